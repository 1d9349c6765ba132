"""Fault injection (issue 16): runs, data sets and checkpoints are never lost or silently corrupted,
and every bad input is a clear error. Each numbered group reproduces one finding of the issue.

Faults are real where this machine allows: flipped bytes and truncated files on disk, processes
killed with SIGKILL mid-run and mid-write, two processes on one run directory. A full or read-only
disk is a tiny tmpfs mounted in a user and mount namespace (`unshare`); where the kernel refuses
one, the full disk becomes a per-process file-size limit (RLIMIT_FSIZE: writes fail with EFBIG)
and the read-only cases are skipped, saying why.
"""
import functools
import hashlib
import io
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ambient_fast.files.checkpoints import load_network, save_network
from ambient_fast.files.reference import UnsafePickleError, import_reference
from ambient_fast.convert import main as convert_main
from ambient_fast.data.format import CorruptedDataset, write_dataset
from ambient_fast.prepare import main as prepare_main
from ambient_fast.evaluate import main as evaluate_main
from ambient_fast.restore import main as restore_main
from ambient_fast.sample import main as sample_main
from ambient_fast.data.synthetic import synthetic_dataset
from ambient_fast.training.reporting import StatsLog
from ambient_fast.training.config import EXIT_INTERRUPTED
from ambient_fast.train import main as train_main
from ambient_fast.training.trainer import SYNTHETIC_P, Trainer

from test_checkpoint import RunsShell, reference_model, write_reference_run
from test_data import DUST, random_set, write_pngs
from test_sample import small_model
from test_train import FAST, assert_same_weights, final_weights

