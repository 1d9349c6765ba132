"""Training throughput against the reference settings and the authors' code: `python bench/train.py`.

The configurations (--configs, comma-separated; default all four):
  32              the CIFAR-10 configuration: DDPM++, gated, 32x32, channel_mult [2,2,2], batch 128;
  64              the 64x64 one: DDPM++, gated, channel_mult [1,2,2,2], batch 64;
  edm2-64         EDM2-S (`--arch edm2 --preset edm2-s`, EDM2's ImageNet-64 size) on 64x64 RGB images with
                  dust masks, the same kind of set as the DDPM++ rows, EDM2's pixel noise levels, batch 64;
  edm2-latent-64  EDM2-S on a 64x64x4 latent-shaped set: float16 values, full masks, each image inside
                  its noise-level window (as `prepare latents` and `prepare crops` make them; no
                  autoencoder is needed: training reads only the values), EDM2's latent levels, batch 64.
At the batch per GPU given (--batch, or the configuration's), one run times the full training step
(batch, loss, backward, clipping, Adam, EMA; for EDM2 also its forced weight normalisation and the
post-hoc EMA profiles) of

  (a) reference settings: our trainer as the reference ran: fp32, TF32 off, eager, NCHW, the fused
      kernels off (AMBIENT_FAST_KERNELS=0), each image's masks made on the host with numpy, one image at a
      time as the reference's Dataset does, and the batch then copied to the device (the rest is our
      trainer as it is: its Adam is fused on CUDA);
  (b) fast path: our trainer's defaults on the device: on CUDA bf16 autocast, torch.compile per U-Net
      block, channels_last, the fused Triton kernels, the stored bytes moved to the device and turned
      into the network input there in one pass (on a CPU, its CPU defaults);
  (c) the authors' code, with --reference-repo PATH (a checkout of giannisdaras/ambient-diffusion):
      its `training.networks.EDMPrecond` and `training.loss.AmbientLoss`, imported from that
      checkout, in the step of its training loop (fp32, TF32 off, the network compiled on CUDA as
      its loop does, NaN guard, clipping, Adam, EMA), on the same batches as (a). Nothing of it is
      copied here; the benchmark runs without it. It has no EDM2 network: the EDM2 tables say so
      in a (c) row of their own, with nothing timed.
For EDM2, (a) is our trainer with its EDM2 objective in the reference settings; on the latent set it
keeps our loader, since the reference's host-side masks have nothing to act on there (no masks).

Timing: the first step alone (compilation, cuDNN's autotuning and the allocator's growth happen
there), the rest of --warmup untimed, then --windows timing windows of --steps steps each. Per row:
images/s (the median window) and the spread of the windows ((max - min) / median), seconds per step,
the first step, model FLOP/s (FLOPs per image of forward + backward, counted with
torch.utils.flop_counter on the same configuration, times images/s) and its share of the bf16 matmul
peak measured in the same run, peak device memory allocated / reserved, the speed-up over (a) with
both sides. For (b), its compile time (first step - median step) and the graphs Dynamo compiled
(none may be compiled while timing); then, on one step of (b), where the time goes (a torch.profiler
table grouped by kernel name: bench/_profile.py documents the groups) and the host syncs of one step
and of one sampler call (the fast sampler as `python -m ambient_fast.sample` runs it, on the same
architecture), counted with torch.cuda.set_sync_debug_mode (CUDA only).

Batch scaling (--scaling, default 128,256,512): (b) at 32x32 (DDPM++) at each batch, its images/s,
spread and peak memory, the speed-up over the first batch with both sides.

The tables are printed and written as markdown to bench/results/train-<device>-<date>.md (or --results
DIR; train-edm2-<device>-<date>.md for a run of EDM2 configurations only, so that it does not replace
the day's DDPM++ record; train-scaling-<device>-<date>.md for a run of the scaling alone, --configs
none), after each section, so that a run cut short keeps what it measured.

Targets (DESIGN.md, one H100): (b) at least 8x (a) at 32x32, and at least 40% of the bf16 peak; no host
sync in a steady-state step. On a CPU the figures cannot judge them; `--quick` runs small models there
to check that it all works, `--tiny` the smallest (bash bench/gpu_check.sh --cpu-rehearsal).
"""
import argparse
import contextlib
import copy
import gc
import importlib
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import _harness as harness  # noqa: E402
import _profile as profile  # noqa: E402
from aot import latent_shaped_set  # noqa: E402
from ambient_fast import kernels  # noqa: E402
from ambient_fast.data.format import CorruptedDataset, write_dataset  # noqa: E402
from ambient_fast.data.batches import Loader  # noqa: E402
from ambient_fast.objective.edm2 import edm2_loss  # noqa: E402
from ambient_fast.objective.objective import NoiseSchedule, ambient_loss, training_batch  # noqa: E402
from ambient_fast.networks import build_model  # noqa: E402
from ambient_fast.sampling.samplers import ambient_sample, seeded_inputs  # noqa: E402
from ambient_fast.training.config import ARCHS, EDM2, PRESETS, TrainConfig, preset_for  # noqa: E402
from ambient_fast.training.trainer import Trainer  # noqa: E402


