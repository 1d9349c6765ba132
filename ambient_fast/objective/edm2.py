"""EDM2's training objective on top of ours (Karras et al., CVPR 2024, section 2 and appendix):
its noise-level distribution and its uncertainty weighting by the network's log-variance head.

Noise levels. EDM2 keeps EDM's log-normal ln(sigma) ~ N(P_mean, P_std^2) and EDM's weight
(sigma^2 + sigma_data^2) / (sigma sigma_data)^2, with other constants per data set (NVlabs/edm2
`train_edm2.py`'s presets): (P_mean, P_std) = (-0.8, 1.6) for ImageNet-64 in pixels and (-0.4, 1.0) for
ImageNet-512 in SD-VAE latents (also `EDM2Loss`'s own default, and Ambient-o's latent runs). They are
`EDMSchedule`'s parameters here, so every restriction of the distribution (sigma_above, windows)
applies unchanged; `EDM2_NOISE_LEVELS` names them and `edm2_noise_levels` picks pixels or latents.

Uncertainty weighting. EDM2's loss per value is weight(sigma) (D - y)^2 / exp(u(sigma)) + u(sigma), with
u the log-variance head (`EDM2Precond(..., return_logvar=True)`), summed over the image's values: the
head learns the log of the expected weighted error at each level, and dividing by it keeps every level's
contribution to the gradient of order one whatever its difficulty. Our per-image ambient loss already
sums weight(sigma) (D - y)^2 over the values it grades (those of A; the hidden-pixel weight on the
ones B hid), so the same objective is `uncertainty_weighted(loss, logvar, graded)` with graded the
number of values graded per image: u then learns the log of the mean error per graded value, the same
quantity as in EDM2, and a masked image (fewer graded values) weighs as its values do, not more.
"""
from typing import Union

import torch

from ambient_fast.data.batches import RawBatch
from ambient_fast.objective.objective import AmbientObjective, EDMSchedule, NoiseSchedule, TrainingBatch, graded_loss

# (P_mean, P_std) of EDM2's presets: ImageNet-64 in pixels, ImageNet-512 in SD-VAE latents.
EDM2_NOISE_LEVELS = {"pixels": (-0.8, 1.6), "latents": (-0.4, 1.0)}


def edm2_noise_levels(latent: bool) -> "tuple[float, float]":
    """EDM2's (P_mean, P_std) for a pixel set (its ImageNet-64 preset) or a latent one (ImageNet-512's)."""
    return EDM2_NOISE_LEVELS["latents" if latent else "pixels"]


def edm2_schedule(latent: bool, **options) -> EDMSchedule:
    """Our EDM noise schedule with EDM2's level distribution for pixels or latents (module docstring);
    `options` are EDMSchedule's other arguments (sigma_data, hidden_weight)."""
    P_mean, P_std = edm2_noise_levels(latent)
    return EDMSchedule(P_mean=P_mean, P_std=P_std, **options)


def uncertainty_weighted(loss: torch.Tensor, logvar: torch.Tensor, graded: Union[torch.Tensor, float]) -> torch.Tensor:
    """EDM2's uncertainty-weighted loss per image, from our per-image ambient loss.

    Args:
        loss: (N,) the per-image loss, the weighted squared error summed over the graded values.
        logvar: (N,) or (N, 1, 1, 1) the log-variance head's u(sigma) of each image.
        graded: (N,) or a number: how many values each image's loss sums over (C*H*W for a clean image;
            the values of A for a masked one).
    Returns:
        (N,) float32: loss / exp(u) + graded * u, EDM2's per-value objective summed over those values.
    """
    logvar = logvar.reshape(-1).to(torch.float32)
    graded = torch.as_tensor(graded, dtype=torch.float32, device=loss.device)
    return loss.to(torch.float32) * torch.exp(-logvar) + graded * logvar


def edm2_loss(model, batch: TrainingBatch, schedule: NoiseSchedule, norm: int = 2) -> torch.Tensor:
    """Each image's EDM2 objective (N,) float32 on a TrainingBatch (`ambient_loss`'s counterpart): the
    ambient loss of the network's output, uncertainty-weighted by its log-variance head at the image's
    level (module docstring), graded over the values of A.

    Args:
        model: an ambient `EDM2Precond`, `model(x (N, 2C, H, W), sigma (N,), labels, return_logvar=True)`.
        batch: from `AmbientObjective.inputs`, or `training_batch` for given tensors.
        schedule: lambda and the hidden weight; norm: 2 (squared error) or 1 (absolute error).
    """
    D, logvar = model(batch.net_input, batch.sigma, batch.labels, return_logvar=True)
    loss = graded_loss(D, batch, schedule, norm)
    return uncertainty_weighted(loss, logvar, batch.A.sum((1, 2, 3)))


class EDM2Objective(AmbientObjective):
    """The ambient objective of an EDM2 network (`EDM2Precond`, ambient layout): the same draws as
    `AmbientObjective`, graded by `edm2_loss`. `objective(model, raw)` is each image's objective (N,)
    float32."""

    def __call__(self, model, raw: RawBatch) -> torch.Tensor:
        return edm2_loss(model, self.inputs(raw), self.schedule, self.norm)
