"""The ambient training objective (Daras et al. 2023, section 3.1), EDM and VP flavours.

Given an observed image `y = A x` (pixels outside A are unknown and never read), its mask A
and a further-corrupted mask `A_hat = B A`, the network sees
`cat([A_hat * (y + sigma n), A_hat])` and is graded on every pixel it is allowed to know:

    loss = weight(sigma) * || A * (D - y) ||^2        (or weight * A * |D - y| for norm=1)

It cannot tell a pixel hidden by B (graded) from one hidden by A (never graded), so it must
predict both: that is what makes the model learn E[x0 | A_hat x_t, A_hat].

B is drawn by the data loader (A_hat given) or here, by `ambient_fast.kernels.ambient_input`
(A_hat None, with delta and a seed): one fused pass on the GPU that draws B and the noise and
writes the network input.

Hidden-pixel weight. The reference weights every pixel of A by weight(sigma). On a pixel that B
hid from the network a mask-aware model predicts D = sigma_data * F, so that weight grades F with
sigma_data^2 weight(sigma), about 1 / sigma^2: huge at low noise. `hidden_weight` (a function of
sigma) replaces the weight on those pixels; `unit_hidden_weight(net)` returns 1 / c_out^2, which
grades F on them with weight 1, as weight(sigma) does on the visible pixels.

Losses are returned per sample (summed over pixels, not over the batch); the caller reduces.
"""
from typing import Callable, NamedTuple, Optional

import torch

from ambient_fast.kernels import ambient_input, masked_loss
from ambient_fast.nn.precond import vp_sigma

WeightFn = Callable[[torch.Tensor], torch.Tensor]  # sigma (N, 1, 1, 1) -> weight (N, 1, 1, 1)


class AmbientLossTerms(NamedTuple):
    """Per-sample terms, each (N,) float32.

    train: error on the pixels the network saw (A_hat), the reference's `train_loss`.
    val: error on every observed pixel (A); this is the objective (`loss`), the reference's `val_loss`.
    test: error on all pixels against the clean image, only when the caller has one (synthetic
        data, evaluation); the reference computed it against the clean images it was handed.
    """

    train: torch.Tensor
    val: torch.Tensor
    test: Optional[torch.Tensor]

    @property
    def loss(self) -> torch.Tensor:
        """The optimised objective, per sample."""
        return self.val


class AmbientLoss:
    """Shared body of the ambient losses; subclasses draw sigma and its weight."""

    def __init__(self, norm: int = 2, hidden_weight: Optional[WeightFn] = None):
        if norm not in (1, 2):
            raise ValueError(f"norm must be 1 (L1) or 2 (L2), got {norm!r}")
        self.norm = norm
        self.hidden_weight = hidden_weight  # None: weight(sigma) on every pixel of A, as the reference

    def sample_sigma(self, n: int, device, generator: Optional[torch.Generator] = None):
        """(sigma, weight), each (n, 1, 1, 1) float32."""
        raise NotImplementedError

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, net, y: torch.Tensor, A: torch.Tensor, A_hat: Optional[torch.Tensor], *,
                 labels: Optional[torch.Tensor] = None, augment_labels: Optional[torch.Tensor] = None,
                 sigma: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None, clean: Optional[torch.Tensor] = None,
                 delta: Optional[float] = None, shared_channels: bool = False,
                 seed: Optional[int] = None) -> AmbientLossTerms:
        """Evaluate the ambient loss on one batch.

        Args:
            net: preconditioned ambient denoiser, `net(x (N, 2C, H, W), sigma (N,), labels, augment_labels)`.
            y: (N, C, H, W) observed images `A * x` in [-1, 1]; values outside A are ignored.
            A: (N, C, H, W) 0/1 mask of observed pixels.
            A_hat: (N, C, H, W) further-corrupted mask, A_hat <= A; None: B is drawn here from
                (delta, shared_channels, seed), together with the noise.
            labels, augment_labels: conditioning passed to `net`.
            sigma: (N,) noise levels; drawn from the training distribution when None.
            noise: (N, C, H, W) standard normal noise (scaled by sigma here); drawn when None.
                Must be None when A_hat is None.
            generator: random source for sigma, and for the noise when A_hat is given.
            clean: (N, C, H, W) clean images, only for the `test` diagnostic.
            delta, shared_channels, seed: the further corruption B when A_hat is None (see
                `ambient_fast.kernels.ambient_input`).
        """
        shapes = [tuple(t.shape) for t in (y, A, A_hat) if t is not None]
        if len(set(shapes)) != 1 or y.ndim != 4:
            raise ValueError(f"y, A and A_hat must share one (N, C, H, W) shape; got {shapes}")
        if A_hat is None and (delta is None or seed is None or noise is not None):
            raise ValueError("without A_hat the loss draws B and the noise itself: pass delta and seed, not noise")
        n = y.shape[0]
        if sigma is None:
            sigma, weight = self.sample_sigma(n, y.device, generator)
        else:
            sigma = sigma.to(device=y.device, dtype=torch.float32).reshape(-1, 1, 1, 1)
            weight = self.weight(sigma)
        if A_hat is None:  # one pass: B, noise, A * y and the network input
            drawn = ambient_input(y, A, sigma.flatten(), delta=delta, seed=seed, shared_channels=shared_channels)
            net_input, A_hat, A, y = drawn.net_input, drawn.A_hat, drawn.A, drawn.y
        else:
            if noise is None:
                noise = torch.randn(y.shape, device=y.device, generator=generator)
            y = A * y  # nothing outside A may reach the network or the loss
            net_input = torch.cat([A_hat * (y + sigma * noise), A_hat], dim=1)
        D = net(net_input, sigma.flatten(), labels, augment_labels)[:, : y.shape[1]]
        # masked_loss: one fused pass on GPU (loss and its gradient)
        if self.hidden_weight is None:
            train, val = masked_loss(D.detach(), y, A_hat, weight, self.norm), masked_loss(D, y, A, weight, self.norm)
        else:
            visible = masked_loss(D, y, A_hat, weight, self.norm)
            train, val = visible.detach(), visible + masked_loss(D, y, A - A_hat, self.hidden_weight(sigma), self.norm)
        return AmbientLossTerms(
            train=train,  # a diagnostic: no gradient
            val=val,
            test=None if clean is None else _sum_per_sample(weight * self._error(D, clean)),
        )

    def _error(self, D: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (D - target).square() if self.norm == 2 else (D - target).abs()


def _sum_per_sample(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).sum(1)


class EDMAmbientLoss(AmbientLoss):
    """EDM flavour: ln(sigma) ~ N(P_mean, P_std^2), weight (sigma^2 + sd^2) / (sigma sd)^2."""

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5, norm: int = 2,
                 hidden_weight: Optional[WeightFn] = None):
        super().__init__(norm, hidden_weight)
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def sample_sigma(self, n, device, generator=None):
        sigma = (torch.randn([n, 1, 1, 1], device=device, generator=generator) * self.P_std + self.P_mean).exp()
        return sigma, self.weight(sigma)

    def weight(self, sigma):
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2


