"""Benchmark of the fused Triton kernels: `python bench/kernels.py`.

For each kernel and sizes from 1 MB to 256 MB (size = elements x 4 bytes), the time of the eager
PyTorch sequence it replaces, of torch.compile of that sequence, and of the Triton kernel: the
median of triton.testing.do_bench, the kernel's bandwidth (bytes it must move / time), that as a
percentage of the copy bandwidth measured in the same run, and the speedups. Every kernel's
output is checked against the eager result before it is timed. The ambient input appears twice: the
kernel alone, on the arguments a training step passes it, against the copy ceiling; and beside it
the whole call a step makes (AmbientObjective.inputs: the per-image draws around the kernel), whose device
operations are counted with torch.profiler (DESIGN.md: at most three). The table is printed and
saved as markdown in bench/results/kernels-<device>-<date>.md (or --results DIR; kernels-edm2-... for
a run of EDM2 configurations only, so that it does not replace the day's DDPM++ record).

The configurations (--configs, comma-separated; default all three):
  ddpmpp          DDPM++'s kernels: the gated activation at (N, 128, 32, 32) in both layouts, and the
                  loss, the ambient input (uint8 values, dust masks, EDM's levels) and the sampler step
                  at (N, 3, 64, 64);
  edm2-64         EDM2-S at ImageNet-64's size (its U-Net has no gated convolution): the ambient input of
                  `EDM2Objective` (uint8 values, dust masks, EDM2's pixel levels) and its loss, the
                  masked loss uncertainty-weighted by the log-variance head, at (N, 3, 64, 64);
  edm2-latent-64  EDM2 on 64x64x4 latents: the same at (N, 4, 64, 64), on float16 values with full
                  masks, each image's level drawn inside its noise-level window (those draws take the
                  PyTorch path on every device; the per-value pass is the kernel).

Without a GPU the timings mean nothing: the script says so, runs the correctness checks in
Triton's interpreter at small sizes instead, writes them to the same report, and exits 0 when
they pass.

Targets (DESIGN.md): at 64 MB and more, at least 85% of the copy bandwidth and 2.5x eager.
"""
import argparse
import os
import platform
import sys
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch

GPU = torch.cuda.is_available()

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402

import _harness as harness  # noqa: E402
import _profile as profile  # noqa: E402

from ambient_fast import kernels  # noqa: E402
from ambient_fast.kernels._utils import triton_available  # noqa: E402
from ambient_fast.objective.corruption import make_operator, training_operator  # noqa: E402
from ambient_fast.data.batches import RawBatch  # noqa: E402
from ambient_fast.objective.edm2 import EDM2Objective, edm2_schedule, uncertainty_weighted  # noqa: E402
from ambient_fast.objective.objective import AmbientObjective, EDMSchedule  # noqa: E402
from ambient_fast.kernels.gated_activation import gated_backward, gated_forward  # noqa: E402
from ambient_fast.kernels.sampler_step import sampler_step_launch  # noqa: E402

SIZES_MB = (1, 8, 64, 256)


class KernelConfig(NamedTuple):
    """A configuration of --configs (module docstring): the (C, H, W) of its ambient input and loss."""

    shape: Tuple[int, int, int]
    edm2: bool    # EDM2's objective (its levels, the uncertainty-weighted loss); else DDPM++'s kernels, all four
    latent: bool  # float16 latents, full masks, noise-level windows; else uint8 values with dust masks


KERNEL_CONFIGS = {"ddpmpp": KernelConfig((3, 64, 64), edm2=False, latent=False),
                  "edm2-64": KernelConfig((3, 64, 64), edm2=True, latent=False),
                  "edm2-latent-64": KernelConfig((4, 64, 64), edm2=True, latent=True)}
DDPMPP = KERNEL_CONFIGS["ddpmpp"]


class Case(NamedTuple):
    """One benchmark row: three callables doing the same work and the bytes the kernel moves."""

    op: str
    detail: str
    size_mb: float
    bytes: int
    eager: Callable
    compiled: Callable
    fused: Callable
    check: Callable[[], float]  # max |fused - eager| (relative where noted); must be below tolerance
    tolerance: float


# ----------------------------------------------------------------------------------------------
# Cases. Each builder returns a Case for `numel` elements of the op's main (N, C, H, W) tensor.


