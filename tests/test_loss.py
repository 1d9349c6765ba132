"""The ambient loss: what it grades, what it never reads, its noise-level distributions."""
import math

import pytest
import torch

from ambient_fast.kernels import ambient_input
from ambient_fast.loss import EDMAmbientLoss, VPAmbientLoss, unit_hidden_weight
from ambient_fast.nn import EDMPrecond, VPPrecond

from conftest import TINY_ARCHITECTURES

N, C, R = 4, 3, 8


def batch(p: float = 0.5, delta: float = 0.3):
    """Observed images y = A * x with A ~ Bernoulli(1 - p) and A_hat = A * Bernoulli(1 - delta)."""
    x = torch.rand(N, C, R, R) * 2 - 1
    A = (torch.rand(N, C, R, R) >= p).float()
    A_hat = A * (torch.rand(N, C, R, R) >= delta).float()
    return x, A * x, A, A_hat


class OutputNet(torch.nn.Module):
    """A 'network' whose denoised output is a free tensor, so gradients with respect to D are visible."""

    def __init__(self):
        super().__init__()
        self.D = torch.nn.Parameter(torch.randn(N, 2 * C, R, R))
        self.calls = []

    def forward(self, x, sigma, labels=None, augment_labels=None):
        self.calls.append((x.detach().clone(), sigma.detach().clone()))
        return self.D + 0.1 * x.sum(1, keepdim=True)


def tiny_model(precond=EDMPrecond, **options):
    model_type, kwargs = TINY_ARCHITECTURES["ddpmpp"]
    return precond(img_resolution=R, img_channels=2 * C, model_type=model_type, **kwargs, **options)


@pytest.mark.parametrize("loss_fn", [EDMAmbientLoss(), VPAmbientLoss(), EDMAmbientLoss(norm=1)])
def test_loss_ignores_pixels_outside_A(loss_fn):
    x, y, A, A_hat = batch()
    garbage = y + (1 - A) * torch.randn_like(y) * 5
    model = tiny_model()
    sigma, noise = torch.rand(N) + 0.1, torch.randn(N, C, R, R)
    a = loss_fn(model, y, A, A_hat, sigma=sigma, noise=noise)
    b = loss_fn(model, garbage, A, A_hat, sigma=sigma, noise=noise)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.train, b.train)


@pytest.mark.parametrize("norm", [1, 2])
def test_gradient_is_zero_outside_A(norm):
    x, y, A, A_hat = batch()
    net = OutputNet()
    y = y.clone().requires_grad_(True)
    terms = EDMAmbientLoss(norm=norm)(net, y, A, A_hat)
    terms.loss.sum().backward()
    grad_D = net.D.grad[:, :C]
    assert torch.all(grad_D[A == 0] == 0), "the objective graded a pixel outside A"
    assert (grad_D[A == 1] != 0).float().mean() > 0.99
    assert torch.all(net.D.grad[:, C:] == 0)  # mask channels of the output are never graded
    assert torch.all(y.grad[A == 0] == 0)


def test_pinned_sigma_and_noise_give_the_defined_objective():
    x, y, A, A_hat = batch()
    net = OutputNet()
    sigma, noise = torch.tensor([0.01, 0.3, 2.0, 40.0]), torch.randn(N, C, R, R)
    terms = EDMAmbientLoss()(net, y, A, A_hat, sigma=sigma, noise=noise, clean=x)
    s = sigma.reshape(-1, 1, 1, 1)
    seen_input, seen_sigma = net.calls[0]
    assert torch.equal(seen_input, torch.cat([A_hat * (y + s * noise), A_hat], dim=1))
    assert torch.equal(seen_sigma, sigma)
    D = net(seen_input, sigma)[:, :C].detach()
    weight = (s ** 2 + 0.25) / (s * 0.5) ** 2
    torch.testing.assert_close(terms.val, (weight * (A * (D - y)) ** 2).sum((1, 2, 3)))
    torch.testing.assert_close(terms.train, (weight * (A_hat * (D - y)) ** 2).sum((1, 2, 3)))
    torch.testing.assert_close(terms.test, (weight * (D - x) ** 2).sum((1, 2, 3)))
    assert torch.all(terms.train <= terms.val + 1e-6)
    l1 = EDMAmbientLoss(norm=1)(net, y, A, A_hat, sigma=sigma, noise=noise)
    torch.testing.assert_close(l1.loss, (weight * A * (D - y).abs()).sum((1, 2, 3)))
    assert EDMAmbientLoss()(net, y, A, A_hat).test is None  # no clean images, no test term


