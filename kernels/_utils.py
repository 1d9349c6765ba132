"""Shared launch helpers of the fused kernels: the optional Triton import, the dispatch rule,
the launch, tensor layouts and block sizes.

Dispatch rule (checked at every call, never at import): an op takes its Triton kernel when
kernels are enabled (`AMBIENT_FAST_KERNELS` is not 0), Triton imports, and its tensors are on
CUDA, or on the CPU while `TRITON_INTERPRET=1` (the interpreter, which is how the tests run the
kernels). Everything else runs the PyTorch reference, and so does code that torch.compile traces
(Inductor generates its own fused kernels from the reference).

Launch: `kernel[grid](...)` builds the kernel in the mode in force (compiled, or interpreted) and
launches it; nothing else. Tooling takes launches over through `launch_hook`: the AOT recorder
(`aot.py`) and the fixes the interpreter needs beside Triton's compiler (`interpreter.py`), which
the tests and benchmarks install and the package's commands never import.

Layouts: every (N, C, H, W) operand is described by three strides (sample, channel, pixel),
pixel = h * W + w. That covers contiguous and channels_last tensors and the channel slices
`t[:, :C]` of either (a gated convolution's two halves, a network output's image channels),
so the kernels read them in place; anything else is copied once by `planes`.
"""
import contextlib
import os
import types
from typing import Callable, Iterator, NamedTuple, Optional, Tuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional: the references run without it.
    triton = None
    tl = types.SimpleNamespace(constexpr=None)  # lets the `tl.constexpr` annotations evaluate

_TRUE = ("1", "true", "yes", "on", "y")


def kernels_enabled() -> bool:
    """True unless the user forced the PyTorch references with AMBIENT_FAST_KERNELS=0."""
    return os.environ.get("AMBIENT_FAST_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def triton_available() -> bool:
    return triton is not None


def interpreting() -> bool:
    """True while TRITON_INTERPRET is set (read now, the way Triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def fused_device(device) -> bool:
    """Whether an op on `device` would take its Triton kernel now."""
    if not kernels_enabled() or triton is None:
        return False
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and (interpreting() or (_hook is not None and _hook.cpu)))


class LaunchHook(NamedTuple):
    """Tooling that takes over kernel launches (see `launch_hook`)."""

    wrap: Callable[["LazyKernel", tuple], Callable]  # (kernel, grid) -> what `kernel[grid]` returns
    cpu: bool  # whether ops on CPU tensors take the fused path while it is installed


_hook: Optional[LaunchHook] = None  # None in production: a launch is only the kernel's launch


@contextlib.contextmanager
def launch_hook(wrap: Callable[["LazyKernel", tuple], Callable], cpu: bool = False) -> Iterator[None]:
    """For tooling only, never the package's commands: while the block runs, `kernel[grid]` returns
    `wrap(kernel, grid)` (which may call `kernel.launcher(grid)` for the plain launch). With `cpu`,
    ops on CPU tensors take the fused path too. The AOT recorder (`aot.record_launches`) and the
    interpreter's fixes (`interpreter.fixes`, installed by tests/conftest.py and the benchmarks that
    interpret) are such hooks; the one in force before is put back afterwards, so they nest."""
    global _hook
    previous, _hook = _hook, LaunchHook(wrap, cpu)
    try:
        yield
    finally:
        _hook = previous


def use_fused(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether an op on these tensors (None entries ignored) takes its Triton kernel. Never while
    torch.compile traces: it gets the reference, which Inductor fuses itself."""
    if torch.compiler.is_compiling():
        return False
    devices = {t.device for t in tensors if t is not None}
    return len(devices) == 1 and fused_device(next(iter(devices)))


class LazyKernel:
    """A Triton kernel built on first launch in the mode in force then: compiled for the GPU, or
    interpreted under TRITON_INTERPRET=1. `triton.jit` decides that when it decorates, so a plain
    `@triton.jit` would freeze whatever the environment said when this package was imported."""

    def __init__(self, fn, **options):
        self.fn = fn
        self.options = options
        self._built = {}
        self._compile_mode = None
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__

    def compile_mode(self):
        """The kernel as Triton compiles it for a GPU, whatever TRITON_INTERPRET says."""
        if self._compile_mode is None:
            from triton.runtime.jit import JITFunction

            self._compile_mode = JITFunction(self.fn, **self.options)
        return self._compile_mode

    def __getitem__(self, grid):
        if _hook is not None:  # tooling (tests, benchmarks, the AOT check); never set in production
            return _hook.wrap(self, grid)
        return self.launcher(grid)

    def launcher(self, grid):
        """The launch of the kernel on `grid`, built in the mode in force now."""
        mode = interpreting()
        kernel = self._built.get(mode)
        if kernel is None:
            kernel = self._built[mode] = triton.jit(self.fn, **self.options)
        return kernel[grid]


def kernel(fn=None, **options):
    """Decorator for the kernels: `@kernel` or `@kernel(do_not_specialize=[...])`."""
    if fn is None:
        return lambda f: LazyKernel(f, **options)
    return LazyKernel(fn, **options)


# ----------------------------------------------------------------------------------------------
# Layouts

def plane_strides(t: torch.Tensor) -> Optional[Tuple[int, int, int]]:
    """(sample, channel, pixel) strides of a 4-D tensor whose H and W merge into one pixel axis,
    else None."""
    _, _, H, W = t.shape
    s_n, s_c, s_h, s_w = t.stride()
    if W == 1:
        return s_n, s_c, s_h
    if H == 1 or s_h == W * s_w:
        return s_n, s_c, s_w
    return None


def is_channels_last(t: torch.Tensor) -> bool:
    """True when channels vary fastest in memory (channels_last, or a channel slice of it)."""
    strides = plane_strides(t)
    if strides is None:
        return t.is_contiguous(memory_format=torch.channels_last)
    _, C, H, W = t.shape
    return C > 1 and H * W > 1 and strides[1] < strides[2]


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def planes(t: torch.Tensor, channels_last: bool) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
    """`t` and its plane strides, copied to the given format first if its layout has none."""
    strides = plane_strides(t)
    if strides is None:
        t = t.contiguous(memory_format=memory_format(channels_last))
        strides = plane_strides(t)
    return t, strides


def empty_planes(shape, dtype: torch.dtype, device, channels_last: bool) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format(channels_last))


def next_power_of_2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def tile(C: int, HW: int, channels_last: bool, elements: int = 2048) -> Tuple[int, int]:
    """(BLOCK_C, BLOCK_HW) of a 2-D tile of about `elements` elements, longest along the axis
    that is contiguous in memory so that loads coalesce."""
    if channels_last:
        block_c = min(next_power_of_2(C), elements)
        block_hw = min(max(elements // block_c, 1), next_power_of_2(HW))
    else:
        block_hw = min(next_power_of_2(HW), elements)
        block_c = min(max(elements // block_hw, 1), next_power_of_2(C))
    return block_c, block_hw


def num_warps(elements: int, per_thread: int = 8) -> int:
    """Warps for a tile of `elements`, about `per_thread` elements a thread (at most 8 warps). More
    per thread raise the registers each thread needs (ptxas, sm_90: the float64 sampler step took
    196 a thread at 16 elements, 122 at 8) and cut the occupancy these bandwidth-bound kernels live on."""
    return max(1, min(8, elements // (32 * per_thread)))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