class Config(NamedTuple):
    """A configuration of --configs (module docstring)."""

    title: str
    resolution: int
    arch: str     # TrainConfig.arch
    latent: bool  # a latent-shaped set (4 channels of float16 values, windows, no masks), else RGB with masks
    batch: int    # the batch per GPU by default


CONFIGS = {
    "32": Config("CIFAR-10 config: DDPM++ 32x32, channel_mult [2,2,2]", 32, "ddpmpp", False, 128),
    "64": Config("64x64 config: DDPM++, channel_mult [1,2,2,2]", 64, "ddpmpp", False, 64),
    "edm2-64": Config("EDM2-S at ImageNet-64's size: 64x64 RGB, dust masks", 64, EDM2, False, 64),
    "edm2-latent-64": Config("EDM2-S on 64x64x4 latents: float16 values, noise-level windows, no masks", 64, EDM2,
                             True, 64),
}
# Per size (--quick, --tiny, or neither): model-size overrides of the configuration's preset
# (`model_size`), and the run's defaults. --quick: the same architectures, narrow and shallow, so that
# a 2-core CPU runs them in seconds; --tiny: the smallest (gpu_check's rehearsal). sample_batch: the
# images of the sampler call whose host syncs are counted (the sampling command's default batch, 64,
# in the full run).
SIZES = {
    "full": dict(size={}, batch=None, steps=10, windows=3, warmup=5, scaling="128,256,512", sample_batch=64),
    "quick": dict(size=dict(model_channels=32, num_blocks=1), batch=4, steps=3, windows=2, warmup=2, scaling="4,8",
                  sample_batch=4),
    "tiny": dict(size=harness.TINY_SIZE, batch=2, steps=1, windows=2, warmup=1, scaling="2,4", sample_batch=2),
}
# EDM2's blocks narrower than one attention head (64 channels) have no attention: the tiny EDM2 is
# this wide, so that its lower resolution (2 x 32 channels) keeps one.
EDM2_TINY_CHANNELS = 32
SCALING_CONFIG = "32"  # the configuration of the batch scaling
P, DELTA = 0.6, 0.1  # dust corruption of the benchmark's data; the step's cost does not depend on them
LR = 2e-3  # the reference loop's (c): EDM's, as our trainer's default for the gated U-Nets (EDM2 keeps its own)
# The reference loop's EMA decay depends on the images seen; its cost does not. A fixed one will do.
EMA_BETA = 0.999
SAMPLER_STEPS = 18  # the sampling command's default


# ----------------------------------------------------------------------------------------------
# Data


def corrupted_set(folder: Path, resolution: int, count: int) -> CorruptedDataset:
    """`count` random RGB images with dust masks (p, one mask for the three channels), written in our
    format; the pixel values do not change the cost of a step."""
    rng = np.random.default_rng(0)
    masks = np.repeat(rng.random((count, 1, resolution, resolution)) >= P, 3, axis=1)
    observed = (rng.integers(0, 256, (count, 3, resolution, resolution), dtype=np.uint8) * masks).astype(np.uint8)
    corruption = {"kind": "dust", "p": P, "delta": DELTA, "shared_channels": True}
    return CorruptedDataset(write_dataset(folder / f"data-{resolution}", observed, masks, corruption, source="bench"))


def benchmark_set(folder: Path, setup: "Setup") -> CorruptedDataset:
    """The set a configuration trains on: `corrupted_set`, or for a latent configuration `count` random
    4-channel float16 latents, each with a noise-level window (bench/aot.py's `latent_shaped_set`).
    Four batches, at least 16 images."""
    count = max(4 * setup.batch, 16)
    if setup.latent:
        return CorruptedDataset(latent_shaped_set(folder / f"latents-{setup.resolution}", setup.resolution, count))
    return corrupted_set(folder, setup.resolution, count)