CORRUPTION = dict(kind="dust", p=0.5, delta=0.1, shared_channels=True)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """Share one built-in synthetic data set with test_train (same folder)."""
    monkeypatch.setenv("AMBIENT_FAST_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def synthetic(tmp_path_factory):
    """The built-in data set, prepared before a subprocess trains on it (not under its disk limit)."""
    return synthetic_dataset(tmp_path_factory.getbasetemp() / "cache", p=SYNTHETIC_P, delta=0.1)


def run(capsys, main, *argv):
    """(exit code, stdout, stderr) of a command's main()."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def clear_error(code, err, *words):
    """A clear error: status 1, one `error:` line, no traceback, naming `words`."""
    assert code == 1, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for word in words:
        assert str(word) in err, (word, err)


def spawn(module, *argv, log):
    """`python -m module argv` in the background, output to `log`."""
    return subprocess.Popen([sys.executable, "-m", module, *map(str, argv)], stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def wait_for(condition, process, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, "the background run ended early"
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def logged_steps(run_dir):
    """Progress/step of every stats.jsonl line, parsed as strict JSON (no NaN / Infinity)."""
    def refuse(constant):
        raise ValueError(f"stats.jsonl holds {constant}, which is not JSON")

    lines = (run_dir / "stats.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=refuse)["Progress/step"] for line in lines]


def files_of(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def flip_bytes(path, count=2):
    raw = bytearray(path.read_bytes())
    for offset in range(count):
        raw[len(raw) // 2 + 97 * offset] ^= 0x5A
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run of FAST's 4 steps (training states of steps 2 and 4)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert train_main(["--out", str(run_dir), *FAST]) == 0
    return run_dir


@pytest.fixture
def run_dir(finished, tmp_path):
    """A copy of the finished run to damage."""
    return Path(shutil.copytree(finished, tmp_path / "run"))


@pytest.fixture
def network(tmp_path):
    path = tmp_path / "net.safetensors"
    save_network(path, small_model(), CORRUPTION)
    return path


# ----------------------------------------------------------------------------------------------
# A full or read-only disk.

@functools.lru_cache(maxsize=None)
def tmpfs_unavailable():
    """None where a tmpfs can be mounted in a user and mount namespace, else why not."""
    if shutil.which("unshare") is None:
        return "util-linux's unshare is not installed"
    with tempfile.TemporaryDirectory() as where:
        probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "mount", "-t", "tmpfs", "-o",
                                "size=64k", "tmpfs", where], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot mount a tmpfs in a user namespace: {probe.stderr.strip()}"


def on_small_disk(tmp_path, argv, size_kb, read_only=False):
    """Run `argv` with tmp_path/disk on a full or read-only disk of `size_kb` KiB.

    Returns (completed process, relative paths left on the disk, how the disk was made)."""
    disk, listing = tmp_path / "disk", tmp_path / "disk-listing.txt"
    disk.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", DISK=str(disk))
    argv = [str(a) for a in argv]
    if tmpfs_unavailable() is None:
        options = f"size={size_kb}k" + (",ro" if read_only else "")
        script = ('mount -t tmpfs -o "$0" tmpfs "$1" || exit 99; "${@:3}"; code=$?; '
                  '(cd "$1" && find . -mindepth 1 | sort) > "$2"; exit $code')
        result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", script, options,
                                 str(disk), str(listing), *argv], capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode != 99, result.stderr
        left = [line[2:] for line in listing.read_text().splitlines()]
        return result, left, "tmpfs"
    if read_only:
        pytest.skip(f"no read-only disk: {tmpfs_unavailable()}")
    limit = size_kb * 1024
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    left = sorted(str(p.relative_to(disk)) for p in disk.rglob("*"))
    return result, left, "RLIMIT_FSIZE"


# ----------------------------------------------------------------------------------------------
# 1. An existing run under --out.

def test_1_a_finished_run_is_not_overwritten_without_overwrite(run_dir, capsys):
    before = files_of(run_dir)
    code, _, err = run(capsys, train_main, "--out", run_dir, *FAST, "--steps", "2")
    clear_error(code, err, run_dir, f"--resume {run_dir}", "--overwrite")
    assert files_of(run_dir) == before
    code, out, err = run(capsys, train_main, "--resume", run_dir, "--steps", "5")
    assert code == 0, err
    assert "from training-state-000000004 at step 4" in out and logged_steps(run_dir)[-1] == 5


def test_1_overwrite_replaces_only_the_run(run_dir, capsys):
    code, out, err = run(capsys, train_main, "--out", run_dir, *FAST, "--steps", "2", "--snapshot-every", "1",
                         "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in run_dir.glob("training-state-*")) == ["training-state-000000001",
                                                                         "training-state-000000002"]
    assert "training-state-000000002" in out.split("training state:")[-1]
    assert not (run_dir / "network-snapshot-000000002.safetensors").exists()  # the old run's
    assert logged_steps(run_dir) == [1, 2]
    (run_dir / "notes.txt").write_text("mine")
    code, _, err = run(capsys, train_main, "--out", run_dir, *FAST, "--overwrite")
    clear_error(code, err, "notes.txt")
    assert (run_dir / "notes.txt").read_text() == "mine" and logged_steps(run_dir) == [1, 2]


def test_1_the_default_run_twice_says_what_to_do(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run(capsys, train_main, *FAST, "--steps", "1")[0] == 0  # --out is the default, runs/ambient
    code, _, err = run(capsys, train_main, *FAST, "--steps", "1")
    clear_error(code, err, "--resume runs/ambient", "--overwrite")


# ----------------------------------------------------------------------------------------------
# 2. Two trainings on one run directory.

def test_2_a_run_in_use_is_refused(tmp_path, capsys, synthetic):
    run_dir = tmp_path / "run"
    with open(tmp_path / "first.log", "w") as log:
        first = spawn("ambient_fast.train", "--out", run_dir, *FAST, "--steps", "400", "--snapshot-every", "1000",
                      log=log)
        try:
            wait_for(lambda: (run_dir / "stats.jsonl").is_file(), first)
            for argv in (["--out", run_dir, *FAST], ["--resume", run_dir], ["--out", run_dir, *FAST, "--overwrite"]):
                code, _, err = run(capsys, train_main, *argv)
                clear_error(code, err, run_dir, f"process {first.pid}")
            first.send_signal(signal.SIGTERM)
            assert first.wait(timeout=120) == EXIT_INTERRUPTED  # interrupted, not finished
        finally:
            first.kill()
    steps = logged_steps(run_dir)
    assert steps == sorted(set(steps))
    assert "interrupted at step" in (tmp_path / "first.log").read_text()


# ----------------------------------------------------------------------------------------------
# 3. Damaged training states and networks.

@pytest.fixture(scope="module")
def straight_six(tmp_path_factory):
    """Final weights of a run trained 6 steps without interruption."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    assert train_main(["--out", str(run_dir), *FAST, "--steps", "6"]) == 0
    return final_weights(run_dir)


def damage_state(state, how):
    if how == "flipped bytes":
        flip_bytes(state / "__0_0.distcp")
    elif how == "truncated":
        data = state / "__0_0.distcp"
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])
    else:
        (state / ".metadata").unlink()


