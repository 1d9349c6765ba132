"""Ahead-of-time compile check of the fused kernels: `python bench/aot.py` (no GPU needed).

Runs the code that launches the fused Triton kernels on a GPU, on this machine's CPU, with every
launch recorded instead of run (`ambient_fast.kernels.aot`): a training step of the built-in 16x16
configuration, of the CIFAR-10 (32x32) and of the 64x64 one in each setting that changes what a
kernel sees, the samplers (exact in float64 and float32, fast) on each trained model and on the
published models, and the kernel benchmark's calls (`bench/kernels.py --sizes 64`, all of its
configurations; `bench/gpu_check.sh` runs the DDPM++ one). Then every distinct specialisation is
compiled to cubin for sm_80 and sm_90 with Triton's compiler and its bundled ptxas, and the report
gives, per kernel and target, the count, the largest register use, spills and shared memory, and
every failure with the compiler's message. Exit status 1 if any specialisation fails.

Which settings are run. A specialisation depends on dtypes, layouts, shapes and constexpr flags:
- the gated-activation kernels see the precision (bf16 or fp32), the gate (sigmoid or double
  sigmoid; `none` launches nothing) and the layout and shapes of every convolution;
- the ambient-input kernel sees the kind of further corruption (dust coins per value or per pixel,
  an erased box, a kept box: the data set's mask operator), the stored values (uint8 levels, or
  float16 in a set with noisy images, whose Tweedie targets are a flag of their own) and the
  layout, whatever the model: a training step of each setting runs a dust set (per value, or one
  coin per pixel), and the ambient input of every operator on each kind of values runs on its own
  (`ambient_input_workloads`);
- the loss kernels see the image shape;
- the sampler kernel sees the state dtype, the clipping, the solver stage and the layout.
EDM2 (`--arch edm2`) reaches the same kernels through its objective (the ambient input, the draws,
the loss; its U-Net has no gated convolution): a training step in each precision and layout on a
pixel set, one on a latent-shaped set (4 channels of float16 values, full masks, noise-level windows:
the draws take the PyTorch path there, the per-value pass stays fused), and the samplers on the
trained network (`edm2_workloads`).
The two pairs of training flags act on different kernels, so the four combinations of each pair
run side by side (`SETTINGS`), in both layouts, at each resolution. `--compile` launches a subset
of what an uncompiled step launches (Inductor generates its own kernels inside the compiled
blocks; the convolutions outside them keep the fused gate), so steps run uncompiled here.
Neither the batch size nor the number of ranks changes a specialisation (the batch is a grid
dimension; FSDP2 and DDP compute with the same dtypes as one process under the one
mixed-precision policy), so steps use a batch of 2 on one process.

`--quick` (CI, tests/test_aot.py): the same workloads on narrow models at 16x16 and 32x32 and the
benchmark's calls at 1 MB.
"""
import argparse
import contextlib
import itertools
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402

import _harness as harness  # noqa: E402

TARGETS = ("sm_80", "sm_90")
SETTINGS = [  # (precision, gate) for the gated kernels, side by side with (preconditioning, shared B) for the rest
    dict(precision="bf16", gate="sigmoid", mask_aware=True, shared_channels=True),
    dict(precision="bf16", gate="double_sigmoid", mask_aware=False, shared_channels=False),
    dict(precision="fp32", gate="sigmoid", mask_aware=False, shared_channels=False),
    dict(precision="fp32", gate="double_sigmoid", mask_aware=True, shared_channels=True),
]
RESOLUTIONS = {"full": (16, 32, 64), "quick": (16, 32)}
QUICK_SIZE = dict(model_channels=16, num_blocks=1)  # narrow and shallow: the same code paths in seconds
KERNEL_BENCH_MB = {"full": 64, "quick": 1}
SAMPLE_STEPS = 2  # Heun's two stages on the first step, Euler on the last: every stage the sampler has


# ----------------------------------------------------------------------------------------------
# Workloads: each is (label, callable); the callables run real code on the CPU.


def random_set(folder: Path, resolution: int, shared_channels: bool, count: int = 2):
    """A small corrupted data set (dust masks, p 0.5) in our format."""
    from ambient_fast.data.format import write_dataset

    rng = np.random.default_rng(0)
    masks = rng.random((count, 1 if shared_channels else 3, resolution, resolution)) >= 0.5
    masks = np.broadcast_to(masks, (count, 3, resolution, resolution))
    observed = (rng.integers(0, 256, masks.shape, dtype=np.uint8) * masks).astype(np.uint8)
    corruption = {"kind": "dust", "p": 0.5, "delta": 0.1, "shared_channels": shared_channels}
    return write_dataset(folder, observed, masks, corruption, source="aot")


