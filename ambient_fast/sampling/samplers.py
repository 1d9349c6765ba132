"""Samplers for ambient models (Daras et al. 2023, section 3.2): EDM's Euler / Heun solver with a
fixed mask, optionally with reconstruction guidance from further masks.

The model was trained to predict E[x0 | A_hat x_t, A_hat]; the fixed-mask sampler uses that, for
one mask M_0 drawn once, in place of E[x0 | x_t]. Reconstruction guidance adds the gradient of
`K * sum_j 0.5 ||D_0(x, t) - D_j(x, t)||^2` over the other masks, which pulls the predictions
made from different masks together (the factor K and the sum over the whole batch are the
reference's, and its published samples depend on them).

The parts, each its own function: EDM's discretisation (`edm_sigma_steps`) and its solver loop with
churn (`edm_solve`, `Churn`), which advance any `increment(x, t, dt)` (`increment_step`: the
exact path's step); the fixed-mask denoiser and its increment (`masked_denoiser`,
`fixed_mask_increment`); reconstruction guidance (`guidance_increment`); the fused path
(`fused_solve`: one kernel per evaluation, and on the fast path a bf16 network in a CUDA graph).
`ambient_sample` puts them together; the posterior samplers (`ambient_fast.sampling.posterior`)
reuse the solver.

Everything here is a pure function of its inputs: latents, masks and the churn noise source
decide the result, and `PerSeedGenerators` draws all three from one stream per image, so each
image depends only on its own seed.
"""
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ambient_fast.sampling.graphs import StaticDenoiser
from ambient_fast.kernels import fused_device, sampler_step
from ambient_fast.options import SOLVERS

Denoiser = Callable[[Tensor, Tensor], Tensor]          # (x, t) -> prediction of x0
Increment = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x, t, dt) -> change of x over dt
Step = Callable[[Tensor, Tensor, Tensor, bool], Tensor]  # (x, t_hat, t_next, heun) -> x at t_next