@pytest.mark.parametrize("how", ["flipped bytes", "truncated", "missing .metadata"])
def test_3_resume_falls_back_to_the_newest_intact_state(run_dir, capsys, straight_six, how):
    damage_state(run_dir / "training-state-000000004", how)
    code, out, err = run(capsys, train_main, "--resume", run_dir, "--steps", "6")
    assert code == 0, err
    assert "training-state-000000004" in out and "refused" in out
    assert "from training-state-000000002 at step 2" in out
    assert_same_weights(final_weights(run_dir), straight_six)
    assert logged_steps(run_dir) == sorted(set(logged_steps(run_dir)))


def test_3_a_hostile_state_index_is_refused_and_runs_nothing(run_dir, capsys, straight_six, tmp_path):
    """DCP's .metadata is a pickle: a state whose index would run code is refused (even with its
    checksums made to match) and resume falls back to the intact older state."""
    state = run_dir / "training-state-000000004"
    marker = tmp_path / "ran"
    (state / ".metadata").write_bytes(pickle.dumps(RunsShell(marker)))
    checksums = json.loads((state / "checksums.json").read_text())
    checksums[".metadata"] = hashlib.sha256((state / ".metadata").read_bytes()).hexdigest()
    (state / "checksums.json").write_text(json.dumps(checksums))
    code, out, err = run(capsys, train_main, "--resume", run_dir, "--steps", "6")
    assert code == 0, err
    assert not marker.exists()
    assert "refused training-state-000000004" in out and "could run code" in out
    assert_same_weights(final_weights(run_dir), straight_six)


def test_3_no_intact_state_is_a_clear_error(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run(capsys, train_main, "--out", run_dir, *FAST, "--steps", "2", "--snapshot-every", "1")[0] == 0
    for state in run_dir.glob("training-state-*"):
        damage_state(state, "flipped bytes")
    code, _, err = run(capsys, train_main, "--resume", run_dir)
    clear_error(code, err, run_dir, "training-state-000000001", "training-state-000000002")


def test_3_a_damaged_network_is_refused(network, tmp_path, capsys):
    flip_bytes(network)
    with pytest.raises(ValueError, match="checksum"):
        load_network(network)
    code, _, err = run(capsys, sample_main, "--net", network, "--out", tmp_path / "samples", "--seeds", "0")
    clear_error(code, err, network)


# ----------------------------------------------------------------------------------------------
# 4. prepare on a full disk.

@pytest.fixture
def png_source(tmp_path):
    """48 RGB images of 32x32: about 150 KB of observed pixels and masks."""
    rng = np.random.default_rng(0)
    write_pngs(tmp_path / "src", list(rng.integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)))
    return tmp_path / "src"


def test_4_prepare_on_a_full_disk_is_a_clear_error_and_leaves_nothing(tmp_path, png_source):
    """prepare on a disk too small for the set: refused by the free-space check; then with that
    check fooled (another process filled the disk after it): the writes fail. Either way one
    clear error and nothing left on the disk."""
    script = tmp_path / "prepare_twice.py"
    script.write_text(f"""
import collections, contextlib, io, json, shutil, sys
from ambient_fast.prepare import main
argv = ["--source", {str(png_source)!r}, "--dest", {str(tmp_path / "disk" / "set")!r}, "--p", "0.5"]
results = []
for fooled in (False, True):
    if fooled:
        usage = collections.namedtuple("usage", "total used free")
        shutil.disk_usage = lambda path: usage(1 << 40, 0, 1 << 40)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        results.append((main(argv), err.getvalue()))
print(json.dumps(results))
""")
    result, left, how = on_small_disk(tmp_path, [sys.executable, script], size_kb=64)
    print(f"disk: {how}")
    assert result.returncode == 0, result.stderr
    (code, err), (fooled_code, fooled_err) = json.loads(result.stdout.splitlines()[-1])
    clear_error(code, err, tmp_path / "disk" / "set", "space" if how == "tmpfs" else "cannot write")
    clear_error(fooled_code, fooled_err, tmp_path / "disk" / "set", "cannot write")
    assert left == []


