"""Preconditioning of ambient denoisers (EDM and VP), and building models from reference configs.

An ambient model sees `x = cat([A_hat * (y + n), A_hat])`: C image channels and C mask
channels (`img_channels = 2C`, as in the reference). The denoiser is
`D(x) = c_skip * x + c_out * F(c_in * x, c_noise)` and the caller keeps `D[:, :C]`.

Two variants of the same coefficients:
- reference (`mask_aware=False`): applied to the whole 2C-channel input, exactly as the
  published checkpoints expect.
- mask-aware (`mask_aware=True`, the default for new models): where the mask is 0 the input
  carries nothing, so there `c_skip = 0` and `c_out = sigma_data`, and the mask channels
  enter the network unscaled. Under the reference variant a hidden pixel is
  `D = c_out(sigma) * F`, so the network has to output `target / c_out`, about 500x the
  target at the sampler's last level (sigma = 0.002); untrained that far, hidden pixels come
  out grey (REFERENCE.md section 3). The mask-aware form keeps the target of order one.
"""
import inspect
from typing import Mapping, Optional

import torch

from .layers import UNetBlock, check_gate
from .unets import ARCHITECTURES


class AmbientPrecond(torch.nn.Module):
    """Shared forward of the preconditioners; subclasses give the coefficients."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, sigma_data: float,
                 mask_aware: bool, model_type: str, gate: str, model_kwargs: dict):
        if model_type not in ARCHITECTURES:
            raise ValueError(f"model_type must be one of {sorted(ARCHITECTURES)}, got {model_type!r}")
        if img_channels % 2:
            raise ValueError(f"an ambient model takes image and mask channels: img_channels must be even (2C), got {img_channels}")
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.sigma_data = sigma_data
        self.mask_aware = mask_aware
        self.model_type = model_type
        self.gate = gate
        self.model_kwargs = dict(model_kwargs)
        self.model = ARCHITECTURES[model_type](
            img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels,
            label_dim=label_dim, gate=check_gate(gate), **model_kwargs)

    def coefficients(self, sigma: torch.Tensor):
        """(c_skip, c_out, c_in, c_noise) for sigma of shape (N, 1, 1, 1), float32."""
        raise NotImplementedError

    def hidden_output_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """c_out on an image pixel whose mask is 0: sigma_data (mask-aware) or c_out(sigma)."""
        if self.mask_aware:
            return torch.full_like(sigma, self.sigma_data)
        return self.coefficients(sigma)[1].expand_as(sigma)

    def blocks(self) -> "list[torch.nn.Module]":
        """The units torch.compile and FSDP treat one by one: the U-Net's blocks."""
        return [module for module in self.model.modules() if isinstance(module, UNetBlock)]

    @property
    def config(self) -> dict:
        """Everything needed to rebuild this model with `build_model` (JSON-serialisable)."""
        own = {name: getattr(self, name) for name in _accepted(type(self), exclude=("model_type", "gate"))}
        return dict(precond=type(self).__name__, model_type=self.model_type, gate=self.gate, **own,
                    **self.model_kwargs)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                augment_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Denoise.

        Args:
            x: (N, 2C, R, R) masked noisy image and mask, `cat([A_hat * (y + n), A_hat])`.
            sigma: (N,) or scalar noise levels.
            class_labels: (N, label_dim) one-hot or None (zeros for a conditional model).
            augment_labels: (N, augment_dim) or None.
        Returns:
            (N, 2C, R, R) float32; the first C channels are the denoised image.
        """
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)

        if not self.mask_aware:
            F_x = self.model(c_in * x, c_noise.flatten(), class_labels, augment_labels)
            return c_skip * x + c_out * F_x.to(torch.float32)

        channels = self.img_channels // 2
        image, mask = x[:, :channels], x[:, channels:]
        F_x = self.model(torch.cat([c_in * image, mask], dim=1), c_noise.flatten(), class_labels, augment_labels)
        F_x = F_x.to(torch.float32)
        F_image, F_mask = F_x[:, :channels], F_x[:, channels:]
        # Observed pixels: the usual coefficients. Hidden pixels: c_skip = 0, c_out = sigma_data.
        d_image = mask * (c_skip * image) + (mask * c_out + (1 - mask) * self.sigma_data) * F_image
        d_mask = c_skip * mask + c_out * F_mask  # carries no meaning; kept so the output has 2C channels
        return torch.cat([d_image, d_mask], dim=1)


class EDMPrecond(AmbientPrecond):
    """EDM preconditioning (Karras et al. 2022) for ambient models."""

    def __init__(self,
        img_resolution: int,               # Image resolution.
        img_channels: int,                 # 2C: image channels plus mask channels.
        label_dim: int = 0,                # Number of class labels, 0 = unconditional.
        sigma_min: float = 0,              # Smallest supported noise level.
        sigma_max: float = float("inf"),   # Largest supported noise level.
        sigma_data: float = 0.5,           # Expected standard deviation of the data.
        mask_aware: bool = True,           # Mask-aware coefficients (new models) or the reference's.
        model_type: str = "DhariwalUNet",  # 'SongUNet' (DDPM++/NCSN++) or 'DhariwalUNet' (ADM).
        gate: str = "sigmoid",             # Gate of the convolutions: 'sigmoid', 'double_sigmoid' or 'none'.
        **model_kwargs,                    # Architecture arguments.
    ):
        super().__init__(img_resolution, img_channels, label_dim, sigma_data, mask_aware, model_type, gate, model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def coefficients(self, sigma):
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


class VPPrecond(AmbientPrecond):
    """Variance-preserving preconditioning (Song et al. 2021) for ambient models."""

    def __init__(self,
        img_resolution: int,             # Image resolution.
        img_channels: int,               # 2C: image channels plus mask channels.
        label_dim: int = 0,              # Number of class labels, 0 = unconditional.
        beta_d: float = 19.9,            # Extent of the noise level schedule.
        beta_min: float = 0.1,           # Initial slope of the noise level schedule.
        M: int = 1000,                   # Number of timesteps of the original DDPM formulation.
        epsilon_t: float = 1e-5,         # Smallest t used in training.
        sigma_data: float = 0.5,         # Scale of hidden pixels under the mask-aware variant.
        mask_aware: bool = True,         # Mask-aware coefficients (new models) or the reference's.
        model_type: str = "SongUNet",    # 'SongUNet' (DDPM++/NCSN++) or 'DhariwalUNet' (ADM).
        gate: str = "sigmoid",           # Gate of the convolutions: 'sigmoid', 'double_sigmoid' or 'none'.
        **model_kwargs,                  # Architecture arguments.
    ):
        super().__init__(img_resolution, img_channels, label_dim, sigma_data, mask_aware, model_type, gate, model_kwargs)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        self.sigma_min = float(vp_sigma(epsilon_t, beta_d, beta_min))
        self.sigma_max = float(vp_sigma(1, beta_d, beta_min))

    def coefficients(self, sigma):
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return c_skip, c_out, c_in, c_noise

    def sigma_inv(self, sigma: torch.Tensor) -> torch.Tensor:
        """t such that sigma(t) = sigma."""
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d


def vp_sigma(t, beta_d: float, beta_min: float) -> torch.Tensor:
    """The VP schedule sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    t = torch.as_tensor(t)
    return ((0.5 * beta_d * t ** 2 + beta_min * t).exp() - 1).sqrt()


