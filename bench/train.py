"""Training throughput against the reference settings and the authors' code: `python bench/train.py`.

For the CIFAR-10 configuration (DDPM++, gated, 32x32, channel_mult [2,2,2]) and the 64x64 one
([1,2,2,2]), at the batch per GPU given (--batch; default 128 at 32x32 and 64 at 64x64), one run
times the full training step (batch, loss, backward, clipping, Adam, EMA) of

  (a) reference settings: our trainer as the reference ran: fp32, TF32 off, eager, NCHW, the fused
      kernels off (AMBIENT_FAST_KERNELS=0), each image's masks made on the host with numpy, one image at a
      time as the reference's Dataset does, and the batch then copied to the device (the rest is our
      trainer as it is: its Adam is fused on CUDA);
  (b) fast path: our trainer's defaults: bf16 autocast, torch.compile per U-Net block, channels_last,
      the fused Triton kernels (CUDA), the stored bytes moved to the device and turned into the
      network input there in one pass;
  (c) the authors' code, with --reference-repo PATH (a checkout of giannisdaras/ambient-diffusion):
      its `training.networks.EDMPrecond` and `training.loss.AmbientLoss`, imported from that
      checkout, in the step of its training loop (fp32, TF32 off, the network compiled on CUDA as
      its loop does, NaN guard, clipping, Adam, EMA), on the same batches as (a). Nothing of it is
      copied here; the benchmark runs without it.

Per row: images/s, seconds per step, model FLOP/s (FLOPs per image of forward + backward, counted
with torch.utils.flop_counter on the same configuration, times images/s) and its percentage of the
bf16 matmul peak measured in the same run, peak device memory, the speed-up over (a) with both
sides. The table is printed and written as markdown to bench/results/train-<device>-<date>.md (or
--results DIR), after each configuration so that a run cut short keeps what it measured.

Targets (DESIGN.md, one H100): (b) at least 8x (a) at 32x32, and at least 40% of the bf16 peak.
On a CPU the figures cannot judge them; `--quick` runs small models there to check that it all works.
"""
import argparse
import contextlib
import copy
import gc
import importlib
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
from ambient_fast import kernels  # noqa: E402
from ambient_fast.data.format import CorruptedDataset, write_dataset  # noqa: E402
from ambient_fast.data.loader import Loader  # noqa: E402
from ambient_fast.objective.objective import NoiseSchedule, ambient_loss, training_batch  # noqa: E402
from ambient_fast.networks import build_model  # noqa: E402
from ambient_fast.training.config import ARCHS, PRESETS, TrainConfig, preset_for  # noqa: E402
from ambient_fast.training.trainer import Trainer  # noqa: E402

CONFIGS = {32: "CIFAR-10 config: DDPM++ 32x32, channel_mult [2,2,2]",
           64: "64x64 config: DDPM++, channel_mult [1,2,2,2]"}
DEFAULT_BATCH = {32: 128, 64: 64}
# --quick: the same architectures, narrow and shallow, so that a 2-core CPU runs them in seconds.
QUICK_SIZE = dict(model_channels=32, num_blocks=1)
QUICK = dict(batch=4, steps=5, warmup=2)
P, DELTA = 0.6, 0.1  # dust corruption of the benchmark's data; the step's cost does not depend on them
LR = 2e-3
# The reference loop's EMA decay depends on the images seen; its cost does not. A fixed one will do.
EMA_BETA = 0.999


class Row(NamedTuple):
    variant: str
    settings: str
    images_per_s: Optional[float]  # None: the variant failed (see settings)
    step_s: Optional[float]
    memory: str


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


