"""Tests for ambient_fast.objective.corruption: the mask operators A and their further corruption A_hat
(the other operators and Theorem 4.1's check: test_measurements.py)."""
import math
import warnings

import pytest
import torch

from ambient_fast.objective.corruption import DustOperator, make_operator

SHAPE = (4, 3, 16, 16)  # (B, C, H, W) used unless a test needs something else

# (name, params) valid for SHAPE.
CASES = {
    "dust": ("dust", dict(p=0.3, delta=0.2)),
    "dust_shared": ("dust", dict(p=0.3, delta=0.2, shared_channels=True)),
    "box": ("box", dict(p=0.3, delta=0.2)),
    "fixed_box": ("fixed_box", dict(p=0.25)),
    "keep_patch": ("keep_patch", dict(p=0.5, delta=0.5)),
}


def build(key: str):
    name, params = CASES[key]
    return make_operator(name, **params)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def within_binomial(count: float, trials: int, prob: float, sigmas: float = 5.0) -> bool:
    return abs(count - trials * prob) <= sigmas * math.sqrt(trials * prob * (1 - prob)) + 1e-9


# ----------------------------------------------------------------------------- shapes and semantics


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("key", list(CASES))
def test_shapes_and_dtypes(key, dtype):
    op = build(key)
    x = torch.rand(SHAPE, dtype=dtype)
    y, A = op.corrupt(x, gen(0))
    A_hat = op.further_corrupt(A, gen(1))
    assert y.shape == SHAPE and y.dtype == dtype
    assert A.shape == A_hat.shape == op.a_shape(SHAPE)
    assert A.dtype == A_hat.dtype == dtype


