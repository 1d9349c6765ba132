"""EDM2's recipe pieces (ambient_fast.objective.edm2, ambient_fast.training.schedule): the uncertainty-
weighted loss against EDM2's per-value formula computed directly, the learning-rate schedule and the
noise-level presets against hand-computed values."""
import math

import pytest
import torch

from ambient_fast.networks import EDM2Precond
from ambient_fast.objective.edm2 import edm2_noise_levels, edm2_schedule, uncertainty_weighted
from ambient_fast.objective.objective import ambient_loss, training_batch
from ambient_fast.training.schedule import edm2_learning_rate


def test_uncertainty_weighting_by_hand():
    # loss 2, u = ln 2, 3 graded values: 2 / 2 + 3 ln 2; loss 0.5, u = 0, 1 value: 0.5.
    result = uncertainty_weighted(torch.tensor([2.0, 0.5]), torch.tensor([math.log(2), 0.0]), torch.tensor([3, 1]))
    torch.testing.assert_close(result, torch.tensor([1 + 3 * math.log(2), 0.5]))
    # Its minimiser over u is the log of the mean error per graded value.
    u = torch.zeros(1, requires_grad=True)
    uncertainty_weighted(torch.tensor([6.0]), u, 3).sum().backward()
    assert u.grad.item() == pytest.approx(-6 + 3)  # d/du (6 e^-u + 3 u) at 0
    u = torch.full((1,), math.log(2.0), requires_grad=True)
    uncertainty_weighted(torch.tensor([6.0]), u, 3).sum().backward()
    assert u.grad.item() == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("masked", [False, True])
def test_uncertainty_weighting_on_our_loss_is_edm2s_per_value_objective(masked):
    """Our ambient loss of an EDM2 network, uncertainty-weighted, equals EDM2's loss written per value
    (weight / exp(u) * (D - y)^2 + u over every graded value) computed here from the network's outputs."""
    net = EDM2Precond(img_resolution=8, img_channels=6, ambient=True, model_channels=8, channel_mult=[1],
                      num_blocks=1, attn_resolutions=[], logvar_channels=8).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p) + (0.5 if p.ndim == 0 else 0))  # gains away from zero
    y, noise = torch.rand(5, 3, 8, 8) * 2 - 1, torch.randn(5, 3, 8, 8)
    A = (torch.rand(5, 3, 8, 8) < 0.7).float() if masked else torch.ones(5, 3, 8, 8)
    sigma = torch.tensor([0.05, 0.3, 1.0, 4.0, 20.0])
    batch = training_batch(y, A, A, sigma, noise)
    schedule = edm2_schedule(latent=False)
    with torch.no_grad():
        ours = uncertainty_weighted(ambient_loss(net, batch, schedule), net(batch.net_input, sigma, return_logvar=True)[1],
                                    A.sum((1, 2, 3)))
        D, logvar = net(batch.net_input, sigma, return_logvar=True)
        weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
        per_value = weight[:, None, None, None] / logvar.exp() * (D[:, :3] - A * y) ** 2 + logvar
        edm2 = (A * per_value).sum((1, 2, 3))
    torch.testing.assert_close(ours, edm2, rtol=1e-5, atol=1e-4)


def test_learning_rate_schedule_by_hand():
    lr = lambda t: edm2_learning_rate(t, batch=2048, ref_lr=0.01, ref_batches=70000, rampup_images=10e6)
    assert lr(0) == 0
    assert lr(5e6) == pytest.approx(0.005)  # half way up the ramp, before the decay
    assert lr(10e6) == pytest.approx(0.01)
    assert lr(70000 * 2048) == pytest.approx(0.01)  # the decay starts at the reference step count
    assert lr(4 * 70000 * 2048) == pytest.approx(0.005)  # 1 / sqrt(4)
    assert lr(100 * 70000 * 2048) == pytest.approx(0.001)
    assert edm2_learning_rate(3e6, 64, 0.02, 0, 0) == 0.02  # neither ramp nor decay
    with pytest.raises(ValueError, match="ref_lr > 0"):
        edm2_learning_rate(1, 64, 0.0, 100)


def test_noise_level_presets():
    assert edm2_noise_levels(latent=False) == (-0.8, 1.6)  # ImageNet-64, pixels
    assert edm2_noise_levels(latent=True) == (-0.4, 1.0)   # ImageNet-512, SD-VAE latents
    loss = edm2_schedule(latent=True, sigma_data=0.5)
    # ln(sigma) ~ N(-0.4, 1): the median is e^-0.4, and one standard deviation up leaves 15.87% above.
    assert loss.upper_quantile(torch.tensor(0.5, dtype=torch.float64)).item() == pytest.approx(math.exp(-0.4))
    assert loss.tail(torch.tensor(math.exp(0.6), dtype=torch.float64)).item() == pytest.approx(0.158655, abs=1e-6)
