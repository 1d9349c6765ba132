"""The ambient training objective (Daras et al. 2023, section 3.1; noisy images as in Ambient-o), in
one place: everything a training step computes from a batch as stored (`RawBatch`, what the loaders
deliver) up to each image's loss. `AmbientObjective(model, raw)` is the whole of it.

What the network sees and what it is graded on. Given an observed image `y = A x` (pixels outside A
are unknown and never read), its mask A and a further-corrupted mask `A_hat = B A`, the network sees
`cat([A_hat * (y + sigma n), A_hat])` and is graded on every pixel it is allowed to know:

    loss = weight * lambda(sigma) * || A * (D - y) ||^2        (or weight * lambda * A * |D - y|, norm=1)

It cannot tell a pixel hidden by B (graded) from one hidden by A (never graded), so it must predict
both: that is what makes the model learn E[x0 | A_hat x_t, A_hat] (Theorem 4.1 of the paper, given
the operator's full-rank condition: ambient_fast.objective.corruption).

The draws, each a function of the image's position in the run (ambient_fast.objective.seeds):
- its own Philox words (IMAGE stream) give its noise level sigma and the words of its further
  corruption. sigma comes from the schedule's distribution (`NoiseSchedule`) restricted to the levels
  the image may train at: above its noise level sigma_n (a noisy image) and its sigma_min (an image
  marked as degraded in a way we do not model), and below its sigma_max in a set with noise-level
  windows (a crop: `ambient_fast.objective.windows`, whose docstring gives the weights); every level
  for the others. It is drawn by the inverse of the distribution's tail function, which also says how
  much of the distribution lies there (tails rather than distribution functions keep the precision
  where the bound leaves little mass);
- the data set's mask operator (`ambient_fast.objective.corruption.training_operator`: the paper's B
  for its kind of masks, or an allowed `--further` override) turns those words into B: a coin per
  value, or one box per image (placed relative to A's own box for fixed_box and keep_patch); images
  whose A hides nothing (clean, or only noisy) get none;
- `ambient_fast.kernels.ambient_input` then unpacks, mirrors, scales, corrupts and noises every value
  in one pass (ELEMENT stream), writing the network input and the target, A and A_hat. On the fused
  path the per-image draws above are one kernel too (`ambient_fast.kernels.image_draws`, bitwise the
  PyTorch path written here), so the ambient input is two launches; fixed_box and keep_patch add the
  few dozen small operations that find A's own box and place B beside it.

The objective per image, and why it stays unbiased. Clean images: EDM's loss at every sigma. Masked
ones: the ambient loss. A noisy image (x_n = x0 + sigma_n n1, A x_n if also masked) trains only at
sigma > sigma_n, with x_t = x_n + sqrt(sigma^2 - sigma_n^2) n: its target on the pixels the network
sees is x_n - sigma_n^2 / sqrt(sigma^2 - sigma_n^2) n, whose expectation given x_t is E[x0 | x_t]
(Tweedie's formula applied twice: the same minimiser as Ambient-o's loss on sigma_n^2 / sigma^2 x_t +
(1 - sigma_n^2 / sigma^2) D against x_n, which weighs by sigma^4 / (sigma^2 - sigma_n^2)^2); on pixels
B hid, x_n itself (its expectation given what the network sees is x0's). So at every sigma each
eligible image's target is unbiased for the clean posterior mean, and any weight that depends only on
sigma and the image's record keeps that minimiser. The weights chosen:
- lambda(sigma), the schedule's (EDM: (sigma^2 + sigma_data^2) / (sigma sigma_data)^2; VP: 1 / sigma^2);
- the mixture over sigma is Ambient-o's: draw sigma, then an image among those eligible at sigma.
  Here the image comes first (the loader's order), so its sigma is drawn from the distribution
  restricted to its eligible levels (mass P(sigma > bound)), and the loss is weighted by
  mass / (share of the data set's images eligible at sigma): in expectation exactly that mixture
  (at a level only the clean images reach, they carry all of its weight);
- a noisy image's weight falls off as sigma approaches sigma_n, as ((1 - a) / 0.5)^2 below
  1 - a = 0.5 (sigma < sqrt(2) sigma_n), a = sigma_n^2 / sigma^2: its target's extra noise variance,
  sigma_n^2 / (1 - a), would otherwise be unbounded there.

Hidden-pixel weight. The reference weights every pixel of A by lambda(sigma). On a pixel that B hid
from the network a mask-aware model predicts D = sigma_data * F, so that weight grades F with
sigma_data^2 lambda(sigma), about 1 / sigma^2: huge at low noise. A schedule's `hidden_weight` (a
function of sigma) replaces lambda on those pixels; `unit_hidden_weight(net)` returns 1 / c_out^2,
which grades F on them with weight 1, as lambda(sigma) does on the visible pixels.

Losses are returned per image (summed over pixels, not over the batch); the caller reduces.
"""
from typing import Callable, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ambient_fast import kernels
from ambient_fast.data.batches import RawBatch
from ambient_fast.networks.precond import vp_sigma
from ambient_fast.kernels.image_draws import (DISCRETE_LEVELS, EDM_LEVELS, VP_LEVELS, BoundTable, LevelDistribution,
                                              image_draws)
