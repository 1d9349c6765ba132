"""Noise-level windows (ambient_fast.objective.windows): draws against the restricted distribution's
closed form (KS), the weighted image-first mixture against "draw sigma, then an eligible image"
(histograms against quadrature), and their storage (sigma_max.npy) and the crops that use them
(ambient_fast.data.crops)."""
import math

import numpy as np
import pytest
import torch

from ambient_fast.data.crops import crop_examples, crop_sigma_max, cut_crops
from ambient_fast.data.format import RECORD, CorruptedDataset, DataError, write_dataset
from ambient_fast.objective.objective import EDMSchedule, VPSchedule
from ambient_fast.objective.windows import NoiseWindows, draw_in_window

INF = math.inf


@pytest.mark.parametrize("loss", [EDMSchedule(P_mean=-0.4, P_std=1.0), VPSchedule()], ids=["edm2", "vp"])
@pytest.mark.parametrize("low, high", [(0.0, 0.2), (0.5, 3.0), (2.0, INF), (0.05, 0.1), (0.0, INF)])
def test_draws_follow_the_restricted_distribution(loss, low, high):
    from scipy import stats

    n = 4000
    u = torch.rand(n, dtype=torch.float64)
    bounds = (torch.full((n,), low, dtype=torch.float64), torch.full((n,), high, dtype=torch.float64))
    sigma, mass = draw_in_window(loss, *bounds, u)
    tail = lambda s: loss.tail(torch.as_tensor(s, dtype=torch.float64)).numpy()
    assert mass[0].item() == pytest.approx(float(tail(low) - tail(high)), rel=1e-12)
    assert sigma.dtype == torch.float32 and (sigma > low).all() and (sigma < high).all()
    cdf = lambda s: (tail(low) - tail(np.asarray(s))) / (tail(low) - tail(high))
    assert stats.kstest(sigma.double().numpy(), cdf).pvalue > 1e-3


def test_levels_stay_strictly_inside_in_float32():
    loss = EDMSchedule()
    low = torch.tensor([0.3, 1.0])
    high = torch.nextafter(low, torch.full_like(low, INF))  # windows one float32 step wide
    sigma, _ = draw_in_window(loss, low, high, torch.tensor([0.001, 0.999], dtype=torch.float64))
    assert (sigma >= low).all() and (sigma <= high).all()


WINDOWS = [(0.0, INF), (0.0, 0.3), (0.2, 1.5), (1.0, INF), (0.05, 0.6)]  # a clean image, a crop, two poor ones


def test_share_counts_the_images_whose_window_holds_sigma():
    low, high = np.array(WINDOWS).T
    windows = NoiseWindows(EDMSchedule(), low, high)
    sigma = torch.tensor([0.01, 0.1, 0.25, 0.5, 1.2, 3.0, 0.3, 0.2])
    brute = [np.mean((low < s) & (s < high)) for s in sigma.double().numpy()]
    np.testing.assert_allclose(windows.share(sigma).numpy(), brute)


def test_weighted_mixture_equals_sigma_first_then_an_eligible_image():
    """Image first (uniform), sigma in its window, weight mass / share: the weighted joint histogram of
    (image, sigma bin) must be Ambient-o's p(sigma) 1[sigma in W_i] / #eligible(sigma), integrated here
    by quadrature on a fine grid."""
    from scipy import integrate, stats

    loss = EDMSchedule(P_mean=-0.4, P_std=1.0)
    low, high = np.array(WINDOWS).T
    windows = NoiseWindows(loss, low, high)
    n = 400_000
    g = torch.Generator().manual_seed(3)
    image = torch.randint(0, len(WINDOWS), (n,), generator=g)
    sigma, weight = windows.draw(torch.from_numpy(low)[image], torch.from_numpy(high)[image],
                                 torch.rand(n, generator=g, dtype=torch.float64))
    edges = np.array([0, 0.05, 0.1, 0.2, 0.3, 0.6, 1.0, 1.5, 3.0, INF])
    bins = np.digitize(sigma.double().numpy(), edges) - 1
    measured = np.zeros((len(WINDOWS), len(edges) - 1))
    np.add.at(measured, (image.numpy(), bins), weight.double().numpy() / n)

    grid = np.exp(np.linspace(-12, 7, 400_001))  # ln sigma from -12 to 7: all but 1e-15 of N(-0.4, 1)
    density = stats.norm.pdf(np.log(grid), -0.4, 1.0)  # of ln sigma
    eligible = (low[:, None] < grid) & (grid < high[:, None])
    per_image = np.where(eligible, density / np.maximum(eligible.sum(0), 1), 0.0)
    expected = np.zeros_like(measured)
    for b in range(len(edges) - 1):
        inside = (grid > edges[b]) & (grid < edges[b + 1])
        expected[:, b] = integrate.trapezoid(per_image[:, inside], np.log(grid[inside]), axis=1)
    assert expected.sum() == pytest.approx(1, abs=1e-4)  # the clean image's window covers every level
    assert np.abs(measured - expected).max() < 4e-3
    # Without the weights the mixture is not Ambient-o's (the restricted images are over-represented).
    unweighted = np.zeros_like(measured)
    np.add.at(unweighted, (image.numpy(), bins), 1 / n)
    assert np.abs(unweighted - expected).max() > 0.05