def training_workloads(work: Path, mode: str) -> Iterator[Tuple[str, Callable[[], None]]]:
    """One training step per (resolution, layout, setting), then the samplers on the model it trained."""
    from ambient_fast.training.config import TrainConfig
    from ambient_fast.training.trainer import Trainer

    for resolution, channels_last, setting in itertools.product(RESOLUTIONS[mode], (True, False), SETTINGS):
        setting = dict(setting)
        shared = setting.pop("shared_channels")
        size = QUICK_SIZE if mode == "quick" else {}
        label = (f"train {resolution}x{resolution} {'channels_last' if channels_last else 'NCHW'} "
                 + " ".join(f"{k}={v}" for k, v in setting.items()) + f" shared_channels={shared}")

        def step(resolution=resolution, channels_last=channels_last, setting=setting, shared=shared, size=size,
                 label=label):
            data = work / f"data-{resolution}-{shared}"
            if not data.exists():
                random_set(data, resolution, shared)
            out = tempfile.mkdtemp(dir=work)
            config = TrainConfig(data=str(data), out=out, device="cpu", compile=False, batch=2, steps=1,
                                 channels_last=channels_last, **setting, **size)
            with contextlib.redirect_stdout(None):
                trainer = Trainer(config)
                trainer.train_step()
            sample_paths(trainer.net.eval(), resolution)

        yield label, step


def latent_shaped_set(folder: Path, resolution: int, count: int = 2):
    """A set shaped as 4-channel latents: float16 values, full masks, sigma_min and sigma_max per image.
    Its latent record names no autoencoder: training reads only the values (decoding is the sampler's)."""
    from ambient_fast.data.format import RECORD, write_dataset

    rng = np.random.default_rng(0)
    values = rng.standard_normal((count, 4, resolution, resolution)).astype(np.float16)
    observed = np.clip(np.round((values.astype(np.float64) + 1) * 127.5), 0, 255).astype(np.uint8)
    records = np.zeros(count, RECORD)
    records["sigma_min"] = 0.05
    latent = {"folder": "none", "config_sha256": "", "scaling": {}, "pixel_shape": [3, 8 * resolution, 8 * resolution]}
    return write_dataset(folder, observed, np.ones(values.shape, bool), {"kind": "none", "p": 0.0, "delta": 0.0,
                         "shared_channels": True}, values=values, records=records,
                         sigma_max=np.full(count, 2.0, np.float32), latent=latent, source="aot")


