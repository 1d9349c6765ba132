"""The ambient objective (ambient_fast.objective.objective): what the loss grades and what it never
reads, the noise schedules' distributions, the ambient input of a batch as stored, and the noise
levels, targets and weights of noisy images, each against an independent computation."""
import math

import numpy as np
import pytest
import torch

from ambient_fast.data.batches import RawBatch
from ambient_fast.kernels import ambient_input
from ambient_fast.networks import EDMPrecond, VPPrecond
from ambient_fast.objective.corruption import FurtherDraw, FurtherKind, make_operator
from ambient_fast.objective.objective import (FULL_WEIGHT_FROM, AmbientObjective, DiscreteVPSchedule, EDMSchedule,
                                             VPSchedule, ambient_loss, training_batch, unit_hidden_weight)
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


@pytest.mark.parametrize("schedule,norm", [(EDMSchedule(), 2), (VPSchedule(), 2), (EDMSchedule(), 1)])
def test_loss_ignores_pixels_outside_A(schedule, norm):
    x, y, A, A_hat = batch()
    garbage = y + (1 - A) * torch.randn_like(y) * 5
    model, noise, sigma = tiny_model(), torch.randn(N, C, R, R), torch.rand(N) + 0.1
    a = ambient_loss(model, training_batch(y, A, A_hat, sigma, noise), schedule, norm)
    b = ambient_loss(model, training_batch(garbage, A, A_hat, sigma, noise), schedule, norm)
    assert torch.equal(a, b)


@pytest.mark.parametrize("norm", [1, 2])
def test_gradient_is_zero_outside_A(norm):
    x, y, A, A_hat = batch()
    net = OutputNet()
    ambient_loss(net, pinned(y, A, A_hat), EDMSchedule(), norm).sum().backward()
    grad_D = net.D.grad[:, :C]
    assert torch.all(grad_D[A == 0] == 0), "the objective graded a pixel outside A"
    assert (grad_D[A == 1] != 0).float().mean() > 0.99
    assert torch.all(net.D.grad[:, C:] == 0)  # mask channels of the output are never graded


def test_the_objective_is_the_defined_one():
    x, y, A, A_hat = batch()
    net = OutputNet()
    sigma, noise = torch.tensor([0.01, 0.3, 2.0, 40.0]), torch.randn(N, C, R, R)
    loss = ambient_loss(net, training_batch(y, A, A_hat, sigma, noise), EDMSchedule())
    s = sigma.reshape(-1, 1, 1, 1)
    seen_input, seen_sigma = net.calls[0]
    assert torch.equal(seen_input, torch.cat([A_hat * (y + s * noise), A_hat], dim=1))
    assert torch.equal(seen_sigma, sigma)
    D = net(seen_input, sigma)[:, :C].detach()
    weight = (s ** 2 + 0.25) / (s * 0.5) ** 2
    torch.testing.assert_close(loss, (weight * (A * (D - y)) ** 2).sum((1, 2, 3)))
    l1 = ambient_loss(net, training_batch(y, A, A_hat, sigma, noise), EDMSchedule(), norm=1)
    torch.testing.assert_close(l1, (weight * A * (D - y).abs()).sum((1, 2, 3)))


