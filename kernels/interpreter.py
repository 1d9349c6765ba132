"""What Triton's interpreter needs to run our kernels in a process that also compiles them, or that
imported Triton before TRITON_INTERPRET was set: tooling for the tests (tests/conftest.py installs
it for the session) and the benchmarks that interpret (bench/kernels.py on a CPU). The package's
commands never import this module; their launches go straight to the kernel.

Two faults of Triton's (3.6, the GPU image's, and 3.9, CI's), each reproduced by a test
(tests/test_kernels.py, tests/test_aot.py):
- triton.language's own jitted helpers (tl.sum, tl.sigmoid, tl.randint4x, ...) are built for the
  mode in force when Triton is first imported. Imported without TRITON_INTERPRET (torch._inductor
  imports Triton, for one), the interpreter cannot call them; imported with it (the kernel tests),
  Triton's compiler cannot (the AOT check in the same process). `language_for` swaps them for their
  twins of the other mode for the duration of a block.
- A jitted helper called from an interpreted kernel patches the builtins of its module for the
  interpreter and never unpatches them, after which Triton's compiler fails in this process
  ("'value' object has no attribute 'dtype'"). `_language_restored` puts back what a block changed.

    with interpreter.fixes():            # every interpreted launch in the block gets both
        ...
"""
import contextlib
import sys
import types
from typing import Iterator

from ._utils import interpreting, launch_hook

_LANGUAGE_TWINS = {}  # id(a jitted function of triton.language) -> {interpreted?: its form for that mode}
_MISSING = object()


@contextlib.contextmanager
def fixes() -> Iterator[None]:
    """For the block, run every interpreted kernel launch with triton.language's helpers in their
    interpreted form (`language_for`), and put back whatever the interpreter changed in
    triton.language afterwards (`_language_restored`). Compiled launches are left as they are."""
    def wrap(kernel, grid):
        launch = kernel.launcher(grid)
        if not interpreting():
            return launch

        def interpreted(*args, **kwargs):
            with _language_restored(), language_for(interpreted=True):
                return launch(*args, **kwargs)

        return interpreted

    with launch_hook(wrap):
        yield


def _language_modules() -> Iterator[types.ModuleType]:
    """triton.language and its submodules, as imported so far."""
    for name, module in list(sys.modules.items()):
        if module is not None and (name == "triton.language" or name.startswith("triton.language.")):
            yield module


@contextlib.contextmanager
def language_for(interpreted: bool) -> Iterator[None]:
    """Make triton.language's own jitted functions usable by kernels interpreted
    (`interpreted=True`) or compiled for a GPU, for the duration of the block: each one built for the
    other mode is swapped for its twin of this mode (made once, kept) and put back afterwards."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError:  # another Triton layout: leave it alone
        yield
        return
    wanted, other = (InterpretedFunction, JITFunction) if interpreted else (JITFunction, InterpretedFunction)
    swapped = []
    for module in _language_modules():
        for attr, value in list(vars(module).items()):
            if isinstance(value, other) and not isinstance(value, wanted):
                twins = _LANGUAGE_TWINS.setdefault(id(value), {None: value})  # keeps value alive: ids stay unique
                if interpreted not in twins:
                    twins[interpreted] = wanted(value.fn)
                swapped.append((module, attr, value))
                setattr(module, attr, twins[interpreted])
    try:
        yield
    finally:
        for module, attr, value in swapped:
            setattr(module, attr, value)


def _language_namespaces() -> Iterator[object]:
    """triton.language's modules and the classes they define: what Triton's interpreter patches."""
    for module in _language_modules():
        yield module
        for value in list(vars(module).values()):
            if isinstance(value, type) and value.__module__.startswith("triton.language"):
                yield value


@contextlib.contextmanager
def _language_restored() -> Iterator[None]:
    """Put back whatever Triton's interpreter replaces in triton.language during the block. Only
    values it replaced are put back: what it added stays (it adds names to a helper's module once,
    for the rewritten helper it caches)."""
    saved = [(namespace, dict(vars(namespace))) for namespace in set(_language_namespaces())]
    try:
        yield
    finally:
        for namespace, before in saved:
            now = vars(namespace)
            for attr, value in before.items():
                if now.get(attr, _MISSING) is not value:
                    setattr(namespace, attr, value)
