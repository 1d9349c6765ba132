"""EDM2's sampler (NVlabs/edm2 `generate_images.edm_sampler`, guidance 1) for networks that take the
image alone, such as an imported EDM2 snapshot: EDM's Heun discretisation with EDM2's defaults (32
steps, a float32 state, no clipping of the predictions). It is our `ambient_sample` with a mask of ones,
the plain network seen through `PlainDenoiser`; the reference's images are reproduced within 1.2e-6
(../shared/fixtures/edm2_tiny, tests/test_edm2.py). Autoguidance (EDM2's second, weaker network) is
not provided.
"""
from typing import Optional

import torch

from ambient_fast.sampling.samplers import ambient_sample


def plain_denoiser(net: torch.nn.Module) -> "PlainDenoiser":
    """The PlainDenoiser of `net`, made once and kept on it: the fast path's CUDA graphs are cached per
    module (`ambient_fast.sampling.graphs`), so every call must pass the same wrapper, or each would
    capture its graph anew. Kept outside the module tree (no submodule, nothing in its state dict); the
    reference cycle net -> wrapper -> net is garbage-collected with the network."""
    wrapper = net.__dict__.get("_plain_denoiser")
    if wrapper is None:
        wrapper = PlainDenoiser(net)
        object.__setattr__(net, "_plain_denoiser", wrapper)  # plain attribute, not nn.Module's registration
    return wrapper


class PlainDenoiser(torch.nn.Module):
    """A denoiser of the image alone, `net(x (N, C, H, W), sigma, class_labels)`, behind the ambient
    interface: it takes cat([A_hat * x, A_hat]) (N, 2C, H, W), passes the image half and ignores the mask
    (the sampler keeps it at ones)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.img_channels = 2 * net.img_channels
        self.img_resolution = net.img_resolution
        self.label_dim = net.label_dim

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                augment_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.net(x[:, :self.net.img_channels], sigma, class_labels, augment_labels)


def edm2_sample(net: torch.nn.Module, noise: torch.Tensor, class_labels: Optional[torch.Tensor] = None, *,
                num_steps: int = 32, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                dtype: torch.dtype = torch.float32, **options) -> torch.Tensor:
    """Sample with EDM2's defaults.

    Args:
        net: a plain denoiser, `net(x (N, C, H, W), sigma, class_labels)` (an `EDM2Precond` with
            `ambient=False`).
        noise: (N, C, H, W) standard normal latents, one per image (per seed).
        class_labels: (N, label_dim) or None.
        num_steps, sigma_min, sigma_max, rho: EDM's noise-level discretisation; dtype: the state's dtype.
        options: further keywords of `ambient_sample` (S_churn and its companions, solver, fast: its CUDA
            graph is captured at the first call and replayed by later ones of the same shapes).
    Returns:
        (N, C, H, W) samples in `dtype`.
    """
    masks = torch.ones((1, *noise.shape), dtype=dtype, device=noise.device)
    return ambient_sample(plain_denoiser(net), noise, masks, num_steps=num_steps, sigma_min=sigma_min,
                          sigma_max=sigma_max, rho=rho, class_labels=class_labels, clip=False, dtype=dtype, **options)
