"""The ambient loss: what it grades, what it never reads, its noise-level distributions, and the
ambient input that feeds it (ambient_fast.objective.inputs)."""
import math

import numpy as np
import pytest
import torch

from ambient_fast.objective.corruption import make_operator
from ambient_fast.data.loader import RawBatch
from ambient_fast.objective.inputs import AmbientInputs, training_batch
from ambient_fast.objective.loss import DiscreteVPAmbientLoss, EDMAmbientLoss, VPAmbientLoss, unit_hidden_weight
from ambient_fast.networks import EDMPrecond, VPPrecond
from ambient_fast.objective.seeds import centred_uniform, philox

from conftest import TINY_ARCHITECTURES, assert_gradient_matches_differences

N, C, R = 4, 3, 8


def batch(p: float = 0.5, delta: float = 0.3):
    """Clean x, observed y = A * x, A ~ Bernoulli(1 - p), A_hat = A * Bernoulli(1 - delta)."""
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


def pinned(y, A, A_hat, sigma=None):
    """A TrainingBatch with given sigma (default four levels across the range) and fresh noise."""
    sigma = torch.tensor([0.01, 0.3, 2.0, 40.0]) if sigma is None else sigma
    return training_batch(y, A, A_hat, sigma, torch.randn(N, C, R, R))


def uniforms(n: int, seed: int = 0):
    return centred_uniform(philox(seed, torch.arange(n))[0])


@pytest.mark.parametrize("loss_fn", [EDMAmbientLoss(), VPAmbientLoss(), EDMAmbientLoss(norm=1)])
def test_loss_ignores_pixels_outside_A(loss_fn):
    x, y, A, A_hat = batch()
    garbage = y + (1 - A) * torch.randn_like(y) * 5
    model, noise, sigma = tiny_model(), torch.randn(N, C, R, R), torch.rand(N) + 0.1
    a = loss_fn(model, training_batch(y, A, A_hat, sigma, noise))
    b = loss_fn(model, training_batch(garbage, A, A_hat, sigma, noise))
    assert torch.equal(a, b)


@pytest.mark.parametrize("norm", [1, 2])
def test_gradient_is_zero_outside_A(norm):
    x, y, A, A_hat = batch()
    net = OutputNet()
    EDMAmbientLoss(norm=norm)(net, pinned(y, A, A_hat)).sum().backward()
    grad_D = net.D.grad[:, :C]
    assert torch.all(grad_D[A == 0] == 0), "the objective graded a pixel outside A"
    assert (grad_D[A == 1] != 0).float().mean() > 0.99
    assert torch.all(net.D.grad[:, C:] == 0)  # mask channels of the output are never graded


def test_the_objective_is_the_defined_one():
    x, y, A, A_hat = batch()
    net = OutputNet()
    sigma, noise = torch.tensor([0.01, 0.3, 2.0, 40.0]), torch.randn(N, C, R, R)
    loss = EDMAmbientLoss()(net, training_batch(y, A, A_hat, sigma, noise))
    s = sigma.reshape(-1, 1, 1, 1)
    seen_input, seen_sigma = net.calls[0]
    assert torch.equal(seen_input, torch.cat([A_hat * (y + s * noise), A_hat], dim=1))
    assert torch.equal(seen_sigma, sigma)
    D = net(seen_input, sigma)[:, :C].detach()
    weight = (s ** 2 + 0.25) / (s * 0.5) ** 2
    torch.testing.assert_close(loss, (weight * (A * (D - y)) ** 2).sum((1, 2, 3)))
    l1 = EDMAmbientLoss(norm=1)(net, training_batch(y, A, A_hat, sigma, noise))
    torch.testing.assert_close(l1, (weight * A * (D - y).abs()).sum((1, 2, 3)))