def edm_sigma_steps(num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                    dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """EDM's noise levels t_0 > ... > t_{N-1} = sigma_min, with t_N = 0 appended: (num_steps + 1,)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    i = torch.arange(num_steps, dtype=dtype, device=device)
    denominator = max(num_steps - 1, 1)
    t = (sigma_max ** (1 / rho) + i / denominator * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros_like(t[:1])])


@dataclass(frozen=True)
class Churn:
    """EDM's stochastic churn (Karras et al. 2022, Algorithm 2): before step i, the noise level t_i is
    raised to t_hat = (1 + gamma) t_i with fresh noise, gamma = min(S_churn / N, sqrt(2) - 1) for t_i
    in [S_min, S_max]. S_churn = 0 is deterministic. `randn_like(x)` is the noise source: pass
    `PerSeedGenerators.randn_like` to keep each image independent of its batch."""

    S_churn: float = 0.0
    S_min: float = 0.0
    S_max: float = float("inf")
    S_noise: float = 1.0
    randn_like: Callable[[Tensor], Tensor] = torch.randn_like

    def gamma(self, t: float, num_steps: int) -> float:
        """The churn of a step at noise level t (a host float: comparing device values would wait)."""
        return min(self.S_churn / num_steps, math.sqrt(2) - 1) if self.S_churn and self.S_min <= t <= self.S_max else 0.0


def edm_solve(step: Step, x: Tensor, t_steps: Tensor, t_host: Sequence[float], solver: str, churn: Churn,
              on_noise: Optional[Callable[[Tensor], None]] = None) -> Tensor:
    """EDM's sampling loop: churn, then one solver step, from t_steps[0] down to t_steps[-1] = 0.

    Args:
        step: advances x from t_hat to t_next, by Heun when its flag is set, else Euler.
        x: (B, C, H, W) state at t_steps[0].
        t_steps: (N + 1,) noise levels on x's device; t_host: the same levels as host floats.
        solver: "heun" (2nd order, Euler on the last step) or "euler".
        churn: EDM's churn; `on_noise(x)` is told of each state it has noised (the fused path keeps
            the network's input in step with it).
    """
    num_steps = len(t_steps) - 1
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        gamma = churn.gamma(t_host[i], num_steps)
        t_hat = t_cur + gamma * t_cur if gamma > 0 else t_cur
        if gamma > 0:
            x = x + (t_hat ** 2 - t_cur ** 2).sqrt() * churn.S_noise * churn.randn_like(x)
            if on_noise is not None:
                on_noise(x)
        x = step(x, t_hat, t_next, solver == "heun" and i < num_steps - 1)
    return x


def increment_step(increment: Increment) -> Step:
    """The exact path's step: Euler `x + g1`, or Heun `x + (g1 + g2) / 2` with g1 and g2 the
    increments at the step's start and at its Euler end."""
    def step(x: Tensor, t_hat: Tensor, t_next: Tensor, heun: bool) -> Tensor:
        g1 = increment(x, t_hat, t_next - t_hat)
        if heun:
            return x + (g1 + increment(x + g1, t_next, t_next - t_hat)) / 2
        return x + g1
    return step


def masked_denoiser(net: torch.nn.Module, mask: Tensor, class_labels: Optional[Tensor], clip: bool,
                    dtype: torch.dtype) -> Denoiser:
    """D(x, t) = net(cat([M * x, M]), t, labels)[:, :C] in `dtype`, clamped to [-1, 1] when `clip`:
    the ambient model's E[x0 | M x_t, M] for the mask M (B, C, H, W)."""
    channels = mask.shape[1]

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        out = net(torch.cat([mask * x, mask], dim=1), t, class_labels)[:, :channels].to(dtype)
        return out.clamp(-1, 1) if clip else out
    return denoise


def fixed_mask_increment(denoise: Denoiser) -> Increment:
    """dt * (x - D(x, t)) / t: the probability-flow ODE's step with D in place of E[x0 | x_t]."""
    return lambda x, t, dt: dt * (x - denoise(x, t)) / t


def guidance_increment(denoisers: Sequence[Denoiser], guidance: float) -> Increment:
    """The fixed-mask increment of denoisers[0] minus w * grad_x E(x, t), reconstruction guidance's
    energy E = K * sum_j 0.5 ||D_0 - D_j||^2 over the K denoisers (one per mask), through autograd."""
    def increment(x: Tensor, t: Tensor, dt: Tensor) -> Tensor:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            d0 = denoisers[0](x, t)
            energy = len(denoisers) * sum(0.5 * (d0 - denoise(x, t)).square().sum() for denoise in denoisers[1:])
            (grad,) = torch.autograd.grad(energy, x)
        return dt * (x.detach() - d0.detach()) / t - guidance * grad
    return increment


def fused_solve(net: torch.nn.Module, x: Tensor, mask: Tensor, t_steps: Tensor, t_host: Sequence[float],
                solver: str, churn: Churn, class_labels: Optional[Tensor], clip: bool, fast: bool) -> Tensor:
    """The fixed-mask sampler with the elementwise work of each evaluation in one kernel
    (`sampler_step`), which also writes the next network input cat([M * x, M]) in place. With
    `fast`, the network runs in bf16 from a `StaticDenoiser` (captured in a CUDA graph on GPUs)."""
    channels = x.shape[1]
    # In the network's memory format, so that its first convolution reads it as it is.
    net_input = torch.cat([mask * x, mask], dim=1).float().contiguous(memory_format=memory_format(net))
    if fast:  # one captured graph per network and shape, reused by later calls
        evaluate = StaticDenoiser.cached(net, net_input, class_labels, use_graph=x.is_cuda)
        net_input = evaluate.net_input
    else:
        def evaluate(t: Tensor) -> Tensor:
            return net(net_input, t, class_labels)[:, :channels]

    def step(x: Tensor, t_hat: Tensor, t_next: Tensor, heun: bool) -> Tensor:
        dt, fixed = t_next - t_hat, dict(clip=clip, net_input=net_input, write_mask=False)
        if not heun:
            return sampler_step(x, evaluate(t_hat), mask, t_hat, dt, **fixed).x
        g1 = sampler_step(x, evaluate(t_hat), mask, t_hat, dt, stage="heun_predict", **fixed).g1
        return sampler_step(x, evaluate(t_next), mask, t_next, dt, stage="heun_correct", g1=g1, **fixed).x

    def on_noise(noised: Tensor) -> None:
        net_input[:, :channels] = mask * noised

    return edm_solve(step, x, t_steps, t_host, solver, churn, on_noise)


def ambient_sample(
    net: torch.nn.Module,
    latents: torch.Tensor,
    masks: torch.Tensor,
    *,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    solver: str = "heun",
    guidance: float = 0.0,
    class_labels: Optional[torch.Tensor] = None,
    clip: bool = True,
    dtype: torch.dtype = torch.float64,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = float("inf"),
    S_noise: float = 1.0,
    randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    fast: bool = False,
) -> torch.Tensor:
    """Sample from an ambient model with a fixed mask (K = 1) or with reconstruction guidance (K > 1).

    Args:
        net: ambient denoiser, `net(cat([M * x, M]) (B, 2C, H, W), sigma, class_labels)` whose first C
            output channels are the denoised image.
        latents: (B, C, H, W) standard normal latents, one per image (per seed).
        masks: (K, B, C, H, W) 0/1 masks. Mask 0 drives the update; masks 1..K-1 the guidance term.
        num_steps, sigma_min, sigma_max, rho: EDM's noise-level discretisation.
        solver: "heun" (2nd order, Euler on the last step) or "euler".
        guidance: scale w of the reconstruction-guidance gradient; 0 disables it (and autograd).
        class_labels: (B, label_dim) or None.
        clip: clamp every prediction to [-1, 1] (the reference's default).
        dtype: dtype of the sampler state (float64 like the reference, or float32).
        S_churn, S_min, S_max, S_noise: EDM's stochastic churn; S_churn = 0 is deterministic.
        randn_like: noise source for churn; pass `PerSeedGenerators.randn_like` to keep images
            independent of their batch.
        fast: the fast path (fixed mask, no churn): float32 state, the network in bf16, its call
            captured in a CUDA graph on GPUs, the elementwise work of each step fused. Off: the
            reference-faithful path.
    Returns:
        (B, C, H, W) samples in `dtype`: the last step's prediction D_0.
    """
    check_sampler_arguments(latents, solver)
    if masks.ndim != 5 or masks.shape[1:] != latents.shape:
        raise ValueError(f"masks must have shape (K, *latents.shape) = (K, {', '.join(map(str, latents.shape))}), "
                         f"got {tuple(masks.shape)}")
    if fast:
        if guidance != 0 or S_churn != 0:
            raise ValueError("the fast path samples with a fixed mask and no churn; use fast=False (--exact) "
                             "for reconstruction guidance or churn")
        dtype = torch.float32
    masks = masks.to(device=latents.device, dtype=dtype)
    t_steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, dtype=dtype, device=latents.device)
    # The churn decisions read the noise levels on the host, computed there: comparing the device's
    # would wait for the GPU at every step.
    t_host = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, dtype=torch.float64).tolist()
    churn = Churn(S_churn, S_min, S_max, S_noise, randn_like)
    x = latents.to(dtype) * t_steps[0]
    with torch.no_grad():
        # Fused elementwise steps: always on the fast path; on the exact path where the kernels run
        # (CUDA), with the reference's arithmetic in the state's dtype.
        if fast or (guidance == 0 and fused_device(x.device)):
            return fused_solve(net, x, masks[0], t_steps, t_host, solver, churn, class_labels, clip, fast)
        denoisers = [masked_denoiser(net, mask, class_labels, clip, dtype) for mask in masks]
        if guidance != 0 and len(masks) > 1:
            increment = guidance_increment(denoisers, guidance)
        else:
            increment = fixed_mask_increment(denoisers[0])
        return edm_solve(increment_step(increment), x, t_steps, t_host, solver, churn)


