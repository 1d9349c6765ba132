"""What every loader delivers and shares (`ambient_fast.data.loader`: the plain PyTorch loader and the
factory; `ambient_fast.data.dali_loader`: NVIDIA DALI's): the batch as stored (`RawBatch`) and the
order, sharding, positions and flips of `Loader`. See `ambient_fast.data.loader` for the semantics."""
from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from typing import Any, ClassVar, NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from ambient_fast.data.format import CorruptedDataset
from ambient_fast.objective.seeds import Stream, permutation, philox, stream_key

__all__ = ["RawBatch", "Loader", "dali_available"]


class RawBatch(NamedTuple):
    """One batch on the loader's device, as stored.

    observed: (B, C, R, R) `A x`, uint8 levels, or float16 on [-1, 1] in a set with noisy images;
    mask_bits: uint8 (B, ceil(C*R*R / 8)) A packed in little bit order; flips: uint8 (B,), 1 =
    mirror image and mask left-right; labels: int64 (B,) class indices, or None for a set without
    labels; position: the first image's position in the run; masked: uint8 (B,), 1 where A hides
    something (the image gets a further corruption); sigma_n: float32 (B,) its noise level (0:
    none); sigma_min: float32 (B,) the level below which it must not train (0: none); sigma_max:
    float32 (B,) the level above which it must not train (inf: none), None in a set without windows.
    """

    observed: Tensor
    mask_bits: Tensor
    flips: Tensor
    labels: Optional[Tensor]
    position: int
    masked: Optional[Tensor] = None
    sigma_n: Optional[Tensor] = None
    sigma_min: Optional[Tensor] = None
    sigma_max: Optional[Tensor] = None

    def nbytes(self) -> int:
        """Bytes this batch moved to the device."""
        return sum(t.numel() * t.element_size() for t in self if torch.is_tensor(t))


def dali_available() -> bool:
    """True when nvidia.dali can be imported."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no `nvidia` package at all
        return False


class Loader(ABC):
    """Order, sharding, positions and flips shared by the loaders; subclasses move the bytes in
    `_load`. Use `make_loader` to construct one."""

    kind: ClassVar[str]

    def __init__(self, dataset: CorruptedDataset, *, batch_size: int, rank: int, world_size: int, seed: int,
                 xflip: bool, device: torch.device):
        checks = [
            (isinstance(batch_size, int) and batch_size >= 1, f"batch_size must be a positive integer, got {batch_size!r}"),
            (isinstance(world_size, int) and world_size >= 1, f"world_size must be a positive integer, got {world_size!r}"),
            (isinstance(rank, int) and 0 <= rank < world_size, f"rank must lie in [0, world_size={world_size}), got {rank!r}"),
            (isinstance(seed, int) and seed >= 0, f"seed must be a non-negative integer, got {seed!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.dataset = dataset
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.xflip, self.device = bool(xflip), device
        self._flip_key = stream_key(seed, Stream.FLIP)
        global_batch = batch_size * world_size
        self.steps_per_epoch = len(dataset) // global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"the data set has {len(dataset)} images, fewer than one global batch "
                             f"({batch_size} x {world_size} ranks = {global_batch}); use a smaller batch")
        self.epoch = self.batch = 0
        self._permutation: tuple[int, np.ndarray] = (-1, np.empty(0, np.int64))

    # -- what a batch holds

    def indices(self, epoch: int, batch: int) -> np.ndarray:
        """Data-set indices of this rank's batch `batch` of epoch `epoch`: int64 (batch_size,)."""
        if self._permutation[0] != epoch:
            self._permutation = (epoch, permutation(self.seed, epoch, len(self.dataset)))
        start = (batch * self.world_size + self.rank) * self.batch_size
        return self._permutation[1][start: start + self.batch_size]

    def position(self, epoch: int, batch: int) -> int:
        """Position in the run of the first image of this rank's batch (see the module docstring)."""
        return ((epoch * self.steps_per_epoch + batch) * self.world_size + self.rank) * self.batch_size

    def flips(self, epoch: int, batch: int) -> np.ndarray:
        """uint8 (batch_size,): 1 where the image (with its mask) is mirrored left-right."""
        if not self.xflip:
            return np.zeros(self.batch_size, np.uint8)
        positions = self.position(epoch, batch) + torch.arange(self.batch_size, dtype=torch.int64)
        return (philox(self._flip_key, positions)[0] >> 31).to(torch.uint8).numpy()

    # -- iteration

    def next(self) -> RawBatch:
        """The batch at the current position; then advance (to the next epoch after the last batch)."""
        batch = self._load(self.epoch, self.batch)
        self.batch += 1
        if self.batch == self.steps_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        return batch

    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> RawBatch:
        return self.next()

    @abstractmethod
    def _load(self, epoch: int, batch: int) -> RawBatch:
        """The batch at (epoch, batch), on the device."""

    # -- resumption

    def _geometry(self) -> dict[str, int]:
        return dict(seed=self.seed, batch_size=self.batch_size, world_size=self.world_size, size=len(self.dataset))

    def state_dict(self) -> dict[str, int]:
        """The position (epoch, batch within it) and what it is relative to; plain ints."""
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

    # -- the bytes of a batch

    @property
    def has_labels(self) -> bool:
        return self.dataset.label_dim > 0

    @property
    def has_windows(self) -> bool:
        """Whether the set stores each image's sigma_max (sigma_max.npy)."""
        return self.dataset.meta.windows is not None

    def host_arrays(self, epoch: int, batch: int) -> "list[np.ndarray]":
        """The arrays of a batch as both loaders move them, in RawBatch's order (labels left out when
        the set has none, sigma_max when it has no windows): values, mask bits, flips, [labels],
        masked, sigma_n, sigma_min, [sigma_max]."""
        stored = self.dataset.get_stored(self.indices(epoch, batch))
        records = stored.records
        arrays = [stored.values, stored.packed, self.flips(epoch, batch)]
        arrays += [stored.labels] if self.has_labels else []
        arrays += [records["masked"], records["sigma_n"], records["sigma_min"]]
        arrays += [stored.sigma_max] if self.has_windows else []
        return [np.ascontiguousarray(a) for a in arrays]

    def batch_on_device(self, tensors: "list[Tensor]", epoch: int, batch: int) -> RawBatch:
        """The RawBatch of `host_arrays`' tensors on the loader's device (moved pinned and without
        waiting on CUDA, unless they are there already)."""
        if self.device.type == "cuda" and not tensors[0].is_cuda:
            tensors = [t.pin_memory() for t in tensors]
        moved = iter([t.to(self.device, non_blocking=True) for t in tensors])
        observed, mask_bits, flips = next(moved), next(moved), next(moved)
        labels = next(moved) if self.has_labels else None
        masked, sigma_n, sigma_min = next(moved), next(moved), next(moved)
        sigma_max = next(moved) if self.has_windows else None
        return RawBatch(observed, mask_bits, flips, labels, self.position(epoch, batch), masked, sigma_n, sigma_min,
                        sigma_max)

    def describe(self) -> str:
        """One line: kind, sizes, device."""
        return (f"{self.kind} loader: {len(self.dataset)} images, batch {self.batch_size} on rank {self.rank} of "
                f"{self.world_size}, {self.steps_per_epoch} steps/epoch, xflip {'on' if self.xflip else 'off'}, "
                f"stored bytes to {self.device}")
