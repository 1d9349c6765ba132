"""Training batches (y, A, A_hat, labels) from a corrupted data set, with B drawn fresh each time.

Both loaders (plain PyTorch here, NVIDIA DALI in `dali_loader`) share these semantics:

- Order. Epoch e uses one permutation of the N images, drawn from (seed, e): the same on every
  rank. Global batch j is the slice [j G, (j + 1) G) of it, G = batch_size * world_size, and rank r
  takes the r-th batch_size images of that slice. The tail that does not fill a global batch is
  dropped, so every rank runs the same number of steps (`steps_per_epoch`). Iteration is endless.
- Values. y = (u * A) / 127.5 - A for the stored uint8 u = A x: u / 127.5 - 1 on observed
  values and exactly 0 wherever A is 0 (u is multiplied by A first, so a pixel outside A cannot
  reach y even if a file held one). A is float32 0/1; A_hat = A * B with B ~ Bernoulli(1 - delta)
  per value, or per pixel for all channels (shared_channels), drawn anew every time an image is
  used: the further corruption is never fixed per image. labels: float32 one-hot (B, label_dim).
- Randomness. The x-flip flags (image and mask flipped together) and the torch loader's B come
  from seeds derived from (seed, rank, epoch, batch index) only. So `load_state_dict` of a saved
  position reproduces the following batches: bitwise for the torch loader; for the DALI loader
  the images, flips, y, A and labels are identical, and B, drawn by DALI's own generator, is
  redrawn (with the same statistics).
"""
from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from typing import Any, ClassVar, NamedTuple, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ambient_fast.data.format import CorruptedDataset
from ambient_fast.seeds import derive_seed

__all__ = ["Batch", "Loader", "TorchLoader", "make_loader", "dali_available", "LOADER_KINDS"]

LOADER_KINDS = ("auto", "dali", "torch")
_FLIP_STREAM, _B_STREAM = 1, 2  # keep the random streams of one batch apart
_SHIFTS = torch.arange(8, dtype=torch.uint8)  # bit k of a packed byte is value 8 j + k ("little")


class Batch(NamedTuple):
    """One batch on the loader's device. y, A, A_hat: float32 (B, C, R, R); labels: float32 (B, label_dim).
    A_hat is None when the loader leaves B to the consumer (`further_corruption=False`)."""

    y: Tensor
    A: Tensor
    A_hat: Optional[Tensor]
    labels: Tensor


def dali_available() -> bool:
    """True when nvidia.dali can be imported."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no `nvidia` package at all
        return False


class Loader(ABC):
    """Position, sharding and per-batch randomness shared by the loaders; subclasses build the
    batch tensors in `_load`. Use `make_loader` to construct one."""

    kind: ClassVar[str]

    def __init__(self, dataset: CorruptedDataset, *, batch_size: int, rank: int, world_size: int, seed: int,
                 delta: float, shared_channels: bool, xflip: bool, device: torch.device, further_corruption: bool):
        checks = [
            (isinstance(batch_size, int) and batch_size >= 1, f"batch_size must be a positive integer, got {batch_size!r}"),
            (isinstance(world_size, int) and world_size >= 1, f"world_size must be a positive integer, got {world_size!r}"),
            (isinstance(rank, int) and 0 <= rank < world_size, f"rank must lie in [0, world_size={world_size}), got {rank!r}"),
            (isinstance(seed, int) and seed >= 0, f"seed must be a non-negative integer, got {seed!r}"),
            (0 <= delta < 1, f"delta must lie in [0, 1), got {delta!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.dataset = dataset
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.delta, self.shared_channels, self.xflip, self.device = float(delta), bool(shared_channels), bool(xflip), device
        self.further_corruption = bool(further_corruption)
        global_batch = batch_size * world_size
        self.steps_per_epoch = len(dataset) // global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"the data set has {len(dataset)} images, fewer than one global batch "
                             f"({batch_size} x {world_size} ranks = {global_batch}); use a smaller batch")
        self.epoch = self.batch = 0
        self._permutation: tuple[int, np.ndarray] = (-1, np.empty(0, np.int64))

    # -- position and randomness of a batch

    def indices(self, epoch: int, batch: int) -> np.ndarray:
        """Data-set indices of this rank's batch `batch` of epoch `epoch`: int64 (batch_size,)."""
        if self._permutation[0] != epoch:
            self._permutation = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset)))
        start = (batch * self.world_size + self.rank) * self.batch_size
        return self._permutation[1][start: start + self.batch_size]

    def flips(self, epoch: int, batch: int) -> np.ndarray:
        """bool (batch_size,): which images (with their masks) are mirrored left-right."""
        if not self.xflip:
            return np.zeros(self.batch_size, bool)
        rng = np.random.default_rng([self.seed, self.rank, epoch, batch, _FLIP_STREAM])
        return rng.random(self.batch_size) < 0.5

    def b_seed(self, epoch: int, batch: int) -> int:
        """Seed of the further corruption B of a batch."""
        return derive_seed(self.seed, self.rank, epoch, batch, _B_STREAM)

    # -- iteration

    def next(self) -> Batch:
        """The batch at the current position; then advance (to the next epoch after the last batch)."""
        batch = self._load(self.epoch, self.batch)
        self.batch += 1
        if self.batch == self.steps_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        return batch

    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> Batch:
        return self.next()

    @abstractmethod
    def _load(self, epoch: int, batch: int) -> Batch:
        """Build the batch at (epoch, batch)."""

    # -- resumption

    def _geometry(self) -> dict[str, int]:
        return dict(seed=self.seed, batch_size=self.batch_size, world_size=self.world_size, size=len(self.dataset))

    def state_dict(self) -> dict[str, int]:
        """The position (epoch, batch within it) and what it is relative to; plain ints (JSON-ready)."""
        return dict(epoch=self.epoch, batch=self.batch, **self._geometry())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position saved by `state_dict` (of either loader kind)."""
        different = {key: (state.get(key), value) for key, value in self._geometry().items() if state.get(key) != value}
        if different:
            details = ", ".join(f"{key} {saved} (now {now})" for key, (saved, now) in different.items())
            raise ValueError(f"the loader state was saved with {details}: resume with the same data set, "
                             "seed, batch size and number of ranks")
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch < self.steps_per_epoch:
            raise ValueError(f"loader state out of range: epoch {epoch}, batch {batch} of {self.steps_per_epoch}")
        self.epoch, self.batch = epoch, batch

    def describe(self) -> str:
        """One line: kind, sizes, corruption, device."""
        return (f"{self.kind} loader: {len(self.dataset)} images, batch {self.batch_size} on rank {self.rank} of "
                f"{self.world_size}, {self.steps_per_epoch} steps/epoch, "
                f"{'B drawn here' if self.further_corruption else 'B left to the consumer'}: delta {self.delta:g} "
                f"({'shared over channels' if self.shared_channels else 'per channel'}), "
                f"xflip {'on' if self.xflip else 'off'}, device {self.device}")


def unpack_bits(packed: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """packed uint8 (B, ceil(C*H*W / 8)) -> uint8 0/1 (B, C, H, W), on packed's device."""
    bits = (packed[:, :, None] >> _SHIFTS.to(packed.device)) & 1
    return bits.flatten(1)[:, : int(np.prod(shape))].reshape(len(packed), *shape)


