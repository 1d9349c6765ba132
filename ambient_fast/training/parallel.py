"""Parallelism applied to a built model, in a fixed order: torch.compile per U-Net block, then
FSDP2 per block and the U-Net root; or DDP; or nothing.

One numerical policy for every kind: fp32 parameters, bf16 computation by autocast (the trainer's),
gradients reduced in fp32. FSDP2 therefore gathers fp32 parameters and casts nothing itself: with a
bf16 `param_dtype` it would cast every floating-point input of the U-Net to bf16, the noise labels
included (VP's reach 999, where bf16 steps by 4), while autocast keeps the noise embedding's
arithmetic in fp32 and casts only what its convolutions and matrix products read. A sharded run
computes what a single process computes.
"""
import contextlib

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from ambient_fast.options import PARALLEL_KINDS
from ambient_fast.training.distributed import World


def parallelize(model: torch.nn.Module, kind: str, world: World, device: torch.device,
                compile_blocks: bool) -> torch.nn.Module:
    """Apply compile and FSDP2 / DDP to `model` in place; return the module to call. `model` is an
    AmbientPrecond or a DiffusersDenoiser: its network is `model.model`, and `model.blocks()` are
    the units compiled and sharded one by one."""
    if kind not in PARALLEL_KINDS:
        raise ValueError(f"--parallel must be one of {PARALLEL_KINDS}, got {kind!r}")
    unet, blocks = model.model, model.blocks()
    if compile_blocks:
        compile_each(blocks)
    if kind == "fsdp":
        mesh = init_device_mesh(device.type, (world.size,))
        policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)  # see the module docstring
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(unet, mesh=mesh, mp_policy=policy)
        return model
    if kind == "ddp":
        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return model


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
        model.model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()