class HostMasks(NamedTuple):
    """A batch as the reference's Dataset hands it over: float images and masks, on the device."""

    y: torch.Tensor
    A: torch.Tensor
    A_hat: torch.Tensor
    labels: torch.Tensor


class HostMaskLoader(Loader):
    """The reference's data path: each image's mask unpacked and its further corruption drawn on the
    host with numpy, one image at a time (the reference's Dataset.__getitem__ makes its masks so),
    then the batch stacked and copied to the device. Same images, in the same order, as our loaders."""

    kind = "host (per-image numpy masks)"

    def __init__(self, dataset: CorruptedDataset, batch_size: int, device: torch.device):
        super().__init__(dataset, batch_size=batch_size, rank=0, world_size=1, seed=0, xflip=False, device=device)

    def _load(self, epoch: int, batch: int) -> HostMasks:
        indices = self.indices(epoch, batch)
        observed, packed, _ = self.dataset.get_raw(indices)
        C, H, W = self.dataset.shape
        ys, As, A_hats = [], [], []
        for u, bits, index in zip(observed, packed, indices):
            A = np.unpackbits(bits, bitorder="little")[: C * H * W].reshape(C, H, W).astype(np.float32)
            keep = np.random.default_rng([self.seed, epoch, int(index)]).random((1, H, W)) < 1 - DELTA
            ys.append((u.astype(np.float32) / 127.5 - 1) * A)
            As.append(A)
            A_hats.append(A * keep)

        def to_device(arrays):
            return torch.from_numpy(np.stack(arrays)).to(self.device)

        labels = torch.zeros((len(indices), 0), device=self.device)
        return HostMasks(to_device(ys), to_device(As), to_device(A_hats), labels)


def host_loader(dataset: CorruptedDataset, batch: int, device: torch.device) -> HostMaskLoader:
    return HostMaskLoader(dataset, batch, device)


