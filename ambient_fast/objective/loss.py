"""The ambient training objective (Daras et al. 2023, section 3.1), EDM and VP flavours.

Given an observed image `y = A x` (pixels outside A are unknown and never read), its mask A
and a further-corrupted mask `A_hat = B A`, the network sees
`cat([A_hat * (y + sigma n), A_hat])` and is graded on every pixel it is allowed to know:

    loss = weight(sigma) * || A * (D - y) ||^2        (or weight * A * |D - y| for norm=1)

It cannot tell a pixel hidden by B (graded) from one hidden by A (never graded), so it must
predict both: that is what makes the model learn E[x0 | A_hat x_t, A_hat].

The batch comes from `ambient_fast.objective.inputs` (a `TrainingBatch`: the network input, the target y, A,
A_hat, sigma and a weight per image, every draw made there from the run's counter-based streams);
the loss only grades. The noise-level distribution is the loss's own: `sigma_above` draws from it
restricted to the levels above an image's bound (a noisy image trains only above its own noise
level), by the inverse of its tail function, and says how much of the distribution lies there.

Hidden-pixel weight. The reference weights every pixel of A by weight(sigma). On a pixel that B
hid from the network a mask-aware model predicts D = sigma_data * F, so that weight grades F with
sigma_data^2 weight(sigma), about 1 / sigma^2: huge at low noise. `hidden_weight` (a function of
sigma) replaces the weight on those pixels; `unit_hidden_weight(net)` returns 1 / c_out^2, which
grades F on them with weight 1, as weight(sigma) does on the visible pixels.

Losses are returned per sample (summed over pixels, not over the batch); the caller reduces.
"""
from typing import Callable, Optional

import torch

from ambient_fast.objective.inputs import TrainingBatch
from ambient_fast.kernels import masked_loss
from ambient_fast.networks.precond import vp_sigma
from ambient_fast.options import FINETUNE_WEIGHTINGS

WeightFn = Callable[[torch.Tensor], torch.Tensor]  # sigma (N, 1, 1, 1) -> weight (N, 1, 1, 1)


class AmbientLoss:
    """Shared body of the ambient losses; subclasses give the noise-level distribution and its weight."""

    def __init__(self, norm: int = 2, hidden_weight: Optional[WeightFn] = None):
        if norm not in (1, 2):
            raise ValueError(f"norm must be 1 (L1) or 2 (L2), got {norm!r}")
        self.norm = norm
        self.hidden_weight = hidden_weight  # None: weight(sigma) on every pixel of A, as the reference

    def tail(self, sigma: torch.Tensor) -> torch.Tensor:
        """P(a training noise level > sigma), float64, for float64 sigma >= 0."""
        raise NotImplementedError

    def upper_quantile(self, q: torch.Tensor) -> torch.Tensor:
        """The level whose tail is q (float64 in (0, 1]), float64: tail(upper_quantile(q)) = q."""
        raise NotImplementedError

    def sigma_above(self, bound: torch.Tensor, u: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
        """(sigma float32 (N,), mass float64 (N,)): a level of the training distribution restricted to
        levels above `bound` (N,) (0: no restriction), drawn by the inverse tail at the uniform u (N,)
        in (0, 1), and the mass P(level > bound) of that restriction. Tails rather than distribution
        functions keep the precision where the bound leaves little mass."""
        mass = self.tail(bound.to(torch.float64))
        return self.upper_quantile(mass * (1 - u.to(torch.float64))).to(torch.float32), mass

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, net, batch: TrainingBatch, augment_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The per-sample objective (N,) float32 of one batch.

        Args:
            net: preconditioned ambient denoiser, `net(x (N, 2C, H, W), sigma (N,), labels, augment_labels)`.
            batch: from `ambient_fast.objective.inputs` (`AmbientInputs`, or `training_batch` for given tensors).
            augment_labels: passed to `net`.
        """
        C = batch.y.shape[1]
        sigma = batch.sigma.reshape(-1, 1, 1, 1)
        scale = batch.weight.reshape(-1, 1, 1, 1)
        weight = self.weight(sigma) * scale
        D = net(batch.net_input, batch.sigma, batch.labels, augment_labels)[:, :C]
        # masked_loss: one fused pass on GPU (loss and its gradient)
        if self.hidden_weight is None:
            return masked_loss(D, batch.y, batch.A, weight, self.norm)
        return (masked_loss(D, batch.y, batch.A_hat, weight, self.norm)
                + masked_loss(D, batch.y, batch.A - batch.A_hat, self.hidden_weight(sigma) * scale, self.norm))


class EDMAmbientLoss(AmbientLoss):
    """EDM flavour: ln(sigma) ~ N(P_mean, P_std^2), weight (sigma^2 + sd^2) / (sigma sd)^2."""

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5, norm: int = 2,
                 hidden_weight: Optional[WeightFn] = None):
        super().__init__(norm, hidden_weight)
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def tail(self, sigma):
        return torch.special.ndtr(-(sigma.log() - self.P_mean) / self.P_std)

    def upper_quantile(self, q):
        return (self.P_mean - self.P_std * torch.special.ndtri(q)).exp()

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

    def tail(self, sigma):
        # t(sigma), the inverse of sigma(t): 0.5 beta_d t^2 + beta_min t = ln(1 + sigma^2)
        t = (torch.sqrt(self.beta_min ** 2 + 2 * self.beta_d * torch.log1p(sigma ** 2)) - self.beta_min) / self.beta_d
        return ((1 - t.clamp(min=self.epsilon_t)) / (1 - self.epsilon_t)).clamp(0, 1)

    def upper_quantile(self, q):
        return vp_sigma(1 - q * (1 - self.epsilon_t), self.beta_d, self.beta_min)

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

    WEIGHTINGS = FINETUNE_WEIGHTINGS

    def __init__(self, sigmas: torch.Tensor, weighting: str = "x0", norm: int = 2):
        if weighting not in self.WEIGHTINGS:
            raise ValueError(f"weighting must be one of {self.WEIGHTINGS}, got {weighting!r}")
        super().__init__(norm, hidden_weight=torch.ones_like if weighting == "snr" else None)
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32).flatten()
        if len(sigmas) < 1 or not (sigmas > 0).all():
            raise ValueError("the schedule's noise levels must be positive")
        self.sigmas = sigmas
        self.sorted_sigmas = sigmas.double().sort().values
        self.weighting = weighting

    def tail(self, sigma):
        levels = self.sorted_sigmas.to(sigma.device)
        return (len(levels) - torch.searchsorted(levels, sigma, right=True)).to(torch.float64) / len(levels)

    def upper_quantile(self, q):
        # The levels are equally likely: q's share of them counted from the top.
        levels = self.sorted_sigmas.to(q.device)
        rank = (q * len(levels)).floor().long().clamp(0, len(levels) - 1)
        return levels[len(levels) - 1 - rank]

    def weight(self, sigma):
        return torch.ones_like(sigma) if self.weighting == "x0" else 1 / sigma ** 2


def unit_hidden_weight(net) -> WeightFn:
    """The hidden-pixel weight 1 / c_out^2 of preconditioned model `net` (an AmbientPrecond): it
    grades the network's raw output F on pixels hidden by B with weight 1."""
    def weight(sigma: torch.Tensor) -> torch.Tensor:
        return net.hidden_output_scale(sigma).reciprocal().square()
    return weight