from ambient_fast.objective.corruption import FurtherDraw, FurtherKind, MaskOperator
from ambient_fast.objective.seeds import Stream, bits24, centred_uniform, philox, stream_key
from ambient_fast.objective.windows import NoiseWindows
from ambient_fast.options import FINETUNE_WEIGHTINGS

__all__ = ["NoiseSchedule", "EDMSchedule", "VPSchedule", "DiscreteVPSchedule", "unit_hidden_weight",
           "TrainingBatch", "training_batch", "ambient_loss", "graded_loss", "AmbientObjective", "FULL_WEIGHT_FROM"]

FULL_WEIGHT_FROM = 0.5  # a noisy image weighs fully where 1 - sigma_n^2 / sigma^2 >= this (module docstring)

WeightFn = Callable[[Tensor], Tensor]  # sigma (N, 1, 1, 1) -> weight (N, 1, 1, 1)


# ----------------------------------------------------------------------------------------------
# Noise schedules: the distribution of sigma and the weight at each sigma


class NoiseSchedule:
    """The training noise levels of one flavour of model: their distribution (`tail` and its inverse
    `upper_quantile`), the weight lambda(sigma) on the pixels the network saw and, optionally, another
    on the pixels B hid (`hidden_weight`; None: lambda there too, as the reference)."""

    def __init__(self, hidden_weight: Optional[WeightFn] = None):
        self.hidden_weight = hidden_weight

    def tail(self, sigma: Tensor) -> Tensor:
        """P(a training noise level > sigma), float64, for float64 sigma >= 0."""
        raise NotImplementedError

    def upper_quantile(self, q: Tensor) -> Tensor:
        """The level whose tail is q (float64 in (0, 1]), float64: tail(upper_quantile(q)) = q."""
        raise NotImplementedError

    def weight(self, sigma: Tensor) -> Tensor:
        """lambda(sigma), of sigma's shape and dtype."""
        raise NotImplementedError

    def level_distribution(self) -> LevelDistribution:
        """The distribution in the form the fused kernel draws from (`ambient_fast.kernels.image_draws`)."""
        raise NotImplementedError

    def sigma_above(self, bound: Tensor, u: Tensor) -> Tuple[Tensor, Tensor]:
        """(sigma float32 (N,), mass float64 (N,)): a level of the distribution restricted to levels
        above `bound` (N,) (0: no restriction), drawn by the inverse tail at the uniform u (N,) in
        (0, 1), and the mass P(level > bound) of that restriction."""
        mass = self.tail(bound.to(torch.float64))
        return self.upper_quantile(mass * (1 - u.to(torch.float64))).to(torch.float32), mass


class EDMSchedule(NoiseSchedule):
    """EDM: ln(sigma) ~ N(P_mean, P_std^2), lambda = (sigma^2 + sd^2) / (sigma sd)^2."""

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5,
                 hidden_weight: Optional[WeightFn] = None):
        super().__init__(hidden_weight)
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data

    def tail(self, sigma):
        return torch.special.ndtr(-(sigma.log() - self.P_mean) / self.P_std)

    def upper_quantile(self, q):
        return (self.P_mean - self.P_std * torch.special.ndtri(q)).exp()

    def weight(self, sigma):
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2

    def level_distribution(self):
        return LevelDistribution(EDM_LEVELS, (self.P_mean, self.P_std))


