"""Ahead-of-time compilation of the fused kernels for GPUs this machine does not have.

Triton's interpreter checks a kernel's arithmetic, not that it compiles: a kernel can pass every
interpreted test and still fail in Triton's compiler on its first GPU launch. Triton's CUDA back end
and its bundled ptxas need no GPU, so the compile can be checked here:

    with record_launches() as launches:      # run real code: every kernel launch is recorded
        ...                                  # (dry: nothing is launched, outputs stay unwritten)
    results = compile_all(launches.specializations(("sm_80", "sm_90")))

A specialisation is what Triton compiles once per distinct launch signature: the argument types,
the constexpr values, the attributes Triton derives from argument values (an integer equal to 1
becomes a constant; pointers and integers divisible by 16 are marked so) and the launch options
(warps, stages). They are derived by Triton's own binder for each target, exactly as its launcher
does, so the set compiled here is the set a GPU run of the same code would compile. Each is
compiled to cubin; ptxas's report gives registers per thread, spills and shared memory.

This uses Triton's internal binder (`create_function_from_signature`, `JITFunction._pack_args`),
as found in Triton 3.6 (the GPU image's) and 3.9 (CI's).
"""
import concurrent.futures
import contextlib
import io
import multiprocessing
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

from ._utils import launch_hook
from .interpreter import language_for

TARGET_CAPABILITIES = {"sm_80": 80, "sm_90": 90}


