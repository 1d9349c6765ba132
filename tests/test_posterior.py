"""Posterior sampling: closed-form posteriors of a Gaussian toy (with its exact denoiser and with a tiny
network trained on its corrupted samples), DPS's looser guarantee, per-seed independence, the fast path."""
import math

import pytest
import torch

from ambient_fast.sampling.measurements import Blur, CompressedSensing, Inpainting
from ambient_fast.sampling.posterior import DPS, AmbientMask, InverseProblem, TweedieMoments, posterior_sample
from ambient_fast.sampling.samplers import Churn, PerSeedGenerators

from test_sample import host_reads, small_model

SHAPE = (1, 2, 2)  # (C, H, W) of the toy: n = 4 values
N = math.prod(SHAPE)
SAMPLES = 2000      # posterior samples per check: sample means to 2.2% of a posterior sd
STEPS = 48          # Heun steps: the discretisation's bias on a variance about 1% (measured)


def toy_gaussian():
    """A correlated Gaussian over the toy's 4 values: (mean (C, H, W), cov (n, n)), float64."""
    g = torch.Generator().manual_seed(0)
    factor = torch.randn(N, N, generator=g, dtype=torch.float64) * 0.3
    cov = factor @ factor.T + 0.05 * torch.eye(N, dtype=torch.float64)
    return torch.tensor([0.2, -0.1, 0.3, 0.0], dtype=torch.float64).view(SHAPE), cov


class GaussianDenoiser(torch.nn.Module):
    """The exact ambient denoiser of x0 ~ N(mean, cov) (cov over the flattened C*H*W values), in the
    preconditioned network's interface: net(cat([M * x, M]), sigma) -> E[x0 | M x_sigma, M]
    = mean + cov M (M cov M + sigma^2 I)^-1 M (x - mean), in the first C channels."""

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("cov", cov)
        self.img_channels, self.img_resolution, self.label_dim = 2 * mean.shape[0], mean.shape[1], 0

    def forward(self, x, sigma, class_labels=None):
        channels = self.img_channels // 2
        image, mask = x[:, :channels].flatten(1), x[:, channels:].flatten(1)
        cov, mean = self.cov.to(image.dtype), self.mean.to(image.dtype).flatten()
        sigma = torch.as_tensor(sigma, dtype=image.dtype, device=image.device).reshape(-1, 1, 1)
        system = mask[:, :, None] * cov * mask[:, None, :] + sigma ** 2 * torch.eye(len(cov), dtype=image.dtype)
        gain = torch.linalg.solve(system, (cov * mask[:, None, :]).transpose(1, 2)).transpose(1, 2)
        denoised = mean + (gain @ (mask * (image - mean))[:, :, None])[:, :, 0]
        return denoised.view_as(x[:, :channels])


def gaussian_posterior(mean, cov, matrix, y, noise_level):
    """Closed form of x0 | y for x0 ~ N(mean, cov), y = matrix x0 + noise_level n: (mean (n,), cov (n, n))."""
    gain = cov @ matrix.T @ torch.linalg.inv(matrix @ cov @ matrix.T + noise_level ** 2 * torch.eye(len(matrix),
                                                                                                     dtype=cov.dtype))
    return mean.flatten() + gain @ (y - matrix @ mean.flatten()), cov - gain @ matrix @ cov


def assert_gaussian(samples, mean, cov, slack=0.02, scale=None, sigmas=5.0):
    """Sample mean and covariance of `samples` (S, n) within `sigmas` standard errors of (mean, cov),
    plus `slack` times the sds `scale` (n,) (default: cov's): the discretisation's bias, or a
    trained network's error."""
    count = len(samples)
    sd = cov.diagonal().sqrt() if scale is None else scale
    mean_error = (samples.mean(0) - mean).abs()
    assert (mean_error <= sigmas * cov.diagonal().sqrt() / math.sqrt(count) + slack * sd).all(), (mean_error / sd).tolist()
    standard_error = ((cov.diagonal()[:, None] * cov.diagonal()[None] + cov ** 2) / count).sqrt()
    cov_error = (torch.cov(samples.T) - cov).abs()
    assert (cov_error <= sigmas * standard_error + slack * sd[:, None] * sd[None]).all(), cov_error.tolist()


