"""Reliability, second round (issue 22): a valid training state is never set aside, every reader
checks what it reads on every path, and everything known before the work is checked before it.
The output guard (item 1) is tested in test_commands, the fuzz tests (item 5) in test_fuzz.

Files are damaged or replaced for real; a state "saved by two ranks" is one whose identity says so
(resealed: its checksums made to match), since what refuses it is that record, not the tensors."""
import contextlib
import hashlib
import json
import math
import os
import signal
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ambient_fast import prepare, restore, sample, train
from ambient_fast.data.format import RECORD, CorruptedDataset, content_digest, write_dataset
from ambient_fast.files.checkpoints import HEADER_DIGEST, header_digest, load_network, save_network
from ambient_fast.memory import machine_bytes
from ambient_fast.objective.seeds import Stream, permutation, stream_key
from ambient_fast.training.config import TrainConfig
from ambient_fast.training.state import CHECKSUMS, IDENTITY, state_dirs
from ambient_fast.training.trainer import Trainer

from test_commands import one_line_error, run, tree_hashes
from test_data import DUST, random_set, rgb_images, write_pngs
from test_sample import small_model

# A tiny network for 8x8 images (two levels) and runs of two steps with a state after each.
NET = ["--channels", "16", "--channel-mult", "1,2", "--blocks", "1", "--attn", ""]
RUN = ["--steps", "2", "--batch", "4", "--snapshot-every", "1", "--sample-count", "2", "--sample-steps", "2", *NET]
CORRUPTION = dict(kind="dust", p=0.5, delta=0.1, shared_channels=True)


@contextlib.contextmanager
def within(seconds):
    """Fail (TimeoutError) instead of hanging when the block takes longer than `seconds`."""
    def expire(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s: the command hangs")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def make_set(path, seed=0, n=16, shape=(3, 8, 8), corruption=DUST, **kwargs):
    observed, masks, labels = random_set(n=n, shape=shape, seed=seed, label_dim=kwargs.pop("label_dim", 0))
    return write_dataset(path, observed, masks, corruption, labels=labels, source="test", **kwargs)


def reseal_state(state: Path):
    """Make a training state's checksums match its files again (as if written so)."""
    names = sorted(p.name for p in state.iterdir() if p.name != CHECKSUMS)
    sums = {name: hashlib.sha256((state / name).read_bytes()).hexdigest() for name in names}
    (state / CHECKSUMS).write_text(json.dumps(sums))


def reseal_set(path: Path):
    """Make a data set's meta.json record its arrays' checksums and its own again."""
    meta = json.loads((path / "meta.json").read_text())
    for name in meta["files"]:
        meta["files"][name]["sha256"] = hashlib.sha256((path / name).read_bytes()).hexdigest()
    meta["content_sha256"] = content_digest(meta)
    (path / "meta.json").write_text(json.dumps(meta))


def state_files(run_dir):
    """Every file of every training state (names and content), damaged ones included."""
    return {k: v for k, v in tree_hashes(run_dir).items() if k.startswith("training-state-")}


# ----------------------------------------------------------------------------------------------
# Item 2: damaged versus incompatible training states.

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A data set and a finished run of two steps on it (training states of steps 1 and 2)."""
    root = tmp_path_factory.mktemp("trained")
    make_set(root / "data")
    assert train.main(["--data", str(root / "data"), "--out", str(root / "run"), *RUN]) == 0
    return root


@pytest.fixture
def resumable(trained, tmp_path):
    """A copy of the trained data set and run (the run's config points at the copy)."""
    import shutil

    shutil.copytree(trained / "data", tmp_path / "data")
    shutil.copytree(trained / "run", tmp_path / "run")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    (tmp_path / "run" / "config.json").write_text(json.dumps({**config, "data": str(tmp_path / "data")}))
    return tmp_path


def refused_and_kept(tmp_path, *words):
    """Resume the run: refused in one line naming `words`, every state kept as it was."""
    run_dir = tmp_path / "run"
    before = state_files(run_dir)
    code, _, err = run(train.main, "--resume", run_dir, "--steps", "3")
    one_line_error(code, err, "does not fit this run", "left as it is", *words)
    assert state_files(run_dir) == before
    assert not list(run_dir.glob("*.damaged-*"))
    return err


def test_a_changed_data_set_is_refused_until_the_original_is_back(resumable):
    import shutil

    shutil.move(resumable / "data", resumable / "original")
    make_set(resumable / "data", seed=1)  # the same count and shape: only its content differs
    refused_and_kept(resumable, "another data set", "put the original data set back", "training-state-000000002")
    shutil.rmtree(resumable / "data")
    shutil.move(resumable / "original", resumable / "data")
    code, out, err = run(train.main, "--resume", resumable / "run", "--steps", "3")
    assert code == 0, err
    assert "from training-state-000000002 at step 2" in out


def test_another_number_of_ranks_is_refused(resumable):
    state = state_dirs(resumable / "run")[-1]
    identity = json.loads((state / IDENTITY).read_text())
    (state / IDENTITY).write_text(json.dumps({**identity, "ranks": 2}))
    reseal_state(state)
    refused_and_kept(resumable, "saved by 2 rank(s)", "torchrun --nproc_per_node=2")


def test_another_network_is_refused(resumable):
    config_path = resumable / "run" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "model_channels": 32}))  # as a newer version's network would
    refused_and_kept(resumable, "its network differs", "the version of ambient-fast that made it")


