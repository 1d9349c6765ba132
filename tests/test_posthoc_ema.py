"""Post-hoc EMA (ambient_fast.training.posthoc_ema): the profiles' closed forms against brute-force
sums, the tracked averages against the profile they stand for, and reconstructions against averages
tracked directly (a toy trajectory, a few steps of a tiny EDM2 through snapshot files)."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from ambient_fast.files.checkpoints import load_network
from ambient_fast.networks import EDM2Precond
from ambient_fast.training.posthoc_ema import (PowerFunctionEMA, gamma_to_std, profile_inner_product, read_snapshots,
                                               reconstruct, reconstruction_error, save_snapshot, solve_coefficients,
                                               std_to_gamma)


def profile_on_grid(t: float, gamma: float, grid: np.ndarray) -> np.ndarray:
    """The profile's density p_t(tau) on `grid`, written out from its definition."""
    return np.where(grid <= t, (gamma + 1) * grid ** gamma / t ** (gamma + 1), 0.0)


def test_relative_std_is_the_profiles_spread():
    grid = (np.arange(400_000) + 0.5) / 400_000  # midpoints of (0, 1], t = 1
    for gamma in (0.0, 1.5, 6.94, 16.97, 40.0):
        density = profile_on_grid(1.0, gamma, grid) / len(grid)
        mean = np.sum(density * grid)
        spread = np.sqrt(np.sum(density * (grid - mean) ** 2))
        assert np.sum(density) == pytest.approx(1, abs=1e-6)
        assert gamma_to_std(gamma) == pytest.approx(spread, rel=1e-5)
    # EDM2's two tracked profiles: the exponents its paper gives for them.
    np.testing.assert_allclose(std_to_gamma([0.05, 0.10]), [16.97, 6.94], atol=0.01)
    stds = np.array([0.01, 0.05, 0.123, 0.2, 0.28])
    np.testing.assert_allclose(gamma_to_std(std_to_gamma(stds)), stds, rtol=1e-10)
    with pytest.raises(ValueError, match="relative std"):
        std_to_gamma(0.3)


@pytest.mark.parametrize("t_a, gamma_a, t_b, gamma_b", [(1.0, 6.94, 1.0, 16.97), (0.55, 3.0, 1.0, 16.97),
                                                       (1.0, 16.97, 0.3, 0.5), (0.8, 0.0, 0.8, 0.0)])
def test_inner_product_closed_form_against_a_sum(t_a, gamma_a, t_b, gamma_b):
    grid = (np.arange(1_000_000) + 0.5) / 1_000_000
    brute = np.sum(profile_on_grid(t_a, gamma_a, grid) * profile_on_grid(t_b, gamma_b, grid)) / len(grid)
    assert profile_inner_product(t_a, gamma_a, t_b, gamma_b) == pytest.approx(brute, rel=1e-4)
    assert profile_inner_product(t_b, gamma_b, t_a, gamma_a) == profile_inner_product(t_a, gamma_a, t_b, gamma_b)
    # Times in images: the product scales as 1 / t.
    assert profile_inner_product(1e6 * t_a, gamma_a, 1e6 * t_b, gamma_b) == pytest.approx(brute / 1e6, rel=1e-4)


def test_tracked_average_is_the_binned_profile():
    """Feed step j's weights as the j-th unit vector: the average then holds each step's weight, which
    must be the profile's integral over that step's images, (t_j^(g+1) - t_(j-1)^(g+1)) / t^(g+1)."""
    steps, batch = 37, 3
    weights = {"w": torch.zeros(steps, dtype=torch.float64)}
    ema = PowerFunctionEMA(weights, stds=(0.05, 0.2))
    for j in range(1, steps + 1):
        ema.update({"w": torch.nn.functional.one_hot(torch.tensor(j - 1), steps).double()}, j * batch, batch)
    edges = np.arange(steps + 1) * batch
    for gamma, average in zip(ema.gammas, ema.averages):
        expected = np.diff(edges ** (gamma + 1.0)) / edges[-1] ** (gamma + 1.0)
        np.testing.assert_allclose(average["w"].numpy(), expected, rtol=1e-9, atol=1e-15)


def toy_trajectory(steps: int, dim: int = 8):
    """Weights that drift smoothly in log time, plus step-to-step noise (a training run's shape)."""
    g = torch.Generator().manual_seed(1)
    freqs, phases = 6 * torch.rand(dim, generator=g), 6 * torch.rand(dim, generator=g)
    return [torch.sin(freqs * np.log(j) + phases) + 0.1 * torch.randn(dim, generator=g) for j in range(1, steps + 1)]