def toy_problem(measurement_of_batch, noise_level, seed=1):
    """One measurement of one draw x0 of the toy, repeated over SAMPLES latents: (problem, matrix, y)."""
    mean, cov = toy_gaussian()
    g = torch.Generator().manual_seed(seed)
    x0 = mean + (torch.linalg.cholesky(cov) @ torch.randn(N, generator=g, dtype=torch.float64)).view(SHAPE)
    one = measurement_of_batch(1)
    clean = one.forward(x0[None])
    y = clean + noise_level * torch.randn(clean.shape, generator=g, dtype=torch.float64)
    if one.mask is not None:
        y = one.mask * y  # nothing is measured where the mask is 0
    matrix = one.as_matrix(SHAPE)[0]
    return (InverseProblem(measurement_of_batch(SAMPLES), y.expand(SAMPLES, *y.shape[1:]), noise_level), matrix,
            y.flatten())


def latents(count=SAMPLES, seed=2):
    return torch.randn(count, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


OBSERVED = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64).view(SHAPE)  # values 0 and 2 measured
CS_MATRIX = torch.randn(1, 2, N, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
MEASUREMENTS = {
    "compressed_sensing": lambda batch: CompressedSensing(CS_MATRIX.expand(batch, -1, -1), SHAPE),
    "inpainting": lambda batch: Inpainting(OBSERVED.expand(batch, *SHAPE)),
    "blur": lambda batch: Blur(torch.tensor([[0.0, 0.2, 0.0], [0.2, 1.0, 0.2], [0.0, 0.2, 0.0]], dtype=torch.float64)),
}


@pytest.mark.parametrize("name", ["compressed_sensing", "inpainting"])
def test_tweedie_moments_sample_the_closed_form_posterior(name):
    """With the exact denoiser p(x0 | x_t) is Gaussian, so the Tweedie-moment denoiser is E[x0 | x_t, y]
    exactly and the ODE's samples are the posterior's: its mean and covariance in closed form (blur
    passes too, 4 s more: the method reads only forward and adjoint, tested per operator)."""
    mean, cov = toy_gaussian()
    problem, matrix, y = toy_problem(MEASUREMENTS[name], noise_level=0.1)
    method = TweedieMoments(cg_iterations=N, jacobian_sigma_max=math.inf)
    samples = posterior_sample(GaussianDenoiser(mean, cov), latents(), problem, method=method, num_steps=STEPS,
                               clip=False)
    assert_gaussian(samples.flatten(1), *gaussian_posterior(mean, cov, matrix, y, 0.1))


def ambient_mask_law(mean, cov, y, noise_level):
    """What `AmbientMask` samples on the toy with OBSERVED: the observed values from their posterior,
    the hidden ones their conditional mean given those, mean + K (x_o - mean_o): (mean, cov) over n."""
    observed = OBSERVED.flatten().bool()
    posterior_mean, posterior_cov = gaussian_posterior(mean, cov, torch.eye(N, dtype=cov.dtype)[observed],
                                                       y[observed], noise_level)
    lift = torch.eye(N, dtype=cov.dtype)[:, observed]  # x_o -> x with the hidden values given by K
    lift[~observed] = cov[~observed][:, observed] @ torch.linalg.inv(cov[observed][:, observed])
    observed_cov = posterior_cov[observed][:, observed]
    return posterior_mean, lift @ observed_cov @ lift.T


def test_ambient_mask_samples_the_observed_posterior_and_conditional_means():
    """The network fed the measurement's mask, with the measurement fused into its input: exact
    posterior samples of the observed values, exact conditional means of the hidden ones; the
    result's mean is the closed-form posterior mean."""
    mean, cov = toy_gaussian()
    problem, _, y = toy_problem(MEASUREMENTS["inpainting"], noise_level=0.2)
    samples = posterior_sample(GaussianDenoiser(mean, cov), latents(), problem, method=AmbientMask(), num_steps=STEPS,
                               clip=False).flatten(1)
    law_mean, law_cov = ambient_mask_law(mean, cov, y, 0.2)
    assert_gaussian(samples, law_mean, law_cov)
    posterior_mean, posterior_cov = gaussian_posterior(mean, cov, torch.diag(OBSERVED.flatten()), y, 0.2)
    torch.testing.assert_close(law_mean, posterior_mean)
    hidden = ~OBSERVED.flatten().bool()
    assert (samples[:, hidden].var(0) < 0.2 * posterior_cov.diagonal()[hidden]).all()  # no spread where unseen


# ----------------------------------------------------------------------------- a trained tiny network


class TinyDenoiser(torch.nn.Module):
    """A tiny ambient network for the toy: EDM's mask-aware preconditioning (hidden values: c_skip 0,
    c_out sigma_data) around an MLP of (c_in M x, M, log(sigma) / 4)."""

    def __init__(self, width: int = 64, sigma_data: float = 0.5):
        super().__init__()
        self.sigma_data, self.img_channels, self.img_resolution, self.label_dim = sigma_data, 2 * SHAPE[0], SHAPE[1], 0
        self.mlp = torch.nn.Sequential(torch.nn.Linear(2 * N + 1, width), torch.nn.SiLU(), torch.nn.Linear(width, width),
                                       torch.nn.SiLU(), torch.nn.Linear(width, N))

    def forward(self, x, sigma, class_labels=None):
        image, mask = x[:, :SHAPE[0]].flatten(1), x[:, SHAPE[0]:].flatten(1)
        sigma = torch.as_tensor(sigma, dtype=image.dtype).reshape(-1, 1).expand(len(image), 1)
        sd2 = self.sigma_data ** 2
        c_skip, c_out, c_in = sd2 / (sigma ** 2 + sd2), sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt(), 1 / (sigma ** 2 + sd2).sqrt()
        F = self.mlp(torch.cat([c_in * mask * image, mask, sigma.log() / 4], dim=1).to(self.mlp[0].weight.dtype))
        out = mask * c_skip * image + (mask * c_out + (1 - mask) * self.sigma_data) * F.to(image.dtype)
        return out.view_as(x[:, :SHAPE[0]])


@pytest.fixture(scope="module")
def trained_denoiser():
    """TinyDenoiser trained with the ambient objective on corrupted draws of the toy only: dust A
    (p 0.2), further corruption B (delta 0.3), graded on A's values with EDM's weight (1 / sigma_data^2
    on the values B hid, as the trainer's hidden weight), noise levels log-uniform over the sampler's
    range. 1,000 steps of batch 1,024 on one thread (small ops: more threads only contend): 3 to 7 s
    on the 2-core machine, shared by the tests below."""
    mean, cov = toy_gaussian()
    torch.manual_seed(0)
    net = TinyDenoiser()
    optimizer = torch.optim.Adam(net.parameters())
    steps = 1000
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=steps, pct_start=0.1)
    factor, threads = torch.linalg.cholesky(cov).float(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            x0 = mean.flatten().float() + torch.randn(1024, N) @ factor.T
            A = (torch.rand(1024, N) >= 0.2).float()
            A_hat = A * (torch.rand(1024, N) >= 0.3).float()
            sigma = torch.empty(1024, 1).uniform_(math.log(0.002), math.log(80.0)).exp()
            noisy = torch.cat([(A_hat * (x0 + sigma * torch.randn_like(x0))).view(-1, *SHAPE), A_hat.view(-1, *SHAPE)], 1)
            error = (net(noisy, sigma).flatten(1) - x0).square()
            weight = A_hat * (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2 + (A - A_hat) / 0.25
            optimizer.zero_grad()
            (weight * error).sum(1).mean().backward()
            optimizer.step()
            schedule.step()
    finally:
        torch.set_num_threads(threads)
    return net.double().requires_grad_(False)


def test_the_trained_network_learned_the_ambient_denoiser(trained_denoiser):
    """The network's error against the exact denoiser, what the tests below allow for: RMS under 0.08
    (measured 0.0002 to 0.056 over these levels and masks; the posterior sds are 0.2 to 0.6)."""
    mean, cov = toy_gaussian()
    exact = GaussianDenoiser(mean, cov)
    g = torch.Generator().manual_seed(4)
    for sigma in (0.002, 0.05, 0.3, 2.0, 10.0):
        for mask in (torch.ones(N), OBSERVED.flatten()):
            x = mean + (torch.randn(1000, N, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
                        + sigma * torch.randn(1000, N, generator=g, dtype=torch.float64)).view(-1, *SHAPE)
            net_input = torch.cat([mask.view(SHAPE) * x, mask.view(SHAPE).expand_as(x)], dim=1)
            error = (trained_denoiser(net_input, sigma) - exact(net_input, sigma)).square().mean().sqrt()
            assert error < 0.08, (sigma, mask, error)


@pytest.mark.parametrize("method", ["tweedie", "ambient"])
def test_a_trained_network_samples_the_closed_form_posterior(trained_denoiser, method):
    """With the trained network as the prior the samples match the closed form within sampling error
    plus the network's error: 0.15 posterior sds (measured: 0.03 on means, 10% on variances for the
    Tweedie moments, whose covariance is the network's Jacobian; 0.06 sd on the ambient variant's
    hidden means). The Tweedie moments keep the default high-noise covariance (r_t^2 I above t = 10),
    which a trained network needs: its t^2 dD/dx turns indefinite at t = 80."""
    mean, cov = toy_gaussian()
    name = "compressed_sensing" if method == "tweedie" else "inpainting"
    problem, matrix, y = toy_problem(MEASUREMENTS[name], noise_level=0.3)
    posterior = gaussian_posterior(mean, cov, matrix, y, 0.3)
    if method == "tweedie":
        law, posterior_method = posterior, TweedieMoments(cg_iterations=N)
    else:
        law, posterior_method = ambient_mask_law(mean, cov, y, 0.3), AmbientMask()
    samples = posterior_sample(trained_denoiser, latents(), problem, method=posterior_method, num_steps=STEPS,
                               clip=False)
    assert_gaussian(samples.flatten(1), *law, slack=0.15, scale=posterior[1].diagonal().sqrt())


def test_dps_moves_toward_the_posterior_but_is_not_exact():
    """DPS is an approximation: held only to moving the prior toward the posterior. Measured on the
    toy (compressed sensing, noise 0.1, 48 steps, scale 0.1): its mean 0.29 posterior sds from the
    posterior's (the prior's: 0.94), residual ||A x - y|| 0.21 (the prior's 1.28, the noise's 0.14),
    variances 1.0 to 2.7 times the posterior's."""
    mean, cov = toy_gaussian()
    problem, matrix, y = toy_problem(MEASUREMENTS["compressed_sensing"], noise_level=0.1)
    posterior_mean, posterior_cov = gaussian_posterior(mean, cov, matrix, y, 0.1)
    sd = posterior_cov.diagonal().sqrt()
    samples = posterior_sample(GaussianDenoiser(mean, cov), latents(), problem, method=DPS(0.1), num_steps=STEPS,
                               clip=False).flatten(1)
    prior = mean.flatten() + latents().flatten(1) @ torch.linalg.cholesky(cov).T
    distance = lambda x: ((x.mean(0) - posterior_mean) / sd).abs().max()
    residual = lambda x: (x @ matrix.T - y).norm(dim=1).mean()
    assert distance(samples) < 0.5 * distance(prior)
    assert residual(samples) < 0.25 * residual(prior)


# ----------------------------------------------------------------------------- seeds, paths, errors


def seeded_problem(seeds, method_name):
    """Latents, sampling masks and a measurement per seed, each image's from its own seed only: 8x8
    RGB images, inpainting for AmbientMask, else compressed sensing with 20 rows."""
    generators = PerSeedGenerators(seeds)
    latents, masks = generators.sampling_inputs((3, 8, 8), 1, 0.6, False, "cpu")
    own = [torch.Generator().manual_seed(1000 + seed) for seed in seeds]
    clean = torch.stack([torch.rand(3, 8, 8, generator=g) * 2 - 1 for g in own])
    if method_name == "ambient":
        measurement = Inpainting(torch.stack([(torch.rand(3, 8, 8, generator=g) < 0.5).float() for g in own]))
    else:
        measurement = CompressedSensing(torch.stack([torch.randn(20, 192, generator=g) / 20 for g in own]), (3, 8, 8))
    return generators, latents.double(), masks[0], InverseProblem(measurement, measurement.forward(clean), 0.05)


METHODS = {"tweedie": TweedieMoments(cg_iterations=3), "dps": DPS(0.5), "ambient": AmbientMask()}


@pytest.mark.parametrize("name", list(METHODS))
def test_each_posterior_sample_depends_only_on_its_seed(name):
    """With churn, from per-seed generators: an image's sample is the same in a batch of 4 and of 2."""
    model = small_model()

    def sample(seeds):
        generators, latents, masks, problem = seeded_problem(seeds, name)
        return posterior_sample(model, latents, problem, method=METHODS[name], mask=masks, num_steps=4,
                                churn=Churn(S_churn=20.0, randn_like=generators.randn_like))

    together, apart = sample([3, 4, 5, 6]), sample([5, 9])
    assert torch.allclose(together[2], apart[0], atol=1e-5)
    assert not torch.allclose(together[2], together[3], atol=1e-2)


@pytest.mark.parametrize("name,max_error,mean_error", [("tweedie", 0.5, 0.01), ("dps", 0.5, 0.01),
                                                        ("ambient", 0.01, 0.001)])
def test_fast_path_agrees_with_the_exact_path(name, max_error, mean_error):
    """The fast path (float32 state, the network in bf16; AmbientMask through the StaticDenoiser, its
    CUDA graph needing a GPU) gives the exact path's images within bf16 tolerance. Measured on this
    random network, max / mean: AmbientMask 0.002 / 0.0003; the gradient methods 0.14-0.38 / 0.002-0.006,
    from a few values: the conjugate gradients see the bf16 Jacobian, and DPS's unit-length steps flip
    which predictions the clamp saturates (their float32 state without bf16: 3e-4 / 2e-6)."""
    _, latents, masks, problem = seeded_problem([0, 1, 2], name)
    model = small_model()
    kwargs = dict(method=METHODS[name], mask=masks, num_steps=4)
    exact = posterior_sample(model, latents, problem, **kwargs)
    fast = posterior_sample(model, latents, problem, fast=True, **kwargs)
    assert fast.dtype == torch.float32 and exact.dtype == torch.float64
    difference = (fast.double() - exact).abs()
    assert difference.max() < max_error and difference.mean() < mean_error, (difference.max(), difference.mean())


@pytest.mark.parametrize("name", list(METHODS))
def test_posterior_sampling_never_waits_for_device_values(name):
    """No tensor value is read on the host (conjugate gradients run a fixed number of iterations, the
    high-noise switch is a device-side choice)."""
    _, latents, masks, problem = seeded_problem([0, 1], name)
    model = small_model()
    assert host_reads(lambda: posterior_sample(model, latents, problem, method=METHODS[name], mask=masks, num_steps=3,
                                               fast=name == "ambient")) == 0


def test_posterior_errors():
    _, latents, masks, problem = seeded_problem([0, 1], "tweedie")
    model = small_model()
    with pytest.raises(ValueError, match="needs a mask measurement"):
        posterior_sample(model, latents, problem, method=AmbientMask())
    with pytest.raises(ValueError, match="one measurement per latent"):
        posterior_sample(model, latents[:1], problem)
    with pytest.raises(ValueError, match="noise level"):
        posterior_sample(model, latents, InverseProblem(problem.measurement, problem.y, -1.0))
    with pytest.raises(ValueError, match="solver"):
        posterior_sample(model, latents, problem, solver="rk4")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA graph, bf16 autocast and pinned churn noise need a CUDA GPU")
def test_posterior_fast_path_on_cuda():
    """On a GPU: AmbientMask replays its CUDA graph, the gradient methods run under bf16 autocast, each
    within the CPU test's tolerance of the exact path; churn noise, drawn per seed and copied from
    pinned memory, keeps an image independent of its batch (to TF32 convolutions' tolerance)."""
    model = small_model().cuda()

    def sample(seeds, name, **options):
        generators, latents, masks, problem = seeded_problem(seeds, name)
        problem = InverseProblem(problem.measurement.to("cuda", torch.float32), problem.y.cuda(), problem.noise_level)
        churn = Churn(20.0, randn_like=generators.randn_like) if options.pop("churn", False) else Churn()
        return posterior_sample(model, latents.cuda(), problem, method=METHODS[name], mask=masks.cuda(), num_steps=4,
                                churn=churn, **options)

    for name, max_error, mean_error in (("ambient", 0.01, 0.001), ("tweedie", 0.5, 0.01), ("dps", 0.5, 0.01)):
        difference = (sample([0, 1, 2], name, fast=True).double() - sample([0, 1, 2], name)).abs()
        assert difference.max() < max_error and difference.mean() < mean_error, (name, difference.max())
    together, alone = sample([0, 1, 2], "ambient", churn=True), sample([1], "ambient", churn=True)
    assert (together[1] - alone[0]).abs().max() < 1e-2
    assert (together[1] - sample([1], "ambient")[0]).abs().max() > 1e-2
