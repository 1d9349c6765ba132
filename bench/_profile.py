"""Where one call's time goes and where it waits on the host, for the benchmarks: a torch.profiler
table of the call grouped by kernel name, and the host synchronisations the call makes.

The table. On CUDA: every kernel, copy and memset the device ran during the call, each in the first
group of `GROUPS` whose pattern its name matches (case-insensitive `re.search`), with their summed
device time; `busy` is the union of their intervals, `idle` the rest of the call's wall time (the
device waiting on the host: launch gaps, host syncs, Python). On a CPU the same groups over the
operators' self time (time inside an op, its children's excluded), `idle` the time outside any op
(Python and dispatch). Times are under the profiler, whose overhead lands mostly in `idle`.

The groups and what their patterns catch (the order matters: first match wins):
- attention: flash / memory-efficient / cuDNN SDPA kernels (`flash`, `fmha`, `sdpa`, `attention`),
  softmax; on a CPU aten::scaled_dot_product_attention and its parts;
- normalisation: PyTorch's group-norm kernels (RowwiseMoments, ComputeFusedParams,
  ComputeInternalGradients, GroupNorm...), Inductor's fused ones (`triton_*_fused_native_group_norm_*`,
  `var_mean`), aten::native_group_norm*;
- elementwise: Inductor's pointwise and reduction kernels (`triton_poi_`, `triton_red_`, `triton_per_`,
  named after the aten ops they fuse, so tested before convolution: `triton_poi_fused_convolution_0`
  is a bias add), our fused Triton kernels (`_gated_*`, `_ambient_input_*`, `_masked_loss_*`,
  `_sampler_step_*`, `_scale_samples_*`);
- convolution: cuDNN's (`sm90_xmma_fprop_implicit_gemm_*`, `*dgrad*`, `*wgrad*`, `cudnn`, the NCHW/NHWC
  transposes), aten::convolution*;
- matmul: cuBLAS / CUTLASS GEMMs (`gemm`, `cublas`, `cutlass`), aten::mm / addmm / bmm / linear;
- optimizer: fused Adam, the foreach kernels of clipping and the EMA (`multi_tensor_apply`, `adam`,
  `foreach`);
- copies: memcpy, memset, PyTorch's copy kernels, cat;
- elementwise (eager): PyTorch's other elementwise and reduction kernels (`elementwise`, `vectorized`,
  `unrolled`, `reduce`, `index`), any other Triton kernel, any other aten:: op;
- other: the rest.

The host syncs: `torch.cuda.set_sync_debug_mode("warn")` around the call, each warning it raises
counted with the Python line that caused it. PyTorch calls the mode experimental: it does not see
every sync (torch.distributed's, for one). It needs CUDA: on a CPU there is nothing to count.
"""
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch.autograd import DeviceType

GROUPS: Sequence[Tuple[str, str]] = (
    ("attention", r"flash|fmha|sdpa|attention|softmax"),
    ("normalisation", r"group_?norm|layer_?norm|batch_?norm|var_mean|rowwisemoments|fusedparams|internalgradients"),
    ("elementwise", r"^triton_(poi|red|per)_|^_(gated|ambient_input|masked_loss|sampler_step|scale_samples)"),
    ("convolution", r"conv|fprop|dgrad|wgrad|implicit_gemm|cudnn|nchwtonhwc|nhwctonchw"),
    ("matmul", r"gemm|cublas|cutlass|aten::(mm|addmm|bmm|baddbmm|matmul|linear)$"),
    ("optimizer", r"multi_tensor_apply|adam|foreach"),
    ("copies", r"memcpy|memset|copy|aten::cat$|catarray"),
    ("elementwise", r"elementwise|vectorized|unrolled|reduce|index|triton|^aten::"),
)
OTHER = "other"
WINDOW = "benchmark call"  # the record_function around the profiled call
_COMPILED = [(group, re.compile(pattern, re.IGNORECASE)) for group, pattern in GROUPS]


def group_of(name: str) -> str:
    """The group of a kernel or operator name: the first of GROUPS whose pattern matches, else 'other'."""
    return next((group for group, pattern in _COMPILED if pattern.search(name)), OTHER)


