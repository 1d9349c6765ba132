"""Every random stream of a run, as a pure function of its position: what makes resumption exact
without saving generator states, and what lets the fused kernels and their PyTorch references draw
the same numbers.

Streams (`Stream`), each with its own key derived from the run's seed:

    INIT      the initial weights (the one seeding of torch's global generator, before training)
    ORDER     the permutation of the data set in each epoch (numpy, from (seed, epoch))
    FLIP      each image's x-flip, from its position in the run
    IMAGE     each image's own draws in the ambient input: its noise level and the corner of its
              further-corruption box (one Philox call per image)
    ELEMENT   each value's draws in the ambient input: its noise and its dust coin (one Philox call
              per value)
    DROPOUT   the dropout masks of one step (torch's global generator, seeded inside a fork that
              restores it: dropout takes no generator argument)

A position is an image's index in the run's stream of images: the step's global batch, then the
rank, then the micro-batch, then the image (`ambient_fast.data.loader`). A value's counter is its
image's position times C*H*W plus its index in the flattened (C, H, W) image.

Counter-based draws use Philox4x32-10 with Triton's conventions (`tl.randint4x(seed, offset)`: key =
the 64-bit seed's low and high words, counter = (offset's low word, its high word, 0, 0)), written
here in plain PyTorch on int64 tensors, so that a kernel and its reference agree bitwise. The words
become numbers without any rounding question: 24 bits each, `uniform = bits * 2^-24` (exact in
float32), and Box-Muller's logarithm and cosine are taken in float64 and rounded once to float32
(the float32 transcendental functions of numpy, torch and CUDA differ in their last bits; their
float64 results round to the same float32).
"""
import enum
import math
from typing import Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["Stream", "derive_seed", "stream_key", "permutation", "philox", "BITS", "bits24", "uniform",
           "open_uniform", "centred_uniform", "box_muller", "TWO_PI"]


class Stream(enum.IntEnum):
    INIT = 0
    ORDER = 1
    FLIP = 2
    IMAGE = 3
    ELEMENT = 4
    DROPOUT = 5


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from non-negative integers (numpy's SeedSequence: stable across platforms)."""
    low, high = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
    return (int(high) << 31) ^ int(low)


def stream_key(seed: int, stream: Stream, *parts: int) -> int:
    """The key of one stream of the run seeded `seed` (parts: e.g. the step, for DROPOUT)."""
    return derive_seed(seed, int(stream), *parts)


def permutation(seed: int, epoch: int, count: int) -> np.ndarray:
    """The order of the data set's `count` images in `epoch`: int64 (count,), the same on every rank."""
    return np.random.default_rng([seed, int(Stream.ORDER), epoch]).permutation(count)


# ----------------------------------------------------------------------------------------------
# Philox4x32-10, as Triton's tl.randint4x computes it.

_MASK32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_ROUNDS = 10


def _mulhilo(constant: int, value: Tensor) -> Tuple[Tensor, Tensor]:
    """(high, low) 32-bit words of constant * value, value an int64 tensor of 32-bit words. The
    constant is split into 16-bit halves so that no partial product leaves int64."""
    low_part = value * (constant & 0xFFFF)             # < 2^48
    high_part = value * (constant >> 16)               # < 2^48; the product is high_part * 2^16 + low_part
    middle = ((high_part & 0xFFFF) << 16) + low_part   # < 2^49
    return (high_part >> 16) + (middle >> 32), middle & _MASK32


def philox(key: int, counters: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Four 32-bit words (int64 tensors of counters' shape) per counter (int64 >= 0), keyed by `key`
    (0 <= key < 2^64): bitwise what `tl.randint4x(key, counters)` returns, as unsigned words."""
    counters = counters.to(torch.int64)
    c0, c1 = counters & _MASK32, (counters >> 32) & _MASK32
    c2 = c3 = torch.zeros_like(counters)
    k0, k1 = key & _MASK32, (key >> 32) & _MASK32
    for _ in range(_ROUNDS):
        high_b, low_b = _mulhilo(_ROUND_B, c2)
        high_a, low_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = high_b ^ c1 ^ k0, low_b, high_a ^ c3 ^ k1, low_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


# ----------------------------------------------------------------------------------------------
# Words to numbers (the kernels repeat exactly these steps).

BITS = 24  # bits of a word that a draw uses: uniforms on a grid of 2^-24, exact in float32
_SCALE = 2.0 ** -BITS
# 2 pi as a float32, the value a Triton kernel's literal takes, widened to float64 on both sides.
TWO_PI = float(np.float32(2 * math.pi))


def bits24(word: Tensor) -> Tensor:
    """The top 24 bits of a 32-bit word: int64 in [0, 2^24)."""
    return word >> (32 - BITS)


def uniform(word: Tensor) -> Tensor:
    """float32 in [0, 1) on the grid k 2^-24, exactly."""
    return bits24(word).to(torch.float32) * _SCALE


def open_uniform(word: Tensor) -> Tensor:
    """float32 in (0, 1] on the grid k 2^-24, exactly (a logarithm's safe argument)."""
    return (bits24(word) + 1).to(torch.float32) * _SCALE


def centred_uniform(word: Tensor) -> Tensor:
    """float64 in (0, 1), (k + 1/2) 2^-24: the argument of an inverse distribution function, never
    an end of the interval."""
    return (bits24(word).to(torch.float64) + 0.5) * _SCALE


def box_muller(radius_word: Tensor, angle_word: Tensor) -> Tensor:
    """A standard normal float32 from two words: sqrt(-2 ln u1) cos(2 pi u0), u1 in (0, 1] and u0 in
    [0, 1), computed in float64 (2 pi: its float32 value, as a kernel's literal) and rounded once."""
    radius = torch.sqrt(-2.0 * torch.log(open_uniform(radius_word).double()))
    return (radius * torch.cos(TWO_PI * uniform(angle_word).double())).to(torch.float32)