class VPAmbientLoss(AmbientLoss):
    """VP flavour: sigma = sigma_VP(t), t uniform in [epsilon_t, 1], weight 1 / sigma^2."""

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, epsilon_t: float = 1e-5, norm: int = 2,
                 hidden_weight: Optional[WeightFn] = None):
        super().__init__(norm, hidden_weight)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.epsilon_t = epsilon_t

    def sample_sigma(self, n, device, generator=None):
        u = torch.rand([n, 1, 1, 1], device=device, generator=generator)
        sigma = vp_sigma(1 + u * (self.epsilon_t - 1), self.beta_d, self.beta_min)
        return sigma, self.weight(sigma)

    def weight(self, sigma):
        return 1 / sigma ** 2


class DiscreteVPAmbientLoss(AmbientLoss):
    """A discrete-time VP model's flavour (a diffusers UNet through `DiffusersDenoiser`): sigma drawn
    uniformly from the noise levels of its T training timesteps, with one of two weightings:

    x0:  weight 1 on the x0 error on every pixel of A (the authors' DeepFloyd fine-tuning script:
         uniform timesteps, mean squared error of the x0 prediction);
    snr: weight 1 / sigma^2 (the signal-to-noise ratio) on the pixels the network saw, which for an
         epsilon model is the squared error of the predicted noise (diffusers' usual objective), and
         1 on the pixels B hid, where the network's output is the x0 prediction itself.
    """

    WEIGHTINGS = ("x0", "snr")

    def __init__(self, sigmas: torch.Tensor, weighting: str = "x0", norm: int = 2):
        if weighting not in self.WEIGHTINGS:
            raise ValueError(f"weighting must be one of {self.WEIGHTINGS}, got {weighting!r}")
        super().__init__(norm, hidden_weight=torch.ones_like if weighting == "snr" else None)
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32).flatten()
        if len(sigmas) < 1 or not (sigmas > 0).all():
            raise ValueError("the schedule's noise levels must be positive")
        self.sigmas = sigmas
        self.weighting = weighting

    def sample_sigma(self, n, device, generator=None):
        index = torch.randint(len(self.sigmas), (n,), device=device, generator=generator)
        sigma = self.sigmas.to(device)[index].reshape(n, 1, 1, 1)
        return sigma, self.weight(sigma)

    def weight(self, sigma):
        return torch.ones_like(sigma) if self.weighting == "x0" else 1 / sigma ** 2


def unit_hidden_weight(net) -> WeightFn:
    """The hidden-pixel weight 1 / c_out^2 of preconditioned model `net` (an AmbientPrecond): it
    grades the network's raw output F on pixels hidden by B with weight 1."""
    def weight(sigma: torch.Tensor) -> torch.Tensor:
        return net.hidden_output_scale(sigma).reciprocal().square()
    return weight
