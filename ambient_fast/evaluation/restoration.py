"""One-step restoration (the paper's Table 1 use of a model) and its perceptual distance.

The model, trained to predict E[x0 | A x_t, A], is shown the observed pixels and their mask at a
small noise level sigma and returns the whole image in one network evaluation.
"""
from typing import Optional

import torch


def restore(model, observed: torch.Tensor, mask: torch.Tensor, sigma: float, labels=None,
            generator: Optional[torch.Generator] = None, add_noise: bool = False) -> torch.Tensor:
    """One-step restoration.

    Args:
        model: ambient denoiser (2C input channels).
        observed: (N, C, H, W) observed images in [-1, 1], 0 outside the mask.
        mask: (N, C, H, W) 0/1.
        sigma: noise level the network is evaluated at (the measurement noise when `add_noise`).
        add_noise: add N(0, sigma^2) to the observed pixels first (noisy measurements).
    Returns:
        (N, C, H, W) restored images clamped to [-1, 1].
    """
    y = mask * observed
    if add_noise:
        y = y + mask * sigma * torch.randn(y.shape, generator=generator, device=y.device)
    sigmas = torch.full((y.shape[0],), sigma, device=y.device)
    with torch.no_grad():
        out = model(torch.cat([y, mask], dim=1), sigmas, labels)[:, : y.shape[1]]
    return out.clamp(-1, 1)


def lpips_distance(images: torch.Tensor, references: torch.Tensor):
    """(mean LPIPS, None) or (None, why it could not be computed)."""
    try:
        import lpips
    except ImportError:
        return None, "the lpips package is not installed (pip install lpips)"
    try:
        metric = lpips.LPIPS(net="alex", verbose=False)
    except Exception as error:  # its weights come from a download; offline there are none
        return None, f"lpips could not load its weights locally ({type(error).__name__}: {error})"
    with torch.no_grad():
        return metric(images.float().cpu(), references.float().cpu()).mean().item(), None