def test_windows_that_never_train_are_refused():
    with pytest.raises(ValueError, match="never draws"):
        NoiseWindows(EDMSchedule(), np.array([0.0, 0.5]), np.array([INF, 0.5]))
    with pytest.raises(ValueError, match="one window per image"):
        NoiseWindows(EDMSchedule(), np.zeros(2), np.zeros(3))


def test_sigma_max_in_the_data_format(tmp_path):
    observed = np.random.default_rng(0).integers(0, 256, (4, 1, 4, 4), dtype=np.uint8)
    masks = np.ones(observed.shape, bool)
    records = np.zeros(4, RECORD)
    records["sigma_min"] = [0, 0.5, 0, 0]
    sigma_max = np.array([INF, 2.0, 0.3, INF], np.float32)
    path = write_dataset(tmp_path / "windows", observed, masks, {"kind": "none"}, records=records, sigma_max=sigma_max)
    dataset = CorruptedDataset(path, verify=True)
    assert dataset.meta.version == 3
    assert dataset.meta.windows == {"with_sigma_max": 2, "sigma_max_range": [float(np.float32(0.3)), 2.0]}
    np.testing.assert_array_equal(dataset.sigma_max(), sigma_max)
    np.testing.assert_array_equal(dataset.get_stored(np.array([2, 1])).sigma_max, sigma_max[[2, 1]])
    # A set without windows is written as before (version 2) and has no upper bounds.
    plain = CorruptedDataset(write_dataset(tmp_path / "plain", observed, masks, {"kind": "none"}))
    assert plain.meta.version == 2 and np.isinf(plain.sigma_max()).all() and plain.get_stored([0]).sigma_max is None
    records["sigma_min"][2] = 0.3
    with pytest.raises(DataError, match="at or below their lowest usable level"):
        write_dataset(tmp_path / "empty", observed, masks, {"kind": "none"}, records=records, sigma_max=sigma_max)
    with pytest.raises(DataError, match="NaN"):
        write_dataset(tmp_path / "nan", observed, masks, {"kind": "none"}, sigma_max=np.full(4, np.nan, np.float32))


def test_crop_levels_follow_ambient_o():
    assert [crop_sigma_max(c, 64) for c in (4, 8, 16, 32, 64)] == [0.1, 0.175, 0.2, 1.0, INF]
    assert crop_sigma_max(12, 64) == 0.175  # between 8 and 16: the smaller crop's bound
    assert crop_sigma_max(2, 32) == 0.1 and crop_sigma_max(16, 32) == 1.0  # by the fraction of the side
    with pytest.raises(DataError, match="under 1/16"):
        crop_sigma_max(3, 64)


def test_crop_examples_are_masked_images_with_their_window(tmp_path):
    image = np.arange(3 * 8 * 8, dtype=np.uint8).reshape(3, 8, 8) + 1
    crops, corners = cut_crops(image, 3, stride=2)
    assert corners.tolist() == [[t, l] for t in (0, 2, 4) for l in (0, 2, 4)]
    np.testing.assert_array_equal(crops[4], image[:, 2:5, 2:5])
    observed, masks, sigma_max = crop_examples(image, 4)
    assert observed.shape == (4, 3, 8, 8) and (sigma_max == 1.0).all()  # 4 of 8 pixels: half the side
    for k, (top, left) in enumerate([(0, 0), (0, 4), (4, 0), (4, 4)]):
        box = np.zeros((8, 8), bool)
        box[top:top + 4, left:left + 4] = True
        assert (masks[k] == box).all()
        np.testing.assert_array_equal(observed[k], image * box)
    records = np.zeros(4, RECORD)
    records["masked"] = 1
    dataset = CorruptedDataset(write_dataset(tmp_path / "crops", observed, masks, {"kind": "box"}, records=records,
                                             sigma_max=sigma_max), verify=True)
    np.testing.assert_array_equal(dataset.sigma_max(), sigma_max)


def test_prepare_crops_writes_every_crop_with_its_level(tmp_path, capsys):
    """`prepare crops` on a folder of two 16x16 PNGs, crops of 8: four crops each, in place in unobserved
    images, every one with sigma_max 1.0 (half the side), the set's kind keep_patch; a crop as large
    as the image is refused."""
    from PIL import Image

    from ambient_fast.prepare import main as prepare

    pixels = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    (tmp_path / "src").mkdir()
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(tmp_path / "src" / f"{i}.png")
    assert prepare(["crops", "--source", str(tmp_path / "src"), "--dest", str(tmp_path / "set"), "--crop", "8"]) == 0
    assert "8 with sigma_max (1)" in capsys.readouterr().out
    dataset = CorruptedDataset(tmp_path / "set", verify=True)
    assert len(dataset) == 8 and dataset.corruption["kind"] == "keep_patch" and dataset.corruption["p"] == 0.5
    np.testing.assert_array_equal(dataset.sigma_max(), np.ones(8, np.float32))
    observed, masks, _ = dataset.get(np.arange(8))
    assert (masks.sum((1, 2, 3)) == 3 * 8 * 8).all()
    np.testing.assert_array_equal(observed[5][:, :8, 8:], pixels[1].transpose(2, 0, 1)[:, :8, 8:])
    assert prepare(["crops", "--source", str(tmp_path / "src"), "--dest", str(tmp_path / "whole"), "--crop", "16"]) == 1
    assert "--crop must lie in 1..15" in capsys.readouterr().err
