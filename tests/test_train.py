"""The trainer: the default run end to end (shortened), exact resumption (one process; two ranks
under torchrun with FSDP2 and DDP in tests/test_cuda_config.py, in CUDA's configuration), SIGTERM,
roll-back on divergence, bad input."""
import contextlib
import copy
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ambient_fast.data.format import write_dataset
from ambient_fast.data.synthetic import clean_twin
from ambient_fast.evaluation.metrics import frechet_distance, pixel_features
from ambient_fast.files.images import load_png
from ambient_fast.training.config import EXIT_INTERRUPTED, TrainConfig
from ambient_fast.data.batches import dali_available
from ambient_fast.data.loader import make_loader
from ambient_fast.train import main
from ambient_fast.training.trainer import Trainer
from ambient_fast.training.state import state_dirs

FAST = ["--steps", "4", "--batch", "8", "--snapshot-every", "2", "--sample-count", "4", "--sample-steps", "2",
        "--channels", "16", "--channel-mult", "1,2", "--blocks", "1", "--attn", ""]


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


def run_main(*argv):
    """(exit status, stdout, stderr) of the train command's main() in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The default run, shortened: (its folder, what it printed)."""
    run = tmp_path_factory.mktemp("default") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AMBIENT_FAST_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        code, printed, err = run_main("--out", run, *FAST)
    assert code == 0, err
    return run, printed


def test_default_run_end_to_end(default_run, tmp_path):
    run, printed = default_run
    for name in ("network-final.safetensors", "samples.png", "inputs.png", "overview.png", "stats.jsonl", "config.json",
                 "log.txt"):
        assert (run / name).is_file(), name
        assert name in printed or name == "config.json", name
    assert len(state_dirs(run)) <= 2 and state_dirs(run)[-1].name.endswith("000000004")
    assert (run / "network-snapshot-000000002.safetensors").is_file()
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert stats[-1]["Progress/step"] == 4
    # The logged losses are the steps' own: a trainer of the run's configuration, stepped here, computes them.
    trainer = Trainer(TrainConfig(**{**json.loads((run / "config.json").read_text()), "out": str(tmp_path / "again")}))
    try:
        losses = [trainer.train_step().item() for _ in range(4)]
    finally:
        trainer.close()
    logged = [(line["Progress/step"], line["Loss/loss"]) for line in stats if "Loss/loss" in line]
    assert logged[-1][0] == 4
    for (previous, _), (step, loss) in zip([(0, None)] + logged, logged):
        window = losses[previous:step]  # the steps since the previous line
        assert loss["num"] == len(window) and loss["mean"] == pytest.approx(np.mean(window), rel=1e-6)
        assert loss["std"] == pytest.approx(np.std(window, ddof=1) if len(window) > 1 else 0.0, rel=1e-5)
    # The summary: a short labelled table first, the full detail in log.txt alone.
    labels = [line.split()[0] for line in printed.splitlines()[:9]]
    assert labels == ["data", "corruption", "model", "training", "parallelism", "precision", "settings", "kernels",
                      "run"], printed[:2000]
    assert "parallel none" in printed and "(the built-in synthetic set)" in printed
    log = (run / "log.txt").read_text()
    assert log.startswith("--- ") and "detail: " in log and "kernels:" in log and "detail: " not in printed
    assert [line for line in printed.splitlines() if line not in log.splitlines()] == []  # all it showed
    # Progress, then the pictures, PSNR and the next commands with the run's own paths.
    assert "training: 4/4 steps (100%)" in printed and "sampling: 4/4 images (100%)" in printed
    assert "held-out images restored in one step" in printed and "dB PSNR" in printed
    data = synthetic_path(printed)
    assert f"python -m ambient_fast.sample --net {run / 'network-final.safetensors'} --out samples" in printed
    assert f"python -m ambient_fast.restore --net {run / 'network-final.safetensors'} --input {data}" in printed
    assert f"python -m ambient_fast.evaluate --samples samples --reference {data}" in printed