class Interval(NamedTuple):
    """One kernel (CUDA) or operator (CPU) inside the profiled call: its name and, in microseconds,
    the span it ran over and the time it counts for (a kernel's duration; an op's self time)."""

    name: str
    start: float
    end: float
    time: float


class ProfileTable(NamedTuple):
    device: str           # "cuda" or "cpu": what the rows count (kernels, or operators' self time)
    wall_us: float        # the call, host clock, the device drained at its end
    rows: List[Tuple[str, int, float]]  # (group, count, summed time us), largest first
    busy_us: float        # CUDA: union of the kernels' intervals; CPU: summed self time
    idle_us: float        # wall - busy (not below 0)


def table_of(intervals: Sequence[Interval], wall_us: float, device: str) -> ProfileTable:
    """Group `intervals` and measure what of `wall_us` they leave idle. On CUDA busy time is the union
    of the intervals (kernels of several streams overlap); on a CPU the sum of self times (they do not)."""
    counts, times = Counter(), Counter()
    for interval in intervals:
        group = group_of(interval.name)
        counts[group] += 1
        times[group] += interval.time
    rows = sorted(((group, counts[group], times[group]) for group in counts), key=lambda row: -row[2])
    if device == "cuda":
        busy, reach = 0.0, float("-inf")
        for start, end in sorted((i.start, i.end) for i in intervals):
            if end > reach:
                busy += end - max(start, reach)
                reach = end
    else:
        busy = sum(interval.time for interval in intervals)
    return ProfileTable(device, wall_us, rows, busy, max(wall_us - busy, 0.0))


def profile_call(fn: Callable[[], object], device: torch.device) -> ProfileTable:
    """Profile one call of fn (warmed up by the caller) and group what ran in it."""
    from torch.profiler import ProfilerActivity, profile, record_function

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        with record_function(WINDOW):
            fn()
            if cuda:
                torch.cuda.synchronize(device)
    events = prof.events()
    window = next(e for e in events if e.name == WINDOW and e.device_type == DeviceType.CPU)
    start, end = window.time_range.start, window.time_range.end
    wanted = DeviceType.CUDA if cuda else DeviceType.CPU
    intervals = []
    for event in events:
        if (event.device_type != wanted or event.name == WINDOW or getattr(event, "is_user_annotation", False)
                or event.time_range.end <= start or event.time_range.start >= end):
            continue
        time = event.time_range.elapsed_us() if cuda else event.self_cpu_time_total
        intervals.append(Interval(event.name, max(event.time_range.start, start), min(event.time_range.end, end), time))
    return table_of(intervals, end - start, device.type)


PROFILE_HEADER = ["group", "count", "ms", "% of the call"]


def profile_rows(table: ProfileTable) -> "list[list[str]]":
    """The table's rows as text, then busy and idle: percentages of the call's wall time."""
    def row(name, count, us):
        return [name, count, f"{us / 1e3:.3f}", f"{100 * us / table.wall_us:.1f}%" if table.wall_us else "-"]

    busy = "busy (union of kernels)" if table.device == "cuda" else "busy (summed self time)"
    idle = "idle (no kernel running)" if table.device == "cuda" else "idle (outside any op: Python, dispatch)"
    return ([row(group, str(count), us) for group, count, us in table.rows]
            + [row(busy, "", table.busy_us), row(idle, "", table.idle_us), row("the call (wall)", "", table.wall_us)])


def host_syncs(fn: Callable[[], object], device: torch.device) -> Optional[Counter]:
    """The host synchronisations of one call of fn, counted per Python line ('file.py:LINE'), as
    torch.cuda.set_sync_debug_mode('warn') reports them; on a CPU fn is called and None returned
    (the mode needs CUDA)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(device)
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught
                   if "called a synchronizing" in str(w.message))


def describe_syncs(syncs: Optional[Counter]) -> str:
    """'2 (trainer.py:278 x1, ...)', or why there is no count."""
    if syncs is None:
        return "unavailable on the CPU (torch.cuda.set_sync_debug_mode needs CUDA); the call ran"
    total = sum(syncs.values())
    return f"{total}" + (" (" + ", ".join(f"{site} x{n}" for site, n in syncs.most_common()) + ")" if total else "")
