"""Corruption operators A and their further corruptions A_hat = B A (Ambient Diffusion).

Ambient Diffusion trains on measurements y = A x0 only. At training time the model sees an
even more corrupted input A_hat x_t and is graded on everything A measures. Theorem 4.1 of the
paper: this learns E[x0 | A_hat x_t, A_hat] iff E[A^T A | A_hat] is full rank for every A_hat
(`ambient_fast.sampling.measurements.check_full_rank_condition` estimates that matrix by Monte
Carlo; the operators that are not masks, Gaussian compressed sensing and block averaging, live
there too, as measurements of inverse problems: a data set stores masks only).

Shapes: images x are (B, C, H, W). Mask operators return A with x's shape and dtype (1 = kept).
All randomness is drawn from an optional `torch.Generator`, on the generator's own device.

Further corruption of a mask operator, in one place: `further_draw` turns an image's random words
(24-bit integers) into a `FurtherDraw`, a per-value coin threshold or one box per image, and
`keep_mask` evaluates it per value. `further_corrupt` feeds them words from a torch.Generator; the
trainer's ambient input (`ambient_fast.kernels.ambient_input`, its fused kernel and its reference)
feeds them Philox words of the run's counter-based streams (`ambient_fast.objective.seeds`), and the fused
kernel repeats `keep_mask`'s arithmetic value by value.
"""
from __future__ import annotations

import enum
import inspect
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from ambient_fast.objective.seeds import BITS
from ambient_fast.options import FURTHER_KINDS

__all__ = [
    "CorruptionOperator",
    "MaskOperator",
    "FurtherKind",
    "FurtherDraw",
    "FurtherSpec",
    "keep_mask",
    "coin_threshold",
    "training_operator",
    "FURTHER_FOR_DATA",
    "FURTHER_KINDS",
    "DustOperator",
    "BoxOperator",
    "FixedBoxOperator",
    "KeepPatchOperator",
    "OPERATORS",
    "make_operator",
]


# ----------------------------------------------------------------------------- helpers


def random_on(fn: Callable[..., Tensor], *args: Any, generator: torch.Generator | None,
            device: torch.device, **kwargs: Any) -> Tensor:
    """Call torch.rand / randn / randint and move the result to `device`.

    A generator can only feed its own device, so draw there (a CPU generator stays usable for
    CUDA images and results do not depend on where the images live).
    """
    source = generator.device if generator is not None else device
    return fn(*args, generator=generator, device=source, **kwargs).to(device)


def check_fraction(name: str, value: float) -> None:
    """Raise unless 0 <= value < 1 (written so that NaN fails too)."""
    if not 0 <= value < 1:
        raise ValueError(f"{name} must lie in [0, 1), got {name}={value!r}")


def _side(fraction: float, size: int, *, round_up: bool) -> int:
    """Box side ceil/int(fraction * size), robust to float noise (int(0.29 * 100) is 28)."""
    length = round(fraction * size, 9)
    return math.ceil(length) if round_up else int(length)


def _box(top: Tensor, left: Tensor, height: Tensor | int, width: Tensor | int, H: int, W: int) -> Tensor:
    """(B,) corners and sides (or one side for all) -> (B, H, W) bool, True on [top, top+height) x
    [left, left+width) (cut by the border)."""
    rows = torch.arange(H, device=top.device)
    cols = torch.arange(W, device=top.device)
    bottom = (top + height)[:, None]
    right = (left + width)[:, None]
    in_rows = (rows >= top[:, None]) & (rows < bottom)
    in_cols = (cols >= left[:, None]) & (cols < right)
    return in_rows[:, :, None] & in_cols[:, None, :]


def _first_true(flags: Tensor) -> Tensor:
    """(B, L) bool -> (B,) index of the first True (argmax returns the first maximum)."""
    return flags.to(torch.uint8).argmax(dim=1)


def _scaled(words: Tensor, count: Tensor | int) -> Tensor:
    """Uniform integers in [0, count) from 24-bit words: floor(word * count / 2^24), exact in int64."""
    return (words * count) >> BITS


