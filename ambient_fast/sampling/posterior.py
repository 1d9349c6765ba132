"""Posterior sampling for linear inverse problems, y = A x0 + sigma_y n with a known operator A
(`ambient_fast.sampling.measurements`) and a known noise level sigma_y, with an ambient model as
the prior.

Every method is a posterior denoiser plugged into EDM's solver (`ambient_fast.sampling.samplers`):
the probability-flow ODE of p(x0 | y) needs E[x0 | x_t, y] where the unconditional sampler uses
E[x0 | x_t]. The prior's E[x0 | x_t] is the ambient model's E[x0 | M x_t, M] for a sampling mask
M (all ones for a model that saw whole images; a per-seed dust mask at the training survival, as
`sample` draws, for a model trained on masked images: the fixed-mask approximation).

- `TweedieMoments` (Boys et al. 2023, "Tweedie moment projected diffusions"): p(x0 | x_t) taken
  as the Gaussian N(D, C) of Tweedie's first two moments, D the denoiser and C = t^2 dD/dx, then
  conditioned on y exactly: E[x0 | x_t, y] = D + C A^T (A C A^T + sigma_y^2 I)^-1 (y - A D), the
  solve by conjugate gradients through the network's vector-Jacobian products. Exact when
  p(x0 | x_t) is Gaussian, i.e. for Gaussian data, with its exact denoiser: the method the tests
  hold to the closed-form posterior.
- `DPS` (Chung et al. 2023, "Diffusion posterior sampling for general noisy inverse problems"):
  after each denoiser evaluation a gradient step on the residual ||y - A D(x, t)|| through the
  network, of length scale / ||y - A D|| times the squared residual's gradient (their
  normalised step size). An approximation: its samples are not the posterior's in general.
- `AmbientMask` (masks only; Daras et al. 2023's model used as trained): the network sees the
  measurement's own mask M, and the noisy state and the measurement are fused where M observes:
  given x_t = x0 + t n and y = x0 + sigma_y n' on those pixels, x0 is seen through
  z = (sigma_y^2 x_t + t^2 y) / (t^2 + sigma_y^2) at the level t_eff = t sigma_y / sqrt(t^2 + sigma_y^2),
  so E[x0 | M x_t, y] = E[x0 | M z_teff, M], one call of the network, no gradient. The observed
  pixels follow the posterior's own ODE and come out as exact posterior samples; a hidden pixel
  is never seen by the network, so it comes out as its conditional mean given the sampled observed
  ones (the fixed-mask sampler's behaviour: spread there needs a prior that sees those pixels,
  e.g. `TweedieMoments` with a sampling mask).

Fast path (`fast=True`, the default on GPUs once a command uses it): float32 state and the network
in bf16. `AmbientMask` replays the network from a CUDA graph (`StaticDenoiser`), as the
unconditional fast sampler does. `TweedieMoments` and `DPS` differentiate through the network, so
they run it under bf16 autocast, forward and backward, without a graph (a captured backward would
need its own static buffers per vector-Jacobian product) and without the fused step kernel.
"""
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ambient_fast.sampling.graphs import StaticDenoiser
from ambient_fast.sampling.measurements import Measurement
from ambient_fast.sampling.samplers import (Churn, Increment, check_sampler_arguments, edm_sigma_steps, edm_solve,
                                            increment_step, memory_format)


@dataclass(frozen=True)
class InverseProblem:
    """y = A x0 + noise_level * n for each image: `y` is (B, *measured shape), A `measurement`."""

    measurement: Measurement
    y: Tensor
    noise_level: float