class TorchLoader(Loader):
    """Plain PyTorch: index the memory maps, move the packed bytes to the device, unpack, flip,
    convert, and draw B with a torch.Generator on the device."""

    kind = "torch"

    def _load(self, epoch: int, batch: int) -> Batch:
        observed, packed, labels = self.dataset.get_raw(self.indices(epoch, batch))
        u, bits = torch.from_numpy(observed), torch.from_numpy(packed)
        if self.device.type == "cuda":
            u, bits = u.pin_memory(), bits.pin_memory()
        u, bits = u.to(self.device, non_blocking=True), bits.to(self.device, non_blocking=True)
        mask = unpack_bits(bits, self.dataset.shape)
        if self.xflip:
            flip = torch.from_numpy(self.flips(epoch, batch)).to(self.device)[:, None, None, None]
            u, mask = torch.where(flip, u.flip(-1), u), torch.where(flip, mask.flip(-1), mask)
        A = mask.float()
        y = (u * mask).float() / 127.5 - A
        B, C, H, W = A.shape
        A_hat = None
        if self.further_corruption:
            generator = torch.Generator(device=self.device).manual_seed(self.b_seed(epoch, batch))
            keep = torch.rand((B, 1 if self.shared_channels else C, H, W), generator=generator, device=self.device)
            A_hat = A * (keep < 1 - self.delta)
        if labels is None:
            one_hot = torch.zeros((B, 0), device=self.device)
        else:
            one_hot = F.one_hot(torch.from_numpy(labels).to(self.device), self.dataset.label_dim).float()
        return Batch(y, A, A_hat, one_hot)


def make_loader(dataset: Union[CorruptedDataset, str], *, batch_size: int, rank: int = 0, world_size: int = 1,
                seed: int = 0, delta: float = 0.1, shared_channels: Optional[bool] = None, xflip: bool = False,
                device: Union[str, torch.device] = "cpu", kind: str = "auto", further_corruption: bool = True) -> Loader:
    """An endless loader of `Batch`es for one rank (see the module docstring for the semantics).

    Args:
        dataset: a CorruptedDataset or its path.
        batch_size: images per batch on this rank.
        rank, world_size: this rank's shard.
        seed: order, flips and B derive from it (non-negative).
        delta: probability that B erases an observed value, in [0, 1).
        shared_channels: one B coin per pixel for all channels; default: what the data set's
            corruption recorded.
        xflip: mirror image and mask together with probability 1/2.
        device: where the batches live (DALI uses the GPU of a CUDA device, its CPU backend otherwise).
        kind: "torch", "dali", or "auto" (DALI when it is installed and the device is CUDA).
        further_corruption: draw B and return A_hat; False leaves A_hat None, for a consumer that
            draws B itself (the trainer, when the fused ambient-input kernel runs).
    """
    if kind not in LOADER_KINDS:
        raise ValueError(f"loader kind must be one of {LOADER_KINDS}, got {kind!r}")
    if not isinstance(dataset, CorruptedDataset):
        dataset = CorruptedDataset(dataset)
    device = torch.device(device)
    if shared_channels is None:
        shared_channels = bool(dataset.corruption.get("shared_channels", False))
    if kind == "auto":
        kind = "dali" if device.type == "cuda" and dali_available() else "torch"
    if kind == "dali":
        from ambient_fast.data.dali_loader import DaliLoader as cls
    else:
        cls = TorchLoader
    return cls(dataset, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed, delta=delta,
               shared_channels=shared_channels, xflip=xflip, device=device, further_corruption=further_corruption)