def _words(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """24-bit random words (int64) from a torch.Generator, the form `further_draw` consumes."""
    return random_on(torch.randint, 0, 1 << BITS, shape, generator=generator, device=device, dtype=torch.int64)


def _to_mask(keep: Tensor, channels: int, dtype: torch.dtype) -> Tensor:
    """(B, 1 or C, H, W) bool -> (B, C, H, W) 0/1 mask; a real copy, not an expanded view."""
    mask = keep.to(dtype)
    return mask.repeat(1, channels // mask.shape[1], 1, 1)


def warn_no_further_corruption(stacklevel: int = 3) -> None:
    warnings.warn(
        "no further corruption (A_hat = A): the model is never graded on the pixels A removes, "
        "so it cannot learn them (the full-rank condition of Theorem 4.1 fails)",
        UserWarning,
        stacklevel=stacklevel,
    )


def _check_p_and_delta(p: float, delta: float) -> None:
    """Both in [0, 1); delta = 0 is allowed but warned about."""
    check_fraction("p", p)
    check_fraction("delta", delta)
    if delta == 0:
        warn_no_further_corruption(stacklevel=4)


# ----------------------------------------------------------------------------- further corruption draws


class FurtherKind(enum.IntEnum):
    """How B is decided for each value (the fused kernel's B_KIND takes these numbers)."""

    COIN = 0       # kept iff the value's own 24-bit word (its pixel's, with shared channels) >= threshold
    ERASE_BOX = 1  # kept unless inside the image's box
    KEEP_BOX = 2   # kept only inside the image's box


@dataclass(frozen=True)
class FurtherDraw:
    """B for a batch of N images, in the form it is evaluated value by value.

    kind: a FurtherKind. thresholds, shared_channels: COIN's, (N,) int64 one threshold per image.
    boxes: the box kinds' (N, 4) int64 (top, left, height, width) per image, cut by the border.
    """

    kind: FurtherKind
    thresholds: Optional[Tensor] = None
    shared_channels: bool = False
    boxes: Optional[Tensor] = None

    def restricted_to(self, masked: Tensor, shape: tuple[int, int, int, int]) -> "FurtherDraw":
        """The same draw where `masked` (N,) is true, and B = 1 (nothing erased) elsewhere: images
        whose A hides nothing (clean or only noisy) get no further corruption."""
        N, _, H, W = shape
        if self.kind == FurtherKind.COIN:
            return FurtherDraw(self.kind, torch.where(masked, self.thresholds, 0), self.shared_channels)
        everything = torch.tensor([0, 0, H, W], device=self.boxes.device)
        nothing = torch.zeros(4, dtype=self.boxes.dtype, device=self.boxes.device)
        fallback = everything if self.kind == FurtherKind.KEEP_BOX else nothing
        return FurtherDraw(self.kind, boxes=torch.where(masked[:, None], self.boxes, fallback))


@dataclass(frozen=True)
class FurtherSpec:
    """B of an operator whose draw does not read A: what it makes of an image's two 24-bit words, in
    numbers a kernel can take (`ambient_fast.kernels.image_draws` draws it there).

    COIN: every value kept iff its own word >= `threshold` (`shared_channels`: one word per pixel).
    ERASE_BOX: a `height` x `width` box erased, its top-left corner uniform over the image (the
    words scaled to [0, H) and [0, W)), cut by the border.
    """

    kind: FurtherKind
    threshold: int = 0
    shared_channels: bool = False
    height: int = 0
    width: int = 0

    def draw(self, words: Tensor, shape: tuple[int, int, int, int]) -> FurtherDraw:
        """The FurtherDraw of N images of `shape` from their words (N, 2) int64 in [0, 2^24)."""
        N, _, H, W = shape
        if self.kind == FurtherKind.COIN:
            thresholds = torch.full((N,), self.threshold, dtype=torch.int64, device=words.device)
            return FurtherDraw(FurtherKind.COIN, thresholds, self.shared_channels)
        boxes = torch.stack([_scaled(words[:, 0], H), _scaled(words[:, 1], W),
                             torch.full((N,), self.height, device=words.device),
                             torch.full((N,), self.width, device=words.device)], 1)
        return FurtherDraw(FurtherKind.ERASE_BOX, boxes=boxes)


def coin_threshold(delta: float) -> int:
    """The 24-bit threshold of a coin that erases with probability delta (to within 2^-25)."""
    return round(delta * (1 << BITS))


def keep_mask(draw: FurtherDraw, shape: tuple[int, int, int, int], coins: Optional[Tensor] = None) -> Tensor:
    """B as bool, (N, C, H, W) for a COIN draw without shared channels, else (N, 1, H, W)
    (broadcast over the channels). coins: COIN's 24-bit words, (N, C or 1, H, W)."""
    N, C, H, W = shape
    if draw.kind == FurtherKind.COIN:
        expected = (N, 1 if draw.shared_channels else C, H, W)
        if coins is None or tuple(coins.shape) != expected:
            raise ValueError(f"a coin draw needs words of shape {expected}, got "
                             f"{None if coins is None else tuple(coins.shape)}")
        return coins >= draw.thresholds.reshape(-1, 1, 1, 1)
    top, left, height, width = draw.boxes.unbind(1)
    inside = _box(top, left, height, width, H, W)[:, None]
    return inside if draw.kind == FurtherKind.KEEP_BOX else ~inside


# ----------------------------------------------------------------------------- base classes


class CorruptionOperator(ABC):
    """A random linear measurement A and its further corruption A_hat = B A.

    Subclasses implement `_sample`, `_further` and `_apply` (and `a_shape` / checks where the
    measurement is not a mask); the public methods validate their inputs and delegate.
    """

    name: ClassVar[str]

    # -- description

    @property
    def params(self) -> dict[str, Any]:
        """Constructor parameters, read back from the attributes of the same names."""
        return {key: getattr(self, key) for key in inspect.signature(type(self)).parameters}

    def describe(self) -> dict[str, Any]:
        """{"name": ..., **params}: what data-set metadata records to rebuild the operator."""
        return {"name": self.name, **self.params}

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.params.items())
        return f"{type(self).__name__}({args})"

    # -- public API

    def corrupt(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw A ~ p(A) for each image and measure. x: (B, C, H, W) -> (y, A)."""
        self._check_x(x)
        A = self._sample(self.a_shape(x.shape), x.dtype, x.device, generator)
        return self.apply(A, x), A

    def further_corrupt(self, A: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw A_hat ~ p(A_hat | A) for each item of the batch; same shape and device as A."""
        self._check_A(A)
        return self._further(A, generator)

    def apply(self, A: Tensor, x: Tensor) -> Tensor:
        """The measurement y = A x of each image x: (B, C, H, W) under its own A."""
        self._check_x(x)
        expected = self.a_shape(x.shape)
        if tuple(A.shape) != expected:
            raise ValueError(
                f"{self.name}: A must have shape {expected} for images of shape "
                f"{tuple(x.shape)}, got {tuple(A.shape)}"
            )
        return self._apply(A, x)

    # -- hooks

    @abstractmethod
    def a_shape(self, x_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of A for a batch of images of shape x_shape = (B, C, H, W)."""

    @abstractmethod
    def _check_A(self, A: Tensor) -> None:
        """Validate an A handed to further_corrupt (no image to compare with)."""

    @abstractmethod
    def _sample(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                generator: torch.Generator | None) -> Tensor:
        """A batch of A ~ p(A) of the given (full) shape."""

    @abstractmethod
    def _further(self, A: Tensor, generator: torch.Generator | None) -> Tensor:
        """A_hat ~ p(A_hat | A) for each item of the batch."""

    @abstractmethod
    def _apply(self, A: Tensor, x: Tensor) -> Tensor:
        """y = A x, inputs already validated."""

    def _check_size(self, H: int, W: int) -> None:
        """Raise if the operator cannot act on H x W images (default: any size works)."""

    # -- validation shared by the public methods

    def _check_x(self, x: Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"{self.name}: images must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{self.name}: images must be floating point, got {x.dtype}")
        self._check_size(x.shape[-2], x.shape[-1])


class MaskOperator(CorruptionOperator):
    """Operators whose A is a 0/1 mask of the image's shape: y = A * x. Their further corruption
    is a `further_draw` from two 24-bit words per image (see the module docstring)."""

    reads_mask: ClassVar[bool] = False  # whether further_draw needs where A's own box lies

    def further_draw(self, kept: Optional[Tensor], words: Tensor, shape: tuple[int, int, int, int]) -> FurtherDraw:
        """B for N images of `shape` (N, C, H, W). kept: (N, H, W) bool, channel 0 of A (only when
        `reads_mask`; else None). words: (N, 2) int64 in [0, 2^24), the images' random words."""
        return self.further_spec(shape).draw(words, shape)

    def further_spec(self, shape: tuple[int, int, int, int]) -> Optional[FurtherSpec]:
        """B as a FurtherSpec, for operators whose draw does not read A (None for those that do,
        which override `further_draw`)."""
        return None

    def _further(self, A, generator):
        N, C, H, W = A.shape
        kept = A[:, 0] != 0 if self.reads_mask else None
        draw = self.further_draw(kept, _words((N, 2), generator, A.device), tuple(A.shape))
        coins = None
        if draw.kind == FurtherKind.COIN:
            coins = _words((N, 1 if draw.shared_channels else C, H, W), generator, A.device)
        return A * keep_mask(draw, tuple(A.shape), coins).to(A.dtype)

    def a_shape(self, x_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(x_shape)

    def _check_A(self, A: Tensor) -> None:
        if A.ndim != 4:
            raise ValueError(f"{self.name}: masks must be 4-D (B, C, H, W), got shape {tuple(A.shape)}")
        self._check_size(A.shape[-2], A.shape[-1])

    def _apply(self, A: Tensor, x: Tensor) -> Tensor:
        return A * x


# ----------------------------------------------------------------------------- mask operators


class DustOperator(MaskOperator):
    """Random inpainting: each pixel kept with probability 1 - p; A_hat keeps each kept pixel
    with probability 1 - delta. `shared_channels` draws one coin per pixel for all channels."""

    name = "dust"

    def __init__(self, p: float, delta: float = 0.1, shared_channels: bool = False) -> None:
        _check_p_and_delta(p, delta)
        self.p, self.delta, self.shared_channels = p, delta, shared_channels

    @property
    def survival_A(self) -> float:
        """Probability that a pixel is kept by A."""
        return 1 - self.p

    @property
    def survival(self) -> float:
        """Probability that a pixel is kept by A_hat: (1 - p)(1 - delta)."""
        return (1 - self.p) * (1 - self.delta)

    def _coins(self, shape: tuple[int, ...], keep_prob: float, device: torch.device,
               generator: torch.Generator | None) -> Tensor:
        """(B, C, H, W) bool, True with probability keep_prob; one coin per pixel if shared."""
        B, C, H, W = shape
        draw_shape = (B, 1, H, W) if self.shared_channels else (B, C, H, W)
        # rand is uniform on [0, 1), so P(u < keep_prob) = keep_prob exactly.
        return random_on(torch.rand, draw_shape, generator=generator, device=device) < keep_prob

    def _sample(self, shape, dtype, device, generator):
        return _to_mask(self._coins(shape, 1 - self.p, device, generator), shape[1], dtype)

    def further_spec(self, shape):
        return FurtherSpec(FurtherKind.COIN, threshold=coin_threshold(self.delta), shared_channels=self.shared_channels)


class BoxOperator(MaskOperator):
    """Erase a ceil(p*H) x ceil(p*W) box whose top-left corner is uniform over the whole image
    (cut by the border); A_hat erases a second ceil(delta*H) x ceil(delta*W) box anywhere."""

    name = "box"

    def __init__(self, p: float, delta: float) -> None:
        _check_p_and_delta(p, delta)
        self.p, self.delta = p, delta

    def _erase_box(self, fraction: float, shape: tuple[int, ...], device: torch.device,
                   generator: torch.Generator | None) -> Tensor:
        """(B, 1, H, W) bool keep-mask with one random box of the given relative side erased."""
        B, _, H, W = shape
        top = random_on(torch.randint, 0, H, (B,), generator=generator, device=device)
        left = random_on(torch.randint, 0, W, (B,), generator=generator, device=device)
        box = _box(top, left, _side(fraction, H, round_up=True), _side(fraction, W, round_up=True), H, W)
        return ~box[:, None]

    def _sample(self, shape, dtype, device, generator):
        return _to_mask(self._erase_box(self.p, shape, device, generator), shape[1], dtype)

    def further_spec(self, shape):
        _, _, H, W = shape
        return FurtherSpec(FurtherKind.ERASE_BOX, height=_side(self.delta, H, round_up=True),
                           width=_side(self.delta, W, round_up=True))


class FixedBoxOperator(MaskOperator):
    """Erase an int(p*H)-sided square fully inside the image; A_hat erases one more square of
    the same size that does not overlap the first (uniform over the non-overlapping positions).
    delta only switches the further corruption off (delta == 0)."""

    name = "fixed_box"

    def __init__(self, p: float, delta: float = 0.1) -> None:
        _check_p_and_delta(p, delta)
        if delta > 0 and p > 0.5:
            # Two disjoint squares of side s fit iff 2s <= H or 2s <= W, and s = int(p*H) > H/2
            # for all but small H, so the paper's second block has no place to go.
            raise ValueError(
                f"fixed_box: a second non-overlapping box of side int(p*H) needs p <= 0.5, got p={p!r}"
            )
        self.p, self.delta = p, delta

    def _check_size(self, H: int, W: int) -> None:
        side = _side(self.p, H, round_up=False)
        if side > W:
            raise ValueError(f"fixed_box: box of side {side} (p={self.p}) does not fit a {H}x{W} image")

    def _sample(self, shape, dtype, device, generator):
        B, C, H, W = shape
        side = _side(self.p, H, round_up=False)
        top = random_on(torch.randint, 0, H - side + 1, (B,), generator=generator, device=device)
        left = random_on(torch.randint, 0, W - side + 1, (B,), generator=generator, device=device)
        return _to_mask(~_box(top, left, side, side, H, W)[:, None], C, dtype)

    reads_mask = True

    def further_draw(self, kept, words, shape):
        N, _, H, W = shape
        side = _side(self.p, H, round_up=False) if self.delta > 0 else 0  # delta 0: nothing more erased
        erased = ~kept
        top1, left1 = _first_true(erased.any(dim=2)), _first_true(erased.any(dim=1))
        rows = torch.arange(H - side + 1, device=kept.device)
        cols = torch.arange(W - side + 1, device=kept.device)
        # Squares are disjoint iff they are separated along rows or along columns.
        apart_rows = (rows - top1[:, None]).abs() >= side
        apart_cols = (cols - left1[:, None]).abs() >= side
        allowed = (apart_rows[:, :, None] | apart_cols[:, None, :]).flatten(1)
        # Where no disjoint place is left (the first square in the middle of a small image), any place.
        allowed |= ~allowed.any(dim=1, keepdim=True)
        # The k-th allowed place in row-major order, k uniform over the allowed count.
        k = _scaled(words[:, 0], allowed.sum(dim=1))
        choice = (allowed.cumsum(dim=1) <= k[:, None]).sum(dim=1)
        sides = torch.full((N,), side, device=kept.device)
        boxes = torch.stack([choice // len(cols), choice % len(cols), sides, sides], 1)
        return FurtherDraw(FurtherKind.ERASE_BOX, boxes=boxes)


class KeepPatchOperator(MaskOperator):
    """Keep only an int((1-p)*H)-sided square patch at a uniform position inside the image;
    A_hat keeps an int((1-delta)*patch)-sided sub-square at a uniform position inside it."""

    name = "keep_patch"

    def __init__(self, p: float, delta: float) -> None:
        _check_p_and_delta(p, delta)
        self.p, self.delta = p, delta

    def _sides(self, H: int) -> tuple[int, int]:
        """(patch side, sub-square side) for images of height H."""
        patch = _side(1 - self.p, H, round_up=False)
        return patch, _side(1 - self.delta, patch, round_up=False)

    def _check_size(self, H: int, W: int) -> None:
        patch, sub = self._sides(H)
        if not 1 <= patch <= W or sub < 1:
            raise ValueError(
                f"keep_patch: kept patch of side {patch} (p={self.p}) and sub-square of side {sub} "
                f"(delta={self.delta}) must both be at least 1 and fit a {H}x{W} image"
            )

    def _sample(self, shape, dtype, device, generator):
        B, C, H, W = shape
        patch, _ = self._sides(H)
        top = random_on(torch.randint, 0, H - patch + 1, (B,), generator=generator, device=device)
        left = random_on(torch.randint, 0, W - patch + 1, (B,), generator=generator, device=device)
        return _to_mask(_box(top, left, patch, patch, H, W)[:, None], C, dtype)

    reads_mask = True

    def further_draw(self, kept, words, shape):
        N, _, H, W = shape
        patch, sub = self._sides(H)
        top, left = _first_true(kept.any(dim=2)), _first_true(kept.any(dim=1))
        shift = _scaled(words, patch - sub + 1)
        sides = torch.full((N,), sub, device=kept.device)
        return FurtherDraw(FurtherKind.KEEP_BOX, boxes=torch.stack([top + shift[:, 0], left + shift[:, 1], sides, sides], 1))


# ----------------------------------------------------------------------------- factory


OPERATORS: dict[str, type[CorruptionOperator]] = {
    cls.name: cls
    for cls in (DustOperator, BoxOperator, FixedBoxOperator, KeepPatchOperator)
}


def make_operator(name: str, **params: Any) -> CorruptionOperator:
    """Build the operator `name` (a key of OPERATORS) from keyword parameters."""
    if name not in OPERATORS:
        raise ValueError(f"unknown corruption operator {name!r}; valid names: {sorted(OPERATORS)}")
    cls = OPERATORS[name]
    signature = inspect.signature(cls)
    try:
        signature.bind(**params)
    except TypeError as err:
        valid = ", ".join(p.name if p.default is p.empty else f"{p.name}={p.default!r}"
                          for p in signature.parameters.values())
        raise ValueError(f"{name}: {err}; valid parameters: {valid}") from None
    return cls(**params)


# The further corruptions a data set may train with, by the kind of its masks (meta.json's record;
# "user" masks are imported ones). Each pair keeps Theorem 4.1's condition: every pixel that A can
# hide is, with positive probability given A_hat, one that A observed and B hid, so the model is
# graded on pixels like the ones A hides. Dust or user masks allow dust B or a box anywhere. A box
# of A is told apart from dust holes or from a smaller box, so its pixels would never be graded:
# box-shaped masks need the paper's own further corruption (a second box of the same kind).
# fixed_box and keep_patch B are defined by the position of A's own box: their data sets only.
FURTHER_FOR_DATA = {"dust": ("dust", "box"), "user": ("dust", "box"), "box": ("box",), "fixed_box": ("fixed_box",),
                    "keep_patch": ("keep_patch",)}


def training_operator(corruption: dict, delta: float, further: Optional[str] = None) -> MaskOperator:
    """The mask operator whose `further_draw` a data set trains with.

    corruption: meta.json's record ({"kind", "p", "shared_channels", ...}; kind "none" for clean or
    only noisy images, "mix" with its "parts" for `prepare mix`); delta: the further corruption's
    level; further: a FURTHER_FOR_DATA kind overriding the data set's own (None: its own, dust for
    user masks). Images whose A hides nothing get no further corruption whatever the operator
    (`FurtherDraw.restricted_to`). Raises ValueError for a combination that breaks Theorem 4.1's
    condition, a mixture of kinds of masks, or an unknown kind."""
    kind = corruption.get("kind")
    if kind == "mix":
        masked = {part["kind"]: part for part in corruption.get("parts", [])
                  if part.get("kind") != "none" and part.get("count", 1) > 0}
        if len(masked) > 1:
            raise ValueError(f"a mixture of {' and '.join(sorted(masked))} masks has no one further corruption; "
                             "mix sets of one kind of masks (and clean or noisy ones)")
        corruption = next(iter(masked.values()), {"kind": "none"})
        kind = corruption["kind"]
    if kind == "none":  # A hides nothing in any image, so no image gets B: its level never matters
        return DustOperator(0.0, 0.1)
    if kind not in FURTHER_FOR_DATA:
        raise ValueError(f"a data set of {kind!r} masks has no further corruption to train with (known kinds: "
                         f"{sorted(FURTHER_FOR_DATA)})")
    allowed = FURTHER_FOR_DATA[kind]
    further = allowed[0] if further is None else further
    if further not in allowed:
        raise ValueError(f"--further {further} on a data set of {kind} masks breaks the condition of Theorem 4.1 (the "
                         f"pixels its masks hide would never be graded); it trains with {' or '.join(allowed)}")
    p = float(corruption.get("p", 0.0))
    if further == "dust":
        return DustOperator(p, delta, shared_channels=bool(corruption.get("shared_channels", False)))
    return make_operator(further, p=p, delta=delta)
