"""The trainer: the default run end to end (shortened), exact resumption (one process; two ranks
under torchrun with FSDP2 and DDP in tests/test_cuda_config.py, in CUDA's configuration), SIGTERM,
roll-back on divergence, bad input."""
import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ambient_fast.training.config import TrainConfig
from ambient_fast.data.batches import dali_available
from ambient_fast.data.loader import make_loader
from ambient_fast.train import main
from ambient_fast.training.trainer import Trainer
from ambient_fast.training.state import state_dirs

FAST = ["--steps", "4", "--batch", "8", "--snapshot-every", "2", "--sample-count", "4", "--channels", "16",
        "--channel-mult", "1,2", "--blocks", "1", "--attn", ""]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """Share one built-in synthetic data set between the tests of this module."""
    monkeypatch.setenv("AMBIENT_FAST_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def final_weights(run):
    return load_file(str(run / "network-final.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_default_run_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--out", str(run), *FAST]) == 0
    printed = capsys.readouterr().out
    for name in ("network-final.safetensors", "samples.png", "inputs.png", "overview.png", "stats.jsonl", "config.json"):
        assert (run / name).is_file(), name
        assert name in printed or name in ("samples.png", "inputs.png", "config.json"), name
    assert "kernels:" in printed and "parallel none" in printed
    assert len(state_dirs(run)) <= 2 and state_dirs(run)[-1].name.endswith("000000004")
    assert (run / "network-snapshot-000000002.safetensors").is_file()
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert stats[-1]["Progress/step"] == 4 and stats[-1]["Loss/loss"]["mean"] > 0


def test_resume_is_exact_in_one_process(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["--out", str(straight), *FAST, "--steps", "6"]) == 0
    assert main(["--out", str(resumed), *FAST, "--steps", "3"]) == 0
    assert main(["--resume", str(resumed), "--steps", "6"]) == 0
    assert_same_weights(final_weights(straight), final_weights(resumed))


@pytest.mark.skipif(not dali_available(), reason="nvidia.dali is not importable (pip install -e \".[dali]\")")
def test_resume_is_exact_with_the_dali_loader(tmp_path):
    """DALI's CPU pipeline: a resumed run ends as a straight one, and as one with the torch loader."""
    straight, resumed, torch_run = tmp_path / "straight", tmp_path / "resumed", tmp_path / "torch"
    dali = [*FAST, "--loader", "dali", "--xflip"]
    assert main(["--out", str(straight), *dali, "--steps", "6"]) == 0
    assert main(["--out", str(resumed), *dali, "--steps", "3"]) == 0
    assert main(["--resume", str(resumed), "--steps", "6"]) == 0
    assert main(["--out", str(torch_run), *FAST, "--loader", "torch", "--xflip", "--steps", "6"]) == 0
    assert_same_weights(final_weights(straight), final_weights(resumed))
    assert_same_weights(final_weights(straight), final_weights(torch_run))


def test_kernel_path_resumes_exactly_and_draws_what_the_reference_draws(tmp_path, monkeypatch):
    """Where the fused kernels run (here: Triton's interpreter) a run resumes bitwise, and the ambient
    input the kernel writes from a batch is bit for bit the reference's."""
    pytest.importorskip("triton", reason="Triton is not installed: the fused training path is not tested")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("AMBIENT_FAST_KERNELS", raising=False)
    tiny = dict(batch=2, steps=2, model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[],
                hidden_weight="unit", xflip=True)
    straight = Trainer(TrainConfig(out=str(tmp_path / "straight"), **tiny))
    assert "Triton interpreter" in straight.summary() and "ambient_input" in straight.summary()
    for _ in range(2):
        straight.train_step()
    first = Trainer(TrainConfig(out=str(tmp_path / "resumed"), **tiny))
    first.train_step()
    first.snapshot()
    first.close()  # releases the run directory's lock
    resumed = Trainer(TrainConfig(out=str(tmp_path / "resumed"), **tiny), resume=True)
    resumed.train_step()
    for name, value in straight.params.items():
        assert torch.equal(value, resumed.params[name]), name
    raw = make_loader(straight.dataset, batch_size=2, xflip=True).next()
    fused = straight.objective.inputs(raw)
    monkeypatch.setenv("AMBIENT_FAST_KERNELS", "0")
    for name, value in zip(fused._fields, straight.objective.inputs(raw)):
        assert torch.equal(getattr(fused, name), value), name


def test_resume_refuses_a_changed_configuration(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--out", str(run), *FAST, "--steps", "2"]) == 0
    assert main(["--resume", str(run), "--lr", "0.5"]) == 1
    assert "lr" in capsys.readouterr().err


def test_sigterm_writes_state_and_resume_finishes_exactly(tmp_path):
    """A run stopped by SIGTERM and resumed ends where one run straight through ends. Both sides run in
    fresh processes with one thread count: the count (or an allocator's history) can change a CPU
    kernel's last bits."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    args = [*FAST, "--steps", "40", "--snapshot-every", "1000"]

    def start(out, *extra):
        return subprocess.Popen([sys.executable, "-m", "ambient_fast.train", "--out", str(out), *args, *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    first = start(straight)
    first.communicate(timeout=300)
    assert first.returncode == 0
    process = start(stopped)
    deadline = time.time() + 120
    while not (stopped / "stats.jsonl").is_file() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    if "interrupted at step" not in out:
        pytest.skip("the run finished before the signal arrived")
    assert state_dirs(stopped), "no training state written on SIGTERM"
    resumed = subprocess.run([sys.executable, "-m", "ambient_fast.train", "--resume", str(stopped)], capture_output=True,
                             text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(final_weights(straight), final_weights(stopped))


def test_non_finite_steps_are_skipped_then_rolled_back(tmp_path):
    """Non-finite steps change nothing and are counted on the device; the roll-back they make due
    happens where the run reads the device (`check_health`, the loop's logging interval), and the
    steps between change nothing either."""
    cfg = TrainConfig(out=str(tmp_path / "run"), steps=6, batch=4, snapshot_every=2, model_channels=16,
                      channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], bad_steps=2, max_rollbacks=1,
                      sample_count=4)
    trainer = Trainer(cfg)
    try:
        for _ in range(2):
            trainer.train_step()
        trainer.snapshot()
        good = {k: v.clone() for k, v in trainer.net.state_dict().items()}
        good_ema = {k: v.clone() for k, v in trainer.ema.items()}
        objective = trainer.objective
        trainer.objective = lambda model, raw: objective(model, raw) * float("nan")
        assert math.isnan(trainer.train_step().item())  # skipped
        assert math.isnan(trainer.train_step().item())  # skipped again: a roll-back is due
        trainer.objective = objective
        assert math.isnan(trainer.train_step().item())  # a finite step, void: the roll-back is due
        assert (trainer.step, trainer.skipped, trainer.rollbacks) == (5, 0, 0)  # nothing read yet
        assert all(torch.equal(good[k], v) for k, v in trainer.net.state_dict().items())
        assert all(torch.equal(good_ema[k], v) for k, v in trainer.ema.items())
        trainer.check_health()
        assert trainer.skipped == 2 and trainer.rollbacks == 1 and trainer.lr_factor == 0.5
        assert trainer.step == 2
        assert all(torch.equal(good[k], v) for k, v in trainer.net.state_dict().items())
        trainer.objective = lambda model, raw: objective(model, raw) * float("nan")
        trainer.train_step()
        trainer.train_step()
        with pytest.raises(RuntimeError, match="diverged: 2 consecutive non-finite steps at step 3 and no roll-back"):
            trainer.check_health()
    finally:
        trainer.close()


class HostReads:
    """Every read of a tensor's value by the host (Tensor.item, tolist, bool, float, int, index, cpu,
    numpy: each a wait for the device on CUDA) while active, with the trainer's step at the read; a
    thin wrapper over those methods. Reads by Triton's interpreter (a kernel launch on CUDA) are not
    reads of the trainer; `allowed` names functions whose reads are of CPU tensors on every device."""

    METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")

    def __init__(self, monkeypatch, trainer, allowed=()):
        self.reads, self.trainer, self.allowed = [], trainer, set(allowed)
        for name in self.METHODS:
            monkeypatch.setattr(torch.Tensor, name, self.wrap(name, getattr(torch.Tensor, name)))

    def wrap(self, name, method):
        def read(tensor, *args, **kwargs):
            if not self.excused(sys._getframe(1)):
                caller = sys._getframe(1).f_code
                self.reads.append((self.trainer.step, name, f"{caller.co_filename}:{caller.co_name}"))
            return method(tensor, *args, **kwargs)
        return read

    def excused(self, frame) -> bool:
        while frame is not None:
            if "/triton/" in frame.f_code.co_filename or frame.f_code.co_name in self.allowed:
                return True
            frame = frame.f_back
        return False


def small_trainer(tmp_path, **options) -> Trainer:
    return Trainer(TrainConfig(out=str(tmp_path / "run"), batch=4, batch_gpu=2, model_channels=8, channel_mult=[1, 2],
                               num_blocks=1, attn_resolutions=[], sample_count=4, **options))


def fused_adam(trainer: Trainer) -> None:
    """The trainer's optimizer as CUDA builds it: fused Adam (which takes the skip as found_inf)."""
    trainer.optimizer = torch.optim.Adam(trainer.params.values(), lr=trainer.cfg.recipe("lr"),
                                         betas=trainer.cfg.recipe("betas"), eps=1e-8, fused=True)


@pytest.mark.parametrize("fused,arch", [(False, "ddpmpp"), (True, "ddpmpp"), (True, "edm2")],
                         ids=["adam", "fused-adam", "edm2-fused-adam"])
def test_a_step_never_reads_the_device(tmp_path, monkeypatch, fused, arch):
    """No host read in a training step, skipped or not, with either optimizer (fused: CUDA's). The
    plain Adam reads its step counter, a CPU tensor on every device (`_get_value`), and nothing else.
    EDM2's step (weight normalisation, uncertainty weighting, post-hoc EMA profiles, between their
    snapshots) reads nothing either."""
    trainer = small_trainer(tmp_path, arch=arch, ema_snapshot_kimg=1000.0)
    try:
        if fused:
            fused_adam(trainer)
        trainer.train_step()  # the optimizer's state is made on the first step
        reads = HostReads(monkeypatch, trainer, allowed=() if fused else ("_get_value",))
        trainer.train_step()
        objective = trainer.objective
        trainer.objective = lambda model, raw: objective(model, raw) * float("nan")
        trainer.train_step()
        monkeypatch.undo()
        assert reads.reads == []
        net = copy.deepcopy(trainer.net)
        if arch == "edm2":  # a skipped step still normalises the weights first (as the reference's forward does)
            net.normalize_weights_()
        before = dict(net.named_parameters())
        trainer.train_step()  # skipped: nothing else changes
        assert all(torch.equal(before[name], value) for name, value in trainer.params.items())
        trainer.check_health()
        assert trainer.skipped == 2
    finally:
        trainer.close()


def test_the_loop_reads_the_device_only_at_its_logging_interval(tmp_path, monkeypatch):
    """40 steps log every second step (and snapshot every 8th): every host read of the run happens
    at those steps, none in between; with fused Adam (CUDA's) no read is the optimizer's."""
    trainer = small_trainer(tmp_path, steps=40, snapshot_every=8)
    try:
        fused_adam(trainer)
        reads = HostReads(monkeypatch, trainer)
        assert trainer.train() == 0
    finally:
        trainer.close()
    monkeypatch.undo()
    steps = {step for step, _, _ in reads.reads}
    assert steps and all(step % 2 == 0 for step in steps), sorted(reads.reads)[:5]


# Digests that tests/training_digest.py printed for the code before the step stopped reading the
# device (commit cc87620: a host read of the gradient's finiteness every step, the roll-back at
# once), each in a fresh process at one thread: weights, EMA, optimizer state, counters, stats lines.
RECORDED_DIGESTS = {
    "late-faults": {"params": "e1c273a699f9bdb7", "ema": "89686cc9fd93060e", "optimizer": "181447ea1f25c1e7",
                    "counters": [40, 160, 4, 1, 0.5], "stats": "11f0af97c415d487"},
    "records": {"params": "216342e5bd06388a", "ema": "5b22ea7348d7af08", "optimizer": "9367ae685541dc70",
                "counters": [12, 48, 0, 0, 1.0], "stats": "af6b2fad387b6325"},
}
RECORDED_WITH = ("2.13.0+cpu", "AVX512")  # torch and the CPU's vector instructions: both can move last bits


@pytest.mark.skipif((torch.__version__, torch.backends.cpu.get_cpu_capability()) != RECORDED_WITH,
                    reason=f"the digests were recorded with torch {RECORDED_WITH[0]} on an {RECORDED_WITH[1]} CPU; "
                           "another build or vector unit may round differently")
@pytest.mark.parametrize("case", sorted(RECORDED_DIGESTS))
def test_training_is_bitwise_the_recorded_run(tmp_path, case):
    """The run ends bit for bit where the code that read the device every step ended: late-faults
    injects non-finite steps (one skipped, two in a row that roll back, seen by the loop a step late,
    one more after), records trains on masked and noisy images (Tweedie targets, weights). 14 s and 8 s
    on 2 cores: the proof that the device-side step, roll-back and objective changed no bit."""
    script = Path(__file__).with_name("training_digest.py")
    result = subprocess.run([sys.executable, str(script), case, str(tmp_path)], capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == RECORDED_DIGESTS[case]


@pytest.mark.parametrize("argv,message", [
    (["--data", "/nonexistent/data"], "nonexistent"),
    (["--delta", "1.5"], "--delta"),
    (["--batch", "6", "--batch-gpu", "4"], "--batch-gpu"),
    (["--resume", "/nonexistent/run"], "config.json"),
])
def test_bad_input_errors(argv, message, capsys, tmp_path):
    out = [] if "--resume" in argv else ["--out", str(tmp_path / "run")]  # --resume trains in its own folder
    assert main([*out, *argv]) == 1
    assert message in capsys.readouterr().err


def test_training_does_not_depend_on_pixels_outside_A(tmp_path):
    """The same images prepared with different values in the erased pixels train identically."""
    from ambient_fast.prepare import main as prepare
    from ambient_fast.files.images import save_png

    rng = np.random.default_rng(0)
    masks = rng.random((24, 16, 16)) < 0.4
    np.save(tmp_path / "masks.npy", masks)
    base = rng.integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)
    for name in "ab":
        source = tmp_path / f"src-{name}"
        source.mkdir()
        images = np.where(masks[..., None], base, rng.integers(0, 256, base.shape, dtype=np.uint8))
        for index, image in enumerate(images):
            save_png(image, source / f"{index:03d}.png")
        assert prepare(["--source", str(source), "--masks", str(tmp_path / "masks.npy"),
                        "--dest", str(tmp_path / f"data-{name}")]) == 0
        assert main(["--data", str(tmp_path / f"data-{name}"), "--out", str(tmp_path / f"run-{name}"), *FAST,
                     "--steps", "3"]) == 0
    assert_same_weights(final_weights(tmp_path / "run-a"), final_weights(tmp_path / "run-b"))


@pytest.mark.parametrize("kind,p", [("box", 0.25), ("fixed_box", 0.25)])
def test_box_data_sets_train_with_a_second_box(tmp_path, kind, p):
    """The trainer's further corruption is the data set's own operator: on box and fixed_box sets,
    A_hat is A with one more square erased (dust sets: a coin per value); a --further that breaks
    Theorem 4.1's condition is refused."""
    from ambient_fast.objective.corruption import OPERATORS
    from ambient_fast.prepare import main as prepare
    from ambient_fast.files.images import save_png

    source = tmp_path / "src"
    source.mkdir()
    for index, image in enumerate(np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)):
        save_png(image, source / f"{index:03d}.png")
    data = tmp_path / "data"
    assert prepare(["--source", str(source), "--dest", str(data), "--corruption", kind, "--p", str(p)]) == 0
    trainer = Trainer(TrainConfig(data=str(data), out=str(tmp_path / "run"), batch=8, model_channels=8,
                                  channel_mult=[1], num_blocks=1, attn_resolutions=[], delta=0.25))
    try:
        assert type(trainer.objective.operator) is OPERATORS[kind] and f"B of {OPERATORS[kind].__name__}" in trainer.summary()
        batch = trainer.objective.inputs(trainer.loader.next())
        assert torch.equal(batch.A_hat[:, :1].expand_as(batch.A_hat), batch.A_hat)  # one box for every channel
        extra = (batch.A - batch.A_hat)[:, 0]  # erased by B: a 4x4 square (box: cut by the border or by A's)
        for n in range(8):
            rows, cols = extra[n].nonzero(as_tuple=True)
            assert len(rows) == 16 if kind == "fixed_box" else len(rows) <= 16
            if len(rows):
                assert rows.max() - rows.min() < 4 and cols.max() - cols.min() < 4
        assert extra.sum() > 0
        trainer.train_step()
    finally:
        trainer.close()
    assert main(["--data", str(data), "--out", str(tmp_path / "dust-B"), "--further", "dust", *FAST]) == 1