def test_reconstruction_matches_a_directly_tracked_average():
    steps, batch, every = 2000, 4, 50
    trajectory = toy_trajectory(steps)
    start = {"w": torch.zeros(8, dtype=torch.float64)}
    tracked, direct = PowerFunctionEMA(start), PowerFunctionEMA(start, stds=(0.07, 0.15))
    snapshots = []  # (images, gamma, average)
    for j, weights in enumerate(trajectory, start=1):
        tracked.update({"w": weights.double()}, j * batch, batch)
        direct.update({"w": weights.double()}, j * batch, batch)
        if PowerFunctionEMA.snapshot_due((j - 1) * batch, j * batch, every * batch):
            snapshots += [(j * batch, gamma, avg["w"].clone()) for gamma, avg in zip(tracked.gammas, tracked.averages)]
    assert len(snapshots) == 2 * steps // every
    times, gammas = [s[0] for s in snapshots], [s[1] for s in snapshots]
    for std, average in zip(direct.stds, direct.averages):
        weights = solve_coefficients(times, gammas, steps * batch, std_to_gamma(std))
        assert weights.sum() == pytest.approx(1, abs=1e-12)
        assert reconstruction_error(times, gammas, weights, steps * batch, std_to_gamma(std)) < 0.005
        rebuilt = sum(w * s[2] for w, s in zip(weights, snapshots))
        spread = (average["w"] - trajectory[-1].double()).abs().max()  # how far an average is from the weights
        assert spread > 0.3
        assert (rebuilt - average["w"]).abs().max() < 1e-4 * spread
    # The profile error is an honest measure: a target outside the tracked span is reached poorly.
    far = solve_coefficients(times[:2], gammas[:2], steps * batch, std_to_gamma(0.25))
    assert reconstruction_error(times[:2], gammas[:2], far, steps * batch, std_to_gamma(0.25)) > 0.5


TINY = dict(model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[], logvar_channels=8)


def test_reconstruct_from_snapshot_files_of_a_tiny_network(tmp_path):
    """A few steps of a tiny EDM2 with snapshots on disk; the reconstructed network file equals the
    average tracked directly within the profile's error."""
    model = EDM2Precond(img_resolution=8, img_channels=3, **TINY).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    params = dict(model.named_parameters())
    initial = {name: p.detach().clone() for name, p in params.items()}
    tracked, direct = PowerFunctionEMA(params), PowerFunctionEMA(params, stds=(0.07,))
    average_net = EDM2Precond(img_resolution=8, img_channels=3, **TINY)
    batch = 4
    for step in range(1, 9):
        x, sigma = torch.randn(batch, 3, 8, 8), torch.rand(batch) + 0.2
        loss = (model(x + sigma[:, None, None, None] * torch.randn_like(x), sigma) - x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        tracked.update(params, step * batch, batch)
        direct.update(params, step * batch, batch)
        for std, average in zip(tracked.stds, tracked.averages):
            average_net.load_state_dict({**model.state_dict(), **average})
            save_snapshot(tmp_path, average_net, step * batch, std, corruption={"kind": "none"})
    snapshots = read_snapshots(tmp_path)
    assert [(s.images, s.std) for s in snapshots[:3]] == [(4, 0.05), (4, 0.1), (8, 0.05)]
    assert snapshots[0].gamma == pytest.approx(std_to_gamma(0.05))
    assert load_network(snapshots[-1].path).corruption == {"kind": "none"}  # a snapshot is a network file

    record = reconstruct(tmp_path, 0.07, tmp_path / "ema-0.070.safetensors")
    assert record["images"] == 32 and len(record["weights"]) == 16 and record["profile_error"] < 0.02
    rebuilt = load_network(tmp_path / "ema-0.070.safetensors").model.state_dict()
    for name, average in direct.averages[0].items():
        moved = (params[name].detach() - initial[name]).abs().max()  # how far training took the weight
        assert (rebuilt[name] - average).abs().max() <= 0.02 * moved + 1e-6, name
    for name, buffer in model.named_buffers():  # buffers are copied, not averaged
        assert torch.equal(rebuilt[name], buffer)
    with safe_open(str(tmp_path / "ema-0.070.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["extra"])["posthoc_ema_reconstruction"]["std"] == 0.07

    with pytest.raises(ValueError, match="snapshot more often|nearer"):
        reconstruct(tmp_path, 0.28, tmp_path / "far.safetensors", max_error=0.001)
    assert not (tmp_path / "far.safetensors").exists()


def test_state_dict_round_trip_and_checks():
    params = {"a": torch.randn(3), "b": torch.randn(2, 2)}
    ema = PowerFunctionEMA(params)
    ema.update({k: v + 1 for k, v in params.items()}, 8, 4)
    other = PowerFunctionEMA(params)
    other.load_state_dict(ema.state_dict())
    for mine, theirs in zip(ema.averages, other.averages):
        assert all(torch.equal(mine[k], theirs[k]) for k in params)
    with pytest.raises(ValueError, match="same --ema-stds"):
        PowerFunctionEMA(params, stds=(0.1,)).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="batch_images"):
        ema.update(params, 2, 4)
    assert PowerFunctionEMA.snapshot_due(90, 110, 100) and not PowerFunctionEMA.snapshot_due(100, 190, 100)


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no post-hoc EMA snapshots"):
        read_snapshots(tmp_path)
