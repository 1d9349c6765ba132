"""Training batches as the data set stores them, on the device: loaders only load.

Both loaders (plain PyTorch here, NVIDIA DALI in `dali_loader`) deliver the same `RawBatch`, byte
for byte: the stored values `A x` (uint8, or float16 in a set with noisy images), the packed mask
bits, one flip flag per image, the labels and each image's corruption record, with the batch's
position in the run. Everything that turns them into the network's input
(unpacking, mirroring, scaling, the further corruption B, the noise) happens in one place after
them, `ambient_fast.objective.objective` (fused kernels on CUDA).

- Order. Epoch e uses one permutation of the N images (`seeds.permutation(seed, e)`): the same on
  every rank. Global batch j is the slice [j G, (j + 1) G) of it, G = batch_size * world_size, and
  rank r takes the r-th batch_size images of that slice. The tail that does not fill a global
  batch is dropped, so every rank runs the same number of steps (`steps_per_epoch`). Iteration is
  endless.
- Position. The i-th image of rank r's batch j of epoch e has position
  ((e * steps_per_epoch + j) * world_size + r) * batch_size + i: its index in the run's stream of
  images, from which every random draw about it derives (`ambient_fast.objective.seeds`).
- Flips (with xflip): the top bit of the FLIP stream's first Philox word at the image's position.
- Resumption: `state_dict` / `load_state_dict` save and restore the position (epoch, batch within
  it); the batches that follow are the same, bitwise, for both loaders.
"""
from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from typing import Any, ClassVar, NamedTuple, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ambient_fast.data.format import CorruptedDataset
from ambient_fast.objective.seeds import Stream, permutation, philox, stream_key
from ambient_fast.options import LOADER_KINDS

__all__ = ["RawBatch", "Loader", "TorchLoader", "make_loader", "dali_available", "LOADER_KINDS"]



class RawBatch(NamedTuple):
    """One batch on the loader's device, as stored.

    observed: (B, C, R, R) `A x`, uint8 levels, or float16 on [-1, 1] in a set with noisy images;
    mask_bits: uint8 (B, ceil(C*R*R / 8)) A packed in little bit order; flips: uint8 (B,), 1 =
    mirror image and mask left-right; labels: int64 (B,) class indices, or None for a set without
    labels; position: the first image's position in the run; masked: uint8 (B,), 1 where A hides
    something (the image gets a further corruption); sigma_n: float32 (B,) its noise level (0:
    none); sigma_min: float32 (B,) the level below which it must not train (0: none).
    """

    observed: Tensor
    mask_bits: Tensor
    flips: Tensor
    labels: Optional[Tensor]
    position: int
    masked: Optional[Tensor] = None
    sigma_n: Optional[Tensor] = None
    sigma_min: Optional[Tensor] = None

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

    def host_arrays(self, epoch: int, batch: int) -> "list[np.ndarray]":
        """The arrays of a batch as both loaders move them, in RawBatch's order (labels left out when
        the set has none): values, mask bits, flips, [labels], masked, sigma_n, sigma_min."""
        stored = self.dataset.get_stored(self.indices(epoch, batch))
        records = stored.records
        arrays = [stored.values, stored.packed, self.flips(epoch, batch)]
        arrays += [] if stored.labels is None else [stored.labels]
        arrays += [records["masked"], records["sigma_n"], records["sigma_min"]]
        return [np.ascontiguousarray(a) for a in arrays]

    def batch_on_device(self, tensors: "list[Tensor]", epoch: int, batch: int) -> RawBatch:
        """The RawBatch of `host_arrays`' tensors on the loader's device (moved pinned and without
        waiting on CUDA, unless they are there already)."""
        if self.device.type == "cuda" and not tensors[0].is_cuda:
            tensors = [t.pin_memory() for t in tensors]
        tensors = [t.to(self.device, non_blocking=True) for t in tensors]
        labels = tensors[3] if len(tensors) == 7 else None
        return RawBatch(*tensors[:3], labels, self.position(epoch, batch), *tensors[-3:])

    def describe(self) -> str:
        """One line: kind, sizes, device."""
        return (f"{self.kind} loader: {len(self.dataset)} images, batch {self.batch_size} on rank {self.rank} of "
                f"{self.world_size}, {self.steps_per_epoch} steps/epoch, xflip {'on' if self.xflip else 'off'}, "
                f"stored bytes to {self.device}")


class TorchLoader(Loader):
    """Plain PyTorch: index the memory maps, move the stored bytes to the device (pinned, without
    waiting, on CUDA)."""

    kind = "torch"

    def _load(self, epoch: int, batch: int) -> RawBatch:
        return self.batch_on_device([torch.from_numpy(a) for a in self.host_arrays(epoch, batch)], epoch, batch)


def make_loader(dataset: Union[CorruptedDataset, str], *, batch_size: int, rank: int = 0, world_size: int = 1,
                seed: int = 0, xflip: bool = False, device: Union[str, torch.device] = "cpu",
                kind: str = "auto") -> Loader:
    """An endless loader of `RawBatch`es for one rank (see the module docstring for the semantics).

    Args:
        dataset: a CorruptedDataset or its path.
        batch_size: images per batch on this rank.
        rank, world_size: this rank's shard.
        seed: order and flips derive from it (non-negative).
        xflip: mirror image and mask together with probability 1/2.
        device: where the batches live (DALI uses the GPU of a CUDA device, its CPU backend otherwise).
        kind: "torch", "dali", or "auto" (DALI when it is installed and the device is CUDA).
    """
    if kind not in LOADER_KINDS:
        raise ValueError(f"loader kind must be one of {LOADER_KINDS}, got {kind!r}")
    if not isinstance(dataset, CorruptedDataset):
        dataset = CorruptedDataset(dataset)
    device = torch.device(device)
    if kind == "auto":
        kind = "dali" if device.type == "cuda" and dali_available() else "torch"
    if kind == "dali":
        from ambient_fast.data.dali_loader import DaliLoader as cls
    else:
        cls = TorchLoader
    return cls(dataset, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed, xflip=xflip, device=device)