def _freeze(value):
    """Lists and dicts (recursively) as tuples, so that a specialisation can be a dict key."""
    if isinstance(value, dict):
        return tuple((_freeze(k), _freeze(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


@dataclass
class Specialization:
    """One distinct compile of one kernel for one target: what `triton.compile` needs, and where
    it came from."""

    kernel: str
    target: str
    jit: object                 # the kernel's compile-mode JITFunction
    signature: dict             # argument name -> Triton type ('*fp32', 'i32', 'constexpr', ...)
    constexprs: dict            # argument path -> value
    attrs: dict                 # argument path -> attributes (e.g. divisibility 16)
    options: object             # the back end's parsed options (num_warps, num_stages, ...)
    sources: set = field(default_factory=set)  # labels of the workloads that launched it
    launches: int = 0

    def describe(self) -> str:
        """Constexprs and types in one line, e.g. `STAGE=0 CLIP=True ... | x_ptr *fp32 ...`."""
        names = self.jit.arg_names
        consts = " ".join(f"{names[path[0]]}={value}" for path, value in self.constexprs.items()
                          if self.signature.get(names[path[0]]) == "constexpr" and names[path[0]].isupper())
        pointers = " ".join(f"{name}:{kind[1:]}" for name, kind in self.signature.items() if kind.startswith("*"))
        return f"{consts} warps={self.options.num_warps} | {pointers}"


class LaunchRecorder:
    """Collects the specialisations of the kernel launches made while it is active (see
    `record_launches`). `label` names the workload now running; it is kept with each record."""

    def __init__(self, targets: Iterable[str]):
        unknown = set(targets) - set(TARGET_CAPABILITIES)
        if unknown:
            raise ValueError(f"unknown targets {sorted(unknown)}; known: {sorted(TARGET_CAPABILITIES)}")
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.targets = {name: GPUTarget("cuda", TARGET_CAPABILITIES[name], 32) for name in targets}
        self.backends = {name: make_backend(target) for name, target in self.targets.items()}
        self.label = ""
        self._binders: Dict[Tuple[int, str], object] = {}
        self._records: Dict[tuple, Specialization] = {}

    def record(self, lazy_kernel, args: tuple, kwargs: dict) -> None:
        from triton.runtime.jit import create_function_from_signature

        jit = lazy_kernel.compile_mode()
        for name, backend in self.backends.items():
            binder = self._binders.get((id(jit), name))
            if binder is None:
                binder = self._binders[(id(jit), name)] = create_function_from_signature(jit.signature, jit.params,
                                                                                         backend)
            bound, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
            key = (lazy_kernel.__name__, name, _freeze(signature), _freeze(constexprs), _freeze(attrs),
                   _freeze(options.__dict__))
            spec = self._records.get(key)
            if spec is None:
                spec = self._records[key] = Specialization(lazy_kernel.__name__, name, jit, signature, constexprs,
                                                           attrs, options)
            spec.sources.add(self.label)
            spec.launches += 1

    def specializations(self) -> List[Specialization]:
        return sorted(self._records.values(), key=lambda s: (s.kernel, s.target, s.describe()))


@contextlib.contextmanager
def record_launches(targets: Iterable[str] = ("sm_80", "sm_90")):
    """Record every fused-kernel launch made inside the block, launching nothing.

    While active, ops on CPU tensors take their fused path (as they would on CUDA) and each launch
    is recorded instead of run: outputs are left unwritten, so values downstream are garbage. That
    is enough, because a specialisation depends on shapes, strides, dtypes and flags, never on
    values. Yields the LaunchRecorder."""
    recorder = LaunchRecorder(targets)

    def record(kernel, grid):
        return lambda *args, **kwargs: recorder.record(kernel, args, kwargs)

    with launch_hook(record, cpu=True):
        yield recorder


class CompileResult(NamedTuple):
    spec: Specialization
    ok: bool
    seconds: float
    registers: Optional[int]    # per thread, from ptxas
    spill_bytes: Optional[int]  # spill stores + spill loads
    shared_bytes: Optional[int]
    cubin_bytes: Optional[int]
    error: str                  # first lines of the compiler's message when not ok


_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_one(spec: Specialization) -> CompileResult:
    """Compile `spec` to cubin for its target with Triton's compiler and bundled ptxas."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", TARGET_CAPABILITIES[spec.target], 32)
    log = io.StringIO()
    start = time.perf_counter()
    try:
        # stdout: ptxas's -v report, printed by Triton on request; triton.language's helpers as the
        # compiler needs them, however Triton was imported
        with contextlib.redirect_stdout(log), language_for(interpreted=False):
            compiled = triton.compile(ASTSource(spec.jit, spec.signature, spec.constexprs, spec.attrs),
                                      target=target, options=spec.options.__dict__)
    except Exception as error:  # the compiler's own message is the result
        lines = str(error).strip().splitlines()
        message = f"{type(error).__name__}: " + " / ".join(line.strip() for line in lines[-4:])
        return CompileResult(spec, False, time.perf_counter() - start, None, None, None, None, message)
    text = log.getvalue()
    registers = max((int(m) for m in _REGISTERS.findall(text)), default=None)
    spills = max((int(a) + int(b) for a, b in _SPILLS.findall(text)), default=None)
    shared = getattr(compiled.metadata, "shared", None)
    return CompileResult(spec, True, time.perf_counter() - start, registers, spills, shared,
                         len(compiled.asm.get("cubin", b"")), "")


def compile_all(specs: List[Specialization], progress=None, workers: Optional[int] = None) -> List[CompileResult]:
    """Compile every specialisation (in a fresh Triton cache, so that ptxas runs and reports each), in
    `workers` forked processes (default: one a CPU core; 1 compiles here); `progress(done, total,
    result)` is called after each, in order."""
    workers = workers or os.cpu_count() or 1
    results = []
    with tempfile.TemporaryDirectory(prefix="ambient-fast-aot-") as cache, \
            _environment(TRITON_CACHE_DIR=cache, TRITON_DUMP_PTXAS_LOG="1"):
        for result in _compiled(specs, min(workers, len(specs))):
            results.append(result)
            if progress is not None:
                progress(len(results), len(specs), result)
    return results


_SPECS: List[Specialization] = []  # what forked workers compile, by index (a JITFunction does not pickle)


def _compile_index(index: int) -> tuple:
    return tuple(compile_one(_SPECS[index]))[1:]


def _compiled(specs: List[Specialization], workers: int) -> Iterable[CompileResult]:
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        yield from map(compile_one, specs)
        return
    global _SPECS
    _SPECS = specs
    try:
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            for spec, fields in zip(specs, pool.map(_compile_index, range(len(specs)))):
                yield CompileResult(spec, *fields)
    finally:
        _SPECS = []


@contextlib.contextmanager
def _environment(**values: str):
    """Set environment variables for the block (Triton reads its settings from them when used)."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def summary(results: List[CompileResult]) -> dict:
    """Counts per kernel and target, the largest register use, any spill, the failures."""
    per_kernel: Dict[str, Dict[str, int]] = {}
    for result in results:
        counts = per_kernel.setdefault(result.spec.kernel, {})
        counts[result.spec.target] = counts.get(result.spec.target, 0) + 1
    ok = [r for r in results if r.ok]
    largest = max(ok, key=lambda r: r.registers or 0, default=None)
    return dict(
        total=len(results), compiled=len(ok), failed=[r for r in results if not r.ok], per_kernel=per_kernel,
        max_registers=None if largest is None else largest.registers, max_registers_at=largest,
        spilling=[r for r in ok if r.spill_bytes], seconds=sum(r.seconds for r in results),
    )