class VPSchedule(NoiseSchedule):
    """VP: sigma = sigma_VP(t), t uniform in [epsilon_t, 1], lambda = 1 / sigma^2."""

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, epsilon_t: float = 1e-5,
                 hidden_weight: Optional[WeightFn] = None):
        super().__init__(hidden_weight)
        self.beta_d, self.beta_min, self.epsilon_t = beta_d, beta_min, epsilon_t

    def tail(self, sigma):
        # t(sigma), the inverse of sigma(t): 0.5 beta_d t^2 + beta_min t = ln(1 + sigma^2)
        t = (torch.sqrt(self.beta_min ** 2 + 2 * self.beta_d * torch.log1p(sigma ** 2)) - self.beta_min) / self.beta_d
        return ((1 - t.clamp(min=self.epsilon_t)) / (1 - self.epsilon_t)).clamp(0, 1)

    def upper_quantile(self, q):
        return vp_sigma(1 - q * (1 - self.epsilon_t), self.beta_d, self.beta_min)

    def weight(self, sigma):
        return 1 / sigma ** 2

    def level_distribution(self):
        return LevelDistribution(VP_LEVELS, (0.5 * self.beta_d, self.beta_min, 1 - self.epsilon_t))


class DiscreteVPSchedule(NoiseSchedule):
    """A discrete-time VP model's (a diffusers UNet through `DiffusersDenoiser`): sigma drawn uniformly
    from the noise levels of its T training timesteps, with one of two weightings:

    x0:  weight 1 on the x0 error on every pixel of A (the authors' DeepFloyd fine-tuning script:
         uniform timesteps, mean squared error of the x0 prediction);
    snr: weight 1 / sigma^2 (the signal-to-noise ratio) on the pixels the network saw, which for an
         epsilon model is the squared error of the predicted noise (diffusers' usual objective), and
         1 on the pixels B hid, where the network's output is the x0 prediction itself.
    """

    WEIGHTINGS = FINETUNE_WEIGHTINGS

    def __init__(self, sigmas: Tensor, weighting: str = "x0"):
        if weighting not in self.WEIGHTINGS:
            raise ValueError(f"weighting must be one of {self.WEIGHTINGS}, got {weighting!r}")
        super().__init__(hidden_weight=torch.ones_like if weighting == "snr" else None)
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

    def level_distribution(self):
        return LevelDistribution(DISCRETE_LEVELS, (), self.sorted_sigmas)


def unit_hidden_weight(net) -> WeightFn:
    """The hidden-pixel weight 1 / c_out^2 of preconditioned model `net` (an AmbientPrecond): it
    grades the network's raw output F on pixels hidden by B with weight 1."""
    def weight(sigma: Tensor) -> Tensor:
        return net.hidden_output_scale(sigma).reciprocal().square()
    return weight


# ----------------------------------------------------------------------------------------------
# A step's batch on the device


class TrainingBatch(NamedTuple):
    """What the grading takes, on the device. Images float32 (N, C, H, W) unless noted."""

    net_input: Tensor  # (N, 2C, H, W) cat([A_hat * (y + sqrt(sigma^2 - sigma_n^2) n), A_hat])
    y: Tensor          # the target: A * y on [-1, 1], nothing outside A (noisy images: Tweedie's)
    A: Tensor          # the observation mask
    A_hat: Tensor      # B * A, what the network sees
    sigma: Tensor      # (N,) noise levels
    labels: Tensor     # (N, label_dim) one-hot conditioning (label_dim 0 without labels)
    weight: Tensor     # (N,) each image's weight beside lambda (module docstring); 1 in one-kind sets


