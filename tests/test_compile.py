"""torch.compile of the training step (CPU): every U-Net block runs compiled, nothing breaks the
graphs, and the compiled step computes what the eager one does.

The blocks share one `forward`, so before they were compiled with a raised recompile limit and
static shapes, the ninth distinct block onwards ran eagerly and Inductor crashed on the symbolic
shapes dynamo switched to (`cannot determine truth value of Relational`) at the first step of the
CIFAR-10 configuration."""
import pytest
import torch
from torch._dynamo.utils import graph_break_reasons

from ambient_fast.objective.objective import EDMSchedule, TrainingBatch, ambient_loss, training_batch
from ambient_fast.networks import EDMPrecond
from ambient_fast.training.parallel import compile_each
from ambient_fast.training.config import ARCHS, PRESETS, preset_for

from conftest import load_bench

compile_check = load_bench("compile_check")


def published_structure(resolution: int) -> EDMPrecond:
    """The CIFAR-10 (32x32) or 64x64 DDPM++ configuration, every block as published, 16 channels wide."""
    model_type, arch = ARCHS["ddpmpp"]
    size = {**PRESETS[preset_for(resolution)], "model_channels": 16}
    return EDMPrecond(img_resolution=resolution, img_channels=6, model_type=model_type, **arch, **size).train()


def batch(resolution: int) -> TrainingBatch:
    """A training batch of two random images, sigma from EDM's distribution."""
    shape = (2, 3, resolution, resolution)
    A = (torch.rand(shape) < 0.6).float()
    sigma = (torch.randn(2) * 1.2 - 1.2).exp()
    return training_batch((torch.rand(shape) * 2 - 1) * A, A, A * (torch.rand(shape) < 0.9), sigma, torch.randn(shape))


def one_loss(net: torch.nn.Module, data: TrainingBatch) -> torch.Tensor:
    """The loss as the trainer calls it."""
    return ambient_loss(net, data, EDMSchedule()).sum()


def compiled_blocks_counter(net: torch.nn.Module, resolution: int, before_step=lambda: None):
    """Compile each of `net`'s blocks with dynamo's eager backend (through a counting wrapper), run two
    loss-and-backward steps (`before_step` first in each) and check that every block ran compiled in
    both, as one graph (no graph break), with no recompile-limit message; returns the counter."""
    blocks = net.blocks()
    counter = compile_check.CallCounter("eager")
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(recompile_limit=8), compile_check.dynamo_limit_messages() as messages:
            compile_each(blocks, backend=counter)
            data = batch(resolution)
            for _ in range(2):
                counter.reset_calls()
                before_step()
                one_loss(net, data).backward()
                assert counter.calls == len(blocks), f"{len(blocks) - counter.calls} of {len(blocks)} blocks ran eagerly"
        assert not messages, messages
        # dynamo's record since the reset above: a break that leaves an empty graph adds no call
        assert not graph_break_reasons, f"{len(graph_break_reasons)} graph breaks: {graph_break_reasons[0].reason}"
    finally:
        torch._dynamo.reset()
    return counter


def test_every_block_of_edm2_s_runs_compiled():
    """EDM2-S's structure at ImageNet-64's size (16 channels wide, one block per resolution), as the
    trainer compiles it (the weight normalisation a step of its own): every block a compiled graph, in
    the second forward as in the first."""
    from ambient_fast.networks import EDM2Precond

    size = {**PRESETS["edm2-s"], "model_channels": 16, "num_blocks": 1}  # every kind of block, once
    net = EDM2Precond(img_resolution=64, img_channels=6, ambient=True, **size).train()
    net.normalize_in_forward(False)
    compiled_blocks_counter(net, 64, before_step=net.normalize_weights_)


@pytest.mark.parametrize("resolution", [32, 64])
def test_every_block_of_the_published_structures_runs_compiled(resolution):
    """33 (32x32) and 44 (64x64) blocks of about a dozen and a half kinds: all compiled graphs, in
    the second forward as in the first (dynamo's own eager backend keeps this test fast)."""
    net = published_structure(resolution)
    counter = compiled_blocks_counter(net, resolution)
    assert 8 < counter.graphs <= len(net.blocks())  # more kinds of block than the default limit allows


def test_no_graph_break_in_the_loss():
    """The whole loss with the network inside (the CIFAR-10 structure) traces as one graph. (Each block
    alone: compiled_blocks_counter, in every structure above.)"""
    net = published_structure(32)
    data = batch(32)
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(lambda: one_loss(net, data))()
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    finally:
        torch._dynamo.reset()


def test_compiled_training_runs_every_block_and_matches_eager(tmp_path, cuda_defaults_on_cpu, lean_inductor):
    """The trainer's --compile path with Inductor on the built-in preset (16x16, 16 channels wide) in
    CUDA's settings (bf16 autocast, channels_last, the fused kernels in Triton's interpreter, the
    fused Adam): every kind of DDPM++ block once or twice (two resolutions, attention at the lower,
    resampling, channel changes), no crash, no recompile-limit message, every block compiled, and
    every parameter's first gradient as the eager trainer's in the same settings. The published
    structures' many blocks are checked above with dynamo's own backend (the recompile limit is
    dynamo's, not Inductor's); Inductor costs ~15 s per block on a 2-core CPU, and each block of the
    published structures is a kind this network has. (Under FSDP2, on 2 ranks, --compile runs in
    tests/test_cuda_config.py with EDM2 and with a diffusers UNet.)"""
    result = compile_check.check(16, dict(model_channels=16), tmp_path, steps=2)
    settings = result["settings"]
    assert (settings.bf16, settings.channels_last, settings.fused_kernels, settings.fused_optimizer) == (True,) * 4
    assert result["compiled_calls"] == result["blocks"] == 10
    assert not result["limit_messages"]
    compared, parameters = result["gradients"]
    assert compared == parameters > 100
    assert result["gradient_error"] <= compile_check.GRADIENT_TOLERANCE[True], result["worst_gradient"]