def test_edm_sigma_distribution():
    sigma, weight = EDMAmbientLoss().sample_sigma(20000, "cpu", torch.Generator().manual_seed(1))
    log_sigma = sigma.log().flatten()
    tolerance = 5 * 1.2 / math.sqrt(20000)
    assert abs(log_sigma.mean().item() + 1.2) < tolerance
    assert abs(log_sigma.std().item() - 1.2) < 0.05
    torch.testing.assert_close(weight, (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2)


def test_vp_sigma_distribution():
    loss = VPAmbientLoss()
    sigma, weight = loss.sample_sigma(20000, "cpu", torch.Generator().manual_seed(2))
    lo = math.sqrt(math.exp(0.5 * 19.9 * 1e-10 + 0.1 * 1e-5) - 1)
    hi = math.sqrt(math.exp(0.5 * 19.9 + 0.1) - 1)
    assert sigma.min() >= lo * 0.999 and sigma.max() <= hi * 1.001
    torch.testing.assert_close(weight, 1 / sigma ** 2)
    # t = 1 + u (eps - 1) is uniform: the median of sigma is sigma(t = 0.5).
    median = math.sqrt(math.exp(0.5 * 19.9 * 0.25 + 0.05) - 1)
    assert abs(sigma.median().item() / median - 1) < 0.05


def test_drawn_sigma_and_noise_are_reproducible():
    x, y, A, A_hat = batch()
    model = tiny_model()
    a = EDMAmbientLoss()(model, y, A, A_hat, generator=torch.Generator().manual_seed(3))
    b = EDMAmbientLoss()(model, y, A, A_hat, generator=torch.Generator().manual_seed(3))
    c = EDMAmbientLoss()(model, y, A, A_hat, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.loss, b.loss) and not torch.equal(a.loss, c.loss)


def test_end_to_end_gradients_are_finite():
    x, y, A, A_hat = batch()
    model = tiny_model()
    EDMAmbientLoss()(model, y, A, A_hat).loss.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_bad_arguments():
    x, y, A, A_hat = batch()
    with pytest.raises(ValueError, match="norm"):
        EDMAmbientLoss(norm=3)
    with pytest.raises(ValueError, match="shape"):
        EDMAmbientLoss()(OutputNet(), y, A[:, :1], A_hat)


@pytest.mark.parametrize("interpret", [pytest.param("0", id="reference"), pytest.param("1", id="triton-interpreter")])
@pytest.mark.parametrize("shared", [False, True])
def test_b_drawn_in_the_loss_equals_the_same_draws_given(interpret, shared, monkeypatch):
    """A_hat=None: the loss draws B and the noise in one ambient_input pass (fused on GPU, here the
    Triton interpreter or the reference); the objective is the one for those draws passed in."""
    if interpret == "1":
        pytest.importorskip("triton", reason="Triton is not installed: the fused path is not tested")
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    monkeypatch.delenv("AMBIENT_FAST_KERNELS", raising=False)
    x, y, A, _ = batch()
    model, loss_fn = tiny_model(), EDMAmbientLoss()
    sigma = torch.rand(N) * 3 + 0.05
    drawn = ambient_input(y, A, sigma, delta=0.3, seed=11, shared_channels=shared, return_draws=True)
    inside = loss_fn(model, y, A, None, sigma=sigma, delta=0.3, seed=11, shared_channels=shared)
    given = loss_fn(model, y, A, A * drawn.B, sigma=sigma, noise=drawn.noise)
    torch.testing.assert_close(inside.loss, given.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inside.train, given.train, rtol=1e-5, atol=1e-5)
    other = loss_fn(model, y, A, None, sigma=sigma, delta=0.3, seed=12, shared_channels=shared)
    assert not torch.equal(inside.train, other.train)  # another seed, other draws
    with pytest.raises(ValueError, match="pass delta and seed"):
        loss_fn(model, y, A, None, sigma=sigma, delta=0.3)


def test_unit_hidden_weight_grades_hidden_pixels_by_one_over_c_out_squared():
    x, y, A, A_hat = batch()
    sigma, noise = torch.rand(N) * 3 + 0.05, torch.randn(N, C, R, R)
    net = tiny_model(mask_aware=True)
    plain, unit = EDMAmbientLoss(), EDMAmbientLoss(hidden_weight=unit_hidden_weight(net))
    a = plain(net, y, A, A_hat, sigma=sigma, noise=noise)
    b = unit(net, y, A, A_hat, sigma=sigma, noise=noise)
    D = net(torch.cat([A_hat * (y + sigma.view(-1, 1, 1, 1) * noise), A_hat], 1), sigma)[:, :C]
    hidden = ((A - A_hat) * (D - y).square()).flatten(1).sum(1) / net.sigma_data ** 2
    visible = (plain.weight(sigma.view(-1, 1, 1, 1)) * A_hat * (D - y).square()).flatten(1).sum(1)
    torch.testing.assert_close(b.loss, visible + hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.train, a.train)
    assert (b.loss < a.loss).all()  # lambda(sigma) > 1 / sigma_data^2 at every sigma
    # The reference's preconditioning: c_out(sigma)^-2 is lambda(sigma) itself, for EDM and VP.
    for precond, loss_cls in ((EDMPrecond, EDMAmbientLoss), (VPPrecond, VPAmbientLoss)):
        reference = tiny_model(precond, mask_aware=False)
        same = [loss_cls(hidden_weight=w)(reference, y, A, A_hat, sigma=sigma, noise=noise).loss
                for w in (None, unit_hidden_weight(reference))]
        torch.testing.assert_close(same[0], same[1], rtol=1e-5, atol=1e-5)