# ----------------------------------------------------------------------------------------------
# 5. meta.json's own content, and training on an unverified set.

def test_5_verify_recomputes_and_hashes_meta_json(tmp_path, capsys):
    observed, masks, _ = random_set()
    for field, value in (("corruption", dict(DUST, p=0.9)), ("observed_fraction", 0.9), ("count", 23)):
        path = write_dataset(tmp_path / field, observed, masks, DUST, source="test")
        meta = json.loads((path / "meta.json").read_text())
        meta[field] = value
        (path / "meta.json").write_text(json.dumps(meta))
        code, _, err = run(capsys, prepare_main, "verify", path)
        clear_error(code, err, "meta.json")
    # A set without meta.json's content checksum still has its observed fraction recomputed.
    path = tmp_path / "observed_fraction"
    meta = json.loads((path / "meta.json").read_text())
    meta.pop("content_sha256", None)
    (path / "meta.json").write_text(json.dumps(meta))
    code, _, err = run(capsys, prepare_main, "verify", path)
    clear_error(code, err, "observed fraction")


def test_5_train_verifies_the_data_set_once(tmp_path, capsys):
    observed, masks, _ = random_set(n=16, shape=(3, 16, 16))
    edited = write_dataset(tmp_path / "edited", observed, masks, DUST, source="test")
    meta = json.loads((edited / "meta.json").read_text())
    meta["corruption"]["p"] = 0.9
    (edited / "meta.json").write_text(json.dumps(meta))
    code, _, err = run(capsys, train_main, "--data", edited, "--out", tmp_path / "run", *FAST)
    clear_error(code, err, "meta.json", "--no-verify-data")
    damaged = write_dataset(tmp_path / "damaged", observed, masks, DUST, source="test")
    flip_bytes(damaged / "observed.npy", count=1)
    code, _, err = run(capsys, train_main, "--data", damaged, "--out", tmp_path / "run", *FAST)
    clear_error(code, err, "observed.npy: checksum mismatch")
    assert run(capsys, train_main, "--data", damaged, "--out", tmp_path / "run", *FAST, "--steps", "1",
               "--no-verify-data")[0] == 0


# ----------------------------------------------------------------------------------------------
# 6. 16-bit PNGs.

def test_6_sixteen_bit_pngs_are_scaled_not_clipped(tmp_path, capsys):
    values = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    (tmp_path / "src").mkdir()
    for index in range(4):
        Image.fromarray(np.roll(values, index)).save(tmp_path / "src" / f"{index}.png")
    assert Image.open(tmp_path / "src" / "0.png").mode.startswith("I;16")
    code, _, err = run(capsys, prepare_main, "--source", tmp_path / "src", "--dest", tmp_path / "set", "--p", "0.3")
    assert code == 0, err
    observed, mask, _ = CorruptedDataset(tmp_path / "set").get(np.arange(4))
    expected = np.stack([np.round(np.roll(values, i) / 257) for i in range(4)])[:, None].astype(np.uint8)
    np.testing.assert_array_equal(observed[mask], expected[mask])


# ----------------------------------------------------------------------------------------------
# 7. prepare --overwrite onto a data-set folder holding other files.

def test_7_prepare_overwrite_never_deletes_unrelated_files(tmp_path, capsys):
    observed, masks, _ = random_set()
    path = write_dataset(tmp_path / "set", observed, masks, DUST, source="test")
    (path / "notes.txt").write_text("mine")
    before = files_of(path)
    write_pngs(tmp_path / "src", list(np.random.default_rng(1).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)))
    code, _, err = run(capsys, prepare_main, "--source", tmp_path / "src", "--dest", path, "--p", "0.5", "--overwrite")
    clear_error(code, err, "notes.txt")
    assert files_of(path) == before