def check_sampler_arguments(latents: Tensor, solver: str) -> None:
    """The checks every sampler makes before any work: a known solver, 4-D latents."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if latents.ndim != 4:
        raise ValueError(f"latents must be 4-D (B, C, H, W), got shape {tuple(latents.shape)}")


def memory_format(net: torch.nn.Module) -> torch.memory_format:
    """channels_last if the network's convolution weights are stored so, else contiguous."""
    weight = next((p for p in net.parameters() if p.ndim == 4), None)
    if weight is not None and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class PerSeedGenerators:
    """One CPU torch.Generator per image, seeded from its seed (as EDM's StackedRandomGenerator): an
    image's latents, its masks and then its churn noise all come from its own stream, so an image
    depends only on its seed, never on the batch or the rank it ran in.

    Args:
        seeds: one integer per image of the batch.
    """

    def __init__(self, seeds: Sequence[int]):
        self.generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]

    def sampling_inputs(self, shape: Sequence[int], num_masks: int, survival: float, shared_channels: bool,
                        device) -> "tuple[Tensor, Tensor]":
        """Latents (B, C, H, W) and dust masks (K, B, C, H, W) keeping each value (each pixel, if
        `shared_channels`) with probability `survival`."""
        channels, height, width = shape
        latents, masks = [], []
        for generator in self.generators:
            latents.append(torch.randn(shape, generator=generator))
            mask_shape = (num_masks, 1 if shared_channels else channels, height, width)
            mask = (torch.rand(mask_shape, generator=generator) < survival).float()
            masks.append(mask.expand(num_masks, channels, height, width))
        return torch.stack(latents).to(device), torch.stack(masks, dim=1).to(device)

    def randn_like(self, x: Tensor) -> Tensor:
        """Standard normal noise of x's shape, dtype and device, image i's from generator i."""
        if len(x) != len(self.generators):
            raise ValueError(f"{len(self.generators)} generators for a batch of {len(x)} images")
        noise = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype) for g in self.generators])
        if x.is_cuda:  # a copy from pinned memory does not wait for the GPU's queue
            noise = noise.pin_memory()
        return noise.to(x.device, non_blocking=True)


