"""Corrupted data sets: the on-disk format, the prepare command, the loaders and a synthetic set.

- `format`: `write_dataset`, `DatasetWriter`, `CorruptedDataset` (observed A*x as uint8, A bit-packed,
  labels, checksummed metadata; memory-mapped, nothing clean on disk).
- `sources`: image folders and EDM-style zips, user masks (what `prepare` reads).
- `prepare`: what `python -m ambient_fast.prepare` does (corrupt, import, mix, verify); `latents`,
  `crops`, `annotate`: latent sets, crops with an upper noise level, each poor image's sigma_min.
- `synthetic`: the built-in procedural data set whose clean distribution is known exactly.
- `loader`: `make_loader`, batches as stored (`batches.RawBatch`: the observed values, the packed
  mask bits, flips, labels, each image's position and record), on the device; plain PyTorch, or
  NVIDIA DALI through `dali_loader` (both on `batches.Loader`). The further corruption B and the
  noise are drawn by the objective.
"""