# ----------------------------------------------------------------------------------------------
# 8. Settings that would ruin a run, and non-finite networks.

@pytest.mark.parametrize("argv,option", [
    (["--lr", "inf"], "--lr"), (["--lr", "nan"], "--lr"), (["--max-grad-norm", "-1"], "--max-grad-norm"),
    (["--ema", "-1"], "--ema"), (["--lr-rampup", "-1"], "--lr-rampup"), (["--delta", "nan"], "--delta"),
    (["--channels", "0"], "--channels"), (["--dropout", "2"], "--dropout"), (["--sample-count", "0"], "--sample-count"),
    (["--blocks", "0"], "--blocks"), (["--channel-mult", "1,0"], "--channel-mult"), (["--seed", "-1"], "--seed"),
])
def test_8_bad_settings_are_refused_before_any_work(tmp_path, capsys, argv, option):
    code, _, err = run(capsys, train_main, "--out", tmp_path / "run", *FAST, *argv)
    clear_error(code, err, option)
    assert not (tmp_path / "run").exists()


def test_8_a_network_with_non_finite_weights_is_never_written(tmp_path):
    model = small_model()
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    path = tmp_path / "net.safetensors"
    with pytest.raises(ValueError, match="non-finite"):
        save_network(path, model, CORRUPTION)
    assert list(tmp_path.iterdir()) == []


def test_8_a_diverged_training_does_not_report_success(tmp_path, capsys, monkeypatch):
    update = Trainer._update_ema

    def poisoned(self, counts):
        update(self, counts)
        if self.step >= 2:
            next(iter(self.ema.values())).fill_(float("inf"))

    monkeypatch.setattr(Trainer, "_update_ema", poisoned)
    run_dir = tmp_path / "run"
    code, out, err = run(capsys, train_main, "--out", run_dir, *FAST)
    clear_error(code, err, "non-finite")
    assert "done" not in out and not (run_dir / "network-final.safetensors").exists()


# ----------------------------------------------------------------------------------------------
# 9. Tracebacks: damaged networks, output paths, a full disk while training, hostile pickles.

@pytest.mark.parametrize("damage", ["truncated", "not safetensors"])
def test_9_a_damaged_net_is_a_clear_error_in_every_command(tmp_path, capsys, network, damage):
    if damage == "truncated":
        network.write_bytes(network.read_bytes()[:1000])
    else:
        network.write_bytes(b"\x00" * 64 + b"not a checkpoint")
    observed, masks, _ = random_set(n=4)
    data = write_dataset(tmp_path / "data", observed, masks, DUST, source="test")
    for main, argv in ((sample_main, ["--net", network, "--out", tmp_path / "samples", "--seeds", "0"]),
                       (convert_main, [network, tmp_path / "converted.safetensors"]),
                       (restore_main, ["--net", network, "--input", data, "--out", tmp_path / "restored"])):
        code, _, err = run(capsys, main, *argv)
        clear_error(code, err, network)


def test_9_output_paths_are_checked_before_the_work(tmp_path, capsys, network, monkeypatch):
    import ambient_fast.evaluation.report
    import ambient_fast.files.checkpoints
    import ambient_fast.sampling.edm2  # noqa: F401
    import ambient_fast.sampling.samplers

    # ambient_fast.sampling.edm2 binds `ambient_sample` when first imported, which the sample command
    # does lazily: imported here first, it keeps the real one, not this test's stand-in (later tests
    # in the same process sampled through `no_work` otherwise).
    def no_work(*args, **kwargs):
        raise AssertionError("the work started before the output path was checked")

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    a_folder = tmp_path / "folder.safetensors"
    a_folder.mkdir()
    images = tmp_path / "images"
    write_pngs(images, list(np.zeros((2, 8, 8, 3), np.uint8)))
    code, _, err = run(capsys, train_main, "--out", a_file, *FAST)
    clear_error(code, err, a_file)
    for main, argv, path, (module, work) in (
            (sample_main, ["--net", network, "--out", a_file], a_file, (ambient_fast.sampling.samplers, "ambient_sample")),
            (convert_main, [network, a_folder], a_folder, (ambient_fast.files.checkpoints, "load_network")),
            (evaluate_main, ["--samples", images, "--reference", images, "--out", a_folder], a_folder,
             (ambient_fast.evaluation.report, "evaluate"))):
        with monkeypatch.context() as patch:
            patch.setattr(module, work, no_work)
            code, _, err = run(capsys, main, *argv)
        clear_error(code, err, path)


