"""Linear measurements of inverse problems, y = A x + noise, and the random measurement families
that are not masks.

`Measurement`: one known linear operator per image of a batch, with `forward(x)` (y = A x),
`adjoint(y)` (A^T y) and `mask` (A's 0/1 mask where A is one, else None; the ambient posterior
sampler feeds it to the network). `as_matrix` gives the dense matrices of tiny cases (closed forms
in tests, Theorem 4.1's check). The operators: `Inpainting` (a mask), `CompressedSensing` (a
Gaussian matrix), `BlockAveraging` (factor x factor block means, at full size), `Blur` (a known
kernel), `Downsampling` (super-resolution: block means at 1/factor size).

`GaussianCSOperator` and `AveragingOperator` are random families in the form of the corruption
operators of `ambient_fast.objective.corruption` (a prior p(A) and a further corruption
p(A_hat | A)): they draw the measurements of inverse problems (`measurement_of` turns a draw into a
`Measurement`), and with the mask operators they are the cases of Theorem 4.1's check, which
estimates E[A^T A | A_hat] from `operator_posterior`'s draws of p(A | A_hat). Training never uses
them: a data set stores masks only.
"""
from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ambient_fast.objective.corruption import (CorruptionOperator, DustOperator, MaskOperator, check_fraction,
                                               random_on, warn_no_further_corruption)

__all__ = [
    "Measurement",
    "Inpainting",
    "CompressedSensing",
    "BlockAveraging",
    "Blur",
    "Downsampling",
    "GaussianCSOperator",
    "AveragingOperator",
    "measurement_of",
    "operator_posterior",
    "FullRankReport",
    "check_full_rank_condition",
]


# ----------------------------------------------------------------------------- known operators


class Measurement(ABC):
    """A known linear measurement of each image of a batch: y = A x, one A per image (operators
    without per-image parameters act alike on every image: `batch` 1)."""

    mask: Optional[Tensor] = None  # (B, C, H, W) 0/1 where A is a mask, else None

    @abstractmethod
    def forward(self, x: Tensor) -> Tensor:
        """y = A x: (B, C, H, W) -> (B, *measured shape)."""

    @abstractmethod
    def adjoint(self, y: Tensor) -> Tensor:
        """A^T y: (B, *measured shape) -> (B, C, H, W)."""

    @property
    def batch(self) -> int:
        """Images with their own operator (1: the same operator for every image)."""
        return 1

    def to(self, device, dtype: torch.dtype) -> Measurement:
        """A copy whose tensors (mask, matrix, flags, kernel) live on `device` in `dtype`."""
        moved = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, Tensor):
                setattr(moved, name, value.to(device, dtype))
        return moved

    def as_matrix(self, image_shape: tuple[int, int, int], dtype: torch.dtype = torch.float64,
                  device=None) -> Tensor:
        """Dense matrices of x -> A x, (batch, m, n) with n = C*H*W: column j is the measurement of
        the j-th basis image. Tiny sizes only."""
        n = math.prod(image_shape)
        basis = torch.eye(n, dtype=dtype, device=device).view(n, 1, *image_shape)
        columns = [self.forward(image.expand(self.batch, *image_shape)).flatten(1) for image in basis]
        return torch.stack(columns, dim=2)


class Inpainting(Measurement):
    """y = M * x for a 0/1 mask M (B, C, H, W) of the image's shape; y is 0 where M is."""

    def __init__(self, mask: Tensor):
        if mask.ndim != 4:
            raise ValueError(f"inpainting: the mask must be 4-D (B, C, H, W), got shape {tuple(mask.shape)}")
        self.mask = mask

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    def forward(self, x):
        return self.mask * x

    def adjoint(self, y):
        return self.mask * y