def edm2_workloads(work: Path, mode: str) -> Iterator[Tuple[str, Callable[[], None]]]:
    """An EDM2 training step per (precision, layout) on a pixel set and one per precision on a
    latent-shaped set, then the samplers on the network it trained."""
    from ambient_fast.training.config import TrainConfig
    from ambient_fast.training.trainer import Trainer

    resolution = max(RESOLUTIONS[mode])
    size = dict(QUICK_SIZE, channel_mult=[1, 2], attn_resolutions=[]) if mode == "quick" else dict(preset="edm2-s")
    cases = [(kind, precision, channels_last) for kind in ("pixels", "latents") for precision in ("bf16", "fp32")
             for channels_last in ((True, False) if kind == "pixels" else (False,))]
    for kind, precision, channels_last in cases:
        def step(kind=kind, precision=precision, channels_last=channels_last):
            data = work / f"edm2-{kind}-{resolution}"
            if not data.exists():
                (random_set if kind == "pixels" else latent_shaped_set)(data, resolution, *([True] if kind == "pixels" else []))
            config = TrainConfig(data=str(data), out=tempfile.mkdtemp(dir=work), device="cpu", compile=False, batch=2,
                                 steps=1, arch="edm2", precision=precision, channels_last=channels_last, **size)
            with contextlib.redirect_stdout(None):
                trainer = Trainer(config)
                trainer.train_step()
            net = trainer.net.eval()
            sample_paths(net, net.img_resolution, net.img_channels // 2)

        yield f"train edm2 {kind} {resolution}x{resolution} {'channels_last' if channels_last else 'NCHW'} {precision}", step


def sample_paths(net: torch.nn.Module, resolution: int, channels: int = 3) -> None:
    """Every path of `ambient_sample`: exact (float64, the default, and float32, `--float32`), without
    clipping, and fast."""
    from ambient_fast.sampling.samplers import ambient_sample, seeded_inputs

    latents, masks = seeded_inputs([0], (channels, resolution, resolution), 1, 0.5, False, "cpu")
    with torch.no_grad():
        for options in (dict(), dict(dtype=torch.float32), dict(clip=False), dict(fast=True)):
            ambient_sample(net, latents, masks, num_steps=SAMPLE_STEPS, **options)


def published_workloads(mode: str) -> Iterator[Tuple[str, Callable[[], None]]]:
    """The samplers on the published configurations (double-sigmoid gate, the reference's
    preconditioning), as `bench/sample.py` and imported checkpoints run them."""
    from sample import published_model

    for resolution in RESOLUTIONS[mode]:
        if resolution == 16:
            continue  # no published 16x16 model
        for channels_last in (True, False):
            def run(resolution=resolution, channels_last=channels_last):
                net = published_model(resolution, QUICK_SIZE if mode == "quick" else {}, torch.device("cpu"))
                if channels_last:
                    net = net.to(memory_format=torch.channels_last)
                sample_paths(net, resolution)

            yield f"sample published {resolution}x{resolution} {'channels_last' if channels_last else 'NCHW'}", run


def ambient_input_workloads(mode: str) -> Iterator[Tuple[str, Callable[[], None]]]:
    """The ambient input of a training step for every further corruption (the operators of
    corruption.FURTHER_FOR_DATA, dust per value and per pixel), on each kind of stored values
    (uint8 levels; float16 values of a set with noisy images, with Tweedie targets and naive), in
    both layouts, at each resolution. The per-image kernel sees besides the schedule (EDM, VP, a
    discrete one), whether records weigh the images and whether the set has labels: each schedule
    runs with and without both (the flags act on separate parts of the kernel)."""
    from ambient_fast.objective.corruption import make_operator
    from ambient_fast.files.images import from_uint8
    from ambient_fast.objective.objective import AmbientObjective, DiscreteVPSchedule, EDMSchedule, VPSchedule
    from kernels import stored_batch

    operators = {"dust": dict(p=0.5, delta=0.1), "dust shared": dict(p=0.5, delta=0.1, shared_channels=True),
                 "box": dict(p=0.25, delta=0.25), "fixed_box": dict(p=0.25, delta=0.1),
                 "keep_patch": dict(p=0.5, delta=0.25)}
    for resolution, channels_last in itertools.product(RESOLUTIONS[mode], (True, False)):
        def run(resolution=resolution, channels_last=channels_last):
            def inputs(schedule, operator, raw, noise, label_dim=0):
                bounds = torch.maximum(raw.sigma_n if noise else torch.zeros(2), raw.sigma_min).numpy()
                AmbientObjective(schedule, operator, seed=0, shape=(3, resolution, resolution), label_dim=label_dim,
                                 channels_last=channels_last, noise=noise, bounds=bounds).inputs(raw)

            levels = stored_batch(2, 3, resolution, resolution, torch.device("cpu"))
            noisy = levels._replace(observed=from_uint8(levels.observed).to(torch.float16),
                                    sigma_n=torch.full((2,), 0.2))
            for name, params in operators.items():
                operator = make_operator(name.split()[0], **params)
                for raw, noise in ((levels, False), (noisy, True), (noisy, False)):
                    inputs(EDMSchedule(), operator, raw, noise)
            dust = make_operator("dust", **operators["dust"])
            labelled = levels._replace(labels=torch.tensor([1, 7]), sigma_min=torch.full((2,), 0.05))
            inputs(EDMSchedule(), dust, labelled, False, label_dim=10)
            for schedule in (VPSchedule(), DiscreteVPSchedule(torch.linspace(0.01, 80, 50))):
                inputs(schedule, dust, levels, False)
                inputs(schedule, dust, noisy._replace(labels=torch.tensor([1, 7])), True, label_dim=10)

        yield (f"ambient input {resolution}x{resolution} {'channels_last' if channels_last else 'NCHW'}, every operator, "
               "uint8 and noisy float16 values, every schedule"), run


def benchmark_workloads(mode: str) -> Iterator[Tuple[str, Callable[[], None]]]:
    """The fused calls of `bench/kernels.py`, every configuration, at the size `bench/gpu_check.sh` runs."""
    import kernels as kernel_bench

    size = KERNEL_BENCH_MB[mode]

    def run():
        for case in kernel_bench.cases_of_size(size, torch.device("cpu")):
            case.fused()

    yield f"bench/kernels.py --sizes {size}", run


# ----------------------------------------------------------------------------------------------
# Record, compile, report


def record(mode: str, console: Console):
    from ambient_fast.kernels import aot

    with tempfile.TemporaryDirectory(prefix="ambient-fast-aot-") as work, aot.record_launches(TARGETS) as recorder:
        workloads = [*training_workloads(Path(work), mode), *edm2_workloads(Path(work), mode), *published_workloads(mode),
                     *ambient_input_workloads(mode), *benchmark_workloads(mode)]
        for index, (label, run) in enumerate(workloads, 1):
            start = time.perf_counter()
            recorder.label = label
            run()
            console.print(f"  [{index}/{len(workloads)}] {label} ({time.perf_counter() - start:.1f} s)",
                          highlight=False, soft_wrap=True)
    return recorder.specializations(), len(workloads)


def report(results, workloads: int, mode: str, seconds: Tuple[float, float]) -> Tuple[List[str], List[List[str]]]:
    from ambient_fast.kernels import aot

    header = ["kernel", "target", "specialisations", "failed", "max registers", "max spill bytes",
              "max shared bytes"]
    rows = []
    for (kernel, target), group in itertools.groupby(results, key=lambda r: (r.spec.kernel, r.spec.target)):
        group = list(group)
        ok = [r for r in group if r.ok]
        rows.append([kernel, target, str(len(group)), str(len(group) - len(ok)),
                     str(max((r.registers or 0 for r in ok), default="-")),
                     str(max((r.spill_bytes or 0 for r in ok), default="-")),
                     str(max((r.shared_bytes or 0 for r in ok), default="-"))])
    totals = aot.summary(results)
    largest = totals["max_registers_at"]
    lines = [f"{totals['total']} specialisations ({mode} set, from {workloads} workloads) for {', '.join(TARGETS)}: "
             f"{totals['compiled']} compiled, {len(totals['failed'])} failed; recording {seconds[0]:.0f} s, "
             f"compiling {seconds[1]:.0f} s."]
    if largest is not None:
        lines.append(f"Largest register use: {largest.registers} per thread, {largest.spec.kernel} on "
                     f"{largest.spec.target} ({largest.spec.describe()}).")
    spilling = totals["spilling"]
    lines.append("Spills: none." if not spilling else "Spills: " + "; ".join(
        f"{r.spec.kernel} {r.spec.target} {r.spill_bytes} B ({r.spec.describe()})" for r in spilling))
    for failure in totals["failed"]:
        lines.append(f"FAILED {failure.spec.kernel} {failure.spec.target} ({failure.spec.describe()}; launched by "
                     f"{', '.join(sorted(failure.spec.sources))}): {failure.error}")
    return lines, [header, *rows]


def run(mode: str, console: Console, results_dir: Path = None) -> int:
    """Record, compile and report; write the markdown report when `results_dir` is given. Returns
    the exit status (1 if anything failed to compile)."""
    from ambient_fast.kernels import aot

    console.print(f"recording the fused-kernel launches of the {mode} set of workloads ...")
    start = time.perf_counter()
    specs, workloads = record(mode, console)
    recorded = time.perf_counter() - start
    console.print(f"compiling {len(specs)} specialisations for {', '.join(TARGETS)} ...")

    def progress(done, total, result):
        if not result.ok or done == total or done % 50 == 0:
            console.print(f"  {done}/{total}" + ("" if result.ok else f" FAILED {result.spec.kernel} {result.spec.target}"),
                          highlight=False)

    start = time.perf_counter()
    results = aot.compile_all(specs, progress)
    lines, (header, *rows) = report(results, workloads, mode, (recorded, time.perf_counter() - start))
    harness.print_table(console, "ahead-of-time compile of the fused kernels", header, rows, left=("kernel", "target"))
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)
    if results_dir is not None:
        import triton

        # The quick set's report is named apart: it must never replace the full set's of the same day.
        suffix = "-quick" if mode == "quick" else ""
        path = Path(results_dir) / f"aot-triton-{triton.__version__}-{harness.today()}{suffix}.md"
        command = "python bench/aot.py " + " ".join(sys.argv[1:])
        harness.write_report(path, f"Ahead-of-time compile of the fused kernels, {harness.today()}", [
            harness.environment_section(torch.device("cpu"), command.strip()).replace(
                harness.CPU_CAVEAT, "A compile check: no GPU is needed.") +
            f"\n- Targets: {', '.join(TARGETS)} (cubin, Triton's bundled ptxas)",
            "\n".join(lines), "\n".join(harness.markdown_table(header, rows))])
        console.print(f"wrote {path}")
    return 1 if any(not r.ok for r in results) else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_check_arguments(parser, "the CI subset: narrow models, 16x16 and 32x32")
    args = parser.parse_args(argv)
    from ambient_fast.kernels._utils import triton_available

    console = Console()
    if not triton_available():
        console.print("Triton is not installed: nothing to compile (pip install triton).")
        return 1
    return run("quick" if args.quick else "full", console, None if args.no_report else args.results)


if __name__ == "__main__":
    raise SystemExit(main())