def synthetic_path(printed: str) -> str:
    """The data set's path, from the summary's data row."""
    return next(line.split()[1] for line in printed.splitlines() if line.startswith("data "))


def test_overview_shows_inputs_samples_clean_and_restorations(default_run):
    """overview.png: labelled panels of the images themselves, upscaled (nearest) to tiles a person can
    see: the samples of samples.png among them, the held-out restorations below."""
    run, _ = default_run
    overview, samples = load_png(run / "overview.png"), load_png(run / "samples.png")
    tile = samples[1:17, 1:17]  # samples.png's first image (16x16, a pixel of padding around)
    big = np.repeat(np.repeat(tile, 4, axis=0), 4, axis=1)
    corners = np.argwhere((overview[:-63, :-63] == big[0, 0]).all(axis=-1))
    found = [(r, c) for r, c in corners if np.array_equal(overview[r:r + 64, c:c + 64], big)]
    assert found, "the first sample, upscaled 4x, is not in overview.png"
    top, left = found[0]
    assert (overview[:top, left:left + 64] < 128).any(), "no label above the samples panel"
    assert overview.shape[0] > 2 * (64 + 20)  # a second row of panels: the restorations


def test_the_final_samples_are_the_sample_commands_at_the_runs_sample_steps(default_run, tmp_path):
    """samples.png holds, seed by seed, what `sample` draws from the final network with --steps at the
    run's --sample-steps (2: FAST), each image a function of its seed alone; and not what 18 steps
    draw, so the option reached the sampler."""
    from ambient_fast.sample import main as sample_main

    run, _ = default_run
    net = str(run / "network-final.safetensors")
    for steps in (2, 18):
        assert sample_main(["--net", net, "--seeds", "0-3", "--steps", str(steps), "--out",
                            str(tmp_path / str(steps))]) == 0
    final = load_png(run / "samples.png")  # 4 images of 16x16 in a 2x2 grid, a pixel between them
    tiles = [final[1 + 17 * (i // 2):17 + 17 * (i // 2), 1 + 17 * (i % 2):17 + 17 * (i % 2)] for i in range(4)]
    for seed, tile in enumerate(tiles):
        drawn = {steps: load_png(tmp_path / str(steps) / f"{seed:06d}.png").astype(int) for steps in (2, 18)}
        assert np.abs(tile.astype(int) - drawn[2]).max() <= 1
        assert np.abs(tile.astype(int) - drawn[18]).mean() > 5


def test_resuming_a_finished_run_does_nothing_unless_steps_grow(default_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(default_run[0], run)
    before = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in run.rglob("*")
              if path.is_file() and path.name not in ("log.txt", ".lock")}
    code, printed, err = run_main("--resume", run)
    assert code == 0, err
    assert "is finished (step 4 of --steps 4): nothing to do" in printed and "--steps 8" in printed
    assert "sampling" not in printed and "training:" not in printed
    after = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in run.rglob("*")
             if path.is_file() and path.name not in ("log.txt", ".lock")}
    assert after == before  # no file written, none rewritten
    assert (run / "log.txt").read_text().count("\n--- ") == 1  # the second session, appended
    # A larger --steps trains a finished run further: test_resume_is_exact_in_one_process.


def eval_grid_images(path, count: int, size: int = 16) -> np.ndarray:
    """The images of an --eval-every grid (files.images.grid: a pixel of padding, near-square), uint8 (N, C, H, W)."""
    picture, columns = load_png(path), math.ceil(math.sqrt(count))
    tiles = [picture[1 + r * (size + 1): 1 + r * (size + 1) + size, 1 + c * (size + 1): 1 + c * (size + 1) + size]
             for r, c in (divmod(i, columns) for i in range(count))]
    return np.stack(tiles).transpose(0, 3, 1, 2)


def test_tensorboard_and_evaluations_during_training(default_run, tmp_path):
    """--log tensorboard --eval-every 2: stats.jsonl records the Fréchet distance of each grid's samples
    against the held-out clean images; TensorBoard's own reader finds every scalar of stats.jsonl
    with its values and the sample grids; and the training is bit for bit the default run's."""
    pytest.importorskip("tensorboard", reason="the [tensorboard] extra is not installed: pip install tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    code, printed, err = run_main("--out", run, *FAST, "--log", "tensorboard", "--eval-every", "2", "--eval-samples", "2",
                                   "--sample-count", "2", "--sample-steps", "2")
    assert code == 0, err
    assert_same_weights(final_weights(default_run[0]), final_weights(run))
    assert "evaluation   every 2 steps: 2 samples" in printed and "Fréchet distance" in printed
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    evaluated = {line["Progress/step"]: line for line in stats if "Eval/frechet_distance" in line}
    assert sorted(evaluated) == [2, 4]
    held_out = np.load(clean_twin(Path(synthetic_path(printed))) / "held_out.npy")
    for step, line in evaluated.items():
        samples = eval_grid_images(run / f"eval-{step:09d}.png", 2)
        assert line["Eval/frechet_distance"] == frechet_distance(pixel_features(samples), pixel_features(held_out))
        assert line["Eval/samples"] == 2 and line["Eval/reference_floor"] > 0

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = {name for line in stats for name in line if name != "timestamp"}
    assert scalars <= set(events.Tags()["scalars"])
    for name in scalars:
        expected = {line["Progress/step"]: line[name]["mean"] if isinstance(line[name], dict) else line[name]
                    for line in stats if name in line}
        assert {event.step: event.value for event in events.Scalars(name)} == pytest.approx(expected, rel=1e-6), name
    images = {tag: events.Images(tag) for tag in ("Eval/samples", "Samples/overview")}
    assert [event.step for event in images["Eval/samples"]] == [2, 4] and images["Samples/overview"][-1].step == 4
    overview = load_png(run / "overview.png")
    assert (images["Samples/overview"][-1].height, images["Samples/overview"][-1].width) == overview.shape[:2]


def test_evaluation_needs_clean_references_for_other_data(tmp_path):
    data = tmp_path / "data"
    images = np.random.default_rng(0).integers(0, 256, (8, 3, 16, 16), dtype=np.uint8)
    write_dataset(data, images, np.ones(images.shape, bool), dict(kind="dust", p=0.5, delta=0.1, shared_channels=True))
    code, _, err = run_main("--data", data, "--out", tmp_path / "run", *FAST, "--eval-every", "2")
    assert code == 1 and err.startswith("error: --eval-reference") and "clean images" in err, err
    assert not (tmp_path / "run" / "stats.jsonl").exists()  # refused before any step


def test_resume_is_exact_in_one_process(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["--out", str(straight), *FAST, "--steps", "6"]) == 0
    assert main(["--out", str(resumed), *FAST, "--steps", "3"]) == 0
    assert main(["--resume", str(resumed), "--steps", "6"]) == 0  # a finished run, trained further
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


# The stopped run of the SIGTERM test: the train command whose process signals itself at the end of a
# given step (argv[1]), so that the signal arrives at a known step however fast the machine is.
SIGNAL_AT_STEP = """
import os, signal, sys
from ambient_fast.train import main
from ambient_fast.training.trainer import Trainer

at, step = int(sys.argv[1]), Trainer.train_step

def step_then_signal(self):
    loss = step(self)
    if self.step == at:
        os.kill(os.getpid(), signal.SIGTERM)
    return loss

Trainer.train_step = step_then_signal
sys.exit(main(sys.argv[2:]))
"""


def test_sigterm_writes_state_and_resume_finishes_exactly(tmp_path):
    """A run stopped by SIGTERM at step 3 (sent by its own process, so never too late) exits with
    EXIT_INTERRUPTED, and resumed ends where one run straight through ends. Both sides run in fresh
    processes with one thread count: the count (or an allocator's history) can change a CPU kernel's
    last bits."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    args = [*FAST, "--steps", "8", "--snapshot-every", "1000"]

    def run(*command):
        return subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env, timeout=300)

    first = run("-m", "ambient_fast.train", "--out", str(straight), *args)
    assert first.returncode == 0, first.stderr[-3000:]
    interrupted = run("-c", SIGNAL_AT_STEP, "3", "--out", str(stopped), *args)
    assert interrupted.returncode == EXIT_INTERRUPTED, interrupted.stderr[-3000:]  # not 0 (finished) nor 1 (error)
    assert "interrupted at step 3: state saved" in interrupted.stdout
    assert [state.name for state in state_dirs(stopped)] == ["training-state-000000003"]
    assert not (stopped / "network-final.safetensors").exists()
    resumed = run("-m", "ambient_fast.train", "--resume", str(stopped))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(final_weights(straight), final_weights(stopped))
    log = (stopped / "log.txt").read_text()  # both sessions, the second appended
    assert log.count("--- ") == 2 and log.index("interrupted at step 3") < log.index("done: 8 steps")


def test_non_finite_steps_are_skipped_then_rolled_back(tmp_path):
    """Non-finite steps change nothing and are counted on the device; the roll-back they make due
    happens where the run reads the device (`check_health`, the loop's logging interval), and the
    steps between change nothing either."""
    cfg = TrainConfig(out=str(tmp_path / "run"), steps=6, batch=4, snapshot_every=2, model_channels=16,
                      channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], bad_steps=2, max_rollbacks=1,
                      sample_count=4, sample_steps=2)
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
                               num_blocks=1, attn_resolutions=[], sample_count=4, sample_steps=2, **options))


def fused_adam(trainer: Trainer) -> None:
    """The trainer's optimizer as CUDA builds it: fused Adam (which takes the skip as found_inf)."""
    trainer.optimizer = torch.optim.Adam(trainer.params.values(), lr=trainer.cfg.recipe("lr"),
                                         betas=trainer.cfg.recipe("betas"), eps=1e-8, fused=True)


@pytest.mark.parametrize("fused,arch", [(False, "ddpmpp"), (True, "ddpmpp"), (True, "edm2")],
                         ids=["adam", "fused-adam", "edm2-fused-adam"])
def test_a_step_never_reads_the_device(tmp_path, monkeypatch, fused, arch):
    """No host read in a training step, skipped or not, with CUDA's fused Adam. The plain Adam, the
    CPU's, reads host memory only: its step counter (`_get_value`) and the step's flag (`_gate`).
    EDM2's step (weight normalisation, uncertainty weighting, post-hoc EMA profiles, between their
    snapshots) reads nothing either."""
    trainer = small_trainer(tmp_path, arch=arch, ema_snapshot_kimg=1000.0)
    try:
        if fused:
            fused_adam(trainer)
        trainer.train_step()  # the optimizer's state is made on the first step
        reads = HostReads(monkeypatch, trainer, allowed=() if fused else ("_get_value", "_gate"))
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
# Per vector unit of the CPU (torch's CPU capability), and within one, per machine seen: two CPUs of
# the same vector unit can still round differently (their BLAS and oneDNN pick kernels by vendor and
# cache, not by vector unit alone). Each record was printed by cc87620's code on its machine, where
# main printed the same: AVX512 on the first machine that ran this test and, on 2026-12-04, on an AMD
# EPYC with AVX-512 and AVX512-BF16; AVX2 on an AMD EPYC with AVX2 only.
RECORDED_TORCH = "2.13.0+cpu"
RECORDED_DIGESTS = {
    "AVX512": [
        {"late-faults": {"params": "e1c273a699f9bdb7", "ema": "89686cc9fd93060e", "optimizer": "181447ea1f25c1e7",
                         "counters": [40, 160, 4, 1, 0.5], "stats": "11f0af97c415d487"},
         "records": {"params": "216342e5bd06388a", "ema": "5b22ea7348d7af08", "optimizer": "9367ae685541dc70",
                     "counters": [12, 48, 0, 0, 1.0], "stats": "af6b2fad387b6325"}},
        {"late-faults": {"params": "3fc00f65ac9a3d3d", "ema": "8862a3d55d5a475b", "optimizer": "49075cf1fb8baf05",
                         "counters": [40, 160, 4, 1, 0.5], "stats": "915495d657d4cfd0"},
         "records": {"params": "757988419e1806bb", "ema": "4e0b699874fa29ee", "optimizer": "94a7b6a0e9080620",
                     "counters": [12, 48, 0, 0, 1.0], "stats": "af6b2fad387b6325"}},
    ],
    "AVX2": [
        {"late-faults": {"params": "37d90e833b7e8a9e", "ema": "aab9ceaaa1926d0b", "optimizer": "27055c00445f95c8",
                         "counters": [40, 160, 4, 1, 0.5], "stats": "915495d657d4cfd0"},
         "records": {"params": "a3f323067226fcbb", "ema": "38e09f96b7f7dcea", "optimizer": "b1894e546c3515fb",
                     "counters": [12, 48, 0, 0, 1.0], "stats": "af6b2fad387b6325"}},
    ],
}
CAPABILITY = torch.backends.cpu.get_cpu_capability()


@pytest.mark.skipif(torch.__version__ != RECORDED_TORCH or CAPABILITY not in RECORDED_DIGESTS,
                    reason=f"the digests were recorded with torch {RECORDED_TORCH} on {' and '.join(RECORDED_DIGESTS)} "
                           f"CPUs (this: torch {torch.__version__}, {CAPABILITY}); another build or vector unit may "
                           "round differently")
@pytest.mark.parametrize("case", ["late-faults", "records"])
def test_training_is_bitwise_the_recorded_run(tmp_path, case):
    """The run ends bit for bit where the code that read the device every step ended: late-faults
    injects non-finite steps (one skipped, two in a row that roll back, seen by the loop a step late,
    one more after), records trains on masked and noisy images (Tweedie targets, weights). 14 s and 8 s
    on 2 cores: the proof that the device-side step, roll-back and objective changed no bit."""
    script = Path(__file__).with_name("training_digest.py")
    result = subprocess.run([sys.executable, str(script), case, str(tmp_path)], capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    digest = json.loads(result.stdout.splitlines()[-1])
    recorded = [machine[case] for machine in RECORDED_DIGESTS[CAPABILITY]]
    assert digest in recorded, (f"{case} printed {digest}, none of the {len(recorded)} digest(s) recorded on "
                                f"{CAPABILITY} CPUs: if cc87620's code prints the same here, this machine rounds "
                                "apart; record it")


@pytest.mark.parametrize("argv,message", [
    (["--data", "/nonexistent/data"], "nonexistent"),
    (["--delta", "1.5"], "--delta"),
    (["--batch", "6", "--batch-gpu", "4"], "--batch-gpu"),
    (["--resume", "/nonexistent/run"], "config.json"),
    (["--eval-reference", "clean/"], "--eval-every"),
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


def test_wandb_tracker_offline_resumes_its_run(tmp_path, monkeypatch):
    """--log wandb (extra [wandb]; offline here: nothing leaves the machine): the run's W&B files land in
    the run folder, and a resumed run continues the same W&B run."""
    pytest.importorskip("wandb", reason="the [wandb] extra is not installed: pip install wandb")
    from ambient_fast.training.tracking import WANDB_ID, open_tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    ids = []
    for start in (0, 2):
        tracker = open_tracker("wandb", tmp_path, {"steps": 4}, start)
        tracker.log({"Loss/loss": {"mean": 1.5, "std": 0.1, "num": 2}, "Progress/step": start + 2, "timestamp": 0.0},
                    step=start + 2)
        tracker.image("Samples/overview", np.zeros((8, 8, 3), np.uint8), start + 2)
        ids.append(tracker.run.id)
        tracker.close()
    assert ids[0] == ids[1] == (tmp_path / WANDB_ID).read_text().strip()
    assert any(path.name.endswith(f"-{ids[0]}") for path in (tmp_path / "wandb").iterdir())
