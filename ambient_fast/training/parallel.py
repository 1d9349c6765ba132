"""Parallelism applied to a built model, in a fixed order: the activations' memory format, then
torch.compile per U-Net block, then FSDP2 per block and the model as the root; or DDP; or nothing.

The root is the whole model, not its U-Net: parameters outside the U-Net (EDM2's log-variance head,
`EDM2Precond.logvar_linear`) must be sharded too, or FSDP2 would not reduce their gradients and each
rank's copy would drift apart (tests/test_parallel.py compares two ranks with one process). FSDP2
cannot shard a 0-dim parameter (EDM2's gains, `emb_gain` and `out_gain`, scalars as in the published
snapshots): those stay whole on every rank, left out of FSDP2, and a hook averages their gradients over
the ranks as they are accumulated (`replicate_gradients`; averaging each micro-batch's gradient is
averaging their sum).

One numerical policy for every kind: fp32 parameters, bf16 computation by autocast (the trainer's),
gradients reduced in fp32. FSDP2 therefore gathers fp32 parameters and casts nothing itself: with a
bf16 `param_dtype` it would cast every floating-point input of the U-Net to bf16, the noise labels
included (VP's reach 999, where bf16 steps by 4), while autocast keeps the noise embedding's
arithmetic in fp32 and casts only what its convolutions and matrix products read. A sharded run
computes what a single process computes.

One memory-format policy for every kind: the parameters stay contiguous and only the activations
are channels_last. FSDP2 shards and all-gathers each parameter as one contiguous block and refuses
any other layout at `fully_shard` ("FSDP does not support non-contiguous parameters yet"), so
converting the weights (`model.to(memory_format=torch.channels_last)`) cannot run under it; nor can
they be converted after sharding, as what FSDP2 gathers for each forward is contiguous again. The
layout reaches cuDNN anyway: ATen runs a convolution channels_last (NHWC kernels, the weight
converted on the fly) when its input *or* its weight is channels_last
(`cudnn_conv_suggest_memory_format`), and writes its output so. Only some activations arrive in
another layout: ATen's CUDA group norm writes NCHW whatever it reads, and most convolutions of a
U-Net block read a group norm's output (through SiLU). So every convolution's input is made
channels_last on the way in (a forward pre-hook), which is the copy ATen itself makes when the
weight is channels_last: the same kernels as with converted weights, plus a weight-sized conversion
per call. Under torch.compile, Inductor chooses the convolutions' layouts itself (its layout
optimisation). Whether cuDNN's NHWC kernels run, and what the conversions cost, is for the GPU
benchmark to measure (bench/train.py's profile).
"""
import contextlib

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from ambient_fast.networks.layers import Conv2d
from ambient_fast.options import PARALLEL_KINDS
from ambient_fast.training.distributed import World


def parallelize(model: torch.nn.Module, kind: str, world: World, device: torch.device,
                compile_blocks: bool, channels_last: bool = False) -> torch.nn.Module:
    """Apply the activations' layout, compile and FSDP2 / DDP to `model` in place; return the
    module to call. `model` is an AmbientPrecond or a DiffusersDenoiser: its network is
    `model.model`, and `model.blocks()` are the units compiled and sharded one by one. Its
    parameters must be contiguous (see the module docstring)."""
    if kind not in PARALLEL_KINDS:
        raise ValueError(f"--parallel must be one of {PARALLEL_KINDS}, got {kind!r}")
    unet, blocks = model.model, model.blocks()
    if channels_last:
        channels_last_activations(unet)
    if compile_blocks:
        compile_each(blocks)
    if kind == "fsdp":
        mesh = init_device_mesh(device.type, (world.size,))
        policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)  # see the module docstring
        scalars = {param for param in model.parameters() if param.ndim == 0}  # FSDP2 shards along a dimension
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy, ignored_params=scalars)
        fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=scalars)  # the root: all outside the blocks
        replicate_gradients(scalars, world.size)
        return model
    if kind == "ddp":
        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return model


def replicate_gradients(params, ranks: int) -> None:
    """Average the gradients of `params` (whole on every rank, outside FSDP2) over the ranks, each
    time backward accumulates into them: the rank's copies stay equal, as FSDP2's reduced shards do.
    A SUM then a division, which every backend has (gloo has no AVG); no read of the device. The
    collectives run in autograd's order, the same on every rank."""
    def average(param: torch.Tensor) -> None:
        torch.distributed.all_reduce(param.grad)
        param.grad.div_(ranks)

    for param in params:
        param.register_post_accumulate_grad_hook(average)


CONVOLUTIONS = (Conv2d, torch.nn.Conv2d, torch.nn.ConvTranspose2d)  # ours, and those of diffusers' UNets


def channels_last_activations(network: torch.nn.Module) -> int:
    """Make every convolution of `network` read its input channels_last (a forward pre-hook; the
    weights keep their layout); returns how many convolutions it hooked."""
    convolutions = [module for module in network.modules() if isinstance(module, CONVOLUTIONS)]
    for convolution in convolutions:
        convolution.register_forward_pre_hook(_input_channels_last)
    return len(convolutions)


def _input_channels_last(module: torch.nn.Module, args: tuple):
    if args and args[0].ndim == 4:
        return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    return None


def compile_each(blocks: "list[torch.nn.Module]", backend="inductor") -> None:
    """torch.compile every block, with static shapes, so that each runs compiled.

    The blocks of a U-Net share one `forward` (one code object), and dynamo keeps at most
    `recompile_limit` (8) compiled versions per code object: blocks of other widths, resolutions or
    with attention each need their own, so past the eighth the rest ran eagerly. The limit is raised to
    the number of blocks (each block's call in training has one shape). Static shapes: after a few
    recompiles dynamo would otherwise mark sizes dynamic, and Inductor failed on the U-Net's symbolic
    shapes (`cannot determine truth value of Relational`). `backend`: torch.compile's (checks count
    the compiled calls through their own)."""
    for name in ("recompile_limit", "cache_size_limit"):  # the name in torch >= 2.6, and before
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), len(blocks)))
            break
    for block in blocks:
        block.compile(dynamic=False, backend=backend)


def gradient_sync(model: torch.nn.Module, kind: str, enabled: bool):
    """Context for one micro-batch of gradient accumulation: skip the gradient reduction unless
    `enabled` (the last micro-batch)."""
    if kind == "ddp" and not enabled:
        return model.no_sync()
    if kind == "fsdp":
        model.set_requires_gradient_sync(enabled)  # the root and every block under it
    return contextlib.nullcontext()