def host_objective(schedule: NoiseSchedule) -> Callable[[torch.nn.Module, HostMasks], torch.Tensor]:
    """The reference's objective on host-made masks: sigma and the noise drawn on the device with
    torch's generator (sigma from the schedule's distribution), the network input made from them,
    graded by our loss."""
    def objective(model: torch.nn.Module, batch: HostMasks) -> torch.Tensor:
        n = len(batch.y)
        u = torch.rand(n, device=batch.y.device, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
        sigma, _ = schedule.sigma_above(torch.zeros(n, device=batch.y.device), u)
        inputs = training_batch(batch.y, batch.A, batch.A_hat, sigma, torch.randn_like(batch.y), batch.labels)
        return ambient_loss(model, inputs, schedule)
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


def time_steps(step: Callable[[], object], batch: int, steps: int, warmup: int, device: torch.device):
    """(images/s, seconds per step) over `steps` steps after `warmup` untimed ones (compilation,
    autotuning, allocator growth happen there)."""
    for _ in range(warmup):
        step()
    elapsed = harness.seconds(step, device, steps)
    return batch * steps / elapsed, elapsed / steps


class Setup(NamedTuple):
    resolution: int
    batch: int
    steps: int
    warmup: int
    size: dict  # model-size overrides of the resolution's preset (--quick); empty: the published configuration
    device: torch.device


def our_trainer(setup: Setup, data: CorruptedDataset, out: Path, fast: bool) -> Trainer:
    """Our Trainer on `data`: its defaults (fast) or the reference settings; the caller holds
    `reference_settings()` around construction and steps for the latter."""
    options = {} if fast else dict(precision="fp32", compile=False, tf32=False, channels_last=False, loader="torch")
    cfg = TrainConfig(data=str(data.path), out=str(out), batch=setup.batch, steps=10 ** 9, snapshot_every=10 ** 9,
                      device=str(setup.device), lr=LR, **setup.size, **options)
    trainer = Trainer(cfg)
    if not fast:
        trainer.loader = host_loader(data, setup.batch, setup.device)
        trainer.objective = host_objective(trainer.schedule)
    return trainer


def run_ours(setup: Setup, data: CorruptedDataset, out: Path, fast: bool) -> "tuple[Row, dict]":
    """The row of our trainer, and its model's configuration."""
    harness.reset_peak_memory(setup.device)
    with contextlib.nullcontext() if fast else reference_settings():
        trainer = our_trainer(setup, data, out, fast)
        rate, step_s = time_steps(trainer.train_step, setup.batch, setup.steps, setup.warmup, setup.device)
        settings = (f"{'bf16' if trainer.bf16 else 'fp32'}, compile {'on' if trainer.compiled else 'off'}, "
                    f"{harness.tf32_state(setup.device)}; kernels: {kernels.active_path(setup.device)}; "
                    f"loader: {trainer.loader.kind}")
    memory, config = harness.peak_memory(setup.device), trainer.net.config
    return Row("(b) fast path" if fast else "(a) reference settings", settings, rate, step_s, memory), config


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
            rate, step_s = time_steps(lambda: step(loader.next()), setup.batch, setup.steps, setup.warmup, setup.device)
        except Exception as error:  # an optional comparison: report it and keep the rows already measured
            return Row("(c) authors' code", f"FAILED: {type(error).__name__}: {error}", None, None, "n/a")
        settings = (f"fp32, compile {'on' if setup.device.type == 'cuda' else 'off (CPU)'}, "
                    f"{harness.tf32_state(setup.device)}; loader: {loader.kind}")
    return Row("(c) authors' code", settings, rate, step_s, harness.peak_memory(setup.device))


# ----------------------------------------------------------------------------------------------
# One configuration, the report


def measure(setup: Setup, work: Path, reference=None) -> "tuple[List[Row], float]":
    """The rows of one configuration and its FLOPs per image."""
    data = corrupted_set(work, setup.resolution, count=max(4 * setup.batch, 16))
    baseline, config = run_ours(setup, data, work / "a", fast=False)
    gc.collect()  # each variant's model, optimiser and compiled code go before the next one is built
    fast, _ = run_ours(setup, data, work / "b", fast=True)
    gc.collect()
    rows = [baseline, fast]
    if reference is not None:
        rows.append(run_reference(setup, data, reference))
        gc.collect()
    torch._dynamo.reset()  # the next configuration compiles afresh
    return rows, flops_per_image(config, setup.resolution)


HEADER = ["variant", "images/s", "s/step", "model TFLOP/s", "% bf16 peak", "peak memory", "vs (a)"]


def table_rows(rows: List[Row], flops: float, peak: float) -> "list[list[str]]":
    baseline = rows[0].images_per_s
    out = []
    for row in rows:
        if row.images_per_s is None:
            out.append([row.variant, "-", "-", "-", "-", row.memory, "-"])
            continue
        model = flops * row.images_per_s
        out.append([row.variant, f"{row.images_per_s:.4g}", f"{row.step_s:.4g}", f"{model / 1e12:.4g}",
                    f"{100 * model / peak:.3g}%", row.memory, harness.ratio(row.images_per_s, baseline)])
    return out


def target_lines(resolution: int, rows: List[Row], flops: float, peak: float, gpu: bool) -> "list[str]":
    (a, b) = rows[:2]
    verdict = "" if gpu else " (not judged: CPU)"
    lines = [f"- (b) / (a): {harness.ratio(b.images_per_s, a.images_per_s)} images/s"
             + (f"; target >= 8x{verdict}" if resolution == 32 else ""),
             f"- (b) model FLOP/s / bf16 peak: {flops * b.images_per_s / 1e12:.4g} / {peak / 1e12:.4g} TFLOP/s = "
             f"{100 * flops * b.images_per_s / peak:.3g}%" + (f"; target >= 40%{verdict}" if resolution == 32 else "")]
    if len(rows) > 2 and rows[2].images_per_s is not None:
        lines.append(f"- (b) / (c): {harness.ratio(b.images_per_s, rows[2].images_per_s)} images/s")
    return lines + [f"- {row.variant}: {row.settings}" for row in rows]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="32,64", help="resolutions to run, of 32 and 64 (default 32,64)")
    parser.add_argument("--batch", type=int, help="batch per GPU (default 128 at 32x32, 64 at 64x64; --quick: 4)")
    parser.add_argument("--steps", type=int, help="timed steps per variant (default 20; --quick: 5)")
    parser.add_argument("--warmup", type=int, help="untimed steps first, compilation included (default 5; --quick: 2)")
    parser.add_argument("--reference-repo", type=Path,
                        help="a checkout of giannisdaras/ambient-diffusion: time its code too")
    harness.add_common_arguments(parser, "small models and batches: checks that it all runs")
    args = parser.parse_args(argv)
    console = Console()
    resolutions = harness.parse_resolutions(parser, args.configs, CONFIGS, "--configs")
    steps = args.steps if args.steps is not None else (QUICK["steps"] if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (QUICK["warmup"] if args.quick else 5)
    if (args.batch is not None and args.batch < 1) or steps < 1 or warmup < 0:
        parser.error("--batch and --steps must be at least 1, --warmup at least 0")
    try:
        device = harness.pick_device(args.device)
        reference = import_reference(args.reference_repo) if args.reference_repo else None
    except (ValueError, RuntimeError) as error:
        console.print(f"[red]error:[/] {error}")
        return 2

    gpu = device.type == "cuda"
    if not gpu:
        console.print(f"[bold yellow]{harness.CPU_CAVEAT}[/]")
    peak = harness.bf16_matmul_peak(device)
    console.print(f"{harness.device_name(device)}: bf16 matmul peak (measured) {peak / 1e12:.4g} TFLOP/s")
    command = "python bench/train.py " + " ".join(argv if argv is not None else sys.argv[1:])
    sections = [harness.environment_section(device, command.strip()),
                f"bf16 matmul peak, measured in this run: {peak / 1e12:.4g} TFLOP/s ({'8192' if gpu else '1024'}^3 "
                "products). FLOPs per image: forward + backward, torch.utils.flop_counter. Each step: batch, loss, "
                "backward, clipping, Adam, EMA. Models: (a) and (b) our defaults (sigmoid gate, mask-aware "
                "preconditioning), (c) the reference's (double sigmoid, its preconditioning); the same FLOPs (gates "
                "and preconditioning are elementwise, not counted)."
                + (f" Quick run: models narrowed to {QUICK_SIZE}, not the published sizes." if args.quick else "")]
    path = harness.report_path(args.results, "train", device)
    for resolution in resolutions:
        batch = args.batch or (QUICK["batch"] if args.quick else DEFAULT_BATCH[resolution])
        setup = Setup(resolution, batch, steps, warmup, QUICK_SIZE if args.quick else {}, device)
        console.print(f"{CONFIGS[resolution]}, batch {batch}: {warmup} + {steps} steps per variant ...")
        with tempfile.TemporaryDirectory() as work:
            rows, flops = measure(setup, Path(work), reference)
        rows_text = table_rows(rows, flops, peak)
        title = (f"{CONFIGS[resolution]}{' (narrowed: --quick)' if args.quick else ''}, batch {batch}, "
                 f"{flops / 1e9:.4g} GFLOP/image")
        harness.print_table(console, title, HEADER, rows_text, left=("variant",))
        lines = target_lines(resolution, rows, flops, peak, gpu)
        console.print("\n".join(lines), highlight=False)
        sections += [f"## {title}", "\n".join(harness.markdown_table(HEADER, rows_text)), "\n".join(lines)]
        harness.write_report(path, f"Training throughput on {harness.device_name(device)}, {harness.today()}", sections)
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