class Prior:
    """The ambient model as a prior: D(x, t) = net(cat([M * x, M]), t, labels)[:, :C], under bf16
    autocast when `bf16`, in `dtype`. mask: (B, C, H, W) sampling mask M."""

    def __init__(self, net: torch.nn.Module, mask: Tensor, class_labels: Optional[Tensor], dtype: torch.dtype,
                 bf16: bool):
        self.net, self.mask, self.class_labels, self.dtype, self.bf16 = net, mask, class_labels, dtype, bf16

    def denoise(self, x: Tensor, t: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """The prediction of x0 from x at level t, through `mask` (default: the sampling mask)."""
        mask = self.mask if mask is None else mask
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.net(torch.cat([mask * x, mask], dim=1), t, self.class_labels)
        return out[:, :x.shape[1]].to(self.dtype)


class PosteriorMethod(ABC):
    """A way to compute the sampler's increment from the prior and the measurement."""

    @abstractmethod
    def increment(self, prior: Prior, problem: InverseProblem, clip: bool, fast: bool) -> Increment:
        """(x, t, dt) -> dt * (x - E[x0 | x_t, y]) / t, or the method's approximation of it."""


def batch_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-image inner products of (B, ...) tensors: (B, 1, ..., 1), broadcastable against a and b."""
    dims = tuple(range(1, a.ndim))
    return (a * b).sum(dim=dims, keepdim=True)


def conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor, iterations: int) -> Tensor:
    """x with matvec(x) = b for each image's symmetric positive semi-definite system, after a fixed
    number of conjugate-gradient iterations from 0 (exact after as many as the system's size). No
    stopping test: reading the residual on the host would wait for the GPU every iteration; an image
    whose system is solved takes zero steps from then on."""
    x, residual = torch.zeros_like(b), b
    direction, rr = residual, batch_dot(residual, residual)
    for _ in range(iterations):
        product = matvec(direction)
        curvature = batch_dot(direction, product)
        alpha = torch.where(curvature > 0, rr / curvature.clamp_min(torch.finfo(b.dtype).tiny), 0)
        x, residual = x + alpha * direction, residual - alpha * product
        rr_next = batch_dot(residual, residual)
        beta = torch.where(rr > 0, rr_next / rr.clamp_min(torch.finfo(b.dtype).tiny), 0)
        direction, rr = residual + beta * direction, rr_next
    return x


@dataclass(frozen=True)
class TweedieMoments(PosteriorMethod):
    """Tweedie-moment posterior denoiser (Boys et al. 2023): D + C A^T (A C A^T + sigma_y^2 I)^-1 (y - A D)
    with C = t^2 dD/dx applied by vector-Jacobian products (dD/dx is symmetric for an exact
    denoiser, the gradient of a log-density plus x). Exact for Gaussian data.

    Args:
        cg_iterations: conjugate-gradient iterations per evaluation, one backward pass each (exact
            after as many as measurements; fewer on images).
        jacobian_sigma_max: above this level C is taken as r_t^2 I, r_t^2 = t^2 sd^2 / (t^2 + sd^2)
            (the posterior variance of N(0, sd^2 I) data, as Pi-GDM, Song et al. 2023): a trained
            network's t^2 dD/dx multiplies its error by about t * sigma_data there and stops being
            positive (measured on a tiny trained network: negative eigenvalues at t = 80). inf
            keeps the exact covariance at every level.
        sigma_data: sd of the high-noise covariance.
    """

    cg_iterations: int = 8
    jacobian_sigma_max: float = 10.0
    sigma_data: float = 0.5

    def increment(self, prior, problem, clip, fast):
        A, sigma_y = problem.measurement, problem.noise_level

        def increment(x: Tensor, t: Tensor, dt: Tensor) -> Tensor:
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                D = prior.denoise(x, t)

                def jacobian_t(v: Tensor) -> Tensor:  # t^2 (dD/dx)^T v
                    return t ** 2 * torch.autograd.grad(D, x, v, retain_graph=True)[0]

                high = t > self.jacobian_sigma_max  # a device bool: chosen by torch.where, never read on the host
                r2 = t ** 2 * self.sigma_data ** 2 / (t ** 2 + self.sigma_data ** 2)

                def covariance(v: Tensor) -> Tensor:
                    return torch.where(high, r2 * v, jacobian_t(v))

                v = conjugate_gradient(lambda u: A.forward(covariance(A.adjoint(u))) + sigma_y ** 2 * u,
                                       problem.y - A.forward(D), self.cg_iterations)
                posterior = (D + jacobian_t(A.adjoint(v))).detach()
            if clip:
                posterior = posterior.clamp(-1, 1)
            return dt * (x.detach() - posterior) / t
        return increment


@dataclass(frozen=True)
class DPS(PosteriorMethod):
    """Diffusion posterior sampling (Chung et al. 2023): each evaluation's increment minus
    `scale` * grad_x ||y - A D(x, t)||, their step scale / ||y - A D|| on the squared residual's
    gradient (up to a factor 2 in `scale`). The step is per evaluation, as in their algorithm, so a
    good scale depends on the number of steps and on the image size (no default: on the 4-value
    toy of the tests, 0.1 to 0.2 at 48 steps). D is clamped to [-1, 1] when `clip`, as the guidance
    sampler's, and the gradient passes through the clamp."""

    scale: float

    def increment(self, prior, problem, clip, fast):
        A = problem.measurement

        def increment(x: Tensor, t: Tensor, dt: Tensor) -> Tensor:
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                D = prior.denoise(x, t)
                D = D.clamp(-1, 1) if clip else D
                difference = problem.y - A.forward(D)
                # The norm's gradient is undefined at 0: a residual that small takes no step.
                residual = batch_dot(difference, difference).clamp_min(torch.finfo(D.dtype).tiny).sqrt()
                (grad,) = torch.autograd.grad(residual.sum(), x)
            return dt * (x.detach() - D.detach()) / t - self.scale * grad
        return increment


@dataclass(frozen=True)
class AmbientMask(PosteriorMethod):
    """The ambient model fed the measurement's own mask, the measurement fused into its input: exact
    posterior samples of the observed pixels, conditional means elsewhere (see the module's
    docstring). The fused level is at least `sigma_floor` (the sampler's sigma_min): a noiseless
    measurement is shown to the network as one of that level."""

    sigma_floor: float = 0.002

    def increment(self, prior, problem, clip, fast):
        mask, y, sigma_y = problem.measurement.mask, problem.y, problem.noise_level
        if mask is None:
            raise ValueError(f"the ambient posterior needs a mask measurement, got {type(problem.measurement).__name__}")
        evaluate = self._evaluate(prior, mask, fast)

        def increment(x: Tensor, t: Tensor, dt: Tensor) -> Tensor:
            seen = (sigma_y ** 2 * x + t ** 2 * y) / (t ** 2 + sigma_y ** 2)
            t_fused = (t * sigma_y / (t ** 2 + sigma_y ** 2).sqrt()).clamp_min(self.sigma_floor)
            D = evaluate(mask * seen, t_fused)
            return dt * (x - (D.clamp(-1, 1) if clip else D)) / t
        return increment

    @staticmethod
    def _evaluate(prior: Prior, mask: Tensor, fast: bool) -> Callable[[Tensor, Tensor], Tensor]:
        """(M * z, level) -> E[x0 | M z, M]: the prior's call, or on the fast path a StaticDenoiser
        (a CUDA graph on GPUs) whose input buffer is refilled in place."""
        if not fast:
            return lambda observed, level: prior.denoise(observed, level, mask)
        net_input = torch.cat([mask, mask], dim=1).float().contiguous(memory_format=memory_format(prior.net))
        static = StaticDenoiser.cached(prior.net, net_input, prior.class_labels, use_graph=mask.is_cuda)

        def evaluate(observed: Tensor, level: Tensor) -> Tensor:
            static.net_input[:, :mask.shape[1]] = observed
            return static(level).to(prior.dtype)
        return evaluate


def posterior_sample(net: torch.nn.Module, latents: Tensor, problem: InverseProblem, *,
                     method: PosteriorMethod = TweedieMoments(), mask: Optional[Tensor] = None,
                     class_labels: Optional[Tensor] = None, num_steps: int = 18, sigma_min: float = 0.002,
                     sigma_max: float = 80.0, rho: float = 7.0, solver: str = "heun", clip: bool = True,
                     dtype: torch.dtype = torch.float64, churn: Churn = Churn(), fast: bool = False) -> Tensor:
    """Samples of p(x0 | y), one per latent, with an ambient model as the prior.

    Args:
        net: ambient denoiser, `net(cat([M * x, M]) (B, 2C, H, W), sigma, class_labels)`.
        latents: (B, C, H, W) standard normal latents, one per image (per seed:
            `PerSeedGenerators`, whose `randn_like` also feeds `churn`).
        problem: the measurement, y (B, ...) and its noise level.
        method: `TweedieMoments()` (exact for Gaussian data), `DPS(scale)` or `AmbientMask()`.
        mask: (B, C, H, W) the prior's sampling mask (default all ones); `AmbientMask` uses the
            measurement's.
        num_steps, sigma_min, sigma_max, rho, solver, churn: EDM's discretisation, solver and churn.
        clip: clamp the predictions to [-1, 1] (images); off for unbounded data.
        dtype: the state's dtype on the exact path (float64 by default).
        fast: float32 state, the network in bf16 (see the module's docstring for what each method
            can take of the fast path).
    Returns:
        (B, C, H, W) posterior samples in the state's dtype: the last step's posterior denoiser.
    """
    check_sampler_arguments(latents, solver)
    if problem.y.shape[0] != latents.shape[0]:
        raise ValueError(f"y must hold one measurement per latent ({latents.shape[0]}), got {problem.y.shape[0]}")
    if not problem.noise_level >= 0:
        raise ValueError(f"the noise level must be >= 0, got {problem.noise_level}")
    dtype = torch.float32 if fast else dtype
    mask = torch.ones_like(latents) if mask is None else mask
    prior = Prior(net, mask.to(latents.device, dtype), class_labels, dtype, bf16=fast)
    problem = InverseProblem(problem.measurement.to(latents.device, dtype), problem.y.to(latents.device, dtype),
                             problem.noise_level)
    increment = method.increment(prior, problem, clip, fast)
    t_steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, dtype=dtype, device=latents.device)
    t_host = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, dtype=torch.float64).tolist()
    with torch.no_grad():
        return edm_solve(increment_step(increment), latents.to(dtype) * t_steps[0], t_steps, t_host, solver, churn)