def test_a_state_that_verifies_but_does_not_load_is_refused_not_set_aside(resumable):
    """A state without an identity (an earlier version's) that does not load into this run."""
    for state in state_dirs(resumable / "run"):
        (state / IDENTITY).unlink()
        reseal_state(state)
    config_path = resumable / "run" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "model_channels": 32}))
    refused_and_kept(resumable, "does not load into this run")


# ----------------------------------------------------------------------------------------------
# Item 3: every reader checks what it reads.

def test_mix_verifies_its_sources(tmp_path):
    make_set(tmp_path / "a")
    make_set(tmp_path / "b", seed=1)
    observed = np.load(tmp_path / "b" / "observed.npy")
    observed[0, 0, 0, 0] ^= 1
    np.save(tmp_path / "b" / "observed.npy", observed)
    one_line_error(*run(prepare.main, "mix", "--dest", tmp_path / "mix", tmp_path / "a", tmp_path / "b")[::2],
                   "failed verification", "observed.npy")
    assert not (tmp_path / "mix").exists()


def sigma_min_files(tmp_path, names):
    """(file, expected words) for every bad --sigma-min file of a source of len(names) images."""
    n = len(names)
    cases = {
        "column.npy": (np.full((n, 1), 0.1, np.float32), f"shape ({n}, 1)"),
        "longer.npy": (np.full(n + 1, 0.1, np.float32), f"shape ({n + 1},)"),
        "shorter.npy": (np.full(n - 1, 0.1, np.float32), f"shape ({n - 1},)"),
        "flags.npy": (np.ones(n, bool), "bool"),
        "text.npy": (np.array(["0.1"] * n), "<U3"),
        "huge.npy": (np.full(n, 1e39, np.float64), "float32's range"),
        "nan.npy": (np.full(n, np.nan, np.float32), "finite"),
    }
    for name, (array, _) in cases.items():
        np.save(tmp_path / name, array)
    mappings = {"strings.json": ({names[0]: "0.5"}, "'0.5'"), "boolean.json": ({names[0]: True}, "True"),
                "list.json": ([0.5] * n, "an object"), "negative.json": ({names[0]: -1}, "-1"),
                "infinite.json": ('{"%s": Infinity}' % names[0], "inf")}
    for name, (mapping, _) in mappings.items():
        (tmp_path / name).write_text(mapping if isinstance(mapping, str) else json.dumps(mapping))
    return {**{k: v[1] for k, v in cases.items()}, **{k: v[1] for k, v in mappings.items()}}


def test_sigma_min_files_are_refused_not_reshaped(tmp_path):
    names = write_pngs(tmp_path / "src", rgb_images(3))
    for name, words in sigma_min_files(tmp_path, names).items():
        for how in (["--p", "0.5"], ["--masks", tmp_path / "masks.npy"]):
            np.save(tmp_path / "masks.npy", np.ones((3, 8, 8), np.uint8))
            code, _, err = run(prepare.main, "--source", tmp_path / "src", "--dest", tmp_path / "set", *how,
                               "--sigma-min", tmp_path / name)
            one_line_error(code, err, "--sigma-min", words)
            assert not (tmp_path / "set").exists()
    # One value per image of the source, also with --max-size: the first ones are used, whole.
    np.save(tmp_path / "levels.npy", np.array([0.25, 0.5, 0.75]))
    assert run(prepare.main, "--source", tmp_path / "src", "--dest", tmp_path / "set", "--p", "0.5", "--max-size", "2",
               "--sigma-min", tmp_path / "levels.npy")[0] == 0
    np.testing.assert_array_equal(CorruptedDataset(tmp_path / "set").records()["sigma_min"], [0.25, 0.5])


