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

from typing import Union

import torch

from ambient_fast.data.batches import Loader, RawBatch, dali_available
from ambient_fast.data.format import CorruptedDataset
from ambient_fast.options import LOADER_KINDS

__all__ = ["TorchLoader", "make_loader"]


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
