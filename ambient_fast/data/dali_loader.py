"""The NVIDIA DALI loader: the batch is unpacked, flipped, converted and further corrupted inside a
DALI pipeline, on the GPU of a CUDA device (on DALI's CPU backend otherwise).

The loader's Python side picks the images and flip flags of each batch exactly as the torch
loader does (ambient_fast.data.loader) and feeds the raw stored bytes, in that order, through
`external_source`: observed uint8 (C, R, R), packed mask bytes, flip flag, label. In the pipeline:

    mask  = the little-endian bits of the packed bytes, cut to C*R*R values, reshaped (C, R, R)
    flip  = fn.flip of image and mask with the same per-sample flag
    A     = float(mask);  y = float(u * mask) / 127.5 - A
    A_hat = A * fn.random.coin_flip(1 - delta), shape (1 or C, R, R), broadcast over channels
            (not drawn with further_corruption=False: the consumer draws B)
    labels = fn.one_hot(label)

B comes from DALI's generator, seeded from (seed, rank, position) whenever the pipeline is built
(at construction and at `load_state_dict`): a restored position gives the same images, flips,
y, A and labels as before, bitwise, and a fresh B of the same distribution.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from ambient_fast.data.format import packed_size
from ambient_fast.data.loader import Batch, Loader

try:
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import Pipeline
    from nvidia.dali.plugin.pytorch.torch_utils import to_torch_tensor
except ImportError as error:
    raise RuntimeError('the DALI loader needs NVIDIA DALI: pip install -e ".[dali]" '
                       f"(or use the torch loader, --loader torch); importing it failed: {error}") from None

__all__ = ["DaliLoader"]

_BIT_VALUES = np.array([[1 << k for k in range(8)]], np.uint8)  # (1, 8): bit k of a byte is value 8 j + k
_SEED_STREAM = 3


class DaliLoader(Loader):
    """make_loader(..., kind="dali"). See the module docstring."""

    kind = "dali"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pipe = self._build()

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self._pipe = self._build()

    def _build(self) -> Pipeline:
        """A synchronous pipeline (fed one batch, run once per `next`) seeded from the position."""
        gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if gpu else None
        seed = int(np.random.SeedSequence([self.seed, self.rank, self.epoch, self.batch, _SEED_STREAM])
                   .generate_state(1, np.uint32)[0] >> 1)
        C, H, W = self.dataset.shape
        count, nbytes = C * H * W, packed_size(self.dataset.shape)
        where = "gpu" if gpu else "cpu"
        pipe = Pipeline(batch_size=self.batch_size, num_threads=max(1, min(4, os.cpu_count() or 1)),
                        device_id=device_id, seed=seed, prefetch_queue_depth=1, exec_async=False,
                        exec_pipelined=False)
        with pipe:
            observed = fn.external_source(name="observed", dtype=types.UINT8, layout="CHW")
            packed = fn.external_source(name="packed", dtype=types.UINT8)
            if gpu:
                observed, packed = observed.gpu(), packed.gpu()
            bits = fn.reshape(packed, shape=[nbytes, 1]) & types.Constant(_BIT_VALUES, device=where)  # (nbytes, 8)
            flat = fn.reshape(bits != 0, shape=[8 * nbytes])[:count]
            mask = fn.reshape(fn.cast(flat, dtype=types.UINT8), shape=[C, H, W], layout="CHW")
            if self.xflip:
                flip = fn.external_source(name="flip", dtype=types.INT32)  # argument inputs stay on the CPU
                observed, mask = fn.flip(observed, horizontal=flip), fn.flip(mask, horizontal=flip)
            A = fn.cast(mask, dtype=types.FLOAT)
            y = fn.cast(observed * mask, dtype=types.FLOAT) / 127.5 - A
            outputs = [y, A]
            if self.further_corruption:
                coins = fn.random.coin_flip(probability=1 - self.delta, shape=[1 if self.shared_channels else C, H, W],
                                            dtype=types.UINT8, device=where)
                outputs.append(A * coins)
            if self.dataset.label_dim:
                label = fn.external_source(name="label", dtype=types.INT64)
                outputs.append(fn.one_hot(label.gpu() if gpu else label, num_classes=self.dataset.label_dim,
                                          dtype=types.FLOAT))
            pipe.set_outputs(*outputs)
        pipe.build()
        return pipe

    def _load(self, epoch: int, batch: int) -> Batch:
        observed, packed, labels = self.dataset.get_raw(self.indices(epoch, batch))
        self._pipe.feed_input("observed", observed, layout="CHW")
        self._pipe.feed_input("packed", packed)
        if self.xflip:
            self._pipe.feed_input("flip", self.flips(epoch, batch).astype(np.int32))
        if labels is not None:
            self._pipe.feed_input("label", labels)
        # Copies: DALI reuses its output buffers on the next run.
        tensors = [to_torch_tensor(output.as_tensor(), copy=True).to(self.device) for output in self._pipe.run()]
        if not self.further_corruption:
            tensors.insert(2, None)
        if labels is None:
            tensors.append(torch.zeros((self.batch_size, 0), device=self.device))
        return Batch(*tensors)
