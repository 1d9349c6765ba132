"""What a command asks of memory, estimated before its work and refused when the machine has less.

Sample counts, seed ranges, resolutions and batch sizes are numbers a user can make as large as
they like; a few of them ask for terabytes. Each command estimates what its options ask for, from
the arrays its work must hold at once, before any of it starts, and `check_memory` refuses an
estimate beyond the memory the machine (or the GPU) has, with the estimate and the option to
change. The estimates count only the arrays that surely exist (activations of a network are
counted by their inputs and outputs per block), so they are lower bounds: a refusal is certain to
be right, and a run that passes may still need more. Nothing here imports torch unless asked about
a GPU.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

__all__ = ["machine_bytes", "check_memory", "readable", "sampling_bytes", "unet_training_bytes", "seeds_bytes"]


def machine_bytes(device: str = "cpu") -> int:
    """The memory of the machine (physical RAM), or of the GPU for a CUDA device, in bytes."""
    if str(device).startswith("cuda"):
        import torch

        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def readable(count: float) -> str:
    """Bytes as a person reads them: '3.2 GiB', '1.5 TiB', 'about 10^400 B'."""
    if count >= 1024 ** 7:  # beyond PiB, and maybe beyond a float (an estimate from a 400-digit option)
        return f"about 10^{len(str(int(count))) - 1} B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if count < 1024 or unit == "PiB":
            return f"{count:.3g} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    raise AssertionError("unreachable")


def check_memory(need: float, what: str, advice: str, device: str = "cpu") -> None:
    """ValueError when `need` bytes (the estimate of `what`, e.g. '--seeds 0-999999999') exceed what
    `device` has; `advice` says which option to change."""
    have = machine_bytes(device)
    if need > have:
        where = "the GPU" if str(device).startswith("cuda") else "this machine"
        raise ValueError(f"{what} needs at least {readable(need)} of memory, more than the {readable(have)} {where} "
                         f"has: {advice}")


def sampling_bytes(images: int, channels: int, resolution: int, masks: int = 1) -> int:
    """Memory the sampler holds at once for `images` images of (channels, resolution, resolution):
    the float64 state, its denoised estimate and the two increments of a Heun step, the network's
    input, and `masks` sampling masks per image (float32)."""
    values = images * channels * resolution * resolution
    return values * (4 * 8 + 2 * 4) + values * masks * 4


def unet_training_bytes(images: int, channels: int, resolution: int, model_channels: int,
                        channel_mult: Sequence[int], num_blocks: int, ranks: int = 1) -> int:
    """Memory a U-Net's training step holds for a micro-batch of `images` images of (channels,
    resolution, resolution), float32. The weights: at each level, two 3x3 convolutions of the level's
    width in each block of the encoder and the decoder (which has one block more), kept five times
    (weights, gradients, Adam's two moments, the EMA), shared by `ranks` (FSDP2 shards them). The
    activations kept for the backward pass: each block's input and output at its level's resolution,
    and the network's input and output."""
    weights = activations = 0
    per_level = 2 * num_blocks + 1
    for level, mult in enumerate(channel_mult):
        width, side = model_channels * mult, max(resolution >> level, 1)
        weights += per_level * 2 * 9 * width * width
        activations += per_level * 2 * width * side * side
    activations += 2 * (2 * channels) * resolution * resolution
    return 4 * (5 * weights // ranks + images * activations)


def seeds_bytes(count: int, channels: int, resolution: int) -> int:
    """Host memory for `count` seeds' images kept at once (the list of seeds, and every image as
    uint8 for the grid and the grid itself)."""
    return count * (40 + 2 * channels * resolution * resolution)