def host_objective(schedule: NoiseSchedule, arch: str) -> Callable[[torch.nn.Module, HostMasks], torch.Tensor]:
    """The reference's objective on host-made masks: sigma and the noise drawn on the device with
    torch's generator (sigma from the schedule's distribution), the network input made from them,
    graded by our loss (an EDM2 network's: uncertainty-weighted by its log-variance head)."""
    loss = edm2_loss if arch == EDM2 else ambient_loss

    def objective(model: torch.nn.Module, batch: HostMasks) -> torch.Tensor:
        n = len(batch.y)
        u = torch.rand(n, device=batch.y.device, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
        sigma, _ = schedule.sigma_above(torch.zeros(n, device=batch.y.device), u)
        inputs = training_batch(batch.y, batch.A, batch.A_hat, sigma, torch.randn_like(batch.y), batch.labels)
        return loss(model, inputs, schedule)
    return objective


# ----------------------------------------------------------------------------------------------
# Settings and measurement


@contextlib.contextmanager
def reference_settings():
    """What the reference trained with: TF32 off for matmuls and cuDNN (its training loop switches
    both off), and our fused kernels off. Restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with harness.fused_kernels_off():
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def flops_per_image(config: dict, resolution: int, channels: int = 3) -> float:
    """FLOPs of one image's forward and backward pass through the model `config` describes,
    counted by torch.utils.flop_counter on the meta device (no arithmetic is done)."""
    with torch.device("meta"):
        net = build_model(config)
        x = torch.randn(1, 2 * channels, resolution, resolution)
        sigma = torch.ones(1)
    with FlopCounterMode(display=False) as counter:
        net(x, sigma)[:, :channels].sum().backward()
    return float(counter.get_total_flops())


def compiled_graphs() -> int:
    """Graphs Dynamo has compiled in this process so far."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


class Setup(NamedTuple):
    resolution: int
    batch: int
    steps: int    # per timing window
    windows: int
    warmup: int   # untimed steps, the first (timed alone) included
    size: dict    # model-size overrides of the preset (--quick, --tiny: `model_size`); empty: the published one
    device: torch.device
    arch: str = "ddpmpp"  # TrainConfig.arch: DDPM++ at the resolution's preset, or EDM2-S
    latent: bool = False  # train on a latent-shaped set (`benchmark_set`)

    @property
    def channels(self) -> int:
        """Channels of the set's images: 4 latent channels, or RGB."""
        return 4 if self.latent else 3


def model_size(mode: str, config: Config) -> dict:
    """The model-size overrides of `config`'s preset at size `mode` (SIZES): --tiny's attention goes
    at the lower of its two resolutions, whatever the configuration's preset says."""
    size = dict(SIZES[mode]["size"])
    if mode == "tiny":
        size["attn_resolutions"] = [config.resolution // 2]
        if config.arch == EDM2:
            size["model_channels"] = EDM2_TINY_CHANNELS
    return size


class Timing(NamedTuple):
    """A variant's steps: the first alone, then each timing window's seconds per step."""

    batch: int
    first_s: float
    window_s: List[float]
    graphs_warmup: int  # graphs Dynamo compiled during the warm-up steps
    graphs_timed: int   # ... and while timing (a recompile there would be timed: it must be 0)

    @property
    def step_s(self) -> float:
        return statistics.median(self.window_s)

    @property
    def images_per_s(self) -> float:
        return self.batch / self.step_s

    @property
    def spread(self) -> float:
        """(max - min) / median of the windows' images/s."""
        rates = [self.batch / s for s in self.window_s]
        return (max(rates) - min(rates)) / statistics.median(rates)


def time_steps(step: Callable[[], object], setup: Setup) -> Timing:
    """The first step alone, the rest of the warm-up untimed, then `setup.windows` windows of
    `setup.steps` steps, the device drained around each."""
    before = compiled_graphs()
    first = harness.seconds(step, setup.device)
    for _ in range(setup.warmup - 1):
        step()
    warmed = compiled_graphs()
    windows = [harness.seconds(step, setup.device, setup.steps) / setup.steps for _ in range(setup.windows)]
    return Timing(setup.batch, first, windows, warmed - before, compiled_graphs() - warmed)


class Row(NamedTuple):
    variant: str
    settings: str
    timing: Optional[Timing]  # None: the variant failed or does not exist (see settings)
    memory: str
    untimed: str = "-"  # what the table says in place of images/s where there is no timing


# The authors' code trains DDPM++, NCSN++ and ADM only: an EDM2 table says so instead of timing anything.
NO_EDM2_REFERENCE = Row("(c) authors' code", "not run: giannisdaras/ambient-diffusion has no EDM2 network", None, "n/a",
                        "none: no EDM2 there")


def our_trainer(setup: Setup, data: CorruptedDataset, out: Path, fast: bool) -> Trainer:
    """Our Trainer on `data`: its defaults (fast) or the reference settings; the caller holds
    `reference_settings()` around construction and steps for the latter. A latent set keeps our loader
    and objective in the reference settings (the module docstring says why)."""
    options = {} if fast else dict(precision="fp32", compile=False, tf32=False, channels_last=False, loader="torch")
    architecture = dict(arch=EDM2, preset="edm2-s") if setup.arch == EDM2 else dict(arch=setup.arch)
    cfg = TrainConfig(data=str(data.path), out=str(out), batch=setup.batch, steps=10 ** 9, snapshot_every=10 ** 9,
                      device=str(setup.device), **architecture, **setup.size, **options)
    trainer = Trainer(cfg)
    if not fast and not setup.latent:
        trainer.loader = host_loader(data, setup.batch, setup.device)
        trainer.objective = host_objective(trainer.schedule, setup.arch)
    return trainer


def run_ours(setup: Setup, data: CorruptedDataset, out: Path, fast: bool) -> "tuple[Row, Trainer]":
    """The row of our trainer, and the trainer (the caller closes it)."""
    harness.reset_peak_memory(setup.device)
    with contextlib.nullcontext() if fast else reference_settings():
        trainer = our_trainer(setup, data, out, fast)
        timing = time_steps(trainer.train_step, setup)
        settings = (f"{'bf16' if trainer.bf16 else 'fp32'}, compile {'on' if trainer.compiled else 'off'}, "
                    f"{'channels_last' if trainer.settings.channels_last else 'NCHW'}, {harness.tf32_state(setup.device)}; "
                    f"kernels: {kernels.active_path(setup.device)}; loader: {trainer.loader.kind}"
                    + (" (a latent set has no masks for the reference's host-side path)" if setup.latent and not fast
                       else ""))
    row = Row("(b) fast path" if fast else "(a) reference settings", settings, timing, harness.peak_memory(setup.device))
    return row, trainer


def sampler_call(config: dict, setup: Setup, batch: int) -> Callable[[], object]:
    """One call of the sampler as `python -m ambient_fast.sample` makes it on the setup's device (its
    memory format and path, 18 Heun steps, `batch` images) on a fresh model of `config` (the trainer's
    compiled blocks would recompile for it), after one untimed call (the fast path captures its
    CUDA graph there, once per network and shape). A latent model samples as the command samples one
    (`ambient_fast.sample.sampling_model`): full masks (its set hid nothing) and no clamping."""
    device = setup.device
    memory_format, fast = harness.cli_sampling(device)
    net = build_model(config).to(device, memory_format=memory_format).eval()
    survival = 1.0 if setup.latent else (1 - P) * (1 - DELTA)
    shape = (setup.channels, setup.resolution, setup.resolution)
    latents, masks = seeded_inputs(range(batch), shape, 1, survival, False, device)

    def call():
        return ambient_sample(net, latents, masks, num_steps=SAMPLER_STEPS, clip=not setup.latent, fast=fast)

    call()
    return call


class Inspection(NamedTuple):
    """One step of (b) looked into: the network it trains, where its time goes, and its and a sampler
    call's host syncs."""

    model: str  # the trainer's description of its network and recipe
    profile: profile.ProfileTable
    step_syncs: Optional[dict]
    sampler_syncs: Optional[dict]
    sample_batch: int


def inspect_step(trainer: Trainer, setup: Setup, sample_batch: int) -> Inspection:
    step = trainer.train_step
    sample = sampler_call(trainer.net.config, setup, sample_batch)
    return Inspection(trainer.describe_model(), profile.profile_call(step, setup.device),
                      profile.host_syncs(step, setup.device), profile.host_syncs(sample, setup.device), sample_batch)


# ----------------------------------------------------------------------------------------------
# (c) the authors' code


def import_reference(repo: Path):
    """(training.networks, training.loss) of a giannisdaras/ambient-diffusion checkout at `repo`."""
    repo = Path(repo).resolve()
    needed = ("training/networks.py", "training/loss.py", "torch_utils", "dnnlib")
    missing = [p for p in needed if not (repo / p).exists()]
    if missing:
        raise ValueError(f"--reference-repo {repo} does not look like a checkout of giannisdaras/ambient-diffusion: "
                         f"it lacks {', '.join(missing)}")
    sys.path.insert(0, str(repo))
    try:
        networks = importlib.import_module("training.networks")
        loss = importlib.import_module("training.loss")
    except ImportError as error:
        raise RuntimeError(f"importing training/networks.py and training/loss.py from {repo} failed: {error}. Its "
                           "dnnlib and torch_utils import their own dependencies (requests, s3fs, torchvision, ...): "
                           "install what is named, e.g. from wheels with bench/gpu_check.sh --wheels DIR") from error
    for module in (networks, loss):
        if not Path(module.__file__).resolve().is_relative_to(repo):
            raise RuntimeError(f"{module.__name__} was imported from {module.__file__}, not from {repo}: another "
                               "package named `training` shadows the checkout")
    return networks, loss


class ReferenceStep:
    """One step of the reference's training loop around its own network and loss: the loss summed
    and divided by the batch, backward, NaN/Inf gradients replaced, clipping at 1, Adam, EMA."""

    def __init__(self, networks, loss_module, resolution: int, size: dict, device: torch.device):
        model_type, arch = ARCHS["ddpmpp"]
        sizes = {**PRESETS[preset_for(resolution)], **size}
        torch.manual_seed(0)
        net = networks.EDMPrecond(img_resolution=resolution, img_channels=6, label_dim=0, use_fp16=False,
                                  model_type=model_type, gated=True, dropout=0.0, **arch, **sizes)
        net = net.train().requires_grad_(True).to(device)
        self.params = list(net.parameters())
        self.ema = copy.deepcopy(net).eval().requires_grad_(False)
        self.net = torch.compile(net) if device.type == "cuda" else net  # its loop compiles the network
        self.loss_fn = loss_module.AmbientLoss()
        self.optimizer = torch.optim.Adam(self.params, lr=LR, betas=(0.9, 0.999), eps=1e-8)

    def __call__(self, batch: HostMasks) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        _, val_loss, _ = self.loss_fn(net=self.net, images=batch.y, corruption_matrix=batch.A,
                                      hat_corruption_matrix=batch.A_hat, labels=batch.labels)
        val_loss.sum().mul(1 / len(batch.y)).backward()
        for param in self.params:
            if param.grad is not None:
                torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        with torch.no_grad():
            for p_ema, param in zip(self.ema.parameters(), self.params):
                p_ema.copy_(param.detach().lerp(p_ema, EMA_BETA))


def run_reference(setup: Setup, data: CorruptedDataset, reference) -> Row:
    harness.reset_peak_memory(setup.device)
    with reference_settings():
        try:
            step = ReferenceStep(*reference, setup.resolution, setup.size, setup.device)
            loader = host_loader(data, setup.batch, setup.device)
            timing = time_steps(lambda: step(loader.next()), setup)
        except Exception as error:  # an optional comparison: report it and keep the rows already measured
            return Row("(c) authors' code", f"FAILED: {type(error).__name__}: {error}", None, "n/a", "failed (below)")
        settings = (f"fp32, compile {'on' if setup.device.type == 'cuda' else 'off (CPU)'}, "
                    f"{harness.tf32_state(setup.device)}; loader: {loader.kind}")
    return Row("(c) authors' code", settings, timing, harness.peak_memory(setup.device))


# ----------------------------------------------------------------------------------------------
# One configuration, the batch scaling


def measure(setup: Setup, work: Path, sample_batch: int, reference=None) -> "tuple[List[Row], float, Inspection]":
    """The rows of one configuration, its FLOPs per image and the inspection of a step of (b)."""
    data = benchmark_set(work, setup)
    baseline, trainer = run_ours(setup, data, work / "a", fast=False)
    trainer.close()
    del trainer
    gc.collect()  # each variant's model, optimiser and compiled code go before the next one is built
    fast, trainer = run_ours(setup, data, work / "b", fast=True)
    inspection = inspect_step(trainer, setup, sample_batch)
    config = trainer.net.config
    trainer.close()
    del trainer
    gc.collect()
    rows = [baseline, fast]
    if setup.arch == EDM2:
        rows.append(NO_EDM2_REFERENCE)
    elif reference is not None:
        rows.append(run_reference(setup, data, reference))
        gc.collect()
    torch._dynamo.reset()  # the next configuration compiles afresh
    return rows, flops_per_image(config, setup.resolution, setup.channels), inspection


def measure_batch(setup: Setup, work: Path) -> Row:
    """(b) at `setup.batch`, compiled afresh."""
    data = benchmark_set(work, setup)
    row, trainer = run_ours(setup, data, work / f"b-{setup.batch}", fast=True)
    trainer.close()
    del trainer
    gc.collect()
    torch._dynamo.reset()
    return row


# ----------------------------------------------------------------------------------------------
# The report


HEADER = ["variant", "images/s", "spread", "s/step", "first step s", "model TFLOP/s", "% bf16 peak",
          "peak memory alloc / reserved", "vs (a)"]


def spread_text(timing: Timing) -> str:
    return f"{100 * timing.spread:.1f}% ({len(timing.window_s)} windows)"


def table_rows(rows: List[Row], flops: float, peak: float) -> "list[list[str]]":
    baseline = rows[0].timing
    out = []
    for row in rows:
        timing = row.timing
        if timing is None:
            out.append([row.variant, row.untimed, "-", "-", "-", "-", "-", row.memory, "-"])
            continue
        model = flops * timing.images_per_s
        out.append([row.variant, f"{timing.images_per_s:.4g}", spread_text(timing), f"{timing.step_s:.4g}",
                    f"{timing.first_s:.3g}", f"{model / 1e12:.4g}", f"{100 * model / peak:.3g}%", row.memory,
                    harness.ratio(timing.images_per_s, baseline.images_per_s)])
    return out


def target_lines(targets: bool, rows: List[Row], flops: float, peak: float, gpu: bool) -> "list[str]":
    """The ratios below a table; `targets`: with DESIGN.md's targets (the CIFAR-10 configuration's)."""
    a, b = rows[0].timing, rows[1].timing
    verdict = "" if gpu else " (not judged: CPU)"
    lines = [f"- (b) / (a): {harness.ratio(b.images_per_s, a.images_per_s)} images/s"
             + (f"; target >= 8x{verdict}" if targets else ""),
             f"- (b) model FLOP/s / bf16 peak: {flops * b.images_per_s / 1e12:.4g} / {peak / 1e12:.4g} TFLOP/s = "
             f"{100 * flops * b.images_per_s / peak:.3g}%" + (f"; target >= 40%{verdict}" if targets else "")]
    if len(rows) > 2 and rows[2].timing is not None:
        lines.append(f"- (b) / (c): {harness.ratio(b.images_per_s, rows[2].timing.images_per_s)} images/s")
    return lines + [f"- {row.variant}: {row.settings}" for row in rows]


def compile_lines(rows: List[Row]) -> "list[str]":
    """Per variant: its first step against its median step, and what Dynamo compiled. Where it
    compiled, the difference is the compile time (with the first call's other costs: cuDNN's
    autotuning, the allocator's growth)."""
    lines = []
    for row in rows:
        timing = row.timing
        if timing is None:
            continue
        first = f"first step {timing.first_s:.3g} s, later steps {timing.step_s:.4g} s"
        if not timing.graphs_warmup and not timing.graphs_timed:
            lines.append(f"- {row.variant}: nothing compiled ({first})")
            continue
        lines.append(f"- {row.variant}: compile time ~ {timing.first_s - timing.step_s:.3g} s ({first}); "
                     f"{timing.graphs_warmup} graphs compiled in the warm-up, {timing.graphs_timed} while timing"
                     + ("" if timing.graphs_timed == 0 else " (RECOMPILED: the windows include compilation)"))
    return lines


def sync_lines(inspection: Inspection) -> "list[str]":
    return [f"- one step of (b), in steady state: {profile.describe_syncs(inspection.step_syncs)}",
            f"- one sampler call (the sampling command's path and memory format on this device, {SAMPLER_STEPS} steps, "
            f"{inspection.sample_batch} images, after a first call): {profile.describe_syncs(inspection.sampler_syncs)}"]


SCALING_HEADER = ["batch", "images/s", "spread", "s/step", "first step s", "peak memory alloc / reserved", "vs first"]


def scaling_rows(rows: List[Row]) -> "list[list[str]]":
    first = rows[0].timing
    return [[str(row.timing.batch), f"{row.timing.images_per_s:.4g}", spread_text(row.timing),
             f"{row.timing.step_s:.4g}", f"{row.timing.first_s:.3g}", row.memory,
             harness.ratio(row.timing.images_per_s, first.images_per_s)] for row in rows]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"configurations to run, of {', '.join(CONFIGS)} "
                        f"(module docstring), or none (default {','.join(CONFIGS)})")
    parser.add_argument("--batch", type=int, help="batch per GPU (default 128 at 32x32, 64 for the others; --quick: 4; "
                        "--tiny: 2)")
    parser.add_argument("--steps", type=int, help="steps per timing window (default 10; --quick: 3; --tiny: 1)")
    parser.add_argument("--windows", type=int, help="timing windows per variant (default 3; --quick, --tiny: 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps first, the first step (compilation) included "
                        "(default 5; --quick: 2; --tiny: 1)")
    parser.add_argument("--scaling", help="batches of (b) at 32x32 (DDPM++) for the batch scaling, or none (default "
                        "128,256,512; --quick: 4,8; --tiny: 2,4)")
    parser.add_argument("--reference-repo", type=Path,
                        help="a checkout of giannisdaras/ambient-diffusion: time its code too")
    harness.add_common_arguments(parser, "small models and batches: checks that it all runs")
    args = parser.parse_args(argv)
    console = Console()
    mode = harness.size_mode(args)
    defaults = SIZES[mode]
    names = harness.parse_list(parser, args.configs, "--configs", CONFIGS)
    scaling = harness.parse_list(parser, args.scaling if args.scaling is not None else defaults["scaling"], "--scaling")
    steps, windows, warmup = (getattr(args, name) if getattr(args, name) is not None else defaults[name]
                              for name in ("steps", "windows", "warmup"))
    if (args.batch is not None and args.batch < 1) or steps < 1 or windows < 1 or warmup < 1:
        parser.error("--batch, --steps, --windows and --warmup must be at least 1")
    try:
        device = harness.pick_device(args.device)
        reference = import_reference(args.reference_repo) if args.reference_repo else None
    except (ValueError, RuntimeError) as error:
        console.print(f"[red]error:[/] {error}")
        return 2

    gpu = device.type == "cuda"
    if not gpu:
        console.print(f"[bold yellow]{harness.CPU_CAVEAT}[/]")
    peak_n = harness.peak_matrix_size(device, mode)
    peak = harness.bf16_matmul_peak(device, peak_n)
    console.print(f"{harness.device_name(device)}: bf16 matmul peak (measured) {peak / 1e12:.4g} TFLOP/s")
    command = "python bench/train.py " + " ".join(argv if argv is not None else sys.argv[1:])
    narrowed = harness.SIZE_TITLES[mode]
    sections = [harness.environment_section(device, command.strip()),
                f"bf16 matmul peak, measured in this run: {peak / 1e12:.4g} TFLOP/s ({peak_n}^3 "
                "products). FLOPs per image: forward + backward, torch.utils.flop_counter. Each step: batch, loss, "
                "backward, clipping, Adam, EMA (EDM2: also its forced weight normalisation and post-hoc EMA "
                "profiles). Models: (a) and (b) our defaults (DDPM++: sigmoid gate; mask-aware preconditioning), (c) "
                "the reference's (double sigmoid, its preconditioning); the same FLOPs (gates and preconditioning are "
                f"elementwise, not counted). Timing: the first step alone, {warmup} warm-up steps in all, then "
                f"{windows} windows of {steps} steps; images/s is the median window's, spread (max - min) / median "
                "of the windows."
                + (" Models narrowed, not the published sizes: over each configuration's preset, "
                   + "; ".join(f"{name} {model_size(mode, CONFIGS[name])}" for name in names or [SCALING_CONFIG]) + "."
                   if mode != "full" else "")]
    edm2_only = bool(names) and all(CONFIGS[name].arch == EDM2 for name in names)
    kind = "train-edm2" if edm2_only else "train" if names else "train-scaling"  # module docstring
    path = harness.report_path(args.results, kind, device)

    def write(*more: str) -> None:
        harness.write_report(path, f"Training throughput on {harness.device_name(device)}, {harness.today()}",
                             [*sections, *more])

    def setup(config: Config, batch: int) -> Setup:
        return Setup(config.resolution, batch, steps, windows, warmup, model_size(mode, config), device, config.arch,
                     config.latent)

    for name in names:
        config = CONFIGS[name]
        batch = args.batch or defaults["batch"] or config.batch
        console.print(f"{config.title}, batch {batch}: {warmup} + {windows} x {steps} steps per variant ...")
        with tempfile.TemporaryDirectory() as work:
            rows, flops, inspection = measure(setup(config, batch), Path(work), defaults["sample_batch"], reference)
        rows_text = table_rows(rows, flops, peak)
        title = f"{config.title}{narrowed}, batch {batch}, {flops / 1e9:.4g} GFLOP/image"
        harness.print_table(console, title, HEADER, rows_text, left=("variant",))
        lines = [f"- model: {inspection.model}", *target_lines(name == "32", rows, flops, peak, gpu)]
        profile_title = (f"One step of (b) under torch.profiler, {'device kernels' if gpu else 'CPU operators (self time)'}"
                         " grouped by name (bench/_profile.py)")
        profile_text = profile.profile_rows(inspection.profile)
        harness.print_table(console, profile_title, profile.PROFILE_HEADER, profile_text, left=("group",))
        console.print("\n".join(lines + ["Compilation:"] + compile_lines(rows) + ["Host syncs:"] + sync_lines(inspection)),
                      highlight=False, soft_wrap=True)
        sections.extend([f"## {title}", "\n".join(harness.markdown_table(HEADER, rows_text)), "\n".join(lines),
                         "### Compilation", "\n".join(compile_lines(rows)),
                         f"### {profile_title}", "\n".join(harness.markdown_table(profile.PROFILE_HEADER, profile_text)),
                         "### Host syncs (torch.cuda.set_sync_debug_mode)", "\n".join(sync_lines(inspection))])
        write()

    if scaling:
        title = f"Batch scaling of (b), {CONFIGS[SCALING_CONFIG].title}{narrowed}"
        console.print(f"{title}: batches {', '.join(map(str, scaling))} ...")
        rows = []
        for batch in scaling:
            with tempfile.TemporaryDirectory() as work:
                rows.append(measure_batch(setup(CONFIGS[SCALING_CONFIG], batch), Path(work)))
            # After each batch, so that a run cut short keeps the batches it measured.
            write(f"## {title}", "\n".join(harness.markdown_table(SCALING_HEADER, scaling_rows(rows))))
        harness.print_table(console, title, SCALING_HEADER, scaling_rows(rows), left=("batch",))
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