PRECONDITIONERS = {"EDMPrecond": EDMPrecond, "VPPrecond": VPPrecond}


def _accepted(cls, exclude=()) -> list:
    """Names of the constructor arguments of `cls`, in signature order."""
    return [name for name in inspect.signature(cls.__init__).parameters
            if name not in ("self", "model_kwargs", *exclude)]


def build_model(config: Mapping) -> AmbientPrecond:
    """Build (without weights) the model described by `AmbientPrecond.config`."""
    config = dict(config)
    name = config.pop("precond", None)
    if name not in PRECONDITIONERS:
        raise ValueError(f"model config names preconditioning {name!r}; expected one of {sorted(PRECONDITIONERS)}")
    return PRECONDITIONERS[name](**config)


def build_reference_model(config: Mapping) -> AmbientPrecond:
    """Build (without weights) the model an EDM-style constructor dict describes, in
    reference-compatible mode: reference preconditioning, and the double-sigmoid gate when
    the config says `gated` (the reference's default).

    `config` holds the reference constructor's keys: `img_resolution`, `img_channels`
    (2C), `label_dim`, `model_type`, the architecture's arguments, `gated`, and optionally
    `class_name` (`training.networks.EDMPrecond` or `...VPPrecond`). Keys it does not know
    (`precond`, `sample_*`, `param_count`, `use_fp16`, ...) are ignored.
    """
    missing = [key for key in ("img_resolution", "img_channels") if key not in config]
    if missing:
        raise ValueError(f"reference config lacks {missing}; it needs at least img_resolution and img_channels (2C)")
    precond_name = str(config.get("class_name", "EDMPrecond")).rsplit(".", 1)[-1]
    if precond_name not in PRECONDITIONERS:
        raise ValueError(f"unsupported preconditioning {precond_name!r}; supported: {sorted(PRECONDITIONERS)}")
    precond_cls = PRECONDITIONERS[precond_name]
    model_type = config.get("model_type", inspect.signature(precond_cls.__init__).parameters["model_type"].default)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type must be one of {sorted(ARCHITECTURES)}, got {model_type!r}")

    precond_keys = _accepted(precond_cls, exclude=("mask_aware", "gate", "model_type"))
    arch_keys = _accepted(ARCHITECTURES[model_type],
                          exclude=("img_resolution", "in_channels", "out_channels", "label_dim", "gate"))
    kwargs = {key: config[key] for key in [*precond_keys, *arch_keys] if key in config}
    gate = "double_sigmoid" if config.get("gated", True) else "none"
    return precond_cls(**kwargs, model_type=model_type, gate=gate, mask_aware=False)


def from_reference(config: Mapping, state_dict: Mapping[str, torch.Tensor]) -> AmbientPrecond:
    """A model of the reference implementation, with its weights, ready to evaluate.

    Builds the model `config` describes in reference-compatible mode (see
    `build_reference_model`), loads `state_dict` strictly (keys exactly as the published
    checkpoints name them) and returns it in eval mode.
    `model(x (N, 2C, R, R), sigma (N,), class_labels=None, augment_labels=None)` returns all
    2C output channels, like the reference; callers keep the first C.
    """
    model = build_reference_model(config)
    model.load_state_dict(dict(state_dict), strict=True)
    return model.eval()
