"""Tests for ambient_fast.sampling.measurements: the known operators of inverse problems, the random
families that are not masks, p(A | A_hat) and Theorem 4.1's check."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from ambient_fast.objective.corruption import make_operator
from ambient_fast.sampling.measurements import (AveragingOperator, BlockAveraging, Blur, CompressedSensing,
                                                Downsampling, GaussianCSOperator, Inpainting, check_full_rank_condition,
                                                measurement_of, operator_posterior)

from test_corruption import gen, within_binomial


def known_operators(shape, dtype=torch.float64):
    """One of each Measurement for images of `shape` (B, C, H, W), H and W even, with random parameters."""
    B, C, H, W = shape
    g = gen(0)
    return {
        "inpainting": Inpainting((torch.rand(shape, generator=g) < 0.6).to(dtype)),
        "compressed_sensing": CompressedSensing(torch.randn(B, 5, C * H * W, generator=g, dtype=dtype), (C, H, W)),
        "block_averaging": BlockAveraging(2, torch.tensor([1.0, 0.0] * (B // 2) + [1.0] * (B % 2), dtype=dtype)),
        "blur": Blur(torch.rand(3, 3, generator=g, dtype=dtype)),
        "downsampling": Downsampling(2),
    }


@pytest.mark.parametrize("name", list(known_operators((3, 2, 4, 6))))
@pytest.mark.parametrize("shape", [(3, 2, 4, 6), (1, 1, 2, 2)], ids=["B3-C2-4x6", "B1-C1-2x2"])
def test_adjoint_is_the_transpose(name, shape):
    """<A x, y> = <x, A^T y> on random x and y, and forward / adjoint agree with the dense matrix."""
    op = known_operators(shape)[name]
    x = torch.randn(shape, dtype=torch.float64)
    y = torch.randn_like(op.forward(x))
    torch.testing.assert_close((op.forward(x) * y).sum(), (x * op.adjoint(y)).sum())
    matrices = op.as_matrix(shape[1:]).expand(shape[0], -1, -1)
    torch.testing.assert_close(op.forward(x).flatten(1), (matrices @ x.flatten(1)[:, :, None])[:, :, 0])
    torch.testing.assert_close(op.adjoint(y).flatten(1), (matrices.transpose(1, 2) @ y.flatten(1)[:, :, None])[:, :, 0])


def test_operators_against_direct_computations():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    kernel = torch.rand(3, 3, dtype=torch.float64)
    padded = F.pad(x, (1, 1, 1, 1))
    direct = sum(kernel[i, j] * padded[:, :, i:i + 4, j:j + 4] for i in range(3) for j in range(3))
    torch.testing.assert_close(Blur(kernel).forward(x), direct)
    blocks = x.view(2, 3, 2, 2, 2, 2).mean(dim=(3, 5))
    torch.testing.assert_close(Downsampling(2).forward(x), blocks)
    torch.testing.assert_close(BlockAveraging(2).forward(x), blocks.repeat_interleave(2, 2).repeat_interleave(2, 3))
    mask = (torch.rand(2, 3, 4, 4) < 0.5).double()
    assert Inpainting(mask).mask is mask and Blur(kernel).mask is None
    with pytest.raises(ValueError, match="odd side"):
        Blur(torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"\(B, m, 48\)"):
        CompressedSensing(torch.ones(2, 5, 47), (3, 4, 4))


# ----------------------------------------------------------------------------- the random families


def test_gaussian_measurement_and_scale():
    op = GaussianCSOperator(m=64)
    x = torch.rand(8, 1, 8, 8, dtype=torch.float64)
    y, A = op.corrupt(x, gen(0))
    torch.testing.assert_close(y, (A @ x.flatten(1)[:, :, None])[:, :, 0])
    assert y.shape == (8, 64) and A.shape == op.a_shape(x.shape)
    # Entries are N(0, 1/m): 8 * 64 * 64 samples pin the variance to about 1%.
    assert abs(A.var().item() * op.m - 1) < 0.05
    A_hat = op.further_corrupt(A, gen(1))
    assert ((A_hat == 0).all(dim=2).sum(dim=1) == 1).all()  # one row deleted per image
    assert not torch.equal(A_hat, op.further_corrupt(A, gen(2)))


def test_averaging_measurement_and_rate():
    op = AveragingOperator(p=0.5, factor=4)
    x = torch.rand(4, 3, 16, 16)
    flags = torch.tensor([1.0, 0.0, 1.0, 0.0])
    y = op.apply(flags, x)
    blocks = x.view(4, 3, 4, 4, 4, 4).mean(dim=(3, 5), keepdim=True).expand(-1, -1, -1, 4, -1, 4)
    torch.testing.assert_close(y[0], blocks.reshape(x.shape)[0])
    assert torch.equal(y[1], x[1])
    op = AveragingOperator(p=0.3, factor=2)
    _, A = op.corrupt(torch.rand(4000, 1, 2, 2), gen(0))
    assert within_binomial(A.sum().item(), 4000, 0.3)
    assert torch.equal(op.further_corrupt(A, gen(1)), torch.ones(4000))


@pytest.mark.parametrize("op", [GaussianCSOperator(m=20), AveragingOperator(p=0.5, factor=4)], ids=lambda op: op.name)
def test_families_are_deterministic_and_describe_themselves(op):
    x = torch.rand(16, 3, 16, 16)
    draws = [op.corrupt(x, gen(seed))[1] for seed in (0, 0, 1)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert type(op)(**op.params).describe() == op.describe() == {"name": op.name, **op.params}


def test_family_errors():
    with pytest.raises(ValueError, match="m must be an integer >= 2"):
        GaussianCSOperator(m=1)
    with pytest.raises(ValueError, match=r"\(B, 4, n\)"):
        GaussianCSOperator(m=4).further_corrupt(torch.ones(2, 5, 64))
    with pytest.raises(ValueError, match="divide"):
        AveragingOperator(p=0.5, factor=3).corrupt(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"p must lie in \[0, 1\)"):
        AveragingOperator(p=1.0)
    with pytest.warns(UserWarning, match="cannot learn"):
        op = GaussianCSOperator(m=4, delete_row=False)
    _, A = op.corrupt(torch.rand(2, 1, 8, 8), gen(0))
    assert torch.equal(op.further_corrupt(A, gen(1)), A)


@pytest.mark.parametrize("op", [make_operator("dust", p=0.3, delta=0.2), make_operator("fixed_box", p=0.25),
                                GaussianCSOperator(m=5), AveragingOperator(p=0.5, factor=2)], ids=lambda op: op.name)
def test_measurement_of_a_draw_measures_as_the_operator(op):
    image_shape = (2, 4, 4)
    x = torch.rand(3, *image_shape, dtype=torch.float64)
    y, A = op.corrupt(x, gen(0))
    measurement = measurement_of(op, A, image_shape)
    torch.testing.assert_close(measurement.forward(x), y)
    matrices = measurement.as_matrix(image_shape)
    torch.testing.assert_close((matrices @ x.flatten(1)[:, :, None])[:, :, 0], y.flatten(1))
    if op.name == "dust":
        assert torch.equal(matrices, torch.diag_embed(A.flatten(1)))


# ----------------------------------------------------------------------------- p(A | A_hat)


def test_dust_exact_posterior_matches_rejection_sampling():
    op = make_operator("dust", p=0.4, delta=0.3)
    A_hat = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    num = 2000
    exact = operator_posterior(op, A_hat, (1, 2, 2), num, gen(0))
    rejected = _rejection(op, A_hat, num)
    revived = 0.6 * 0.3 / (1 - 0.6 * 0.7)
    for samples in (exact, rejected):
        assert samples.shape == (num, 1, 2, 2)
        assert (samples >= A_hat).all()
        for pixel in [(0, 1), (1, 0), (1, 1)]:
            assert within_binomial(samples[:, 0, pixel[0], pixel[1]].sum().item(), num, revived)


def _rejection(op, A_hat, num):
    """p(A | A_hat) by rejection from the prior, written out independently of operator_posterior."""
    g, kept = gen(1), []
    while sum(len(k) for k in kept) < num:
        _, A = op.corrupt(torch.zeros(4096, *A_hat.shape[1:]), g)
        kept.append(A[(op.further_corrupt(A, g) == A_hat).flatten(1).all(dim=1)])
    return torch.cat(kept)[:num]


def test_gaussian_posterior_keeps_rows_and_redraws_the_deleted_one():
    op = GaussianCSOperator(m=4)
    _, A = op.corrupt(torch.rand(1, 1, 4, 4), gen(0))
    A_hat = op.further_corrupt(A, gen(1))
    deleted = (A_hat[0] == 0).all(dim=1).nonzero().item()
    samples = operator_posterior(op, A_hat, (1, 4, 4), 4000, gen(2))
    kept = [row for row in range(4) if row != deleted]
    assert torch.equal(samples[:, kept], A_hat.expand(4000, -1, -1)[:, kept])
    assert abs(samples[:, deleted].var().item() * op.m - 1) < 0.05


def test_rejection_sampling_of_box_posteriors():
    op = make_operator("fixed_box", p=0.5)
    _, A = op.corrupt(torch.rand(1, 1, 2, 2), gen(0))
    A_hat = op.further_corrupt(A, gen(1))
    samples = operator_posterior(op, A_hat, (1, 2, 2), 200, gen(2), batch_size=256)
    assert samples.shape == (200, 1, 2, 2) and (samples >= A_hat).all() and (samples.sum(dim=(1, 2, 3)) == 3).all()
    impossible = torch.zeros(1, 1, 4, 4)  # two small boxes never erase everything
    with pytest.raises(RuntimeError, match="rejection sampling"):
        operator_posterior(make_operator("box", p=0.3, delta=0.3), impossible, (1, 4, 4), 10, gen(0),
                           batch_size=256, max_draws=1024)
    with pytest.raises(ValueError, match="batch of 1"):
        operator_posterior(op, torch.ones(2, 1, 2, 2), (1, 2, 2), 10)


# ----------------------------------------------------------------------------- Theorem 4.1


@pytest.mark.parametrize(
    "op, image_shape",
    [
        (make_operator("dust", p=0.3, delta=0.2), (1, 3, 3)),
        (make_operator("dust", p=0.3, delta=0.2, shared_channels=True), (2, 2, 2)),
        (GaussianCSOperator(m=3), (1, 2, 2)),
        (make_operator("fixed_box", p=0.5), (1, 2, 2)),
        (AveragingOperator(p=0.5, factor=2), (1, 2, 2)),
    ],
    ids=["dust", "dust_shared", "gaussian_cs", "fixed_box", "averaging"],
)
def test_full_rank_condition_holds(op, image_shape):
    report = check_full_rank_condition(op, image_shape, num_hats=4, posterior_samples=500, generator=gen(0))
    assert report.holds and report.min_eigenvalue > 0.05
    assert len(report.min_eigenvalues) == 4


@pytest.mark.parametrize("build, image_shape", [
    (lambda: make_operator("dust", p=0.5, delta=0.0), (1, 3, 3)),
    (lambda: GaussianCSOperator(m=3, delete_row=False), (1, 2, 2)),
], ids=["dust", "gaussian_cs"])
def test_full_rank_condition_fails_without_further_corruption(build, image_shape):
    with pytest.warns(UserWarning, match="Theorem 4.1"):
        op = build()
    report = check_full_rank_condition(op, image_shape, num_hats=4, posterior_samples=200, generator=gen(0))
    assert not report.holds
    assert report.min_eigenvalue <= report.tolerance
    assert math.isfinite(report.min_eigenvalue)
