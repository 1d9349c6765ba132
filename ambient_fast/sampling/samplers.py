"""Samplers for ambient models (Daras et al. 2023, section 3.2): EDM's Euler / Heun solver with a
fixed mask, optionally with reconstruction guidance from further masks.

The model was trained to predict E[x0 | A_hat x_t, A_hat]; the fixed-mask sampler uses that, for
one mask M_0 drawn once, in place of E[x0 | x_t]. Reconstruction guidance adds the gradient of
`K * sum_j 0.5 ||D_0(x, t) - D_j(x, t)||^2` over the other masks, which pulls the predictions
made from different masks together (the factor K and the sum over the whole batch are the
reference's, and its published samples depend on them).

Everything here is a pure function of its inputs: latents, masks and the churn noise source
decide the result, so each image depends only on its own seed.
"""
import math
from typing import Callable, Optional

import torch

from ambient_fast.sampling.graphs import StaticDenoiser
from ambient_fast.kernels import fused_device, sampler_step
from ambient_fast.options import SOLVERS


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
        randn_like: noise source for churn; pass a per-seed generator to keep images independent of
            their batch.
        fast: the fast path (fixed mask, no churn): float32 state, the network in bf16, its call
            captured in a CUDA graph on GPUs, the elementwise work of each step fused. Off: the
            reference-faithful path.
    Returns:
        (B, C, H, W) samples in `dtype`: the last step's prediction D_0.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if masks.ndim != 5 or masks.shape[1:] != latents.shape:
        raise ValueError(f"masks must have shape (K, *latents.shape) = (K, {', '.join(map(str, latents.shape))}), "
                         f"got {tuple(masks.shape)}")
    if fast:
        if guidance != 0 or S_churn != 0:
            raise ValueError("the fast path samples with a fixed mask and no churn; use fast=False (--exact) "
                             "for reconstruction guidance or churn")
        dtype = torch.float32
    channels = latents.shape[1]
    masks = masks.to(device=latents.device, dtype=dtype)
    use_guidance = guidance != 0 and masks.shape[0] > 1
    t_steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, dtype=dtype, device=latents.device)

    def denoise(x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = net(torch.cat([mask * x, mask], dim=1), t, class_labels)[:, :channels].to(dtype)
        return out.clamp(-1, 1) if clip else out

    def increment(x: torch.Tensor, t: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        """dt * (x - D_0(x, t)) / t, minus w * grad_x E(x, t) when guidance is on."""
        if not use_guidance:
            return dt * (x - denoise(x, t, masks[0])) / t
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            d0 = denoise(x, t, masks[0])
            energy = masks.shape[0] * sum(0.5 * (d0 - denoise(x, t, m)).square().sum() for m in masks[1:])
            (grad,) = torch.autograd.grad(energy, x)
        return dt * (x.detach() - d0.detach()) / t - guidance * grad

    def fused_step(x: torch.Tensor, t_hat: torch.Tensor, t_next: torch.Tensor, heun: bool) -> torch.Tensor:
        """The same step with its elementwise work in one kernel per evaluation; `net_input` holds
        cat([M * x, M]) and is updated in place, `evaluate(t)` predicts from it."""
        dt, mask = t_next - t_hat, masks[0]
        if not heun:
            return sampler_step(x, evaluate(t_hat), mask, t_hat, dt, clip=clip, net_input=net_input,
                                write_mask=False).x
        g1 = sampler_step(x, evaluate(t_hat), mask, t_hat, dt, stage="heun_predict", clip=clip,
                          net_input=net_input, write_mask=False).g1
        return sampler_step(x, evaluate(t_next), mask, t_next, dt, stage="heun_correct", g1=g1, clip=clip,
                            net_input=net_input, write_mask=False).x

    x = latents.to(dtype) * t_steps[0]
    # Fused elementwise steps: always on the fast path; on the exact path where the kernels run (CUDA),
    # with the reference's arithmetic in the state's dtype.
    fused = fast or (guidance == 0 and fused_device(x.device))
    net_input = None
    if fused:  # in the network's memory format, so that its first convolution reads it as it is
        net_input = torch.cat([masks[0] * x, masks[0]], dim=1).float().contiguous(memory_format=memory_format(net))

    def evaluate_in_place(t: torch.Tensor) -> torch.Tensor:
        return net(net_input, t, class_labels)[:, :channels]

    evaluate = evaluate_in_place
    if fast:  # one captured graph per network and shape, reused by later calls
        evaluate = StaticDenoiser.cached(net, net_input, class_labels, use_graph=x.is_cuda)
        net_input = evaluate.net_input
    # The churn decisions read the noise levels on the host, computed there: comparing the device's
    # would wait for the GPU at every step.
    t_host = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, dtype=torch.float64).tolist()
    with torch.no_grad():
        for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
            gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_churn and S_min <= t_host[i] <= S_max else 0.0
            t_hat = t_cur + gamma * t_cur if gamma > 0 else t_cur
            if gamma > 0:
                x = x + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x)
                if fused:
                    net_input[:, :channels] = masks[0] * x
            if fused:
                x = fused_step(x, t_hat, t_next, solver == "heun" and i < num_steps - 1)
                continue
            g1 = increment(x, t_hat, t_next - t_hat)
            if solver == "heun" and i < num_steps - 1:
                x = x + (g1 + increment(x + g1, t_next, t_next - t_hat)) / 2
            else:
                x = x + g1
    return x


def memory_format(net: torch.nn.Module) -> torch.memory_format:
    """channels_last if the network's convolution weights are stored so, else contiguous."""
    weight = next((p for p in net.parameters() if p.ndim == 4), None)
    if weight is not None and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format

def seeded_inputs(seeds, shape, num_masks: int, survival: float, shared_channels: bool, device):
    """Latents (B, C, H, W) and dust masks (K, B, C, H, W), each image's drawn from its own seed only."""
    channels, height, width = shape
    latents, masks = [], []
    for seed in seeds:
        generator = torch.Generator().manual_seed(int(seed))
        latents.append(torch.randn(shape, generator=generator))
        mask_shape = (num_masks, 1 if shared_channels else channels, height, width)
        mask = (torch.rand(mask_shape, generator=generator) < survival).float()
        masks.append(mask.expand(num_masks, channels, height, width))
    return torch.stack(latents).to(device), torch.stack(masks, dim=1).to(device)


def sampling_sigmas(net, sigma_floor: float = 0.0, sigma_min: float = 0.002, sigma_max: float = 80.0) -> dict:
    """EDM's sampling range clipped to the noise levels `net` covers (its `sigma_min` / `sigma_max`
    where it has them: a discrete schedule of a diffusers model covers e.g. 0.01..157) and to the
    lowest level it was trained at (`sigma_floor`, recorded by the trainer: a model trained only on
    images with noise of level sigma_n never saw a level below it), as keyword arguments of
    `ambient_sample`. Our own EDM and VP models cover EDM's default range, unchanged.

    Below the floor, the documented choice: the sampler stops at the floor, and its last step
    returns the denoiser's output there, E[x0 | x_floor], Tweedie's estimate of the clean image:
    what the training data can support, rather than levels the model never learned."""
    return dict(sigma_min=max(sigma_min, getattr(net, "sigma_min", 0.0), float(sigma_floor)),
                sigma_max=min(sigma_max, getattr(net, "sigma_max", float("inf"))))