def seeded_inputs(seeds, shape, num_masks: int, survival: float, shared_channels: bool, device):
    """Latents (B, C, H, W) and dust masks (K, B, C, H, W), each image's drawn from its own seed only
    (`PerSeedGenerators.sampling_inputs` of fresh generators)."""
    return PerSeedGenerators(seeds).sampling_inputs(shape, num_masks, survival, shared_channels, device)


def sampling_sigmas(loaded, sigma_min: float = 0.002, sigma_max: float = 80.0) -> dict:
    """EDM's sampling range for a loaded network (`ambient_fast.files.checkpoints.LoadedNetwork`, or
    any record with `model` and `sigma_floor`), as keyword arguments of the samplers: clipped to the
    noise levels the model covers (its `sigma_min` / `sigma_max` where it has them: a discrete
    schedule of a diffusers model covers e.g. 0.01..157) and to the lowest level it was trained at
    (`sigma_floor`, recorded by the trainer: a model trained only on images with noise of level
    sigma_n never saw a level below it). Our own EDM and VP models cover EDM's default range, unchanged.

    Below the floor, the documented choice: the sampler stops at the floor, and its last step
    returns the denoiser's output there, E[x0 | x_floor], Tweedie's estimate of the clean image:
    what the training data can support, rather than levels the model never learned."""
    net = loaded.model
    return dict(sigma_min=max(sigma_min, getattr(net, "sigma_min", 0.0), float(loaded.sigma_floor)),
                sigma_max=min(sigma_max, getattr(net, "sigma_max", float("inf"))))
