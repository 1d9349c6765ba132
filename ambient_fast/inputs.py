"""The ambient input of a training step, in one place: from a batch as stored (`RawBatch`, what the
loaders deliver) to what the network and the loss take (`TrainingBatch`).

For each image, from its position in the run (ambient_fast.seeds):
- its own Philox words (IMAGE stream) give its noise level, drawn by the loss's distribution
  (`AmbientLoss.sigma_from_words`), and the words of its further corruption;
- the data set's mask operator (`ambient_fast.corruption.training_operator`: the paper's B for its
  kind of masks, or an allowed `--further` override) turns those words into B: a coin per value,
  or one box per image (placed relative to A's own box for fixed_box and keep_patch);
- `ambient_fast.kernels.ambient_input` then unpacks, mirrors, scales, corrupts and noises every
  value in one pass (the fused kernel on CUDA, its PyTorch reference elsewhere; bitwise the same
  draws), writing the network input and the y, A and A_hat that the loss grades against.
"""
from typing import Callable, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ambient_fast import kernels
from ambient_fast.corruption import MaskOperator
from ambient_fast.data.loader import RawBatch
from ambient_fast.seeds import Stream, bits24, philox, stream_key

__all__ = ["TrainingBatch", "AmbientInputs", "training_batch"]

SigmaSampler = Callable[[Tuple[Tensor, Tensor]], Tensor]  # two (N,) Philox words -> (N,) sigma


class TrainingBatch(NamedTuple):
    """What one step's loss takes, on the device. Images float32 (N, C, H, W) unless noted."""

    net_input: Tensor  # (N, 2C, H, W) cat([A_hat * (y + sigma n), A_hat])
    y: Tensor          # A * y on [-1, 1]: nothing outside A
    A: Tensor          # the observation mask
    A_hat: Tensor      # B * A, what the network sees
    sigma: Tensor      # (N,) noise levels
    labels: Tensor     # (N, label_dim) one-hot conditioning (label_dim 0 without labels)


class AmbientInputs:
    """The ambient input of one run (see the module docstring).

    Args:
        operator: the mask operator whose `further_draw` makes B.
        sample_sigma: the loss's noise-level distribution (`AmbientLoss.sigma_from_words`).
        seed: the run's seed (the IMAGE and ELEMENT streams derive from it).
        shape: (C, R, R) of the data set's images; label_dim: its classes (0: none).
        channels_last: lay the outputs out channels_last.
    """

    def __init__(self, operator: MaskOperator, sample_sigma: SigmaSampler, *, seed: int, shape: Tuple[int, int, int],
                 label_dim: int = 0, channels_last: bool = False):
        self.operator, self.sample_sigma = operator, sample_sigma
        self.shape, self.label_dim, self.channels_last = tuple(shape), int(label_dim), bool(channels_last)
        self.image_key = stream_key(seed, Stream.IMAGE)
        self.value_key = stream_key(seed, Stream.ELEMENT)

    def __call__(self, raw: RawBatch) -> TrainingBatch:
        N = raw.observed.shape[0]
        C, H, W = self.shape
        device = raw.observed.device
        words = philox(self.image_key, raw.position + torch.arange(N, dtype=torch.int64, device=device))
        sigma = self.sample_sigma(words[:2]).to(torch.float32)
        kept = None
        if self.operator.reads_mask:  # where A's own box lies: channel 0 of A, mirrored as the image
            channel0 = kernels.unpack_mask(raw.mask_bits[:, : -(-H * W // 8)], (N, 1, H, W))
            kept = kernels.mirror(channel0, raw.flips)[:, 0] != 0
        further = self.operator.further_draw(kept, torch.stack([bits24(words[2]), bits24(words[3])], 1), (N, C, H, W))
        out = kernels.ambient_input(raw.observed, raw.mask_bits, raw.flips, sigma, further, key=self.value_key,
                                    offset=raw.position * C * H * W, channels_last=self.channels_last)
        return TrainingBatch(out.net_input, out.y, out.A, out.A_hat, sigma, self.one_hot(raw.labels, N, device))

    def one_hot(self, labels: Optional[Tensor], count: int, device) -> Tensor:
        """(count, label_dim) float32 conditioning from class indices (or none)."""
        if labels is None or not self.label_dim:
            return torch.zeros((count, self.label_dim), device=device)
        return F.one_hot(labels, self.label_dim).to(torch.float32)

    def describe(self) -> str:
        """One line for the run's summary: which further corruption, and where it is drawn."""
        return f"B of {self.operator!r}, drawn with the noise from the stored bytes in one pass"


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
    return TrainingBatch(net_input, y, A, A_hat, sigma, labels)
