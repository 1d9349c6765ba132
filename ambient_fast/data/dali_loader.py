"""The NVIDIA DALI loader: the stored bytes of each batch, moved to the GPU of a CUDA device (kept on
DALI's CPU backend otherwise) by an asynchronous pipeline that prepares the next batches while the
current one trains.

The pipeline's source is a callback that, from the position the pipeline was built at, returns
batch after batch exactly as the torch loader (ambient_fast.data.loader) reads them: the stored
values (C, R, R), the packed mask bytes, the flip flags, the labels and the images' records. DALI calls it ahead
of time (`prefetch_queue_depth` batches), so the loader counts the batches it has handed out, not
the ones DALI prepared: a saved position is the next batch the trainer gets, and `load_state_dict`
builds the pipeline again from there. The batches are the torch loader's, byte for byte.
"""
from __future__ import annotations

import os

import torch

from ambient_fast.data.batches import Loader, RawBatch

try:
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import Pipeline
    from nvidia.dali.plugin.pytorch.torch_utils import to_torch_tensor
except ImportError as error:
    raise RuntimeError('the DALI loader needs NVIDIA DALI: pip install -e ".[dali]" '
                       f"(or use the torch loader, --loader torch); importing it failed: {error}") from None

__all__ = ["DaliLoader"]

PREFETCH = 2  # batches DALI prepares ahead of the one being trained on


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
        """An asynchronous pipeline whose source starts at the current position."""
        gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if gpu else None
        cursor = [self.epoch, self.batch]
        # float16 values in a set with noisy images or latents, uint8 levels otherwise
        dtypes = [types.FLOAT16 if self.dataset.meta.values else types.UINT8, types.UINT8, types.UINT8]
        dtypes += ([types.INT64] if self.has_labels else []) + [types.UINT8, types.FLOAT, types.FLOAT]
        dtypes += [types.FLOAT] if self.has_windows else []

        def source():
            epoch, batch = cursor
            cursor[1] += 1
            if cursor[1] == self.steps_per_epoch:
                cursor[0], cursor[1] = epoch + 1, 0
            return self.host_arrays(epoch, batch)

        # The seed is unused: nothing in the pipeline draws.
        pipe = Pipeline(batch_size=self.batch_size, num_threads=max(1, min(4, os.cpu_count() or 1)),
                        device_id=device_id, seed=0, prefetch_queue_depth=PREFETCH, exec_async=True,
                        exec_pipelined=True)
        with pipe:
            outputs = fn.external_source(source=source, num_outputs=len(dtypes), batch=True, dtype=dtypes)
            pipe.set_outputs(*(output.gpu() for output in outputs) if gpu else outputs)
        pipe.build()
        return pipe

    def _load(self, epoch: int, batch: int) -> RawBatch:
        # Copies: DALI reuses its output buffers on later runs.
        tensors = [to_torch_tensor(output.as_tensor(), copy=True) for output in self._pipe.run()]
        return self.batch_on_device(tensors, epoch, batch)
