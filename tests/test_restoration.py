"""Posterior restoration of many images (ambient_fast.sampling.restoration): operator descriptions,
measurements, the least-squares baseline, and per-image seeds that make each image independent of its
batch."""
import json

import numpy as np
import pytest
import torch

from ambient_fast.data.format import CorruptedDataset, write_dataset
from ambient_fast.sampling.measurements import CompressedSensing, Downsampling
from ambient_fast.sampling.restoration import (MaskedImages, MeasuredArray, PosteriorSettings, check_operator,
                                               least_squares, measure, operator_measurement, posterior_method,
                                               posterior_restorations, read_operator)

from test_sample import small_model

SHAPE = (3, 8, 8)


@pytest.mark.parametrize("description,message", [
    ({"kind": "warp"}, "'kind' is one of"),
    ({"kind": "gaussian_cs"}, "'m' must be a positive integer"),
    ({"kind": "gaussian_cs", "m": 4, "seed": -1}, "'seed'"),
    ({"kind": "downsampling", "factor": 0}, "'factor'"),
    ({"kind": "blur", "kernel": [[1, 2], [3, 4]]}, "odd side"),
    ({"kind": "blur", "size": 3}, "gaussian_sd"),
    ({"kind": "block_averaging", "factor": 2, "noise_level": float("nan")}, "noise_level"),
])
def test_operator_descriptions_are_checked(description, message):
    with pytest.raises(ValueError, match=message):
        check_operator(description)


def test_read_operator(tmp_path):
    (tmp_path / "op.json").write_text(json.dumps({"kind": "gaussian_cs", "m": 5}))
    assert read_operator(tmp_path / "op.json") == {"kind": "gaussian_cs", "m": 5, "seed": 0, "per_image": True,
                                                   "noise_level": 0.0}
    (tmp_path / "bad.json").write_text("{kind")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_operator(tmp_path / "bad.json")


def test_each_image_has_its_own_compressed_sensing_matrix():
    """Image i's matrix depends on (seed, i) only: the same in any selection of images; entries N(0, 1/m)."""
    description = check_operator({"kind": "gaussian_cs", "m": 40, "seed": 3})
    a = operator_measurement(description, SHAPE, [5, 7, 9]).matrix
    b = operator_measurement(description, SHAPE, [9, 2]).matrix
    torch.testing.assert_close(a[2], b[0], rtol=0, atol=0)
    assert not torch.equal(a[0], a[1])
    assert a.var().item() == pytest.approx(1 / 40, rel=0.05)
    shared = operator_measurement({**description, "per_image": False}, SHAPE, [5, 7])
    assert shared.matrix.shape == (1, 40, 192)


def test_gaussian_blur_kernel_and_measure():
    """A Gaussian kernel sums to 1 (a constant image stays constant away from the zero padding);
    measure's noise is the same for an image whatever else is measured with it."""
    description = check_operator({"kind": "blur", "size": 5, "gaussian_sd": 1.0, "noise_level": 0.1})
    kernel = operator_measurement(description, SHAPE, [0]).kernel
    assert kernel.sum().item() == pytest.approx(1.0) and torch.equal(kernel, kernel.T)
    clean = torch.rand(3, *SHAPE, dtype=torch.float64) * 2 - 1
    together, alone = measure(description, clean, [4, 5, 6], seed=1), measure(description, clean[1:2], [5], seed=1)
    torch.testing.assert_close(together[1:2], alone)
    flat = measure({**description, "noise_level": 0.0}, torch.full((1, *SHAPE), 0.5, dtype=torch.float64), [0])
    torch.testing.assert_close(flat[..., 2:-2, 2:-2], torch.full_like(flat[..., 2:-2, 2:-2], 0.5))


def test_least_squares_is_the_minimum_norm_solution():
    """Compressed sensing with m < n: A^T (A A^T)^-1 y, the pseudo-inverse's (torch.linalg.pinv);
    downsampling: each block's value spread over its pixels (A A^T = I / f^2)."""
    g = torch.Generator().manual_seed(0)
    matrix = torch.randn(2, 30, 192, generator=g, dtype=torch.float64)
    measurement = CompressedSensing(matrix, SHAPE)
    y = torch.randn(2, 30, generator=g, dtype=torch.float64)
    expected = (torch.linalg.pinv(matrix) @ y[:, :, None])[:, :, 0].view(2, *SHAPE)
    torch.testing.assert_close(least_squares(measurement, y, iterations=60), expected, rtol=1e-6, atol=1e-8)
    small = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(least_squares(Downsampling(2), small),
                               small.repeat_interleave(2, 2).repeat_interleave(2, 3))


def masked_set(tmp_path, count=5):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, *SHAPE), dtype=np.uint8)
    masks = rng.random((count, 1, 8, 8)).repeat(3, 1) < 0.4
    return CorruptedDataset(write_dataset(tmp_path / "set", images * masks, masks,
                                          {"kind": "dust", "p": 0.6, "delta": 0.1, "shared_channels": True},
                                          source="test"))


@pytest.mark.parametrize("method", ["ambient", "tweedie"])
def test_restorations_do_not_depend_on_the_batch(tmp_path, method):
    """Images 1 and 2 restored in batches of 5 items and of 3 (2 samples each, the items split
    differently, the noise added per image): the same restorations, to the float32 network's
    rounding (its convolutions round differently at another batch size, and the conjugate gradients
    carry that a little further: measured 3e-5); the samples of an image differ."""
    model = small_model()
    source = MaskedImages(masked_set(tmp_path), add_noise=0.05, seed=4)
    settings = PosteriorSettings(posterior_method(method, cg_iterations=2), noise_level=0.05, survival=0.5,
                                 shared_channels=True, num_steps=3)

    def run(indices, batch):
        return dict(posterior_restorations(model, source, indices, samples=2, seed=11, batch=batch, settings=settings,
                                           device="cpu"))

    wide, narrow = run([0, 1, 2], 5), run([1, 2], 3)
    for i in (1, 2):
        torch.testing.assert_close(wide[i], narrow[i], rtol=0, atol=1e-4)
    assert wide[2].shape == (2, *SHAPE) and (wide[2][0] - wide[2][1]).abs().max() > 1e-2


def test_measured_array_checks_its_measurements():
    description = {"kind": "downsampling", "factor": 2}
    with pytest.raises(ValueError, match=r"\(N, 3, 4, 4\)"):
        MeasuredArray(np.zeros((2, 3, 8, 8), np.float32), description, SHAPE)
    with pytest.raises(ValueError, match="NaN"):
        MeasuredArray(np.full((2, 3, 4, 4), np.nan, np.float32), description, SHAPE)
    source = MeasuredArray(np.ones((2, 3, 4, 4), np.float32), description, SHAPE)
    measurement, y, labels = source.measurements(np.array([1]), "cpu", torch.float64)
    assert isinstance(measurement, Downsampling) and y.shape == (1, 3, 4, 4) and labels is None