def test_9_10_read_only_outputs_are_clear_errors_naming_the_file(tmp_path, network):
    """Every command refuses a read-only --out before working; a refused write names the file,
    not its hidden temporary."""
    images = tmp_path / "images"
    write_pngs(images, list(np.zeros((2, 8, 8, 3), np.uint8)))
    script = tmp_path / "script.py"
    script.write_text(f"""
import contextlib, io, json, os, sys
from ambient_fast.files.checkpoints import load_network, save_network
from ambient_fast import convert, evaluate, sample, train
disk, net = os.environ["DISK"], {str(network)!r}
results = {{}}
for name, main, argv in (
        ("train", train.main, ["--out", disk + "/run", "--steps", "1"]),
        ("sample", sample.main, ["--net", net, "--out", disk + "/samples", "--seeds", "0"]),
        ("convert", convert.main, [net, disk + "/net.safetensors"]),
        ("evaluate", evaluate.main, ["--samples", {str(images)!r}, "--reference", {str(images)!r},
                                     "--out", disk + "/report.json"])):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        results[name] = (main(argv), err.getvalue())
try:
    save_network(disk + "/direct.safetensors", load_network(net).model)
except OSError as error:
    results["save_network"] = (1, "error: " + str(error))
print(json.dumps(results))
""")
    result, _, how = on_small_disk(tmp_path, [sys.executable, script], size_kb=64, read_only=True)
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout.splitlines()[-1])
    assert sorted(results) == ["convert", "evaluate", "sample", "save_network", "train"]
    for name, (code, err) in results.items():
        clear_error(code, err, tmp_path / "disk")
        assert ".tmp" not in err, (name, err)
    assert "direct.safetensors" in results["save_network"][1]


def test_9_a_full_disk_while_training_is_a_clear_error(tmp_path, synthetic):
    command = [sys.executable, "-m", "ambient_fast.train", "--out", tmp_path / "disk" / "run", *FAST]
    result, left, how = on_small_disk(tmp_path, command, size_kb=160)
    print(f"disk: {how}")
    assert "Traceback" not in result.stderr, result.stderr
    clear_error(result.returncode, result.stderr.strip().splitlines()[-1], tmp_path / "disk" / "run", "cannot write")
    assert "done:" not in result.stdout
    assert not [name for name in left if ".tmp" in name], left


