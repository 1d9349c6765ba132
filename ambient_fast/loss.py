"""The ambient training objective (Daras et al. 2023, section 3.1), EDM and VP flavours.

Given an observed image `y = A x` (pixels outside A are unknown and never read), its mask A
and a further-corrupted mask `A_hat = B A`, the network sees
`cat([A_hat * (y + sigma n), A_hat])` and is graded on every pixel it is allowed to know:

    loss = weight(sigma) * || A * (D - y) ||^2        (or weight * A * |D - y| for norm=1)

It cannot tell a pixel hidden by B (graded) from one hidden by A (never graded), so it must
predict both: that is what makes the model learn E[x0 | A_hat x_t, A_hat].

The batch comes from `ambient_fast.inputs` (a `TrainingBatch`: the network input, y, A, A_hat and
sigma, every draw made there from the run's counter-based streams); the loss only grades. Its
noise-level distribution is the loss's own, applied to the Philox words `sigma_from_words` gets.

Hidden-pixel weight. The reference weights every pixel of A by weight(sigma). On a pixel that B
hid from the network a mask-aware model predicts D = sigma_data * F, so that weight grades F with
sigma_data^2 weight(sigma), about 1 / sigma^2: huge at low noise. `hidden_weight` (a function of
sigma) replaces the weight on those pixels; `unit_hidden_weight(net)` returns 1 / c_out^2, which
grades F on them with weight 1, as weight(sigma) does on the visible pixels.

Losses are returned per sample (summed over pixels, not over the batch); the caller reduces.
"""
from typing import Callable, Optional, Tuple

import torch

from ambient_fast.inputs import TrainingBatch
from ambient_fast.kernels import masked_loss
from ambient_fast.nn.precond import vp_sigma
from ambient_fast.seeds import BITS, bits24, box_muller, uniform

WeightFn = Callable[[torch.Tensor], torch.Tensor]  # sigma (N, 1, 1, 1) -> weight (N, 1, 1, 1)
Words = Tuple[torch.Tensor, torch.Tensor]  # two (N,) Philox words per image (ambient_fast.seeds)


class AmbientLoss:
    """Shared body of the ambient losses; subclasses give the noise-level distribution and its weight."""

    def __init__(self, norm: int = 2, hidden_weight: Optional[WeightFn] = None):
        if norm not in (1, 2):
            raise ValueError(f"norm must be 1 (L1) or 2 (L2), got {norm!r}")
        self.norm = norm
        self.hidden_weight = hidden_weight  # None: weight(sigma) on every pixel of A, as the reference

    def sigma_from_words(self, words: Words) -> torch.Tensor:
        """(N,) float32 noise levels of the training distribution from two Philox words per image."""
        raise NotImplementedError

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, net, batch: TrainingBatch, augment_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The per-sample objective (N,) float32 of one batch.

        Args:
            net: preconditioned ambient denoiser, `net(x (N, 2C, H, W), sigma (N,), labels, augment_labels)`.
            batch: from `ambient_fast.inputs` (`AmbientInputs`, or `training_batch` for given tensors).
            augment_labels: passed to `net`.
        """
        C = batch.y.shape[1]
        sigma = batch.sigma.reshape(-1, 1, 1, 1)
        weight = self.weight(sigma)
        D = net(batch.net_input, batch.sigma, batch.labels, augment_labels)[:, :C]
        # masked_loss: one fused pass on GPU (loss and its gradient)
        if self.hidden_weight is None:
            return masked_loss(D, batch.y, batch.A, weight, self.norm)
        return (masked_loss(D, batch.y, batch.A_hat, weight, self.norm)
                + masked_loss(D, batch.y, batch.A - batch.A_hat, self.hidden_weight(sigma), self.norm))


class EDMAmbientLoss(AmbientLoss):
    """EDM flavour: ln(sigma) ~ N(P_mean, P_std^2), weight (sigma^2 + sd^2) / (sigma sd)^2."""

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5, norm: int = 2,
                 hidden_weight: Optional[WeightFn] = None):
        super().__init__(norm, hidden_weight)
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def sigma_from_words(self, words):
        return (box_muller(words[1], words[0]) * self.P_std + self.P_mean).exp()

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

    def sigma_from_words(self, words):
        u = uniform(words[0])
        return vp_sigma(1 + u * (self.epsilon_t - 1), self.beta_d, self.beta_min)

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

    def sigma_from_words(self, words):
        index = (bits24(words[0]) * len(self.sigmas)) >> BITS  # uniform over the timesteps
        return self.sigmas.to(words[0].device)[index]

    def weight(self, sigma):
        return torch.ones_like(sigma) if self.weighting == "x0" else 1 / sigma ** 2


def unit_hidden_weight(net) -> WeightFn:
    """The hidden-pixel weight 1 / c_out^2 of preconditioned model `net` (an AmbientPrecond): it
    grades the network's raw output F on pixels hidden by B with weight 1."""
    def weight(sigma: torch.Tensor) -> torch.Tensor:
        return net.hidden_output_scale(sigma).reciprocal().square()
    return weight