def gated_cases(numel: int, size_mb: float, device, channels_last: bool) -> List[Case]:
    C, H, W = 128, 32, 32
    N = max(1, numel // (C * H * W))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dtype = torch.bfloat16
    ag = torch.randn(N, 2 * C, H, W, device=device, dtype=dtype).contiguous(memory_format=fmt)
    bias = torch.randn(C, device=device, dtype=dtype)
    dout = torch.randn(N, C, H, W, device=device, dtype=dtype).contiguous(memory_format=fmt)
    elem = N * C * H * W * 2
    reference = kernels.gated_activation_reference
    compiled = lazy_compile(reference)

    def eager_fwd():
        with torch.no_grad():
            return reference(*ag.chunk(2, dim=1), bias, True)

    def compiled_fwd():
        with torch.no_grad():
            return compiled(*ag.chunk(2, dim=1), bias, True)

    def fused_fwd():
        return gated_forward(*ag.chunk(2, dim=1), bias, True)

    leaf, leaf_bias = ag.detach().requires_grad_(True), bias.detach().requires_grad_(True)
    outputs = {}  # forward -> its output on the leaves: the graph a timed backward differentiates

    def output_of(forward):
        """Computed at the first backward (a warm-up call), not here: building the cases compiled the
        reference with Inductor on every run, the CPU's interpreter checks and the AOT recording included."""
        if forward not in outputs:
            outputs[forward] = forward(*leaf.chunk(2, dim=1), leaf_bias, True)
        return outputs[forward]

    dag = torch.empty_like(ag)

    def eager_bwd():
        return torch.autograd.grad(output_of(reference), (leaf, leaf_bias), dout, retain_graph=True)

    def compiled_bwd():
        return torch.autograd.grad(output_of(compiled), (leaf, leaf_bias), dout, retain_graph=True)

    def fused_bwd():
        return dag, gated_backward(*ag.chunk(2, dim=1), dout, True, True, *dag.chunk(2, dim=1))

    def check_fwd():
        return _max_err(fused_fwd(), eager_fwd())

    def check_bwd():
        got, want = fused_bwd(), eager_bwd()
        return max(_max_err(got[0], want[0]), _max_err(got[1], want[1], relative=True))

    layout = "channels_last" if channels_last else "nchw"
    detail = f"bf16 {layout} ({N},{2 * C},{H},{W}) double"
    return [Case("gated_activation fwd", detail, size_mb, 3 * elem, eager_fwd, compiled_fwd, fused_fwd, check_fwd,
                 0.05),  # a, g read, out written
            Case("gated_activation bwd", detail, size_mb, 5 * elem, eager_bwd, compiled_bwd, fused_bwd, check_bwd,
                 0.05)]  # a, g, dout read, da, dg written


def masked_loss_cases(numel: int, size_mb: float, device, config: KernelConfig = DDPMPP) -> List[Case]:
    """The loss of a training step on the image channels of a network output, forward and backward:
    the masked loss alone, or EDM2's (the masked loss uncertainty-weighted by the log-variance head,
    `ambient_fast.objective.edm2.uncertainty_weighted`: its gradient also reaches the head's output).
    A latent set's masks are full."""
    C, H, W = config.shape
    N = max(1, numel // (C * H * W))
    output = torch.randn(N, 2 * C, H, W, device=device)
    D = output[:, :C].detach().requires_grad_(True)  # the image channels of a network output
    y = torch.rand(N, C, H, W, device=device) * 2 - 1
    A = (torch.ones(N, C, H, W, device=device) if config.latent  # a latent set's masks are full
         else (torch.rand(N, C, H, W, device=device) < 0.6).float())
    weight = torch.rand(N, device=device) + 0.5
    logvar = torch.randn(N, 1, 1, 1, device=device).requires_grad_(True)
    dloss = torch.ones(N, device=device)
    reference = kernels.masked_loss_reference
    compiled = lazy_compile(reference)

    def run(fn):
        loss = fn(D, y, A, weight)
        if not config.edm2:
            return loss, torch.autograd.grad(loss, D, dloss)[0]
        loss = uncertainty_weighted(loss, logvar, A.sum((1, 2, 3)))
        return (loss, *torch.autograd.grad(loss, (D, logvar), dloss))

    def check():
        # The loss and the head's gradient are sums over the image's values: relative; dD per value: absolute.
        fused, want = run(kernels.masked_loss), run(reference)
        errors = [_max_err(fused[0], want[0], relative=True), _max_err(fused[1], want[1])]
        if config.edm2:
            errors.append(_max_err(fused[2], want[2], relative=True))
        return max(errors)

    elem = N * C * H * W * 4
    detail = f"fp32 L2 ({N},{C},{H},{W}) slice" + (", EDM2 uncertainty-weighted" if config.edm2 else "")
    # forward reads D, y, A and writes dloss/dD; backward reads it and writes the scaled gradient
    return [Case("masked_loss fwd+bwd", detail, size_mb, 6 * elem, lambda: run(reference), lambda: run(compiled),
                 lambda: run(kernels.masked_loss), check, 1e-4)]


def stored_batch(N: int, C: int, H: int, W: int, device) -> RawBatch:
    """A batch as a loader delivers it: uint8 values, packed mask bits (dust, 20% erased, one mask per
    pixel), flips, no labels."""
    A = (torch.rand(N, 1, H, W, device=device) < 0.8).expand(N, C, H, W)
    observed = (torch.randint(0, 256, (N, C, H, W), device=device, dtype=torch.uint8) * A).to(torch.uint8)
    bits = torch.from_numpy(np.packbits(A.cpu().numpy().reshape(N, -1), axis=1, bitorder="little")).to(device)
    flips = (torch.arange(N, device=device) % 2).to(torch.uint8)
    zeros = torch.zeros(N, device=device)
    return RawBatch(observed, bits, flips, None, 12345, torch.ones(N, dtype=torch.uint8, device=device), zeros, zeros)


def latent_batch(N: int, C: int, H: int, W: int, device) -> RawBatch:
    """A batch of a latent set as a loader delivers it: float16 values, every mask bit set (latents have
    no masks) and nothing hidden, no flips, each image's noise-level window (sigma_min 0.05, sigma_max
    2, as bench/aot.py's latent-shaped set)."""
    values = torch.randn(N, C, H, W, device=device).to(torch.float16)
    bits = torch.full((N, -(-C * H * W // 8)), 255, dtype=torch.uint8, device=device)
    zeros = torch.zeros(N, device=device)
    return RawBatch(values, bits, zeros.to(torch.uint8), None, 12345, zeros.to(torch.uint8), zeros,
                    torch.full((N,), 0.05, device=device), torch.full((N,), 2.0, device=device))


def training_inputs(shape, edm2: bool = False, windows: Optional[RawBatch] = None):
    """The trainer's ambient input (`AmbientObjective.inputs`; `EDM2Objective`'s for edm2) for a set of
    images of `shape`, made as the trainer makes it: a dust set with EDM's levels (EDM2's pixel levels
    for edm2), or, given `windows` (a batch whose records are the set's), a latent set: EDM2's latent
    levels, no masks (the operator of a set that hides nothing), each image inside its window."""
    objective = EDM2Objective if edm2 else AmbientObjective
    schedule = edm2_schedule(latent=windows is not None) if edm2 else EDMSchedule()
    if windows is None:
        return objective(schedule, make_operator("dust", p=0.2, delta=0.1, shared_channels=True), seed=7,
                         shape=shape).inputs
    return objective(schedule, training_operator({"kind": "none"}, 0.0), seed=7, shape=shape,
                     bounds=windows.sigma_min.cpu().numpy(), sigma_max=windows.sigma_max.cpu().numpy()).inputs


def kernel_arguments(inputs, raw: RawBatch) -> "tuple[tuple, dict]":
    """The arguments `inputs` passes to ambient_fast.kernels.ambient_input for `raw`, caught on one
    call (the ambient input calls the op through the kernels package)."""
    calls = []
    op = kernels.ambient_input

    def catch(*args, **kwargs):
        calls.append((args, kwargs))
        return op(*args, **kwargs)

    kernels.ambient_input = catch
    try:
        inputs(raw)
    finally:
        kernels.ambient_input = op
    if len(calls) != 1:
        raise RuntimeError(f"the ambient input called ambient_fast.kernels.ambient_input {len(calls)} times, not once")
    return calls[0]


def ambient_input_cases(numel: int, size_mb: float, device, config: KernelConfig = DDPMPP) -> List[Case]:
    """The ambient input of a training step on a loader's batch, twice: the kernel alone (the
    arguments a step passes it; eager: its PyTorch reference), and the whole call a step makes
    (ambient_fast.objective.objective.AmbientObjective.inputs: the per-image draws, sigma and the kernel; eager:
    the same with the references). Both move the same bytes; the second's distance from the first is
    what the draws around the kernel cost. Compiled: torch.compile of the eager sequence."""
    C, H, W = config.shape
    N = max(1, numel // (C * H * W))
    raw = (latent_batch if config.latent else stored_batch)(N, C, H, W, device)
    inputs = training_inputs((C, H, W), config.edm2, raw if config.latent else None)
    args, kwargs = kernel_arguments(inputs, raw)

    def kernel():
        return kernels.ambient_input(*args, **kwargs)

    def call():
        return inputs(raw)

    def eager(fn):
        def run():
            with harness.fused_kernels_off():
                return fn()
        return run

    def check(fn):
        def compare():
            fused, want = fn(), eager(fn)()
            exact = all(torch.equal(getattr(fused, name), getattr(want, name)) for name in ("A", "y", "A_hat"))
            # The noise's float64 logarithm and cosine may differ in a GPU's last bits before rounding.
            return _max_err(fused.net_input, want.net_input) if exact else float("inf")
        return compare

    # Compiled: traces the reference (the dispatch never fuses while compiling).
    compiled_kernel, compiled_call = lazy_compile(kernels.ambient_input), lazy_compile(inputs)
    elem = N * C * H * W
    # stored values, bits, flips read; net input, A_hat, A, y written
    traffic = elem * (raw.observed.element_size() + 4 * 2 + 4 * 3) + raw.mask_bits.numel() + N
    values = "float16" if config.latent else "uint8"
    shape = f"stored {values} + bits ({N},{C},{H},{W}) -> fp32" + (", windows" if config.latent else "")
    call_name = f"{'EDM2Objective' if config.edm2 else 'AmbientObjective'}.inputs call"
    return [Case("ambient_input kernel", f"the kernel alone: {shape}", size_mb, traffic, eager(kernel),
                 lambda: compiled_kernel(*args, **kwargs), kernel, check(kernel), 1e-5),
            Case(call_name, f"a training step's whole call: {shape}", size_mb, traffic, eager(call),
                 lambda: compiled_call(raw), call, check(call), 1e-5)]


def ambient_input_launches(size_mb: float, config: KernelConfig) -> int:
    """Device kernels one AmbientObjective.inputs call of `config` launches at `size_mb` on CUDA (DESIGN.md: at
    most three)."""
    case = ambient_input_cases(int(size_mb * 2 ** 20) // 4, size_mb, torch.device("cuda"), config)[1]
    case.fused()  # built and compiled before it is counted
    return sum(count for _, count, _ in profile.profile_call(case.fused, torch.device("cuda")).rows)


def bytes_per_image() -> "list[list[str]]":
    """Rows: what crosses to the device for one image, and what the ambient input reads, for the
    CIFAR-10 (32x32) and 64x64 configurations (RGB, with a label). Before: the loaders unpacked and
    converted on the device, and the ambient input read float32 y and A (8 bytes a value). Now:
    the stored bytes themselves with the image's record (a RawBatch, measured)."""
    rows = []
    for resolution in (32, 64):
        C = 3
        values = C * resolution * resolution
        raw = stored_batch(4, C, resolution, resolution, torch.device("cpu"))._replace(labels=torch.zeros(4, dtype=torch.int64))
        now = raw.nbytes() // 4
        rows.append([f"{resolution}x{resolution}", f"{values + -(-values // 8) + 8:,}", f"{8 * values:,}",
                     f"{now:,}", f"{now:,}", f"{8 * values / now:.1f}x"])
    return rows


BYTES_HEADER = ["images", "to device before", "ambient input read before", "to device now", "ambient input reads now",
                "read before / now"]


def sampler_cases(numel: int, size_mb: float, device) -> List[Case]:
    C, H, W = 3, 64, 64
    N = max(1, numel // (C * H * W))
    dtype = torch.float64  # the sampler's default state dtype
    x = torch.randn(N, C, H, W, device=device, dtype=dtype) * 5
    output = torch.randn(N, 2 * C, H, W, device=device)
    D = output[:, :C]
    mask = (torch.rand(N, C, H, W, device=device) < 0.5).to(dtype)
    g1 = torch.randn_like(x)
    t, dt = torch.tensor(2.5, device=device, dtype=dtype), torch.tensor(-0.4, device=device, dtype=dtype)
    net_input = torch.cat([mask * x, mask], dim=1)
    reference = kernels.sampler_step_reference
    compiled = lazy_compile(reference)
    kw = dict(stage="heun_correct", g1=g1, net_input=net_input, write_mask=False)

    def fused():
        return sampler_step_launch(x, D, mask, t, dt, "heun_correct", g1, True, net_input, False, None)

    def check():
        got = fused()
        return _max_err(got, reference(x, D, mask, t, dt, **kw).x)

    elem = N * C * H * W
    traffic = elem * (8 * 3 + 4 + 8 * 2)  # read x, g1, M (fp64), D (fp32); write x_next, M x_next
    return [Case("sampler_step heun_correct", f"fp64 state ({N},{C},{H},{W})", size_mb, traffic,
                 lambda: reference(x, D, mask, t, dt, **kw), lambda: compiled(x, D, mask, t, dt, **kw),
                 fused, check, 1e-9)]


def cases_of_size(size_mb: float, device, configs=tuple(KERNEL_CONFIGS)) -> List[Case]:
    """The cases of the configurations named (KERNEL_CONFIGS), `size_mb` each."""
    numel = int(size_mb * 2 ** 20) // 4
    cases = []
    for name in configs:
        config = KERNEL_CONFIGS[name]
        if not config.edm2:  # EDM2's U-Net has no gated convolution; the sampler step is timed at DDPM++'s shape
            for channels_last in (False, True):
                cases += gated_cases(numel, size_mb, device, channels_last)
        cases += masked_loss_cases(numel, size_mb, device, config)
        cases += ambient_input_cases(numel, size_mb, device, config)
        if not config.edm2:
            cases += sampler_cases(numel, size_mb, device)
    return cases


def lazy_compile(fn: Callable) -> Callable:
    """torch.compile(fn), compiled on first call (the CPU run never calls it)."""
    compiled = []

    def call(*args, **kwargs):
        if not compiled:
            compiled.append(torch.compile(fn, dynamic=False))
        return compiled[0](*args, **kwargs)

    return call


def _max_err(a, b, relative: bool = False) -> float:
    a, b = a.double(), b.double()
    err = (a - b).abs().max().item()
    return err / max(b.abs().max().item(), 1e-30) if relative else err


# ----------------------------------------------------------------------------------------------
# GPU: time everything


def median_ms(fn: Callable) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])[0]


def copy_bandwidth() -> float:
    """GB/s of a 256 MB device-to-device copy (read + write)."""
    src = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / median_ms(lambda: dst.copy_(src)) / 1e6


def report_kind(configs) -> str:
    """The report's name: kernels, or kernels-edm2 for EDM2 configurations only (module docstring)."""
    return "kernels-edm2" if all(KERNEL_CONFIGS[name].edm2 for name in configs) else "kernels"


def run_gpu(sizes_mb, configs, console: Console, results: Path) -> int:
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    copy = copy_bandwidth()
    console.print(f"{name}: copy bandwidth {copy:.0f} GB/s; timing {len(sizes_mb)} sizes ...")
    rows, failures = [], []
    for size_mb in sizes_mb:
        for case in cases_of_size(size_mb, device, configs):
            err = case.check()
            ok = err <= case.tolerance
            if not ok:
                failures.append(f"{case.op} {case.detail}: error {err:.3g} > {case.tolerance:g}")
            eager, compiled, fused = median_ms(case.eager), median_ms(case.compiled), median_ms(case.fused)
            gbs = case.bytes / fused / 1e6
            rows.append((case.op, case.detail.split(" (")[0], case.size_mb, [
                case.op, case.detail, f"{case.size_mb:g}", f"{eager:.4f}", f"{compiled:.4f}", f"{fused:.4f}",
                f"{gbs:.0f}", f"{100 * gbs / copy:.0f}%", f"{eager / fused:.2f}x", f"{compiled / fused:.2f}x",
                "ok" if ok else f"FAIL {err:.2g}"]))
            console.print(f"  {case.op:26s} {case.size_mb:>4g} MB  eager {eager:.4f}  compile {compiled:.4f}  "
                          f"triton {fused:.4f} ms", highlight=False)
        torch.cuda.empty_cache()
    rows = [row for *_, row in sorted(rows, key=lambda r: r[:3])]
    header = ["op", "case", "MB", "eager ms", "compile ms", "triton ms", "triton GB/s", "% copy", "vs eager",
              "vs compile", "check"]
    harness.print_table(console, f"fused kernels on {name} (copy {copy:.0f} GB/s)", header, rows,
                        left=("op", "case", "check"))
    launches = ", ".join(f"{config} {ambient_input_launches(max(sizes_mb), KERNEL_CONFIGS[config])}"
                         for config in configs)
    launch_line = (f"Device operations (kernels, copies, memsets; torch.profiler) that one ambient-input call of a "
                   f"training step (AmbientObjective.inputs, EDM2Objective.inputs) launches at {max(sizes_mb):g} MB: "
                   f"{launches}; target (DESIGN.md) at most 3 (a set with noise-level windows draws its levels with "
                   "PyTorch: module docstring).")
    console.print(launch_line, highlight=False, soft_wrap=True)
    command = "python bench/kernels.py " + " ".join(sys.argv[1:])
    path = harness.report_path(results, report_kind(configs), device)
    harness.write_report(path, f"Fused kernels on {name}, {harness.today()}", [
        harness.environment_section(device, command.strip()),
        f"Copy bandwidth (256 MB device copy, same run): {copy:.0f} GB/s. "
        "Times: median of triton.testing.do_bench. GB/s: the bytes the fused kernel must move / its time "
        "(the ambient input's whole call: the same bytes over the call's time). "
        "Size: elements x 4 bytes of the op's main (N, C, H, W) tensor. Ratios: eager ms / triton ms and "
        "compile ms / triton ms of the same row. Targets (DESIGN.md): at 64 MB and more, >= 85% of copy "
        "bandwidth and >= 2.5x eager.",
        "\n".join(harness.markdown_table(header, rows)), launch_line,
        "Bytes per image of the ambient input (" + bytes_per_image.__doc__.split("(", 1)[1].replace("\n    ", " "),
        "\n".join(harness.markdown_table(BYTES_HEADER, bytes_per_image()))])
    console.print(f"wrote {path}")
    for failure in failures:
        console.print(f"[red]check failed:[/] {failure}")
    return 1 if failures else 0


# ----------------------------------------------------------------------------------------------
# CPU: correctness only, in the interpreter


def run_cpu(configs, console: Console, results: Path) -> int:
    """The correctness checks of every case in Triton's interpreter at small sizes, with the fixes the
    interpreter needs in a process that imported Triton without it (ambient_fast.kernels.interpreter)."""
    from ambient_fast.kernels import interpreter

    os.environ["TRITON_INTERPRET"] = "1"  # read at each launch (ambient_fast.kernels._utils.LazyKernel)
    console.print("[bold yellow]No CUDA GPU: kernel timings need a GPU.[/] Running the correctness checks in "
                  "Triton's interpreter (TRITON_INTERPRET=1) at small sizes instead.")
    header = ["op", "case", "max error", "tolerance", "check"]
    rows = []
    with interpreter.fixes():
        for case in cases_of_size(0.01, torch.device("cpu"), configs):
            err = case.check()
            rows.append([case.op, case.detail, f"{err:.3g}", f"{case.tolerance:g}", "ok" if err <= case.tolerance else "FAIL"])
    harness.print_table(console, f"fused kernels vs eager PyTorch, Triton interpreter on {platform.processor() or 'CPU'}",
                        header, rows, left=("op", "case", "check"))
    harness.print_table(console, "bytes per image of the ambient input", BYTES_HEADER, bytes_per_image())
    console.print(f"path: {kernels.active_path('cpu')}")
    device = torch.device("cpu")
    path = harness.report_path(results, report_kind(configs), device)
    harness.write_report(path, f"Fused kernels in Triton's interpreter, {harness.today()}", [
        harness.environment_section(device, ("python bench/kernels.py " + " ".join(sys.argv[1:])).strip()),
        "Correctness only: each case's fused kernel, interpreted, against its eager PyTorch sequence at 0.01 MB. "
        f"Path: {kernels.active_path(device)}.",
        "\n".join(harness.markdown_table(header, rows)),
        "\n".join(harness.markdown_table(BYTES_HEADER, bytes_per_image()))])
    console.print(f"wrote {path}")
    return 1 if any(row[-1] == "FAIL" for row in rows) else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES_MB)),
                        help="sizes in MB (elements x 4 bytes), comma-separated (default 1,8,64,256)")
    parser.add_argument("--configs", default=",".join(KERNEL_CONFIGS), help=f"configurations, of "
                        f"{', '.join(KERNEL_CONFIGS)} (module docstring; default all)")
    parser.add_argument("--results", type=Path, default=harness.RESULTS, help="folder of the markdown report")
    args = parser.parse_args(argv)
    configs = harness.parse_list(parser, args.configs, "--configs", KERNEL_CONFIGS)
    if not configs:
        parser.error("--configs names no configuration")
    console = Console()
    if not triton_available():
        console.print("Triton is not installed: nothing to benchmark.")
        return 1
    if not GPU:
        return run_cpu(configs, console, args.results)
    return run_gpu([float(s) for s in args.sizes.split(",")], configs, console, args.results)


if __name__ == "__main__":
    raise SystemExit(main())
