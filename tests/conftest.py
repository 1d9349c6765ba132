"""Shared test set-up: fixed seeds, the reference fixtures, tiny model configurations."""
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

FIXTURES = Path(os.environ.get("AMBIENT_FAST_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))


def pytest_configure(config):
    """Under pytest-xdist (`-n 2`, the README's test command) each worker computes on one thread: two
    workers of two threads each on CI's two cores would fight over them. Tests that compare with a
    subprocess pass it this count (OMP_NUM_THREADS), so the comparison stays bitwise."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _interpreter_fixes():
    """The fixes Triton's interpreter needs beside its compiler in one process (the kernel tests
    interpret, the AOT check compiles), for the whole session: ambient_fast.kernels.interpreter.
    Imported at the first test, after collection, so that the kernel tests' module still imports
    Triton under TRITON_INTERPRET=1 as it means to."""
    from ambient_fast.kernels import interpreter

    with interpreter.fixes():
        yield


@pytest.fixture
def cuda_defaults_on_cpu(monkeypatch):
    """The commands and the trainer resolve their defaults as on CUDA (AMBIENT_FAST_DEFAULTS_FOR), the
    fused kernels run in Triton's interpreter."""
    from ambient_fast.training.settings import TARGET_VARIABLE

    monkeypatch.setenv(TARGET_VARIABLE, "cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("AMBIENT_FAST_KERNELS", raising=False)


@pytest.fixture
def lean_inductor(monkeypatch):
    """Inductor as cheap as a CPU test can have it, here and in the subprocesses started (torchrun's
    ranks): scalar C++ with no probe of the CPU's vector units (TORCHINDUCTOR_VEC_ISA_OK=0: otherwise
    each process compiles or loads a test library per vector unit in a Python subprocess of its own
    before its first compile) compiled in the process itself (TORCHINDUCTOR_COMPILE_THREADS=1: no pool
    of compile workers beside each compiling process, on two cores that two xdist workers or two ranks
    fill already). A GPU compiles Triton code, not C++: the vectorised C++ is a path of the CPU alone;
    the lowering, fusion and scheduling that a GPU's compile shares are the same. Measured alone with
    empty caches on the 2-core CPU, within the same hour (its speed drifts): the Inductor check in
    CUDA's settings 216 s and 285 CPU-s with Inductor's defaults, 136 s and 182 CPU-s scalar, 123 s and
    124 CPU-s scalar in one process; the compiled EDM2 and fine-tuning FSDP2 runs 158 s and 271 CPU-s
    with the defaults, 112 s and 169 CPU-s lean. Without the probes, a process's first compile of a
    one-line function: 20.9 and 19.9 s -> 7.7 and 9.9 s, its cache empty; 8.4 and 9.5 s -> 5.8 and 7.6
    s, its cache full; the C++ generated is the same (the vector unit was the scalar one already)."""
    import torch._inductor.config

    monkeypatch.setenv("TORCHINDUCTOR_VEC_ISA_OK", "0")
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "1")
    with torch._inductor.config.patch({"compile_threads": 1, "cpp.vec_isa_ok": False}):  # both read at import
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _threads():
    """Fail the test that leaves torch's thread count changed: later tests compare in-process runs
    with subprocess ones bitwise, and the count changes a CPU reduction's last bits."""
    before = torch.get_num_threads()
    yield
    after = torch.get_num_threads()
    torch.set_num_threads(before)
    assert after == before, f"the test left torch's thread count at {after} (it was {before})"


def fixture_folder(name: str) -> Path:
    """The folder of a golden reference fixture; skips the test when absent."""
    folder = FIXTURES / name
    if not folder.is_dir():
        pytest.skip(f"reference fixtures not found at {folder} (they live in ../shared/fixtures beside the "
                    "project root; set AMBIENT_FAST_FIXTURES to point elsewhere)")
    return folder


def load_fixture(name: str):
    """(config, weights, cases) of a golden reference fixture; skips the test when absent."""
    folder = fixture_folder(name)
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    return config, load_file(folder / "weights.safetensors"), load_file(folder / "cases.safetensors")


# Small versions of every architecture variant: (model_type, architecture kwargs).
TINY_ARCHITECTURES = {
    "ddpmpp": ("SongUNet", dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                                dropout=0.0)),
    "ncsnpp": ("SongUNet", dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                                embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
                                resample_filter=[1, 3, 3, 1], dropout=0.0)),
    "skip": ("SongUNet", dict(model_channels=16, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[4],
                              embedding_type="fourier", encoder_type="skip", decoder_type="skip",
                              resample_filter=[1, 3, 3, 1], dropout=0.0)),
    "adm": ("DhariwalUNet", dict(model_channels=64, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                                 dropout=0.0)),
}


def assert_gradient_matches_differences(loss_of, params, eps: float, rel: float) -> None:
    """The gradient g that backward gives for `loss_of()` (a scalar of `params`) against central
    differences of `loss_of` (steps of `eps`), to within `rel` of |g|, along two unit directions: g's
    own (the derivative there is |g| only if g has the right size and direction) and a random one.
    An independent check of every backward formula on the way. Call it with no gradients computed yet."""
    params = [p for p in params if p.requires_grad]
    loss_of().backward()
    gradient = [p.grad.clone() for p in params]
    size = torch.sqrt(sum(g.square().sum() for g in gradient)).item()
    assert size > 0, "no gradient at all"

    def unit(vectors):
        norm = torch.sqrt(sum(v.square().sum() for v in vectors))
        return [v / norm for v in vectors]

    def shifted(direction, scale: float) -> float:
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(scale * d)
            value = loss_of().item()
            for p, d in zip(params, direction):
                p.sub_(scale * d)
        return value

    for direction in (unit(gradient), unit([torch.randn_like(p) for p in params])):
        analytic = sum((g * d).sum() for g, d in zip(gradient, direction)).item()
        numeric = (shifted(direction, eps) - shifted(direction, -eps)) / (2 * eps)
        assert abs(numeric - analytic) <= rel * size, (numeric, analytic, size)


@contextmanager
def installed_modules(modules: dict):
    """Make stand-in modules importable under the given names (e.g. the reference's `torch_utils`, so
    that a test pickles globals exactly as the reference's files name them); restores sys.modules."""
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(module: str, *args: str, ranks: int = 2) -> str:
    """Run `python -m module args` under torchrun on CPU (gloo); return its stdout, fail on error."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_port",
               str(free_port()), "-m", module, *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def load_bench(name: str):
    """bench/NAME.py imported as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).resolve().parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A folder that `build(folder)` fills, built once per test session: under pytest-xdist the
    workers share it (the first to ask builds it, another asking meanwhile waits for it), so that a
    module fixture that trains a network does not train it on every worker. Its users only read it."""
    from filelock import FileLock

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    session = tmp_path_factory.getbasetemp().parent  # this session's, shared by its workers
    folder = session / name
    with FileLock(str(session / f"{name}.lock")):
        if not (folder / ".built").exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed build left
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder
