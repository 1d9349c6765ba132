"""One numerical policy for FSDP2 and a single process: fp32 parameters, bf16 by autocast. Two FSDP2
ranks (gloo, CPU) compute the network's output bitwise as one process does, also for VP noise labels
near 999, which FSDP2's own bf16 casting of inputs rounded to steps of 4."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from ambient_fast.training.distributed import World
from ambient_fast.networks import VPPrecond
from ambient_fast.training.parallel import parallelize

from conftest import TINY_ARCHITECTURES, free_port

SCRIPT = textwrap.dedent("""
    import sys, torch
    from ambient_fast.training.distributed import close_world, init_world
    from ambient_fast.training.parallel import parallelize
    sys.path.insert(0, {tests!r})
    from test_parallel import model_and_input

    world, device = init_world("cpu")
    net, x, sigma = model_and_input()
    model = parallelize(net, {kind!r}, world, device, compile_blocks=False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, sigma)
    if world.is_main:
        torch.save(out, {path!r})
    close_world()
""")


def model_and_input():
    """A VP model with unit-scale weights, and an input whose noise levels span VP's whole range."""
    torch.manual_seed(0)
    model_type, kwargs = TINY_ARCHITECTURES["ddpmpp"]
    net = VPPrecond(img_resolution=8, img_channels=6, model_type=model_type, **kwargs)
    with torch.no_grad():
        for param in net.parameters():
            param.copy_(torch.randn_like(param) / max(param[0].numel(), 1) ** 0.5)
    x = torch.randn(4, 6, 8, 8)
    sigma = torch.tensor([0.01, 1.0, 40.0, 150.0])  # c_noise = 999 t: about 0.5, 49, 720, 999
    return net, x, sigma


def forward_in_fresh_processes(tmp_path, kind: str, ranks: int) -> torch.Tensor:
    """The network's output computed by `ranks` new processes (torchrun, gloo) with parallelism `kind`,
    one thread each: both sides of the comparison start alike (a thread count, or an allocator's
    history, can change a CPU kernel's choice and its last bits)."""
    script, path = tmp_path / f"forward_{kind}.py", tmp_path / f"out_{kind}.pt"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent), path=str(path), kind=kind))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_port",
                             str(free_port()), str(script)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(path)


def test_fsdp_computes_what_one_process_computes(tmp_path):
    want = forward_in_fresh_processes(tmp_path, "none", ranks=1)
    got = forward_in_fresh_processes(tmp_path, "fsdp", ranks=2)
    assert torch.equal(got, want), (got - want).abs().max()
    # And what this process computes, up to bf16 rounding: the same arithmetic.
    net, x, sigma = model_and_input()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        here = parallelize(net, "none", World(0, 1, 0), torch.device("cpu"), compile_blocks=False)(x, sigma)
    torch.testing.assert_close(here, want, rtol=2e-2, atol=2e-2)
