"""Preconditioning of ambient denoisers (EDM and VP; EDM2 with its log-variance head), and building
models from reference configs.

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

from .edm2 import Block, EDM2UNet, MPConv, MPFourier
from .layers import UNetBlock, check_gate
from .unets import ARCHITECTURES


def edm_coefficients(sigma: torch.Tensor, sigma_data: float):
    """EDM's (c_skip, c_out, c_in, c_noise) for sigma of shape (N, 1, 1, 1), as EDM and EDM2 compute them."""
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (sigma_data ** 2 + sigma ** 2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def mask_aware_image(image: torch.Tensor, mask: torch.Tensor, F_image: torch.Tensor, c_skip: torch.Tensor,
                     c_out: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """The denoised image under mask-aware preconditioning: where the mask is 1 the usual
    `c_skip * image + c_out * F`; where it is 0 (the input carries nothing) `sigma_data * F`."""
    return mask * (c_skip * image) + (mask * c_out + (1 - mask) * sigma_data) * F_image


def conditioning_labels(class_labels: Optional[torch.Tensor], label_dim: int, device) -> Optional[torch.Tensor]:
    """Class labels as the networks take them: None for an unconditional model, the all-zeros label
    (1, label_dim) when none are given, else float32 (N, label_dim)."""
    if label_dim == 0:
        return None
    if class_labels is None:
        return torch.zeros([1, label_dim], device=device)
    return class_labels.to(torch.float32).reshape(-1, label_dim)


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
        class_labels = conditioning_labels(class_labels, self.label_dim, x.device)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)

        if not self.mask_aware:
            F_x = self.model(c_in * x, c_noise.flatten(), class_labels, augment_labels)
            return c_skip * x + c_out * F_x.to(torch.float32)

        channels = self.img_channels // 2
        image, mask = x[:, :channels], x[:, channels:]
        F_x = self.model(torch.cat([c_in * image, mask], dim=1), c_noise.flatten(), class_labels, augment_labels)
        F_x = F_x.to(torch.float32)
        F_image, F_mask = F_x[:, :channels], F_x[:, channels:]
        d_image = mask_aware_image(image, mask, F_image, c_skip, c_out, self.sigma_data)
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
        return edm_coefficients(sigma, self.sigma_data)


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


class EDM2Precond(torch.nn.Module):
    """EDM2's preconditioning around `EDM2UNet` (Karras et al. 2024), with its log-variance head: the
    uncertainty u(sigma) = logvar_linear(logvar_fourier(c_noise)) by which EDM2's loss weights each
    noise level. The coefficients are EDM's (`edm_coefficients`).

    Two input layouts:
    - plain (`ambient=False`, the reference's): x is the noisy image (N, C, R, R) and img_channels = C;
      the forward is NVlabs/edm2's `Precond.forward`, and a reference state dict loads strictly.
    - ambient (`ambient=True`): x = cat([A_hat * (y + n), A_hat]) (N, 2C, R, R) and img_channels = 2C,
      as our other models take it. The U-Net reads both halves and predicts the C image channels; the
      output is cat([D_image, A_hat]), so callers keep [:, :C] as with `AmbientPrecond`. `mask_aware`
      (the default) gives hidden pixels c_skip = 0 and c_out = sigma_data and leaves the mask channels
      unscaled; otherwise EDM's coefficients apply to the whole input, as in the reference's ambient models.

    The precision is the caller's (autocast): unlike the reference there is no `use_fp16` switch.
    Parameters may be stored in float16 (an imported snapshot): every weight is normalised in float32
    and, as in the reference, a float16 gain is divided by sqrt(fan_in) in float16.
    """

    def __init__(self,
        img_resolution: int,            # Image resolution.
        img_channels: int,              # Input channels: C (plain) or 2C, image and mask (ambient).
        label_dim: int = 0,             # Number of class labels, 0 = unconditional.
        sigma_data: float = 0.5,        # Expected standard deviation of the data.
        logvar_channels: int = 128,     # Fourier features of the log-variance head.
        ambient: bool = False,          # Input cat([A_hat * x, A_hat]) (ours) instead of the image alone.
        mask_aware: bool = True,        # Ambient only: mask-aware coefficients (new models) or EDM's on all.
        **model_kwargs,                 # EDM2UNet's arguments; the rest take the reference's defaults.
    ):
        if ambient and img_channels % 2:
            raise ValueError(f"an ambient model takes image and mask channels: img_channels must be even (2C), "
                             f"got {img_channels}")
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.sigma_data = sigma_data
        self.logvar_channels = logvar_channels
        self.ambient = ambient
        self.mask_aware = mask_aware
        self.model_kwargs = edm2_unet_arguments(model_kwargs)
        out_channels = img_channels // 2 if ambient else img_channels
        self.unet = EDM2UNet(img_resolution=img_resolution, in_channels=img_channels, out_channels=out_channels,
                             label_dim=label_dim, **self.model_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1)

    @property
    def model(self) -> EDM2UNet:
        """The U-Net, under the name `training.parallel` reads (the state dict names it `unet`)."""
        return self.unet

    def coefficients(self, sigma: torch.Tensor):
        """(c_skip, c_out, c_in, c_noise) for sigma of shape (N, 1, 1, 1), float32."""
        return edm_coefficients(sigma, self.sigma_data)

    def hidden_output_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """c_out on an image pixel whose mask is 0: sigma_data (ambient, mask-aware) or c_out(sigma)."""
        if self.ambient and self.mask_aware:
            return torch.full_like(sigma, self.sigma_data)
        return self.coefficients(sigma)[1].expand_as(sigma)

    def blocks(self) -> "list[torch.nn.Module]":
        """The units torch.compile and FSDP treat one by one: the U-Net's blocks."""
        return [module for module in self.unet.modules() if isinstance(module, Block)]

    def normalize_weights_(self) -> None:
        """Forced weight normalisation of every MPConv as a step of its own, for a trainer that calls it
        before each training forward and turns it off inside the forward (`normalize_in_forward(False)`):
        whole compiled graphs, the same arithmetic (see MPConv)."""
        for module in self.modules():
            if isinstance(module, MPConv):
                module.normalize_weight_()

    def normalize_in_forward(self, enabled: bool) -> None:
        """Whether each training-mode forward normalises the weights in place first (the reference's way)."""
        for module in self.modules():
            if isinstance(module, MPConv):
                module.normalize_in_forward = enabled

    @property
    def config(self) -> dict:
        """Everything needed to rebuild this model with `build_model` (JSON-serialisable; every U-Net
        argument is recorded, defaults included)."""
        own = {name: getattr(self, name) for name in _accepted(type(self))}
        return dict(precond=type(self).__name__, **own, **self.model_kwargs)

    def describe(self) -> str:
        params = sum(p.numel() for p in self.parameters())
        layout = f"ambient, {'mask-aware' if self.mask_aware else 'reference'} preconditioning" if self.ambient else "plain"
        return f"EDM2 U-Net ({params / 1e6:.2f} M parameters, {layout})"

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                augment_labels: Optional[torch.Tensor] = None, return_logvar: bool = False):
        """Denoise.

        Args:
            x: (N, img_channels, R, R): the noisy image (plain) or cat([A_hat * (y + n), A_hat]) (ambient).
            sigma: (N,) or scalar noise levels.
            class_labels: (N, label_dim) one-hot or None (the all-zeros label for a conditional model).
            augment_labels: must be None (EDM2 has no augmentation conditioning).
            return_logvar: also return the log-variance u(sigma) (N or 1, 1, 1, 1).
        Returns:
            D (N, img_channels, R, R) float32 (ambient: the first C channels are the denoised image), or
            (D, logvar) with return_logvar.
        """
        if augment_labels is not None:
            raise ValueError("EDM2 networks take no augmentation labels")
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        class_labels = conditioning_labels(class_labels, self.label_dim, x.device)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        c_noise = c_noise.flatten()
        if not self.ambient:
            D = c_skip * x + c_out * self.unet(c_in * x, c_noise, class_labels).to(torch.float32)
        else:
            channels = self.img_channels // 2
            image, mask = x[:, :channels], x[:, channels:]
            net_input = torch.cat([c_in * image, mask if self.mask_aware else c_in * mask], dim=1)
            F_image = self.unet(net_input, c_noise, class_labels).to(torch.float32)
            if self.mask_aware:
                d_image = mask_aware_image(image, mask, F_image, c_skip, c_out, self.sigma_data)
            else:
                d_image = c_skip * image + c_out * F_image
            D = torch.cat([d_image, mask], dim=1)
        if not return_logvar:
            return D
        return D, self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)