class CompressedSensing(Measurement):
    """y = A x.flatten() for a matrix A (B, m, C*H*W) per image."""

    def __init__(self, matrix: Tensor, image_shape: tuple[int, int, int]):
        if matrix.ndim != 3 or matrix.shape[2] != math.prod(image_shape):
            raise ValueError(f"compressed sensing: the matrix must have shape (B, m, {math.prod(image_shape)}) for "
                             f"images of shape {tuple(image_shape)}, got {tuple(matrix.shape)}")
        self.matrix, self.image_shape = matrix, tuple(image_shape)

    @property
    def batch(self) -> int:
        return self.matrix.shape[0]

    def forward(self, x):
        return (self.matrix @ x.flatten(1)[:, :, None])[:, :, 0]

    def adjoint(self, y):
        return (self.matrix.transpose(1, 2) @ y[:, :, None]).view(-1, *self.image_shape)


class BlockAveraging(Measurement):
    """Each factor x factor block replaced by its mean (average pooling, then nearest upsampling): an
    orthogonal projection, so its own adjoint. flags: (B,) 1 = averaged, 0 = left as it is (None:
    every image averaged)."""

    def __init__(self, factor: int, flags: Optional[Tensor] = None):
        self.factor, self.flags = factor, flags

    @property
    def batch(self) -> int:
        return 1 if self.flags is None else self.flags.shape[0]

    def forward(self, x):
        averaged = F.interpolate(F.avg_pool2d(x, self.factor), scale_factor=self.factor, mode="nearest")
        return averaged if self.flags is None else torch.where(self.flags[:, None, None, None] > 0, averaged, x)

    def adjoint(self, y):
        return self.forward(y)


