"""Sampling throughput against a reference-style sampler: `python bench/sample.py`.

18-step Heun with one fixed mask (EDM's noise levels, no churn) at 32x32 and 64x64, batch 256, on
DDPM++ models of the published configurations built as the published checkpoints are (double-sigmoid
gate, the reference's preconditioning) with random weights redrawn at unit scale (EDM initialises
the last layers near zero, which would make every sampler return almost the same images):

  reference-style: the reference sampler's way of working, written out below: float64 state and
      torch.autograd on every evaluation (the reference differentiates its guidance energy even
      when the guidance scale is 0 and the energy is 0), fp32 network, eager, no fused kernels, at
      most 64 images per call (the reference's default batch; its autograd graph of a batch of 256
      at 64x64 would not fit in 80 GB);
  exact: ambient_fast.sampling.samplers.ambient_sample(fast=False) (`python -m ambient_fast.sample --exact`):
      float64 state, no autograd, the fused sampler step where it runs (CUDA);
  fast: ambient_fast.sampling.samplers.ambient_sample(fast=True), the sampling command's default on GPUs:
      bf16 network replayed from a CUDA graph (on GPUs), float32 state, fused step.

exact and fast sample the network in the memory format the sampling command gives it on the device
(channels_last on CUDA, contiguous elsewhere); reference-style keeps the reference's (contiguous).

Reported: images/s (one timed call after a 2-step warm-up call), the speed-up over reference-style
with both sides, and how far each sampler's images are from reference-style's (max and mean
absolute difference; images lie in [-1, 1]). Written to bench/results/sample-<device>-<date>.md or
--results DIR, after each resolution.

Target (DESIGN.md, one H100, 64x64, batch 256): fast >= 20x reference-style, with the same images
within tolerance (max 0.1, mean 0.01: tests/test_sample.py's bound for the CUDA-graph path; exact:
max 1e-4, the fixtures' float64 bound). A CPU cannot judge the speed target; `--quick` runs small
models there to check that it all works, `--tiny` the smallest in 8 steps (bash bench/gpu_check.sh
--cpu-rehearsal).
"""
import argparse
import copy
import math
import sys
from pathlib import Path
from typing import List, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402

import _harness as harness  # noqa: E402
from ambient_fast import kernels  # noqa: E402
from ambient_fast.networks import build_reference_model  # noqa: E402
from ambient_fast.sampling.samplers import ambient_sample, edm_sigma_steps, seeded_inputs  # noqa: E402
from ambient_fast.training.config import ARCHS, PRESETS, preset_for  # noqa: E402

RESOLUTIONS = (32, 64)
NUM_STEPS = 18
# Per size (--quick: narrow and shallow, for a 2-core CPU; --tiny: the smallest): model-size overrides
# of the published configuration, the default batch and the Heun steps of the timed call. --tiny checks
# that every path runs (bash bench/gpu_check.sh --cpu-rehearsal) and times nothing worth reading: 8 steps,
# where the fast sampler still lies well within its tolerance of reference-style (measured at 32x32 on
# the CPU: max 0.020 at 8 steps, 0.011 at 18; 0.044 at 6, and 0.11 at 4, past the 0.1 allowed), in half
# the time (7.7 s against 15.7 s for the whole command).
SIZES = {"full": dict(size={}, batch=256, steps=NUM_STEPS),
         "quick": dict(size=dict(model_channels=32, num_blocks=1), batch=2, steps=NUM_STEPS),
         "tiny": dict(size=harness.TINY_SIZE, batch=1, steps=8)}
SURVIVAL = 0.54  # (1 - p)(1 - delta) for p = 0.4, delta = 0.1: the reference sampler's default
# The reference samples at most 64 images per call (its --batch default); its autograd graph of a
# 64x64 model at batch 256 would not fit in an H100's 80 GB. Reference-style runs in such chunks.
REFERENCE_BATCH = 64
TOLERANCE = {"exact": (1e-4, 1e-4), "fast": (0.1, 0.01)}  # (max, mean) absolute difference to reference-style


