"""The ahead-of-time compile check (ambient_fast.kernels.aot, bench/aot.py): every fused-kernel
specialisation that training, the samplers and the kernel benchmark launch compiles to cubin for
sm_80 and sm_90 with Triton's compiler and bundled ptxas, on this CPU-only machine.

The CI subset is `bench/aot.py --quick` (narrow models at 16x16 and 32x32); the full set is
`python bench/aot.py` (recorded in bench/results/aot-triton-*.md)."""
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed (it is part of the [test] extra)")

from ambient_fast.kernels import aot, sampler_step  # noqa: E402
from ambient_fast.kernels._utils import kernel, tl  # noqa: E402

from conftest import load_bench  # noqa: E402


@kernel
def _clamp_with_a_named_enum(x_ptr, out_ptr, BLOCK: tl.constexpr):
    """The sampler kernel's bug, kept small: PropagateNan bound to a name first."""
    offsets = tl.arange(0, BLOCK)
    nan = tl.PropagateNan.ALL
    tl.store(out_ptr + offsets, tl.maximum(tl.load(x_ptr + offsets), 0.0, propagate_nan=nan))


def test_the_check_catches_what_the_interpreter_misses(monkeypatch):
    """The interpreter runs the kernel; Triton's compiler refuses it, and the check says so."""
    x = torch.randn(16)
    out = torch.empty(16)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _clamp_with_a_named_enum[(1,)](x, out, BLOCK=16)
    assert torch.equal(out, x.clamp(min=0))
    monkeypatch.delenv("TRITON_INTERPRET")
    with aot.record_launches(("sm_90",)) as recorder:
        _clamp_with_a_named_enum[(1,)](x, out, BLOCK=16)
    (result,) = aot.compile_all(recorder.specializations(), workers=1)
    assert not result.ok and "PROPAGATE_NAN" in result.error


_INTERPRET_THEN_COMPILE = """
import os
os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported, as the kernel tests do
import torch
from ambient_fast.kernels import aot, interpreter
from ambient_fast.kernels._utils import kernel, tl

@kernel
def shifted_sigmoid(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    shift = tl.program_id(0).to(tl.int64)
    tl.store(out_ptr + offsets, tl.sigmoid(tl.load(x_ptr + offsets)) + shift)

x = torch.randn(16)
out = torch.empty(16)
with interpreter.fixes():  # what tests/conftest.py installs for a test session
    shifted_sigmoid[(1,)](x, out, BLOCK=16)
assert torch.allclose(out, torch.sigmoid(x))
del os.environ["TRITON_INTERPRET"]
with aot.record_launches(("sm_90",)) as recorder:
    shifted_sigmoid[(1,)](x, out, BLOCK=16)
(result,) = aot.compile_all(recorder.specializations(), workers=1)
assert result.ok, result.error
"""


def test_compiles_in_a_process_that_interpreted_a_jitted_helper(tmp_path):
    """Triton imported under TRITON_INTERPRET=1, an interpreted kernel calling one of
    triton.language's jitted helpers (which patches builtins and leaves them patched), then the
    compile check in the same process: with the interpreter's fixes installed around the launch it
    still compiles (the kernel tests run before this module when pytest is given them first)."""
    script = tmp_path / "interpret_then_compile.py"  # a file: Triton reads a kernel's source
    script.write_text(_INTERPRET_THEN_COMPILE)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_recording_derives_triton_specialisations_and_launches_nothing():
    """One record per distinct specialisation and target, attributes as Triton's launcher derives
    them (a stride of 1 becomes a constant), and the outputs are left as they were."""
    x = torch.randn(2, 3, 8, 8)
    net_input = torch.zeros(2, 6, 8, 8)
    with aot.record_launches() as recorder:
        for _ in range(2):
            sampler_step(x, x.clone(), torch.ones_like(x), 1.0, -0.1, net_input=net_input)
        sampler_step(x.double(), x, torch.ones_like(x), 1.0, -0.1, net_input=net_input)
    specs = recorder.specializations()
    assert sorted((s.target, s.signature["x_ptr"]) for s in specs) == [
        ("sm_80", "*fp32"), ("sm_80", "*fp64"), ("sm_90", "*fp32"), ("sm_90", "*fp64")]
    assert sorted(s.launches for s in specs) == [1, 1, 2, 2]
    assert all(s.signature["x_sp"] == "constexpr" for s in specs)  # stride 1
    assert torch.equal(net_input, torch.zeros(2, 6, 8, 8))


def test_every_specialisation_of_the_ci_set_compiles():
    """Training steps (16x16 and 32x32, narrow; bf16 and fp32, both gates, both preconditionings,
    shared and per-channel B, channels_last and NCHW), the samplers and bench/kernels.py's calls:
    all compile for sm_80 and sm_90, without spills."""
    from rich.console import Console

    bench = load_bench("aot")
    console = Console(record=True, width=200)
    specs, workloads = bench.record("quick", console)
    results = aot.compile_all(specs)
    failed = [f"{r.spec.kernel} {r.spec.target} {r.spec.describe()}: {r.error}" for r in results if not r.ok]
    assert not failed, "\n".join(failed)
    kernels = {r.spec.kernel for r in results}
    assert kernels == {"_gated_forward_kernel", "_gated_backward_kernel", "_masked_loss_kernel", "_scale_samples_kernel",
                       "_image_draws_kernel", "_ambient_input_kernel", "_sampler_step_kernel"}
    assert {r.spec.target for r in results} == {"sm_80", "sm_90"}
    assert not [r for r in results if r.spill_bytes]