@pytest.mark.parametrize("label,words", [(1.7, "1.7"), ("3", "'3'"), (True, "True"), (2 ** 70, str(2 ** 70)),
                                         (-1, "-1"), (None, "None")])
def test_labels_are_checked_whole(tmp_path, label, words):
    names = write_pngs(tmp_path / "src", rgb_images(2))
    (tmp_path / "src" / "dataset.json").write_text(json.dumps({"labels": [[names[0], 0], [names[1], label]]}))
    code, _, err = run(prepare.main, "--source", tmp_path / "src", "--dest", tmp_path / "set", "--p", "0.5")
    one_line_error(code, err, "dataset.json", words)


def test_labels_named_twice_differently_are_refused(tmp_path):
    names = write_pngs(tmp_path / "src", rgb_images(2))
    (tmp_path / "src" / "dataset.json").write_text(json.dumps({"labels": [[names[0], 0], [names[1], 1],
                                                                          [names[0], 2]]}))
    one_line_error(*run(prepare.main, "--source", tmp_path / "src", "--dest", tmp_path / "set", "--p", "0.5")[::2],
                   "labelled twice")


@pytest.mark.parametrize("field,value", [("count", "1e999"), ("count", "16.0"), ("count", "-3"), ("count", '"16"'),
                                         ("count", "true"), ("label_dim", "-1"), ("label_dim", str(2 ** 64)),
                                         ("shape", "[3, 8, 8, 1]"), ("shape", f"[3, {2 ** 70}, {2 ** 70}]"),
                                         ("observed_fraction", "NaN"), ("observed_fraction", "2"),
                                         ("corruption", '{"kind": "dust", "p": 1e999}'),
                                         ("records", '{"clean": -1}'), ("files", "[]")])
def test_meta_json_numbers_are_range_checked(tmp_path, field, value):
    path = make_set(tmp_path / "set")
    meta = (path / "meta.json").read_text()
    data = json.loads(meta)
    data[field] = "@@"
    (path / "meta.json").write_text(json.dumps(data).replace('"@@"', value))
    one_line_error(*run(prepare.main, "verify", path)[::2], "malformed meta.json", field)


def test_verify_checks_labels_before_using_them(tmp_path):
    path = make_set(tmp_path / "set", label_dim=3)
    labels = np.load(path / "labels.npy")
    labels[0] = 7
    np.save(path / "labels.npy", labels)
    reseal_set(path)
    one_line_error(*run(prepare.main, "verify", path)[::2], "labels outside [0, 3)")


def test_special_files_are_refused_not_read(tmp_path):
    """A FIFO wherever a file is read: a one-line error at once, never a hang."""
    names = write_pngs(tmp_path / "src", rgb_images(2))
    fifo = tmp_path / "fifo.npy"
    os.mkfifo(fifo)
    os.mkfifo(tmp_path / "fifo.json")
    data = make_set(tmp_path / "set")
    os.replace(data / "observed.npy", tmp_path / "observed.npy")
    os.mkfifo(data / "observed.npy")
    (tmp_path / "fifo-meta").mkdir()
    os.mkfifo(tmp_path / "fifo-meta" / "meta.json")
    (tmp_path / "fifo-source").mkdir()
    write_pngs(tmp_path / "fifo-source", rgb_images(1), ["a.png"])
    os.mkfifo(tmp_path / "fifo-source" / "b.png")
    source, dest = ["--source", tmp_path / "src"], ["--dest", tmp_path / "out"]
    cases = [
        ([*source, *dest, "--p", "0.5", "--sigma-min", fifo], "FIFO"),
        ([*source, *dest, "--p", "0.5", "--sigma-min", tmp_path / "fifo.json"], "FIFO"),
        ([*source, *dest, "--masks", fifo], "FIFO"),
        (["--source", tmp_path / "fifo-source", *dest, "--p", "0.5"], "FIFO"),
        (["--source", fifo, *dest, "--p", "0.5"], "FIFO"),
        (["verify", data], "FIFO"),
        (["verify", tmp_path / "fifo-meta"], "FIFO"),
        (["mix", *dest, data], "FIFO"),
    ]
    for argv, words in cases:
        with within(20):
            one_line_error(*run(prepare.main, *argv)[::2], words)
    with within(20):
        one_line_error(*run(train.main, "--data", data, "--out", tmp_path / "run", *RUN)[::2], "FIFO")
        net = tmp_path / "net.safetensors"
        save_network(net, small_model(), CORRUPTION)
        one_line_error(*run(restore.main, "--net", net, "--input", tmp_path / "fifo-meta", "--out",
                            tmp_path / "restored")[::2], "not a prepared data set")
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def test_zip_read_errors_are_clear(tmp_path):
    images = rgb_images(3)
    write_pngs(tmp_path / "src", images)
    with zipfile.ZipFile(tmp_path / "good.zip", "w", zipfile.ZIP_STORED) as archive:
        for path in sorted((tmp_path / "src").iterdir()):
            archive.write(path, path.name)
    raw = bytearray((tmp_path / "good.zip").read_bytes())
    # A flipped byte inside the second member's data: its CRC no longer matches.
    start = raw.index(b"img001.png") + len("img001.png") + 60
    raw[start] ^= 0xFF
    (tmp_path / "crc.zip").write_bytes(bytes(raw))
    good = (tmp_path / "good.zip").read_bytes()
    (tmp_path / "cut.zip").write_bytes(good[: len(good) // 2] + good[-22:])  # the directory kept, a member cut
    for name in ("crc.zip", "cut.zip"):
        code, _, err = run(prepare.main, "--source", tmp_path / name, "--dest", tmp_path / "set", "--p", "0.5")
        one_line_error(code, err, name)
        assert not (tmp_path / "set").exists()


def rewrite_header(path: Path, change):
    """Rewrite the metadata of a safetensors file in place: `change(metadata)` edits the dict."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    change(header["__metadata__"])
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size:])


def test_the_checkpoint_header_is_covered_and_checked(tmp_path, capsys):
    net = tmp_path / "net.safetensors"
    save_network(net, small_model(), CORRUPTION)
    assert load_network(net).corruption == CORRUPTION

    def edit(field, value, reseal):
        def change(meta):
            meta[field] = json.dumps({**json.loads(meta[field]), **value})
            if reseal:
                meta[HEADER_DIGEST] = header_digest(meta)
        copy = tmp_path / f"{field}-{reseal}.safetensors"
        copy.write_bytes(net.read_bytes())
        rewrite_header(copy, change)
        return copy

    with pytest.raises(ValueError, match="failed its header checksum"):
        load_network(edit("corruption", {"p": 0.9}, reseal=False))
    with pytest.raises(ValueError, match=r"corruption.p must be a finite number in \[0, 1\]"):
        load_network(edit("corruption", {"p": 5}, reseal=True))
    with pytest.raises(ValueError, match="does not describe the stored weights"):
        load_network(edit("model", {"model_channels": 32}, reseal=True))
    with pytest.raises(ValueError, match="model.num_blocks must be an integer"):
        load_network(edit("model", {"num_blocks": 2 ** 40}, reseal=True))
    older = tmp_path / "older.safetensors"
    older.write_bytes(net.read_bytes())
    rewrite_header(older, lambda meta: meta.pop(HEADER_DIGEST))
    capsys.readouterr()
    assert load_network(older).corruption == CORRUPTION and load_network(older).corruption == CORRUPTION
    assert capsys.readouterr().err.count("before checkpoint headers had a checksum") == 1


def test_training_uses_the_data_sets_delta_unless_given(tmp_path):
    path = make_set(tmp_path / "set", corruption={**DUST, "delta": 0.3})
    for given, delta, source in ((None, 0.3, "the data set's"), (0.2, 0.2, "--delta; the data set records 0.3")):
        cfg = TrainConfig(data=str(path), out=str(tmp_path / f"run-{given}"), delta=given, batch=4, steps=1,
                          model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
        trainer = Trainer(cfg)
        try:
            assert trainer.objective.operator.delta == delta and trainer.training_record()["delta"] == delta
            assert f"delta {delta}: {source}" in trainer.summary()
        finally:
            trainer.close()


# ----------------------------------------------------------------------------------------------
# Item 4: everything known before the work is checked before it.

@pytest.mark.parametrize("options,words", [
    (["--channel-mult", "1,2,2,2"], ["--channel-mult 1,2,2,2 has 4 levels", "12 is not divisible by 8",
                                     "at most 3 level(s)"]),
    (["--attn", "5"], ["--attn 5", "12, 6"]),
    (["--channels", "132"], ["--channels 132", "group normalisation"]),
])
def test_network_shapes_are_checked_before_any_file(tmp_path, options, words):
    path = make_set(tmp_path / "set", shape=(3, 12, 12))
    out = tmp_path / "run"
    argv = ["--data", path, "--out", out, *RUN]
    one_line_error(*run(train.main, *argv, *options)[::2], *words)
    assert not out.exists()
    assert run(train.main, *argv)[0] == 0  # the retry with the options fixed finds nothing in its way


def test_seeds_that_differ_above_32_bits_draw_differently():
    low, high = 5, 5 + 2 ** 32
    for stream in Stream:
        assert stream_key(low, stream) != stream_key(high, stream)
    assert not np.array_equal(permutation(low, 0, 64), permutation(high, 0, 64))
    # The initial weights and dropout seed torch's generator with a stream's key, of which it keeps 32 bits.
    for stream, parts in ((Stream.INIT, ()), (Stream.DROPOUT, (0, 0))):
        assert (stream_key(low, stream, *parts) ^ stream_key(high, stream, *parts)) & 0xFFFFFFFF
    for main, argv in ((sample.main, ["--net", "n.safetensors", "--seeds", f"0,{2 ** 32}"]),
                       (prepare.main, ["--source", "s", "--dest", "d", "--p", "0.5", "--seed", 2 ** 32]),
                       (restore.main, ["--net", "n", "--input", "d", "--seed", 2 ** 32])):
        one_line_error(*run(main, *argv)[::2], "2^32 - 1")


def test_noise_levels_beyond_the_model_are_refused_before_training(tmp_path):
    observed, masks, _ = random_set(n=8, shape=(3, 8, 8))
    records = np.zeros(8, RECORD)
    records["masked"], records["sigma_min"] = 1, 100.0
    write_dataset(tmp_path / "set", observed, masks, DUST, source="test", records=records)
    one_line_error(*run(train.main, "--data", tmp_path / "set", "--out", tmp_path / "run", *RUN)[::2],
                   "8 image(s)", "at or above 80", "--sigma-min")
    assert not (tmp_path / "run").exists()
    # restore: a level the network never saw (1e300 overflowed float32 inside the network before)
    net = tmp_path / "net.safetensors"
    save_network(net, small_model(), CORRUPTION)
    make_set(tmp_path / "data")
    for sigma in (80.5, 1e300):
        one_line_error(*run(restore.main, "--net", net, "--input", tmp_path / "data", "--out", tmp_path / "restored",
                            "--sigma", sigma, "--device", "cpu")[::2], f"--sigma {sigma:g}", "(0, 80]")
    assert not (tmp_path / "restored").exists()


def test_memory_asked_for_is_estimated_first(tmp_path):
    have = machine_bytes()
    seeds = have // 40 + 1  # more seeds than the list of them could hold
    one_line_error(*run(sample.main, "--net", "n.safetensors", "--seeds", f"0-{seeds}")[::2], f"{seeds + 1} seeds",
                   "needs at least", "sample fewer seeds")
    net = tmp_path / "net.safetensors"
    save_network(net, small_model(), CORRUPTION)
    one_line_error(*run(sample.main, "--net", net, "--out", tmp_path / "samples", "--seeds", "0",
                        "--guidance-masks", have // (4 * 3 * 8 * 8) + 1)[::2], "--guidance-masks", "lower --batch")
    write_pngs(tmp_path / "src", rgb_images(2))
    side = math.isqrt(have // (2 * 3 * 11)) + 1
    one_line_error(*run(prepare.main, "--source", tmp_path / "src", "--dest", tmp_path / "set", "--p", "0.5",
                        "--resolution", side)[::2], f"{side}x{side}", "--resolution")
    path = make_set(tmp_path / "data")
    one_line_error(*run(train.main, "--data", path, "--out", tmp_path / "run", *RUN, "--sample-count",
                        have // (40 * 3 * 8 * 8) + 1)[::2], "--sample-count")
    one_line_error(*run(train.main, "--data", path, "--out", tmp_path / "run", *RUN[:-8], "--channels",
                        2 ** 20)[::2], "a step on micro-batches", "smaller network")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "net.safetensors", "src"]


def test_a_mixture_of_masked_sets_trains_to_the_end(tmp_path):
    make_set(tmp_path / "a", corruption={**DUST, "p": 0.3})
    make_set(tmp_path / "b", seed=1)
    assert run(prepare.main, "mix", "--dest", tmp_path / "mix", tmp_path / "a", tmp_path / "b:8")[0] == 0
    code, _, err = run(train.main, "--data", tmp_path / "mix", "--out", tmp_path / "run", *RUN)
    assert code == 0, err
    mix = CorruptedDataset(tmp_path / "mix")
    survival = load_network(tmp_path / "run").survival
    assert survival == pytest.approx(mix.meta.observed_fraction * 0.9)