def published_model(resolution: int, size: dict, device: torch.device) -> torch.nn.Module:
    """The published DDPM++ configuration at `resolution` (narrowed by `size`), reference-compatible,
    weights redrawn from N(0, 1 / fan_in) with a fixed seed, in eval mode on `device`."""
    model_type, arch = ARCHS["ddpmpp"]
    config = dict(img_resolution=resolution, img_channels=6, model_type=model_type, gated=True, dropout=0.0,
                  **arch, **{**PRESETS[preset_for(resolution)], **size})
    net = build_reference_model(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in net.parameters():
            if param.ndim >= 2:  # weights; biases and norm scales keep their initial values
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(param[0].numel()))
    return net.eval().to(device)


def reference_style_sample(net: torch.nn.Module, latents: torch.Tensor, mask: torch.Tensor,
                           num_steps: int = NUM_STEPS) -> torch.Tensor:
    """The fixed-mask Heun sampler the way the reference runs it: float64 state; every evaluation
    builds the autograd graph through the network and differentiates the guidance energy
    K * sum_j 0.5 ||D_0 - D_j||^2 over its masks (here K = 1, so the energy and its gradient are 0,
    times a guidance scale of 0), as the reference does whatever the scale.

    latents: (B, C, H, W); mask: (B, C, H, W) 0/1. Returns (B, C, H, W) float64."""
    channels = latents.shape[1]
    mask = mask.to(torch.float64)
    t_steps = edm_sigma_steps(num_steps, dtype=torch.float64, device=latents.device)

    def increment(x: torch.Tensor, t: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        denoised = net(torch.cat([mask * x, mask], dim=1), t, None).to(torch.float64)[:, :channels].clamp(-1, 1)
        stacked = denoised[None]  # (K, B, C, H, W)
        energy = len(stacked) * 0.5 * (stacked[:1] - stacked).square().sum()
        (guidance_gradient,) = torch.autograd.grad(energy, x)
        return dt * (x.detach() - denoised.detach()) / t - 0.0 * guidance_gradient

    x = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        g1 = increment(x, t_cur, t_next - t_cur)
        if i < num_steps - 1:
            x = x + (g1 + increment(x + g1, t_next, t_next - t_cur)) / 2
        else:
            x = x + g1  # Euler on the last step: the prediction of the last evaluation
    return x.detach()


class Result(NamedTuple):
    sampler: str
    settings: str
    images_per_s: float
    images: torch.Tensor


def run_samplers(resolution: int, batch: int, size: dict, device: torch.device,
                 num_steps: int = NUM_STEPS) -> List[Result]:
    """Each sampler: a 2-step warm-up call (kernel compilation, cuDNN plans, allocator), then one
    timed `num_steps`-step call on the same latents and mask."""
    net = published_model(resolution, size, device)
    memory_format, _ = harness.cli_sampling(device)
    cli_net = net if memory_format == torch.contiguous_format else copy.deepcopy(net).to(memory_format=memory_format)
    layout = "channels_last" if memory_format == torch.channels_last else "contiguous"
    latents, masks = seeded_inputs(range(batch), (3, resolution, resolution), 1, SURVIVAL, False, device)

    def reference_style(steps):
        with harness.fused_kernels_off():
            chunks = [slice(i, i + REFERENCE_BATCH) for i in range(0, batch, REFERENCE_BATCH)]
            return torch.cat([reference_style_sample(net, latents[c], masks[0, c], steps) for c in chunks])

    graph = "CUDA graph" if device.type == "cuda" else "no CUDA graph (GPU only)"
    samplers = [
        ("reference-style", f"float64 state, autograd every evaluation, fp32 network, eager, contiguous, PyTorch "
                            f"references, at most {REFERENCE_BATCH} images per call (the reference's default)",
         reference_style),
        ("exact", f"float64 state, no autograd, fp32 network, {layout}; kernels: {kernels.active_path(device)}",
         lambda steps: ambient_sample(cli_net, latents, masks, num_steps=steps)),
        ("fast", f"float32 state, bf16 network, {layout}, {graph}; kernels: {kernels.active_path(device)}",
         lambda steps: ambient_sample(cli_net, latents, masks, num_steps=steps, fast=True)),
    ]
    results = []
    for name, settings, sample in samplers:
        sample(2)
        harness.reset_peak_memory(device)
        images = []
        elapsed = harness.seconds(lambda: images.append(sample(num_steps)), device)
        results.append(Result(name, f"{settings}; {harness.tf32_state(device)}; peak memory allocated / reserved "
                                    f"{harness.peak_memory(device)}", batch / elapsed, images[0].double().cpu()))
    return results


HEADER = ["sampler", "images/s", "vs reference-style", "max abs diff", "mean abs diff", "within tolerance"]


def table_rows(results: List[Result]) -> "list[list[str]]":
    reference = results[0]
    rows = []
    for result in results:
        diff = (result.images - reference.images).abs()
        if result is reference:
            agreement = ["-", "-", "(the reference)"]
        else:
            bound_max, bound_mean = TOLERANCE[result.sampler]
            ok = diff.max().item() <= bound_max and diff.mean().item() <= bound_mean
            agreement = [f"{diff.max().item():.3g}", f"{diff.mean().item():.3g}",
                         f"{'yes' if ok else 'NO'} (max {bound_max:g}, mean {bound_mean:g})"]
        rows.append([result.sampler, f"{result.images_per_s:.4g}",
                     harness.ratio(result.images_per_s, reference.images_per_s), *agreement])
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolutions", default="32,64", help="of 32 and 64, comma-separated (default 32,64)")
    parser.add_argument("--batch", type=int, help="images per call (default 256; --quick: 2; --tiny: 1)")
    harness.add_common_arguments(parser, "small models and batch: checks that it all runs")
    args = parser.parse_args(argv)
    console = Console()
    resolutions = harness.parse_resolutions(parser, args.resolutions, RESOLUTIONS, "--resolutions")
    defaults = SIZES[harness.size_mode(args)]
    batch = args.batch if args.batch is not None else defaults["batch"]
    if batch < 1:
        parser.error("--batch must be at least 1")
    try:
        device = harness.pick_device(args.device)
    except ValueError as error:
        console.print(f"[red]error:[/] {error}")
        return 2

    gpu = device.type == "cuda"
    if not gpu:
        console.print(f"[bold yellow]{harness.CPU_CAVEAT}[/]")
    size = defaults["size"]
    command = "python bench/sample.py " + " ".join(argv if argv is not None else sys.argv[1:])
    sections = [harness.environment_section(device, command.strip()),
                f"{defaults['steps']}-step Heun, one fixed mask (survival {SURVIVAL}), DDPM++ as published "
                "(double-sigmoid gate, reference preconditioning), random weights redrawn at unit scale. images/s: "
                "one timed call after a 2-step warm-up call; differences: against reference-style's images, in "
                "[-1, 1]. exact and fast: the network in the sampling command's memory format on this device."
                + (f" Models narrowed to {size} (not the published sizes)." if size else "")]
    path = harness.report_path(args.results, "sample", device)
    failures = 0
    for resolution in resolutions:
        console.print(f"{resolution}x{resolution}, batch {batch}: reference-style, exact and fast samplers ...")
        results = run_samplers(resolution, batch, size, device, defaults["steps"])
        rows = table_rows(results)
        failures += sum(row[-1].startswith("NO") for row in rows)
        title = f"{resolution}x{resolution}{harness.SIZE_TITLES[harness.size_mode(args)]}, batch {batch}"
        harness.print_table(console, title, HEADER, rows, left=("sampler", "within tolerance"))
        fast, reference = results[2], results[0]
        target = (f"- fast / reference-style: {harness.ratio(fast.images_per_s, reference.images_per_s)} images/s"
                  + ("; target >= 20x at 64x64, batch 256" + ("" if gpu else " (not judged: CPU)")
                     if resolution == 64 else ""))
        lines = [target] + [f"- {result.sampler}: {result.settings}" for result in results]
        console.print("\n".join(lines), highlight=False, soft_wrap=True)
        sections += [f"## {title}", "\n".join(harness.markdown_table(HEADER, rows)), "\n".join(lines)]
        harness.write_report(path, f"Sampling throughput on {harness.device_name(device)}, {harness.today()}", sections)
    console.print(f"wrote {path}")
    if failures:
        console.print(f"[red]{failures} sampler(s) outside tolerance[/]")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