def edm2_unet_arguments(model_kwargs: Mapping) -> dict:
    """EDM2UNet's arguments: the given ones over the reference's defaults (sequences as lists), so
    that a config records the whole architecture. Unknown names are an error."""
    parameters = inspect.signature(EDM2UNet.__init__).parameters
    accepted = _accepted(EDM2UNet, exclude=("img_resolution", "in_channels", "out_channels", "label_dim"))
    unknown = sorted(set(model_kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"unknown EDM2 network argument(s) {unknown}; accepted: {accepted}")
    resolved = {name: model_kwargs.get(name, parameters[name].default) for name in accepted}
    return {name: list(value) if isinstance(value, tuple) else value for name, value in resolved.items()}


PRECONDITIONERS = {"EDMPrecond": EDMPrecond, "VPPrecond": VPPrecond, "EDM2Precond": EDM2Precond}
REFERENCE_PRECONDITIONERS = ("EDMPrecond", "VPPrecond")  # what build_reference_model builds (Ambient Diffusion's)


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
    if precond_name not in REFERENCE_PRECONDITIONERS:
        raise ValueError(f"unsupported preconditioning {precond_name!r}; supported: {list(REFERENCE_PRECONDITIONERS)}")
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


def edm2_from_reference(init_kwargs: Mapping, state_dict: Mapping[str, torch.Tensor]) -> EDM2Precond:
    """A model of NVlabs/edm2, with its weights, ready to evaluate.

    `init_kwargs`: the reference `Precond`'s constructor keywords (a snapshot's `_init_kwargs` holds only
    those passed; the others take the reference's defaults, which are ours). `use_fp16` is dropped: the
    precision is the caller's (autocast). The state dict loads strictly, each tensor kept in the dtype it
    is stored in (a snapshot's float16, evaluated as the reference evaluates it). Plain input (the image
    alone), eval mode; `model(x, sigma, class_labels, return_logvar=False)` as the reference's.
    """
    kwargs = {key: value for key, value in init_kwargs.items() if key != "use_fp16"}
    missing = [key for key in ("img_resolution", "img_channels", "label_dim") if key not in kwargs]
    if missing:
        raise ValueError(f"EDM2 constructor keywords lack {missing}: a reference Precond always receives them")
    model = EDM2Precond(**kwargs)
    # assign keeps each tensor's dtype; the copies keep the caller's tensors out of the model (training
    # mode rewrites its weights in place).
    model.load_state_dict({key: value.detach().clone() for key, value in state_dict.items()}, strict=True, assign=True)
    return model.eval()