class Blur(Measurement):
    """Each channel convolved with a known (k, k) kernel, k odd, zero padding: y has x's shape."""

    def __init__(self, kernel: Tensor):
        if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] % 2 == 0:
            raise ValueError(f"blur: the kernel must be a square of odd side (k, k), got shape {tuple(kernel.shape)}")
        self.kernel = kernel

    def _weight(self, images: Tensor) -> Tensor:
        """The kernel as a depthwise convolution weight (C, 1, k, k) for `images`' channels and dtype."""
        return self.kernel.to(images)[None, None].expand(images.shape[1], 1, *self.kernel.shape)

    def forward(self, x):
        return F.conv2d(x, self._weight(x), padding=self.kernel.shape[0] // 2, groups=x.shape[1])

    def adjoint(self, y):
        # The transposed convolution with the same weight and padding is conv2d's adjoint.
        return F.conv_transpose2d(y, self._weight(y), padding=self.kernel.shape[0] // 2, groups=y.shape[1])


class Downsampling(Measurement):
    """Super-resolution: the mean of each factor x factor block, y of shape (B, C, H/factor, W/factor)."""

    def __init__(self, factor: int):
        self.factor = factor

    def forward(self, x):
        return F.avg_pool2d(x, self.factor)

    def adjoint(self, y):
        # Each block mean reads its factor^2 pixels with weight 1 / factor^2.
        return F.interpolate(y, scale_factor=self.factor, mode="nearest") / self.factor ** 2


# ----------------------------------------------------------------------------- random families


class GaussianCSOperator(CorruptionOperator):
    """Compressed sensing: A is an m x n matrix with i.i.d. N(0, 1/m) entries (n = C*H*W), one
    per image, y = A x.flatten(). A_hat zeroes one uniformly chosen row (deletion with a static
    shape: A_hat^T A_hat is that of the matrix with the row removed)."""

    name = "gaussian_cs"

    def __init__(self, m: int, delete_row: bool = True) -> None:
        if isinstance(m, bool) or not isinstance(m, int) or m < 2:
            raise ValueError(f"m must be an integer >= 2, got m={m!r}")
        if not delete_row:
            warn_no_further_corruption()
        self.m, self.delete_row = m, delete_row

    def a_shape(self, x_shape: tuple[int, ...]) -> tuple[int, ...]:
        B, C, H, W = x_shape
        return (B, self.m, C * H * W)

    def _check_A(self, A: Tensor) -> None:
        if A.ndim != 3 or A.shape[1] != self.m:
            raise ValueError(f"gaussian_cs: A must have shape (B, {self.m}, n), got {tuple(A.shape)}")

    def _sample(self, shape, dtype, device, generator):
        # Any shape: operator_posterior also draws single N(0, 1/m) rows with it.
        return random_on(torch.randn, shape, generator=generator, device=device, dtype=dtype) / math.sqrt(self.m)

    def _further(self, A, generator):
        if not self.delete_row:
            return A.clone()
        row = random_on(torch.randint, 0, self.m, (A.shape[0],), generator=generator, device=A.device)
        keep = torch.arange(self.m, device=A.device) != row[:, None]
        return A * keep[:, :, None].to(A.dtype)

    def _apply(self, A, x):
        return CompressedSensing(A, x.shape[1:]).forward(x)


class AveragingOperator(CorruptionOperator):
    """With probability p an image is replaced by its factor x factor block average (average
    pooling, then nearest upsampling). A: (B,) flags, 1 = averaged. A_hat averages every image."""

    name = "averaging"

    def __init__(self, p: float, factor: int = 8) -> None:
        check_fraction("p", p)
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"factor must be a positive integer, got factor={factor!r}")
        self.p, self.factor = p, factor

    def a_shape(self, x_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (x_shape[0],)

    def _check_A(self, A: Tensor) -> None:
        if A.ndim != 1:
            raise ValueError(f"averaging: A must be 1-D flags of shape (B,), got {tuple(A.shape)}")

    def _check_size(self, H: int, W: int) -> None:
        if H % self.factor or W % self.factor:
            raise ValueError(f"averaging: factor {self.factor} must divide the image size, got {H}x{W}")

    def _sample(self, shape, dtype, device, generator):
        return (random_on(torch.rand, shape, generator=generator, device=device) < self.p).to(dtype)

    def _further(self, A, generator):
        return torch.ones_like(A)

    def _apply(self, A, x):
        return BlockAveraging(self.factor, A).forward(x)


def measurement_of(operator: CorruptionOperator, A: Tensor, image_shape: tuple[int, int, int]) -> Measurement:
    """The known measurement of a drawn A (or A_hat) of `operator`, for images of shape (C, H, W)."""
    if isinstance(operator, MaskOperator):
        return Inpainting(A)
    if isinstance(operator, GaussianCSOperator):
        return CompressedSensing(A, image_shape)
    if isinstance(operator, AveragingOperator):
        return BlockAveraging(operator.factor, A)
    raise TypeError(f"no measurement for {type(operator).__name__}")


# ----------------------------------------------------------------------------- Theorem 4.1


def operator_posterior(operator: CorruptionOperator, A_hat: Tensor, image_shape: tuple[int, int, int], num: int,
                       generator: torch.Generator | None = None, *, batch_size: int = 8192,
                       max_draws: int = 4_000_000) -> Tensor:
    """`num` draws of A ~ p(A | A_hat) for one A_hat (batch of 1) of images of shape (C, H, W):
    (num, *A_hat.shape[1:]).

    Dust and Gaussian CS have it in closed form. Any other operator: rejection sampling, drawing
    (A, A_hat') pairs from the prior and keeping the A whose A_hat' equals A_hat exactly; exact but
    only practical when A_hat takes few values (tiny images); raises RuntimeError after `max_draws`
    prior draws.
    """
    expected = operator.a_shape((1, *image_shape))
    if tuple(A_hat.shape) != expected:
        raise ValueError(f"{operator.name}: operator_posterior takes one A_hat (batch of 1) of shape {expected}, "
                         f"got shape {tuple(A_hat.shape)}")
    if isinstance(operator, DustOperator):
        return _dust_posterior(operator, A_hat, num, generator)
    if isinstance(operator, GaussianCSOperator):
        return _gaussian_cs_posterior(operator, A_hat, num, generator)
    zeros = torch.zeros(batch_size, *image_shape, dtype=A_hat.dtype, device=A_hat.device)
    accepted: list[Tensor] = []
    found = drawn = 0
    while found < num:
        if drawn >= max_draws:
            raise RuntimeError(
                f"{operator.name}: rejection sampling found {found} of {num} posterior samples in {drawn} prior "
                "draws; this A_hat is too unlikely (use a smaller image or raise max_draws)")
        _, A = operator.corrupt(zeros, generator)
        match = (operator.further_corrupt(A, generator) == A_hat).reshape(batch_size, -1).all(dim=1)
        accepted.append(A[match])
        found += int(match.sum())
        drawn += batch_size
    return torch.cat(accepted)[:num]


def _dust_posterior(operator: DustOperator, A_hat: Tensor, num: int, generator: torch.Generator | None) -> Tensor:
    """Pixels kept by A_hat were kept by A; an erased one was kept by A (and erased only by the
    further corruption) with probability (1-p) delta / (1 - (1-p)(1-delta))."""
    erased = 1 - operator.survival
    revived = (1 - operator.p) * operator.delta / erased if erased > 0 else 0.0
    _, C, H, W = A_hat.shape
    coins = random_on(torch.rand, (num, 1 if operator.shared_channels else C, H, W), generator=generator,
                      device=A_hat.device) < revived
    return torch.maximum(A_hat.expand(num, -1, -1, -1), coins.to(A_hat.dtype).expand(num, C, H, W))


def _gaussian_cs_posterior(operator: GaussianCSOperator, A_hat: Tensor, num: int,
                           generator: torch.Generator | None) -> Tensor:
    """The kept rows are A's; the zeroed row was an independent N(0, 1/m) row."""
    samples = A_hat.repeat(num, 1, 1)
    if not operator.delete_row:
        return samples
    zero_rows = (A_hat[0] == 0).all(dim=1).nonzero().flatten()
    if len(zero_rows) != 1:
        raise ValueError(f"gaussian_cs: A_hat must have exactly one zeroed row, found {len(zero_rows)}")
    samples[:, zero_rows[0]] = operator._sample((num, A_hat.shape[2]), A_hat.dtype, A_hat.device, generator)
    return samples


@dataclass(frozen=True)
class FullRankReport:
    """Outcome of `check_full_rank_condition`.

    min_eigenvalues: smallest eigenvalue of the estimate of E[A^T A | A_hat], one per A_hat.
    min_eigenvalue:  the smallest of those.
    tolerance:       the threshold an eigenvalue must exceed to count as non-zero.
    holds:           min_eigenvalue > tolerance.
    """

    min_eigenvalues: tuple[float, ...]
    min_eigenvalue: float
    tolerance: float
    holds: bool


def check_full_rank_condition(operator: CorruptionOperator, image_shape: tuple[int, int, int], *,
                              num_hats: int = 8, posterior_samples: int = 2000,
                              generator: torch.Generator | None = None,
                              rtol: float = 1e-8) -> FullRankReport:
    """Monte Carlo check of Theorem 4.1: is E[A^T A | A_hat] full rank for sampled A_hat?

    Draws `num_hats` A_hat from the prior for images of shape image_shape = (C, H, W) (tiny),
    estimates E[A^T A | A_hat] with `posterior_samples` draws of `operator_posterior` and takes
    its smallest eigenvalue in float64.

    Tolerance: a direction that no posterior sample measures lies in the null space of every
    sampled A^T A, so the estimate is exactly singular there up to float64 rounding (~1e-16
    relative). A direction measured with posterior probability q contributes about q, at least
    1/posterior_samples once seen (it is missed with probability (1 - q)^posterior_samples).
    Hence zero means `min eigenvalue <= rtol * largest eigenvalue`, with rtol far above
    rounding and far below 1/posterior_samples.
    """
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
    device = generator.device if generator is not None else torch.device("cpu")
    x = random_on(torch.rand, (num_hats, *image_shape), generator=generator, device=device, dtype=torch.float64)
    _, A = operator.corrupt(x, generator)
    A_hat = operator.further_corrupt(A, generator)
    min_eigenvalues, largest = [], 0.0
    for i in range(num_hats):
        samples = operator_posterior(operator, A_hat[i:i + 1], image_shape, posterior_samples, generator)
        mats = measurement_of(operator, samples, image_shape).as_matrix(image_shape, device=device)
        gram = torch.einsum("sji,sjk->ik", mats, mats) / len(samples)
        eigenvalues = torch.linalg.eigvalsh(gram)
        min_eigenvalues.append(eigenvalues[0].item())
        largest = max(largest, eigenvalues[-1].item())
    tolerance = rtol * largest
    smallest = min(min_eigenvalues)
    return FullRankReport(tuple(min_eigenvalues), smallest, tolerance, smallest > tolerance)