def training_batch(y: Tensor, A: Tensor, A_hat: Tensor, sigma: Tensor, noise: Tensor,
                   labels: Optional[Tensor] = None) -> TrainingBatch:
    """A TrainingBatch from images, masks and draws given as tensors (tests, benchmarks, the
    reference's host-side data path): y is masked by A, the network input made as the kernel makes
    it. y, A, A_hat, noise: float (N, C, H, W); sigma: (N,); labels: (N, label_dim) or None."""
    shapes = {tuple(t.shape) for t in (y, A, A_hat, noise)}
    if len(shapes) != 1 or y.ndim != 4:
        raise ValueError(f"y, A, A_hat and noise must share one (N, C, H, W) shape; got {sorted(shapes)}")
    y, A, A_hat = (t.to(torch.float32) for t in (y, A, A_hat))
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=y.device).reshape(-1).expand(len(y)).contiguous()
    y = A * y  # nothing outside A may reach the network or the loss
    net_input = kernels.network_input(y, A_hat, sigma, noise.to(torch.float32))
    if labels is None:
        labels = torch.zeros((len(y), 0), device=y.device)
    return TrainingBatch(net_input, y, A, A_hat, sigma, labels, torch.ones_like(sigma))


def ambient_loss(model, batch: TrainingBatch, schedule: NoiseSchedule, norm: int = 2,
                 augment_labels: Optional[Tensor] = None) -> Tensor:
    """Each image's loss (N,) float32 on a TrainingBatch: lambda(sigma) times its weight on the
    pixels of A (the schedule's hidden weight instead where B hid them, if it has one).

    Args:
        model: preconditioned ambient denoiser, `model(x (N, 2C, H, W), sigma (N,), labels, augment_labels)`.
        batch: from `AmbientObjective.inputs`, or `training_batch` for given tensors.
        schedule: lambda and the hidden weight.
        norm: 2 (squared error) or 1 (absolute error).
        augment_labels: passed to `model`.
    """
    return graded_loss(model(batch.net_input, batch.sigma, batch.labels, augment_labels), batch, schedule, norm)


def graded_loss(D: Tensor, batch: TrainingBatch, schedule: NoiseSchedule, norm: int = 2) -> Tensor:
    """`ambient_loss` of the network's output D (N, >= C, H, W) (its first C channels the denoised image)."""
    C = batch.y.shape[1]
    D = D[:, :C]
    sigma = batch.sigma.reshape(-1, 1, 1, 1)
    scale = batch.weight.reshape(-1, 1, 1, 1)
    weight = schedule.weight(sigma) * scale
    # masked_loss: one fused pass on GPU (loss and its gradient)
    if schedule.hidden_weight is None:
        return kernels.masked_loss(D, batch.y, batch.A, weight, norm)
    return (kernels.masked_loss(D, batch.y, batch.A_hat, weight, norm)
            + kernels.masked_loss(D, batch.y, batch.A - batch.A_hat, schedule.hidden_weight(sigma) * scale, norm))


# ----------------------------------------------------------------------------------------------
# The objective


class _KernelTables(NamedTuple):
    distribution: LevelDistribution
    table: BoundTable