def test_edm_sigma_distribution():
    loss = EDMAmbientLoss()
    sigma, mass = loss.sigma_above(torch.zeros(20000), uniforms(20000, 1))
    assert torch.equal(mass, torch.ones(20000, dtype=torch.float64))
    log_sigma = sigma.log()
    assert abs(log_sigma.mean().item() + 1.2) < 5 * 1.2 / math.sqrt(20000)
    assert abs(log_sigma.std().item() - 1.2) < 0.05
    # Log-normal: a quarter of the mass below exp(P_mean - 0.6745 P_std).
    assert abs((sigma < math.exp(-1.2 - 0.6745 * 1.2)).float().mean().item() - 0.25) < 0.015
    torch.testing.assert_close(loss.weight(sigma), (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2)


def test_vp_sigma_distribution():
    loss = VPAmbientLoss()
    sigma, _ = loss.sigma_above(torch.zeros(20000), uniforms(20000, 2))
    lo = math.sqrt(math.exp(0.5 * 19.9 * 1e-10 + 0.1 * 1e-5) - 1)
    hi = math.sqrt(math.exp(0.5 * 19.9 + 0.1) - 1)
    assert sigma.min() >= lo * 0.999 and sigma.max() <= hi * 1.001
    torch.testing.assert_close(loss.weight(sigma), 1 / sigma ** 2)
    # t = 1 + u (eps - 1) is uniform: the median of sigma is sigma(t = 0.5).
    median = math.sqrt(math.exp(0.5 * 19.9 * 0.25 + 0.05) - 1)
    assert abs(sigma.median().item() / median - 1) < 0.05


def test_discrete_sigmas_are_uniform_over_the_timesteps():
    levels = torch.linspace(0.01, 80, 10)
    sigma, _ = DiscreteVPAmbientLoss(levels).sigma_above(torch.zeros(20000), uniforms(20000, 3))
    counts = torch.stack([(sigma == level).sum() for level in levels]).double()
    assert counts.sum() == 20000 and ((counts - 2000).abs() < 5 * math.sqrt(2000)).all()


def test_end_to_end_gradients_match_a_numerical_derivative():
    """The network's gradient through the loss agrees with a central difference along a random
    direction (a float64 network), so the loss's own gradient is the loss's."""
    x, y, A, A_hat = batch()
    model = tiny_model().double()
    b = training_batch(y, A, A_hat, torch.rand(N) + 0.5, torch.randn(N, C, R, R))
    b = b._replace(**{name: getattr(b, name).double() for name in ("net_input", "y", "A", "A_hat", "sigma")})
    # The loss sums in float32: smaller steps drown in its rounding.
    assert_gradient_matches_differences(lambda: EDMAmbientLoss()(model, b).sum(), model.parameters(), eps=1e-3,
                                        rel=1e-3)


def test_bad_arguments():
    x, y, A, A_hat = batch()
    with pytest.raises(ValueError, match="norm"):
        EDMAmbientLoss(norm=3)
    with pytest.raises(ValueError, match="shape"):
        training_batch(y, A[:, :1], A_hat, torch.ones(N), torch.randn_like(y))


def test_unit_hidden_weight_grades_hidden_pixels_by_one_over_c_out_squared():
    x, y, A, A_hat = batch()
    b = pinned(y, A, A_hat, torch.rand(N) * 3 + 0.05)
    net = tiny_model(mask_aware=True)
    plain, unit = EDMAmbientLoss(), EDMAmbientLoss(hidden_weight=unit_hidden_weight(net))
    a, u = plain(net, b), unit(net, b)
    D = net(b.net_input, b.sigma)[:, :C]
    hidden = ((A - A_hat) * (D - y).square()).flatten(1).sum(1) / net.sigma_data ** 2
    visible = (plain.weight(b.sigma.view(-1, 1, 1, 1)) * A_hat * (D - y).square()).flatten(1).sum(1)
    torch.testing.assert_close(u, visible + hidden, rtol=1e-5, atol=1e-5)
    assert (u < a).all()  # lambda(sigma) > 1 / sigma_data^2 at every sigma
    # The reference's preconditioning: c_out(sigma)^-2 is lambda(sigma) itself, for EDM and VP.
    for precond, loss_cls in ((EDMPrecond, EDMAmbientLoss), (VPPrecond, VPAmbientLoss)):
        reference = tiny_model(precond, mask_aware=False)
        same = [loss_cls(hidden_weight=w)(reference, b) for w in (None, unit_hidden_weight(reference))]
        torch.testing.assert_close(same[0], same[1], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# The ambient input of a step (ambient_fast.objective.inputs)


def raw(observed, A, position=0, flips=None, labels=None):
    bits = torch.from_numpy(np.packbits(A.numpy().astype(bool).reshape(len(A), -1), axis=1, bitorder="little"))
    flips = torch.zeros(len(A), dtype=torch.uint8) if flips is None else flips
    return RawBatch(observed, bits, flips, labels, position)


@pytest.mark.parametrize("interpret", [pytest.param("0", id="reference"), pytest.param("1", id="triton-interpreter")])
def test_ambient_inputs_of_a_raw_batch(interpret, monkeypatch):
    """Sigma from the loss's distribution at each image's position, B of the data set's operator, the
    network input of those draws; the same on the kernel path and the reference path."""
    if interpret == "1":
        pytest.importorskip("triton", reason="Triton is not installed: the fused path is not tested")
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    monkeypatch.delenv("AMBIENT_FAST_KERNELS", raising=False)
    A = (torch.rand(N, C, R, R) < 0.6)
    observed = torch.randint(0, 256, (N, C, R, R), dtype=torch.uint8) * A
    loss = EDMAmbientLoss()
    inputs = AmbientInputs(make_operator("dust", p=0.4, delta=0.3), loss, seed=5, shape=(C, R, R),
                           label_dim=3)
    out = inputs(raw(observed, A, position=40, labels=torch.tensor([0, 2, 1, 2])))
    expected, _ = loss.sigma_above(torch.zeros(N), centred_uniform(philox(inputs.image_key, 40 + torch.arange(N))[0]))
    assert torch.equal(out.sigma, expected) and torch.equal(out.weight, torch.ones(N))
    assert torch.equal(out.labels, torch.eye(3)[[0, 2, 1, 2]])
    assert torch.equal(out.A, A.float()) and (out.A_hat <= out.A).all()
    keep = (out.A_hat.sum() / out.A.sum()).item()
    assert 0.55 < keep < 0.85  # 1 - delta = 0.7 over ~460 values
    # The same position gives the same draws, another position others.
    again, later = inputs(raw(observed, A, position=40)), inputs(raw(observed, A, position=44))
    assert torch.equal(again.net_input, out.net_input) and not torch.equal(later.net_input, out.net_input)
    # Batches 0..1 and 2..3 at their positions are the whole batch.
    halves = [inputs(raw(observed[i:i + 2], A[i:i + 2], position=40 + i)) for i in (0, 2)]
    assert torch.equal(torch.cat([h.net_input for h in halves]), out.net_input)


def test_box_data_sets_get_a_second_box():
    """fixed_box masks train with a second square of the same side that does not overlap the first,
    box masks with a second box anywhere: A_hat is A with one more square erased."""
    H = 16
    for name, params in (("fixed_box", dict(p=0.25, delta=0.1)), ("box", dict(p=0.25, delta=0.25))):
        operator = make_operator(name, **params)
        _, A = operator.corrupt(torch.zeros(64, C, H, H), torch.Generator().manual_seed(1))
        observed = (torch.randint(0, 256, A.shape, dtype=torch.uint8) * A.to(torch.uint8))
        inputs = AmbientInputs(operator, EDMAmbientLoss(), seed=0, shape=(C, H, H))
        flips = (torch.arange(64) % 2).to(torch.uint8)
        out = inputs(raw(observed, A, flips=flips))
        extra = (out.A - out.A_hat)[:, 0]  # erased by B only
        side = 4  # int(0.25 * 16) and ceil(0.25 * 16)
        assert torch.equal(out.A_hat[:, :1].expand_as(out.A_hat), out.A_hat)  # one box for every channel
        for n in range(64):
            rows, cols = extra[n].nonzero(as_tuple=True)
            assert len(rows) > 0
            assert rows.max() - rows.min() < side and cols.max() - cols.min() < side  # within one square
            if name == "fixed_box":
                # A whole square of 16 pixels, disjoint from A's own square.
                assert len(rows) == side * side and (out.A[n, 0][rows, cols] == 1).all()