@pytest.mark.parametrize("key", list(CASES))
def test_mask_measurement_is_product(key):
    op = build(key)
    x = torch.rand(SHAPE)
    y, A = op.corrupt(x, gen(0))
    assert A.shape == x.shape
    assert set(A.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(y, A * x)


# ----------------------------------------------------------------------------- randomness


@pytest.mark.parametrize("key", list(CASES))
def test_determinism(key):
    op = build(key)
    x = torch.rand(16, *SHAPE[1:])  # 16 images: distinct seeds cannot give equal A by chance

    def draw(seed):
        g = gen(seed)
        _, A = op.corrupt(x, g)
        return A, op.further_corrupt(A, g)

    A1, A_hat1 = draw(0)
    A2, A_hat2 = draw(0)
    A3, _ = draw(1)
    assert torch.equal(A1, A2) and torch.equal(A_hat1, A_hat2)
    assert not torch.equal(A1, A3)


@pytest.mark.parametrize("key", list(CASES))
def test_further_corruption_is_redrawn(key):
    op = build(key)
    _, A = op.corrupt(torch.rand(SHAPE), gen(0))
    assert not torch.equal(op.further_corrupt(A, gen(1)), op.further_corrupt(A, gen(2)))


@pytest.mark.parametrize("key", list(CASES))
def test_further_corruption_only_removes(key):
    op = build(key)
    _, A = op.corrupt(torch.rand(SHAPE), gen(0))
    A_hat = op.further_corrupt(A, gen(1))
    assert (A_hat <= A).all()
    assert A_hat.sum() < A.sum()


# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("shared", [False, True])
def test_dust_survival(shared):
    op = make_operator("dust", p=0.3, delta=0.2, shared_channels=shared)
    B, C, H, W = 64, 3, 32, 32
    _, A = op.corrupt(torch.rand(B, C, H, W), gen(0))
    A_hat = op.further_corrupt(A, gen(1))
    assert op.survival_A == pytest.approx(0.7) and op.survival == pytest.approx(0.56)
    for c in range(C):
        assert within_binomial(A[:, c].sum().item(), B * H * W, op.survival_A)
        assert within_binomial(A_hat[:, c].sum().item(), B * H * W, op.survival)
    channels_equal = (A == A[:, :1]).all() and (A_hat == A_hat[:, :1]).all()
    assert channels_equal == shared


def test_box_erases_a_border_cut_box_at_a_uniform_corner():
    op = make_operator("box", p=0.3, delta=0.2)
    B, H, W = 2000, 10, 10
    _, A = op.corrupt(torch.rand(B, 2, H, W), gen(0))
    assert torch.equal(A[:, 0], A[:, 1])
    erased = A[:, 0] == 0
    side = math.ceil(0.3 * H)
    top = erased.any(dim=2).float().argmax(dim=1)
    left = erased.any(dim=1).float().argmax(dim=1)
    expected_area = (side - (top + side - H).clamp(min=0)) * (side - (left + side - W).clamp(min=0))
    assert torch.equal(erased.sum(dim=(1, 2)), expected_area)
    # Corners are uniform on 0..H-1: mean (H-1)/2, standard deviation sqrt((H^2-1)/12).
    assert abs(top.float().mean() - (H - 1) / 2) < 5 * math.sqrt((H * H - 1) / 12 / B)
    A_hat = op.further_corrupt(A, gen(1))
    extra = (A - A_hat)[:, 0].sum(dim=(1, 2))
    assert extra.max() <= math.ceil(0.2 * H) ** 2 and extra.max() > 0


def test_fixed_box_areas_and_non_overlap():
    op = make_operator("fixed_box", p=0.25)
    B, C, H, W = 500, 3, 16, 16
    side = 4
    _, A = op.corrupt(torch.rand(B, C, H, W), gen(0))
    A_hat = op.further_corrupt(A, gen(1))
    assert ((1 - A).sum(dim=(2, 3)) == side**2).all()
    # The second box adds exactly side^2 more erased pixels: it never overlaps the first.
    assert ((1 - A_hat).sum(dim=(2, 3)) == 2 * side**2).all()
    second = (A - A_hat)[:, 0] > 0
    rows, cols = second.any(dim=2).sum(dim=1), second.any(dim=1).sum(dim=1)
    assert (rows == side).all() and (cols == side).all()


def test_keep_patch_areas():
    op = make_operator("keep_patch", p=0.5, delta=0.5)
    B, H, W = 500, 16, 16
    _, A = op.corrupt(torch.rand(B, 1, H, W), gen(0))
    A_hat = op.further_corrupt(A, gen(1))
    assert (A.sum(dim=(1, 2, 3)) == 8 * 8).all()
    assert (A_hat.sum(dim=(1, 2, 3)) == 4 * 4).all()
    kept = A_hat[:, 0] > 0
    assert (kept.any(dim=2).sum(dim=1) == 4).all() and (kept.any(dim=1).sum(dim=1) == 4).all()


# ----------------------------------------------------------------------------- errors and metadata


@pytest.mark.parametrize("name", ["dust", "box", "fixed_box", "keep_patch"])
@pytest.mark.parametrize("p", [1.0, -0.1, float("nan")])
def test_invalid_p(name, p):
    params = dict(p=p) if name in ("fixed_box", "dust") else dict(p=p, delta=0.1)
    with pytest.raises(ValueError, match=r"p must lie in \[0, 1\), got p="):
        make_operator(name, **params)


@pytest.mark.parametrize("name", ["dust", "box", "fixed_box", "keep_patch"])
def test_invalid_delta(name):
    with pytest.raises(ValueError, match=r"delta must lie in \[0, 1\), got delta=1.0"):
        make_operator(name, p=0.2, delta=1.0)


@pytest.mark.parametrize("name, params", [
    ("dust", dict(p=0.2, delta=0.0)),
    ("box", dict(p=0.2, delta=0.0)),
    ("fixed_box", dict(p=0.2, delta=0.0)),
    ("keep_patch", dict(p=0.2, delta=0.0)),
])
def test_no_further_corruption_warns(name, params):
    with pytest.warns(UserWarning, match="cannot learn"):
        op = make_operator(name, **params)
    _, A = op.corrupt(torch.rand(2, 1, 8, 8), gen(0))
    assert torch.equal(op.further_corrupt(A, gen(1)), A)


def test_boxes_that_do_not_fit():
    x = torch.rand(2, 1, 16, 4)
    with pytest.raises(ValueError, match="does not fit"):
        make_operator("fixed_box", p=0.5).corrupt(x)  # side 8 > width 4
    with pytest.raises(ValueError, match="fit"):
        make_operator("keep_patch", p=0.25, delta=0.1).corrupt(x)  # patch 12 > width 4
    with pytest.raises(ValueError, match="side 0"):
        make_operator("keep_patch", p=0.95, delta=0.1).corrupt(torch.rand(2, 1, 8, 8))  # int(0.4) = 0
    with pytest.raises(ValueError, match="non-overlapping"):
        make_operator("fixed_box", p=0.6)


def test_wrong_shapes():
    op = make_operator("dust", p=0.3)
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"shape \(2, 3, 8, 8\).*got \(2, 1, 8, 8\)"):
        op.apply(torch.ones(2, 1, 8, 8), x)
    with pytest.raises(ValueError, match=r"4-D.*\(3, 8, 8\)"):
        op.further_corrupt(torch.ones(3, 8, 8))
    with pytest.raises(ValueError, match="4-D"):
        op.corrupt(torch.rand(3, 8, 8))


def test_factory_errors():
    with pytest.raises(ValueError, match="valid names: .*dust"):
        make_operator("blur", p=0.1)
    with pytest.raises(ValueError, match="valid parameters: p, delta=0.1, shared_channels=False"):
        make_operator("dust", p=0.1, sigma=2)
    with pytest.raises(ValueError, match="valid names: .*keep_patch"):
        make_operator("gaussian_cs", m=4)  # a measurement of inverse problems (test_measurements.py), not a data set's


@pytest.mark.parametrize("key", list(CASES))
def test_describe_round_trips(key):
    op = build(key)
    description = op.describe()
    assert description == {"name": CASES[key][0], **op.params}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a valid description rebuilds without warnings
        assert make_operator(**description).describe() == description


def test_factory_builds_the_named_class():
    assert isinstance(make_operator("dust", p=0.1), DustOperator)