def test_9_a_hostile_storage_record_is_refused_without_unsafe_advice(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class HostileStorage:
        """Pickles as torch's tensor-storage record, holding a torch.save of os.system."""

        def __reduce__(self):
            buffer = io.BytesIO()
            torch.save(RunsShell(marker), buffer)
            return (torch.storage._load_from_bytes, (buffer.getvalue(),))

    snapshot = write_reference_run(tmp_path, OrderedDict(reference_model().state_dict()),
                                   extra=dict(weights=HostileStorage()))
    with pytest.raises(UnsafePickleError) as refused:
        import_reference(snapshot)
    assert "system" in str(refused.value) and "weights_only" not in str(refused.value)
    code, _, err = run(capsys, sample_main, "--net", snapshot, "--out", tmp_path / "samples")
    clear_error(code, err, "system")
    assert "weights_only" not in err and not marker.exists()


# ----------------------------------------------------------------------------------------------
# 10. Hygiene.

def test_10_sigkill_then_resume_leaves_no_duplicates_or_temporaries(tmp_path, capsys, network, synthetic):
    run_dir = tmp_path / "run"
    with open(tmp_path / "killed.log", "w") as log:
        killed = spawn("ambient_fast.train", "--out", run_dir, *FAST, "--steps", "100", "--snapshot-every", "10",
                       log=log)
        try:  # logged every 5 steps: killed after the state of step 10, with steps past it logged
            wait_for(lambda: (run_dir / "stats.jsonl").is_file() and logged_steps(run_dir)[-1] >= 15, killed)
        finally:
            killed.kill()
            killed.wait()
    # A writer killed between writing a network and renaming it into place.
    model = load_network(network).model
    writer = os.fork()
    if writer == 0:
        os.replace = lambda *args: os._exit(9)
        save_network(run_dir / "network-snapshot-000000999.safetensors", model, CORRUPTION)
        os._exit(0)
    assert os.waitpid(writer, 0)[1] >> 8 == 9 and [p for p in run_dir.iterdir() if ".tmp-" in p.name]
    newest = max(int(p.name.rsplit("-", 1)[1]) for p in run_dir.glob("training-state-*"))
    code, out, err = run(capsys, train_main, "--resume", run_dir, "--steps", newest + 2)
    assert code == 0, err
    steps = logged_steps(run_dir)
    assert steps == sorted(set(steps)) and steps[-1] == newest + 2
    assert not [p.name for p in run_dir.iterdir() if ".tmp" in p.name]
    assert f"process {killed.pid}" in out  # the killed run's lock, reported and taken over


def test_10_stats_are_strict_json(tmp_path):
    stats = StatsLog(tmp_path / "stats.jsonl", enabled=True)
    huge = torch.tensor(1e308, dtype=torch.float64)  # their mean overflows
    stats.add(huge)
    stats.add(huge)
    stats.flush(**{"Progress/step": 0, "Timing/images_per_sec": float("inf")})
    assert logged_steps(tmp_path) == [0]


def test_10_json_errors_name_the_file(run_dir, tmp_path, capsys):
    (run_dir / "config.json").write_text('{"lr": 0.1,')
    code, _, err = run(capsys, train_main, "--resume", run_dir)
    clear_error(code, err, run_dir / "config.json")
    snapshot = write_reference_run(tmp_path, OrderedDict(reference_model().state_dict()))
    (tmp_path / "training_options.json").write_text("{")
    code, _, err = run(capsys, sample_main, "--net", snapshot, "--out", tmp_path / "samples")
    clear_error(code, err, tmp_path / "training_options.json")


def test_10_write_errors_name_the_file_not_its_temporary(tmp_path, monkeypatch):
    """The rename into place refused, as the OS reports it (naming the temporary)."""
    def refused(source, destination):
        raise PermissionError(13, "Permission denied", str(source))

    model = small_model()
    monkeypatch.setattr(os, "replace", refused)
    path = tmp_path / "net.safetensors"
    with pytest.raises(OSError) as error:
        save_network(path, model, CORRUPTION)
    assert str(path) in str(error.value) and ".tmp" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_10_duplicate_seeds_and_stale_samples(tmp_path, capsys, network):
    samples = tmp_path / "samples"
    code, _, err = run(capsys, sample_main, "--net", network, "--out", samples, "--seeds", "1,1,1")
    clear_error(code, err, "--seeds", "1")
    common = ["--net", network, "--steps", "2", "--device", "cpu"]
    assert run(capsys, sample_main, *common, "--out", samples, "--seeds", "0-3")[0] == 0
    code, _, err = run(capsys, sample_main, *common, "--out", samples, "--seeds", "0-1")
    clear_error(code, err, samples, "--overwrite")
    assert run(capsys, sample_main, *common, "--out", samples, "--seeds", "0-1", "--overwrite")[0] == 0
    assert sorted(p.name for p in samples.glob("0*.png")) == ["000000.png", "000001.png"]
    report = tmp_path / "report.json"
    assert run(capsys, evaluate_main, "--samples", samples, "--reference", samples, "--out", report)[0] == 0
    assert json.loads(report.read_text())["samples"]["count"] == 2
    shutil.copy(samples / "000000.png", samples / "000007.png")  # a stale image from elsewhere
    code, _, err = run(capsys, evaluate_main, "--samples", samples, "--reference", samples)
    clear_error(code, err, "000007.png", "sampling.json")