class AmbientObjective:
    """The ambient objective of one run (see the module docstring): `objective(model, raw)` is each
    image's loss (N,) float32 for a batch as stored.

    Args:
        schedule: the noise levels sigma is drawn from, and their weights.
        operator: the mask operator whose `further_draw` makes B.
        seed: the run's seed (the IMAGE and ELEMENT streams derive from it).
        shape: (C, R, R) of the data set's images; label_dim: its classes (0: none).
        channels_last: lay the network input out channels_last.
        bounds: every image's lowest usable level, max(sigma_n, sigma_min) (`CorruptedDataset.
            sigma_bounds`; sigma_min alone without Tweedie targets), for the share of images eligible
            at a level; None: all 0. The fused path looks each image's bound up among these: a batch
            whose records are not the set's gets NaN levels (the step is then skipped).
        noise: whether the set holds noisy images (their Tweedie targets); False also trains
            noisy images as if clean (the naive baseline: their sigma_n ignored).
        norm: 2 (squared error) or 1 (absolute error), as `ambient_loss` takes it.
        sigma_max: every image's highest usable level (`CorruptedDataset.sigma_max`, inf: none) in a
            set with noise-level windows, or None. Then each image's level is drawn inside its window
            (`ambient_fast.objective.windows`: the lower bound as above, the mixture weight mass over
            the share of the set whose window holds the level), the batch must carry `sigma_max`, and
            the per-image draws take the PyTorch path on every device (the fused kernel knows lower
            bounds only); the per-value pass stays fused.
    """

    def __init__(self, schedule: NoiseSchedule, operator: MaskOperator, *, seed: int, shape: Tuple[int, int, int],
                 label_dim: int = 0, channels_last: bool = False, bounds: Optional[np.ndarray] = None,
                 noise: bool = False, norm: int = 2, sigma_max: Optional[np.ndarray] = None):
        if norm not in (1, 2):
            raise ValueError(f"norm must be 1 (L1) or 2 (L2), got {norm!r}")
        self.schedule, self.operator, self.noise, self.norm = schedule, operator, bool(noise), norm
        self.shape, self.label_dim, self.channels_last = tuple(shape), int(label_dim), bool(channels_last)
        self.image_key = stream_key(seed, Stream.IMAGE)
        self.value_key = stream_key(seed, Stream.ELEMENT)
        self.bounds = self.windows = None
        self._kernel_tables = {}  # device -> _KernelTables
        if sigma_max is not None:
            low = np.zeros(len(sigma_max)) if bounds is None else bounds
            self.windows = NoiseWindows(schedule, low, sigma_max)
        elif bounds is not None and np.any(bounds > 0):
            self.bounds = torch.from_numpy(np.sort(np.asarray(bounds, np.float64)))
            never = int(np.sum(schedule.tail(self.bounds).numpy() <= 0))
            if never:
                raise ValueError(f"{never} images have a noise level or sigma_min at or above the largest level the "
                                 "schedule trains at: they could never be used; drop them or lower their records")

    def __call__(self, model, raw: RawBatch) -> Tensor:
        """Each image's loss (N,) float32 for a batch as stored (`ambient_loss` of `inputs`)."""
        return ambient_loss(model, self.inputs(raw), self.schedule, self.norm)

    def inputs(self, raw: RawBatch) -> TrainingBatch:
        """The network input and what it is graded against, from a batch as stored: each image's noise
        level, weights, B and one-hot label from its position and its record (one launch on the fused
        path, `ambient_fast.kernels.image_draws`, bitwise the PyTorch here), then every value's."""
        N = raw.observed.shape[0]
        shape = (N, *self.shape)
        device = raw.observed.device
        if N and kernels.use_fused(raw.observed) and self.windows is None:
            spec, on_device = self.operator.further_spec(shape), self._on(device)
            sigma, weight, noise_std, tweedie, drawn, labels = image_draws(
                key=self.image_key, position=raw.position, count=N, device=device, distribution=on_device.distribution,
                table=on_device.table, tweedie=self.noise, further=spec, shape=shape, masked=raw.masked,
                sigma_n=raw.sigma_n, sigma_min=raw.sigma_min, labels=raw.labels, label_dim=self.label_dim)
            if spec is None:  # B placed relative to A's own box: from the kernel's words, here
                further = self.further(raw, drawn, shape)
            elif spec.kind == FurtherKind.COIN:
                further = FurtherDraw(FurtherKind.COIN, drawn, spec.shared_channels)
            else:
                further = FurtherDraw(spec.kind, boxes=drawn)
        else:
            words = philox(self.image_key, raw.position + torch.arange(N, dtype=torch.int64, device=device))
            sigma, weight, noise_std, tweedie = self.noise_levels(raw, centred_uniform(words[0]))
            further = self.further(raw, torch.stack([bits24(words[2]), bits24(words[3])], 1), shape)
            labels = self.one_hot(raw.labels, N, device)
        out = kernels.ambient_input(raw.observed, raw.mask_bits, raw.flips, noise_std, further, key=self.value_key,
                                    offset=raw.position * shape[1] * shape[2] * shape[3],
                                    channels_last=self.channels_last, tweedie=tweedie)
        return TrainingBatch(out.net_input, out.y, out.A, out.A_hat, sigma, labels, weight)

    def further(self, raw: RawBatch, words: Tensor, shape) -> FurtherDraw:
        """B of the batch from the images' words (N, 2) int64 in [0, 2^24), none where A hides nothing."""
        N, _, H, W = shape
        kept = None
        if self.operator.reads_mask:  # where A's own box lies: channel 0 of A, mirrored as the image
            channel0 = kernels.unpack_mask(raw.mask_bits[:, : -(-H * W // 8)], (N, 1, H, W))
            kept = kernels.mirror(channel0, raw.flips)[:, 0] != 0
        further = self.operator.further_draw(kept, words, shape)
        return further if raw.masked is None else further.restricted_to(raw.masked != 0, shape)

    def _on(self, device) -> "_KernelTables":
        """What the kernel reads on `device`, made once: the schedule's levels, and the records' tables
        (the tails of the data set's distinct bounds computed by the schedule there, as the PyTorch
        path computes them batch by batch)."""
        device = torch.device(device)
        tables = self._kernel_tables.get(device)
        if tables is None:
            distribution = self.schedule.level_distribution()
            if distribution.levels is not None:
                distribution = distribution._replace(levels=distribution.levels.to(device))
            bounds = None if self.bounds is None else self.bounds.to(device)
            zero = torch.zeros(1, dtype=torch.float64, device=device)
            known = zero if bounds is None else torch.unique(torch.cat([zero, bounds]))  # sorted
            table = BoundTable(known, self.schedule.tail(known), bounds)
            tables = self._kernel_tables[device] = _KernelTables(distribution, table)
        return tables

    def noise_levels(self, raw: RawBatch, u: Tensor) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """(sigma, weight, the standard deviation of the noise to add, the Tweedie multiple or None), each
        (N,) float32, from the images' records and their uniforms u (module docstring)."""
        zeros = torch.zeros_like(u)
        sigma_n = raw.sigma_n.to(torch.float64) if self.noise and raw.sigma_n is not None else zeros
        sigma_min = raw.sigma_min.to(torch.float64) if raw.sigma_min is not None else zeros
        bound = torch.maximum(sigma_n, sigma_min)
        if self.windows is not None:
            if raw.sigma_max is None:
                raise ValueError("this objective trains noise-level windows: the batch must carry each image's "
                                 "sigma_max (a loader of a set with sigma_max.npy)")
            # strictly inside (bound, sigma_max) in float32 too; the weight is mass / share
            sigma, weight = self.windows.draw(bound, raw.sigma_max, u)
        else:
            sigma, weight = self._sigma_above(bound, u)
        if not self.noise:
            return sigma, weight, sigma, None
        variance = sigma.to(torch.float64) ** 2 - sigma_n ** 2
        kept_share = variance / sigma.to(torch.float64) ** 2  # 1 - sigma_n^2 / sigma^2
        weight = weight * ((kept_share / FULL_WEIGHT_FROM) ** 2).clamp(max=1).to(torch.float32)
        return sigma, weight, variance.sqrt().to(torch.float32), (sigma_n ** 2 / variance.sqrt()).to(torch.float32)

    def _sigma_above(self, bound: Tensor, u: Tensor) -> Tuple[Tensor, Tensor]:
        """(sigma, weight) float32 (N,): a level above each image's bound (N,) float64 and its mixture weight."""
        sigma, mass = self.schedule.sigma_above(bound, u)
        # Strictly above the bound in float32 too: sigma^2 - sigma_n^2 stays positive.
        bound32 = bound.to(torch.float32)
        sigma = torch.maximum(sigma, torch.nextafter(bound32, torch.full_like(bound32, float("inf"))))
        if self.bounds is None:
            return sigma, torch.ones_like(sigma)
        if self.bounds.device != u.device:  # moved once, not every step
            self.bounds = self.bounds.to(u.device)
        share = torch.searchsorted(self.bounds, sigma.to(torch.float64)) / len(self.bounds)
        return sigma, (mass / share).to(torch.float32)

    def one_hot(self, labels: Optional[Tensor], count: int, device) -> Tensor:
        """(count, label_dim) float32 conditioning from class indices (or none)."""
        if labels is None or not self.label_dim:
            return torch.zeros((count, self.label_dim), device=device)
        return F.one_hot(labels, self.label_dim).to(torch.float32)

    def describe(self) -> str:
        """One line for the run's summary: which further corruption, where it is drawn, the records."""
        records = "" if self.bounds is None and not self.noise else \
            f", sigma above each image's noise level / sigma_min{' (Tweedie targets)' if self.noise else ''}"
        if self.windows is not None:
            records += ", sigma inside each image's noise-level window (sigma_max)"
        return f"B of {self.operator!r} where A hides something, drawn with the noise from the stored bytes in one pass{records}"