def test_edm_sigma_distribution():
    schedule = EDMSchedule()
    sigma, mass = schedule.sigma_above(torch.zeros(20000), uniforms(20000, 1))
    assert torch.equal(mass, torch.ones(20000, dtype=torch.float64))
    log_sigma = sigma.log()
    assert abs(log_sigma.mean().item() + 1.2) < 5 * 1.2 / math.sqrt(20000)
    assert abs(log_sigma.std().item() - 1.2) < 0.05
    # Log-normal: a quarter of the mass below exp(P_mean - 0.6745 P_std).
    assert abs((sigma < math.exp(-1.2 - 0.6745 * 1.2)).float().mean().item() - 0.25) < 0.015
    torch.testing.assert_close(schedule.weight(sigma), (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2)


def test_vp_sigma_distribution():
    schedule = VPSchedule()
    sigma, _ = schedule.sigma_above(torch.zeros(20000), uniforms(20000, 2))
    lo = math.sqrt(math.exp(0.5 * 19.9 * 1e-10 + 0.1 * 1e-5) - 1)
    hi = math.sqrt(math.exp(0.5 * 19.9 + 0.1) - 1)
    assert sigma.min() >= lo * 0.999 and sigma.max() <= hi * 1.001
    torch.testing.assert_close(schedule.weight(sigma), 1 / sigma ** 2)
    # t = 1 + u (eps - 1) is uniform: the median of sigma is sigma(t = 0.5).
    median = math.sqrt(math.exp(0.5 * 19.9 * 0.25 + 0.05) - 1)
    assert abs(sigma.median().item() / median - 1) < 0.05


def test_discrete_sigmas_are_uniform_over_the_timesteps():
    levels = torch.linspace(0.01, 80, 10)
    sigma, _ = DiscreteVPSchedule(levels).sigma_above(torch.zeros(20000), uniforms(20000, 3))
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
    assert_gradient_matches_differences(lambda: ambient_loss(model, b, EDMSchedule()).sum(), model.parameters(), eps=1e-3,
                                        rel=1e-3)


def test_bad_arguments():
    x, y, A, A_hat = batch()
    with pytest.raises(ValueError, match="norm"):
        AmbientObjective(EDMSchedule(), make_operator("dust", p=0.5), seed=0, shape=(C, R, R), norm=3)
    with pytest.raises(ValueError, match="norm"):
        ambient_loss(OutputNet(), pinned(y, A, A_hat), EDMSchedule(), norm=3)
    with pytest.raises(ValueError, match="shape"):
        training_batch(y, A[:, :1], A_hat, torch.ones(N), torch.randn_like(y))


def test_unit_hidden_weight_grades_hidden_pixels_by_one_over_c_out_squared():
    x, y, A, A_hat = batch()
    b = pinned(y, A, A_hat, torch.rand(N) * 3 + 0.05)
    net = tiny_model(mask_aware=True)
    plain, unit = EDMSchedule(), EDMSchedule(hidden_weight=unit_hidden_weight(net))
    a, u = ambient_loss(net, b, plain), ambient_loss(net, b, unit)
    D = net(b.net_input, b.sigma)[:, :C]
    hidden = ((A - A_hat) * (D - y).square()).flatten(1).sum(1) / net.sigma_data ** 2
    visible = (plain.weight(b.sigma.view(-1, 1, 1, 1)) * A_hat * (D - y).square()).flatten(1).sum(1)
    torch.testing.assert_close(u, visible + hidden, rtol=1e-5, atol=1e-5)
    assert (u < a).all()  # lambda(sigma) > 1 / sigma_data^2 at every sigma
    # The reference's preconditioning: c_out(sigma)^-2 is lambda(sigma) itself, for EDM and VP.
    for precond, schedule in ((EDMPrecond, EDMSchedule), (VPPrecond, VPSchedule)):
        reference = tiny_model(precond, mask_aware=False)
        same = [ambient_loss(reference, b, schedule(hidden_weight=w)) for w in (None, unit_hidden_weight(reference))]
        torch.testing.assert_close(same[0], same[1], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# The ambient input of a batch as stored


def raw(observed, A, position=0, flips=None, labels=None):
    bits = torch.from_numpy(np.packbits(A.numpy().astype(bool).reshape(len(A), -1), axis=1, bitorder="little"))
    flips = torch.zeros(len(A), dtype=torch.uint8) if flips is None else flips
    return RawBatch(observed, bits, flips, labels, position)


@pytest.mark.parametrize("interpret", [pytest.param("0", id="reference"), pytest.param("1", id="triton-interpreter")])
def test_ambient_inputs_of_a_raw_batch(interpret, monkeypatch):
    """Sigma from the schedule's distribution at each image's position, B of the data set's operator, the
    network input of those draws; the same on the kernel path and the reference path."""
    if interpret == "1":
        pytest.importorskip("triton", reason="Triton is not installed: the fused path is not tested")
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    monkeypatch.delenv("AMBIENT_FAST_KERNELS", raising=False)
    A = (torch.rand(N, C, R, R) < 0.6)
    observed = torch.randint(0, 256, (N, C, R, R), dtype=torch.uint8) * A
    schedule = EDMSchedule()
    objective = AmbientObjective(schedule, make_operator("dust", p=0.4, delta=0.3), seed=5, shape=(C, R, R),
                                 label_dim=3)
    inputs = objective.inputs
    out = inputs(raw(observed, A, position=40, labels=torch.tensor([0, 2, 1, 2])))
    words = philox(objective.image_key, 40 + torch.arange(N))
    expected, _ = schedule.sigma_above(torch.zeros(N), centred_uniform(words[0]))
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
        inputs = AmbientObjective(EDMSchedule(), operator, seed=0, shape=(C, H, H)).inputs
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


# ----------------------------------------------------------------------------------------------
# The per-image draws on the fused path (kernels.image_draws): the reference's bits, in one launch


def records_batch(count: int, labels: bool, seed: int = 0) -> RawBatch:
    """A stored batch of 8x8 images with records (every third noisy at 0.2, every fifth with sigma_min
    0.05, every fourth clean) and, optionally, labels of 7 classes."""
    generator = torch.Generator().manual_seed(seed)
    A = torch.rand(count, C, R, R, generator=generator) < 0.6
    observed = torch.randint(0, 256, (count, C, R, R), dtype=torch.uint8, generator=generator) * A
    index = torch.arange(count)
    sigma_n = torch.where(index % 3 == 1, 0.2, 0.0).float()
    sigma_min = torch.where(index % 5 == 2, 0.05, 0.0).float()
    masked = (index % 4 != 0).to(torch.uint8)
    classes = torch.randint(0, 7, (count,), generator=generator) if labels else None
    return raw(observed, A, position=12345, flips=(index % 2).to(torch.uint8), labels=classes)._replace(
        masked=masked, sigma_n=sigma_n, sigma_min=sigma_min)


def records_objective(schedule, operator: str, noise: bool, labels: bool, batch: RawBatch) -> AmbientObjective:
    """The objective of the set `records_batch` draws from (its bounds: Tweedie targets read sigma_n)."""
    params = dict(dust=dict(p=0.4, delta=0.3), dust_shared=dict(p=0.4, delta=0.3, shared_channels=True),
                  box=dict(p=0.25, delta=0.25), fixed_box=dict(p=0.25, delta=0.1), keep_patch=dict(p=0.5, delta=0.25))
    sigma_n = batch.sigma_n if noise else torch.zeros_like(batch.sigma_n)
    return AmbientObjective(schedule, make_operator(operator.replace("_shared", ""), **params[operator]), seed=3,
                            shape=(C, R, R), label_dim=7 if labels else 0, noise=noise,
                            bounds=torch.maximum(sigma_n, batch.sigma_min).numpy())


@pytest.mark.parametrize("schedule,operator,noise,labels", [
    pytest.param(EDMSchedule(), "dust", False, False, id="edm-dust"),
    pytest.param(EDMSchedule(), "dust_shared", True, True, id="edm-dust-shared-tweedie-labels"),
    pytest.param(VPSchedule(), "box", True, False, id="vp-box-tweedie"),
    pytest.param(DiscreteVPSchedule(torch.linspace(0.01, 80, 50)), "dust", True, True, id="discrete-dust-tweedie"),
    pytest.param(EDMSchedule(), "fixed_box", False, True, id="edm-fixed-box"),
    pytest.param(EDMSchedule(), "keep_patch", True, False, id="edm-keep-patch-tweedie"),
])
def test_fused_image_draws_are_bitwise_the_reference(schedule, operator, noise, labels, monkeypatch):
    """The ambient input of 140 images (two programs of the per-image kernel, the second partial) on
    the fused path, under Triton's interpreter, and on the PyTorch path: sigma, the weights and the
    one-hot labels, and through the network input, the target and A_hat the noise added, the Tweedie
    multiples and B."""
    pytest.importorskip("triton", reason="Triton is not installed: the fused path is not tested")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("AMBIENT_FAST_KERNELS", raising=False)
    batch = records_batch(140, labels)
    objective = records_objective(schedule, operator, noise, labels, batch)
    fused = objective.inputs(batch)
    monkeypatch.setenv("AMBIENT_FAST_KERNELS", "0")
    reference = objective.inputs(batch)
    for name, value in zip(reference._fields, reference):
        assert torch.equal(getattr(fused, name), value), name
    assert (reference.weight != 1).any() and (reference.A_hat != reference.A).any()  # the records and B did count


class Launches:
    """Counts kernel launches and the PyTorch operations outside them (on CUDA, each a launch of its
    own; allocations and views are not) while active."""

    FREE = {"empty", "empty_strided", "detach", "alias", "view", "_unsafe_view", "reshape", "expand", "unsqueeze",
            "squeeze", "slice", "select", "t", "permute", "as_strided", "unbind", "split"}

    def __init__(self, monkeypatch):
        from torch.utils._python_dispatch import TorchDispatchMode

        from ambient_fast.kernels._utils import LazyKernel

        self.kernels, self.operations, self.inside = 0, [], 0
        getitem = LazyKernel.__getitem__

        def counted(kernel, grid):
            launch = getitem(kernel, grid)

            def run(*args, **kwargs):
                self.kernels += 1
                self.inside += 1  # the interpreter's own copies are the launch
                try:
                    return launch(*args, **kwargs)
                finally:
                    self.inside -= 1
            return run

        monkeypatch.setattr(LazyKernel, "__getitem__", counted)
        counter = self

        class Operations(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.__name__.split(".")[0]
                if not counter.inside and name not in Launches.FREE:
                    counter.operations.append(name)
                return func(*args, **(kwargs or {}))

        self.mode = Operations()


@pytest.mark.parametrize("operator,noise,labels", [("dust", False, False), ("dust_shared", True, True),
                                                   ("box", True, False)])
def test_the_ambient_input_is_two_launches(operator, noise, labels, monkeypatch):
    """On the fused path the ambient input of a batch is the per-image kernel and the per-value one,
    nothing else (the per-image Philox draws and what follows from them were about 260 small
    operations). B placed relative to A's own box (fixed_box, keep_patch) adds the few dozen that
    find that box."""
    pytest.importorskip("triton", reason="Triton is not installed: the fused path is not tested")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("AMBIENT_FAST_KERNELS", raising=False)
    batch = records_batch(16, labels)
    objective = records_objective(EDMSchedule(), operator, noise, labels, batch)
    objective.inputs(batch)  # the tables the kernel reads are made once
    launches = Launches(monkeypatch)
    with launches.mode:
        objective.inputs(batch)
    assert (launches.kernels, launches.operations) == (2, [])


# ----------------------------------------------------------------------------------------------
# Noisy images and records: the Tweedie target, restricted noise levels, the weights of a mixture


def test_the_tweedie_target_trains_towards_the_clean_posterior_mean():
    """Gaussian toy: x0 ~ N(mu, s0^2) per value, x_n = x0 + sigma_n n1, x_t = x_n + sqrt(sigma^2 -
    sigma_n^2) n. E[x0 | x_t] = mu + s0^2 / (s0^2 + sigma^2) (x_t - mu) in closed form. The least-
    squares fit of the kernel's target on x_t (the trained objective's minimiser among D(x_t) =
    alpha x_t + beta, which holds the true one) recovers it; the noisy value itself, the naive
    target, recovers E[x_n | x_t] instead."""
    mu, s0, sigma_n, sigma = 0.1, 0.5, 0.3, 0.6
    N, C, H, W = 64, 1, 32, 32
    generator = torch.Generator().manual_seed(3)
    x0 = mu + s0 * torch.randn(N, C, H, W, generator=generator, dtype=torch.float64)
    noisy = (x0 + sigma_n * torch.randn(x0.shape, generator=generator, dtype=torch.float64)).to(torch.float16)
    bits = torch.full((N, C * H * W // 8), 255, dtype=torch.uint8)
    std = math.sqrt(sigma ** 2 - sigma_n ** 2)
    out = ambient_input(noisy.contiguous(), bits, torch.zeros(N, dtype=torch.uint8), torch.full((N,), std),
                        FurtherDraw(FurtherKind.COIN, torch.zeros(N, dtype=torch.int64)), key=11, offset=0,
                        tweedie=torch.full((N,), sigma_n ** 2 / std))
    x_t, target = out.net_input[:, :C].double().flatten(), out.y.double().flatten()

    def fit(y):
        design = torch.stack([x_t, torch.ones_like(x_t)], 1)
        return torch.linalg.lstsq(design, y[:, None]).solution.flatten().tolist()

    slope, intercept = fit(target)
    expected = s0 ** 2 / (s0 ** 2 + sigma ** 2)
    assert slope == pytest.approx(expected, abs=0.01) and intercept == pytest.approx(mu * (1 - expected), abs=0.01)
    naive, _ = fit(noisy.double().flatten())
    assert naive == pytest.approx((s0 ** 2 + sigma_n ** 2) / (s0 ** 2 + sigma ** 2), abs=0.01)
    assert abs(naive - expected) > 0.1  # the two targets are told apart


def test_noise_levels_targets_and_weights_of_a_batch():
    """The objective on records: sigma above each image's bound, the noise added to reach it, the
    Tweedie multiple and the weight, against the formulas computed here."""
    bounds = np.array([0.0, 0.2, 0.2, 0.5], np.float32)  # clean, noisy 0.2, noisy 0.2, clean with sigma_min 0.5
    sigma_n = torch.tensor([0.0, 0.2, 0.2, 0.0])
    sigma_min = torch.tensor([0.0, 0.0, 0.0, 0.5])
    objective = AmbientObjective(EDMSchedule(), make_operator("dust", p=0.5, delta=0.1), seed=0, shape=(3, 8, 8),
                                 bounds=bounds, noise=True)
    raw = RawBatch(torch.zeros(4, 3, 8, 8, dtype=torch.float16), torch.full((4, 24), 255, dtype=torch.uint8),
                   torch.zeros(4, dtype=torch.uint8), None, 0, torch.zeros(4, dtype=torch.uint8), sigma_n, sigma_min)
    u = torch.tensor([0.1, 0.5, 0.99, 0.3], dtype=torch.float64)
    sigma, weight, std, tweedie = objective.noise_levels(raw, u)
    scipy_stats = pytest.importorskip("scipy.stats", reason="scipy (part of [test]) gives the truncated log-normal")
    z_low = (np.log(np.maximum(bounds.astype(np.float64), 1e-300)) + 1.2) / 1.2
    mass = scipy_stats.norm.sf(z_low)
    want = np.exp(-1.2 + 1.2 * scipy_stats.norm.isf(mass * (1 - u.numpy())))
    np.testing.assert_allclose(sigma.numpy(), want, rtol=1e-6)
    assert (sigma.numpy() > bounds).all()
    share = np.array([(bounds < s).mean() for s in want])
    cut = np.clip(((want ** 2 - sigma_n.numpy() ** 2) / want ** 2 / FULL_WEIGHT_FROM) ** 2, None, 1)
    np.testing.assert_allclose(weight.numpy(), mass / share * cut, rtol=1e-5)
    np.testing.assert_allclose(std.numpy(), np.sqrt(want ** 2 - sigma_n.numpy() ** 2), rtol=1e-5)
    np.testing.assert_allclose(tweedie.numpy(), sigma_n.numpy() ** 2 / np.sqrt(want ** 2 - sigma_n.numpy() ** 2),
                               rtol=1e-5)


def test_the_weights_make_the_mixture_of_sigma_first_then_an_eligible_image():
    """Over a data set whose images may train above different bounds, the weighted draws give every
    level the weight of the schedule's own distribution, shared among the images eligible there:
    E_image E_sigma[weight 1{sigma in bin}] = P(bin) for every bin (Ambient-o's mixture)."""
    schedule = EDMSchedule()
    bounds = np.array([0.0, 0.0, 0.1, 0.3, 0.3, 1.0], np.float32)
    objective = AmbientObjective(schedule, make_operator("dust", p=0.5, delta=0.1), seed=0, shape=(1, 2, 2),
                                 bounds=bounds)
    u = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000  # a fine quadrature of each image's draw
    edges = np.array([0.002, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 80.0])
    total = np.zeros(len(edges) - 1)
    for bound in bounds:
        count = len(u)
        raw = RawBatch(torch.zeros(count, 1, 2, 2, dtype=torch.uint8), torch.full((count, 1), 15, dtype=torch.uint8),
                       torch.zeros(count, dtype=torch.uint8), None, 0, torch.ones(count, dtype=torch.uint8),
                       torch.zeros(count), torch.full((count,), float(bound)))
        sigma, weight, _, _ = objective.noise_levels(raw, u)
        total += np.histogram(sigma.numpy(), edges, weights=weight.numpy())[0] / count / len(bounds)
    tail = schedule.tail(torch.tensor(edges, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(total, tail[:-1] - tail[1:], rtol=2e-3, atol=1e-5)


@pytest.mark.parametrize("schedule", [EDMSchedule(), VPSchedule(), DiscreteVPSchedule(torch.linspace(0.01, 80, 50))],
                         ids=["edm", "vp", "discrete"])
def test_restricted_draws_stay_above_the_bound_with_the_right_mass(schedule):
    u = (torch.arange(4000, dtype=torch.float64) + 0.5) / 4000
    for bound in (0.0, 0.05, 0.7, 5.0):
        sigma, mass = schedule.sigma_above(torch.full((4000,), bound), u)
        assert (sigma > bound).all()
        assert mass[0].item() == pytest.approx(schedule.tail(torch.tensor([bound], dtype=torch.float64)).item())
        # The restriction of the schedule's distribution: its tail, renormalised, at the draws' quantiles.
        q = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
        levels = torch.quantile(sigma.double(), q)
        renormalised = schedule.tail(levels) / mass[0]
        assert torch.allclose(renormalised, 1 - q, atol=0.03), (bound, renormalised)
