"""Making data sets: corrupt clean images, import corrupted ones with their masks, mix prepared
sets, and describe one (see ambient_fast.data.format for what a set holds). The command line:
`python -m ambient_fast.prepare` (ambient_fast.prepare, where each way is described).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ambient_fast.objective.corruption import make_operator
from ambient_fast.data.format import RECORD, CorruptedDataset, DataError, DatasetWriter, corruption_record
from ambient_fast.objective.seeds import derive_seed
from ambient_fast.data.sources import ImageSource, mask_array, mask_folder, mask_rows, read_mask
from ambient_fast.files import reading
from ambient_fast.files.atomic import read_json
from ambient_fast.files.reading import regular_file
from ambient_fast.memory import check_memory
from ambient_fast.options import CORRUPTIONS

__all__ = ["prepare_corrupted", "import_masked", "mix_datasets", "prepare_latents", "prepare_crops",
           "prepare_annotated", "summary"]
_NOISE_STREAM = 1  # the noise's generator is seeded apart from the masks' one
CHUNK = 256           # images decoded, corrupted and written at a time
PROGRESS_FROM = 1024  # show a progress bar from this many images on


def _progress(total: int):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]prepare"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=total < PROGRESS_FROM)


def _common_size(source: ImageSource, count, resolution: Optional[int]) -> int:
    """The side of the square images to write (the first `count` of the source, or the indices given
    as `count`); DataError when they are not all the same square size and no --resolution was given."""
    if resolution is not None:
        if resolution < 1:
            raise DataError(f"--resolution must be a positive integer, got {resolution}")
        return resolution
    chosen = range(count) if isinstance(count, int) else count
    sizes = {source.size_of(i) for i in chosen}
    if len(sizes) > 1:
        examples = {}
        for i in chosen:
            examples.setdefault(source.size_of(i), source.names[i])
        shown = ", ".join(f"{name} {w}x{h}" for (h, w), name in list(examples.items())[:3])
        raise DataError(f"images have {len(sizes)} different sizes ({shown}); pass --resolution R to "
                        "center-crop and resize them all to R x R")
    (height, width), = sizes
    if height != width:
        raise DataError(f"images are {width}x{height}, not square; pass --resolution R to center-crop "
                        "and resize them to R x R")
    return height


def _count(source: ImageSource, max_size: Optional[int]) -> int:
    if max_size is not None and max_size < 1:
        raise DataError(f"--max-size must be a positive integer, got {max_size}")
    return len(source) if max_size is None else min(len(source), max_size)


def _labels_and_dim(source: ImageSource, count: int) -> tuple[Optional[np.ndarray], int]:
    labels = None if source.labels is None else source.labels[:count]
    return labels, 0 if labels is None else int(labels.max()) + 1


def _chosen(source: ImageSource, max_size: Optional[int], indices) -> np.ndarray:
    """int64 indices of the images to write: the first max_size (all without), or of those, `indices`."""
    count = _count(source, max_size)
    if indices is None:
        return np.arange(count)
    chosen = np.asarray(indices, np.int64).reshape(-1)
    if not len(chosen) or chosen.min() < 0 or chosen.max() >= count:
        raise DataError(f"no images to write, or indices outside the {count} images of {source.describe()}")
    return chosen


def sigma_min_values(spec, names: list[str], count: int, flag: str = "--sigma-min",
                     absent: float = 0.0) -> Optional[np.ndarray]:
    """float32 (count,) from --sigma-min (or `flag`, e.g. --sigma-max) for the first `count` of the
    source's images `names`: a number for every image, a .npy of exactly one value per image of the
    source (in its order: shape (len(names),), a real dtype), a .json {image name: value} (images it
    leaves out: `absent`), or the `count` values themselves (an array, e.g. from `annotate`). None for
    no spec. DataError for a file that is not a regular one, another shape or type, a name the source
    does not hold, or a value that is negative, not finite (inf allowed where `absent` is: no bound),
    or beyond float32's range; nothing is flattened, truncated or rounded to an integer."""
    if spec is None:
        return None
    path = Path(str(spec))
    if isinstance(spec, np.ndarray):
        values = np.asarray(spec, np.float64)
        if values.shape != (count,):
            raise DataError(f"{flag}: {values.shape} values for {count} images")
    else:
        try:
            values = np.full(len(names), float(spec), np.float64)
        except ValueError:
            if path.suffix == ".npy":
                values = _sigma_min_array(path, len(names), flag)
            elif path.suffix == ".json":
                values = _sigma_min_mapping(path, names, flag, absent)
            else:
                raise DataError(f"{flag} takes a number, a .npy or a .json file, got {spec!r}") from None
    stored = values.astype(np.float32)
    unbounded = np.isposinf(values) if np.isinf(absent) else np.zeros(values.shape, bool)
    good = (np.isfinite(stored) | unbounded) & (values >= 0)
    if not good.all():
        raise DataError(f"{flag} values must be {'numbers (inf: no bound)' if np.isinf(absent) else 'finite numbers'} "
                        f">= 0 (and within float32's range), got {values[~good][:3].tolist()}")
    return stored[:count]


def _sigma_min_array(path: Path, count: int, flag: str = "--sigma-min") -> np.ndarray:
    """float64 (count,) of a .npy of one noise level per image."""
    try:
        array = np.load(regular_file(path, flag), allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:  # EOFError: an empty file
        raise DataError(f"{flag} {path} cannot be read ({error})") from None
    if array.dtype == np.bool_ or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise DataError(f"{flag} {path} holds {array.dtype} values; save real numbers (e.g. float32)")
    if array.shape != (count,):
        raise DataError(f"{flag} {path} has shape {array.shape}; it needs one value per image of the source: "
                        f"shape ({count},)")
    return array.astype(np.float64)


def _sigma_min_mapping(path: Path, names: list[str], flag: str = "--sigma-min", absent: float = 0.0) -> np.ndarray:
    """float64 (len(names),) of a .json {image name: noise level} (`absent` for the images it leaves out)."""
    mapping = read_json(path)
    if not isinstance(mapping, dict):
        raise DataError(f"{flag} {path} must hold an object {{image name: noise level}}, got "
                        f"{type(mapping).__name__}")
    unknown = sorted(set(mapping) - set(names))
    if unknown:
        raise DataError(f"{flag} {path} names images the source does not hold: {unknown[:3]}")
    try:
        levels = {name: reading.number(value, f"{flag} {path}: the level of {name}", 0)
                  for name, value in mapping.items()}
    except ValueError as error:
        raise DataError(str(error)) from None
    return np.array([levels.get(name, absent) for name in names], np.float64)


def _records(masks: np.ndarray, sigma_n: float, sigma_min: Optional[np.ndarray]) -> np.ndarray:
    """The RECORD of each image of a chunk: masked where A hides anything."""
    records = np.zeros(len(masks), RECORD)
    records["masked"] = ~masks.reshape(len(masks), -1).all(axis=1)
    records["sigma_n"] = sigma_n
    if sigma_min is not None:
        records["sigma_min"] = sigma_min
    return records


def level_values(observed: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """float16 values (0 outside A) of stored uint8 levels, through the training input's table
    (kernels.LEVELS): a set that mixes them with noisy images holds the values the levels train as."""
    from ambient_fast.kernels import LEVELS

    return LEVELS.numpy().astype(np.float16)[observed] * masks


def noisy_values(images: np.ndarray, masks: np.ndarray, sigma_n: float,
                 generator: torch.Generator) -> "tuple[np.ndarray, np.ndarray]":
    """(values float16, observed uint8) of uint8 images with Gaussian noise of level sigma_n added on
    the [-1, 1] scale: A * (x + sigma_n n), never clipped, and its rounding to uint8 levels, clipped
    and 0 outside A, for looking at."""
    noise = torch.randn(images.shape, generator=generator, dtype=torch.float64).numpy()
    values = ((2 * images.astype(np.float64) - 255) / 255 + sigma_n * noise) * masks
    observed = np.clip(np.round((values + 1) * 127.5), 0, 255).astype(np.uint8) * masks
    return values.astype(np.float16), observed.astype(np.uint8)


def prepare_corrupted(source_path, dest, *, corruption: str = "dust", p: Optional[float] = None, delta: float = 0.1,
                      shared_channels: bool = False, resolution: Optional[int] = None,
                      max_size: Optional[int] = None, seed: int = 0, overwrite: bool = False, noise: float = 0.0,
                      sigma_min=None, indices=None) -> Path:
    """Corrupt the images of `source_path` with a mask operator (or none), optionally noise them
    first (`noise`: sigma_n on the [-1, 1] scale), and write the data set.

    Masks are drawn from one torch.Generator seeded with `seed`, CHUNK images at a time, in the
    source's sorted order, the noise from another seeded from `seed` too: the same inputs and seed
    give the same data set (and the same masks with or without noise). `sigma_min`: see
    `sigma_min_values` (one value per image written). `indices`: write only these of the source's
    images (in this order; e.g. those `annotate` found a level for). Raises DataError (bad input) or
    ValueError (the operator's parameters).
    """
    if corruption not in CORRUPTIONS:
        raise DataError(f"--corruption {corruption!r} does not produce masks; choose one of {CORRUPTIONS}")
    if not (math.isfinite(noise) and noise >= 0):
        raise DataError(f"--noise must be a finite level >= 0, got {noise}")
    operator = None
    if corruption == "none":
        if p is not None or shared_channels:
            raise DataError("--corruption none masks nothing: drop --p and --shared-channels")
        record = {"kind": "none", "p": 0.0, "delta": delta, "shared_channels": True}
    else:
        if p is None:
            raise DataError(f"--corruption {corruption} needs --p (or --corruption none for no masks)")
        params = dict(p=p, delta=delta)
        if corruption == "dust":
            params["shared_channels"] = shared_channels
        elif shared_channels:
            raise DataError(f"--shared-channels applies to dust only ({corruption} masks are the same for every channel)")
        operator = make_operator(corruption, **params)
        record = corruption_record(operator)
    if noise > 0:
        record["sigma_n"] = noise
    with ImageSource(source_path) as source:
        labels, label_dim = _labels_and_dim(source, _count(source, max_size))
        chosen = _chosen(source, max_size, indices)
        count = len(chosen)
        labels = None if labels is None else labels[chosen]
        side = _common_size(source, chosen, resolution)
        # A chunk's images, masks (the operator's float32 and bool) and stored rows; with noise, its
        # float64 noise and values too.
        check_memory(min(CHUNK, count) * source.channels * side * side * (11 + (26 if noise > 0 else 0)),
                     f"images of {side}x{side}" + (" (--resolution)" if resolution is not None else ""),
                     "choose a smaller --resolution")
        minimum = sigma_min_values(sigma_min, source.names, count)
        shape = (source.channels, side, side)
        generator = torch.Generator().manual_seed(seed)
        noise_generator = torch.Generator().manual_seed(derive_seed(seed, _NOISE_STREAM))
        with_records = noise > 0 or minimum is not None
        with DatasetWriter(dest, count=count, shape=shape, label_dim=label_dim, overwrite=overwrite,
                           values=noise > 0, records=with_records) as writer, _progress(count) as progress:
            task = progress.add_task("prepare", total=count)
            for start in range(0, count, CHUNK):
                rows = range(start, min(start + CHUNK, count))
                images = source.read_all(chosen[rows.start:rows.stop], resolution)
                if operator is None:
                    masks = np.ones(images.shape, bool)
                else:  # A depends only on the generator, not on the pixels
                    _, A = operator.corrupt(torch.zeros(images.shape), generator)
                    masks = A.numpy() != 0
                values, observed = (None, images * masks) if noise == 0 else \
                    noisy_values(images, masks, noise, noise_generator)
                records = None
                if with_records:
                    records = _records(masks, noise, None if minimum is None else minimum[rows.start:rows.stop])
                writer.append(observed, masks, None if labels is None else labels[rows.start:rows.stop], values,
                              records)
                progress.advance(task, len(rows))
            return writer.commit(record, f"{source.describe()}, seed {seed}")


def import_masked(source_path, masks_path, dest, *, delta: float = 0.1, max_size: Optional[int] = None,
                  overwrite: bool = False, sigma_min=None) -> Path:
    """Write a data set from images that are already corrupted and their masks (a folder of mask
    images or one .npy, see the module docstring). Pixels outside the masks are zeroed, whatever
    the images hold there. Images are used at their own (common, square) size. `sigma_min`: see
    `sigma_min_values`."""
    if not 0 <= delta < 1:
        raise DataError(f"--delta must lie in [0, 1), got {delta}")
    masks_path = Path(masks_path)
    with ImageSource(source_path) as source:
        count = _count(source, max_size)
        side = _common_size(source, count, None)
        if masks_path.suffix == ".npy":
            array, files = mask_array(masks_path, source), None
        else:
            array, files = None, mask_folder(masks_path, source.names[:count])
        labels, label_dim = _labels_and_dim(source, count)
        minimum = sigma_min_values(sigma_min, source.names, count)
        C = source.channels
        observed_values, shared = 0, True
        with DatasetWriter(dest, count=count, shape=(C, side, side), label_dim=label_dim, overwrite=overwrite,
                           records=minimum is not None) as writer, _progress(count) as progress:
            task = progress.add_task("import", total=count)
            for start in range(0, count, CHUNK):
                rows = range(start, min(start + CHUNK, count))
                images = source.read_all(rows)
                if files is None:
                    masks = mask_rows(array, slice(rows.start, rows.stop), C, f"masks {masks_path}")
                else:
                    masks = np.stack([read_mask(files[i], source.size_of(i), C) for i in rows])
                shared = shared and bool((masks == masks[:, :1]).all())
                observed_values += int(np.count_nonzero(masks))
                records = None if minimum is None else _records(masks, 0.0, minimum[rows.start:rows.stop])
                writer.append(images * masks, masks, None if labels is None else labels[rows.start:rows.stop],
                              records=records)
                progress.advance(task, len(rows))
            erased = 1 - observed_values / (count * C * side * side)
            record = dict(kind="user", p=round(erased, 6), delta=delta, shared_channels=shared,
                          masks=str(masks_path.resolve()))
            return writer.commit(record, source.describe())


def _same_latents(sets: "list[CorruptedDataset]") -> Optional[dict]:
    """The latent record of sets to mix (None for pixel sets); DataError when latent and pixel sets are
    mixed, or latents of different autoencoders or scalings (where the autoencoder's folder is aside)."""
    latent = [dataset for dataset in sets if dataset.is_latent]
    if not latent:
        return None
    if len(latent) < len(sets):
        pixels = next(dataset for dataset in sets if not dataset.is_latent)
        raise DataError(f"{latent[0].path} holds latents and {pixels.path} pixels: a mixture is one or the other "
                        "(encode the pixel set with prepare latents first)")
    same = lambda record: {key: value for key, value in record.items() if key != "folder"}
    for dataset in latent[1:]:
        if same(dataset.meta.latent) != same(latent[0].meta.latent):
            raise DataError(f"{dataset.path} and {latent[0].path} hold latents of different autoencoders or scalings: "
                            "mix latents of one autoencoder")
    return latent[0].meta.latent


def mix_datasets(parts: "list[tuple[Path, Optional[int]]]", dest, *, overwrite: bool = False) -> Path:
    """Merge prepared sets into one: the first COUNT images of each (all for None), in the order
    given, every image keeping its record (masked or clean, its noise level, its sigma_min, its
    sigma_max: inf in sets without windows). Each set is verified first (`CorruptedDataset.verify`: a
    damaged one is refused). The sets must share resolution, channels and labels, and be all pixels
    or all latents of one autoencoder; a set with noise makes the mixture store float16 values (the
    others' as their exact levels). meta.json's corruption is
    {"kind": "mix", "parts": [each set's path, count and corruption]}."""
    if not parts:
        raise DataError("prepare mix needs at least one SET")
    sets = [(CorruptedDataset(path), count) for path, count in parts]
    for dataset, _ in sets:  # a damaged source must not become a mixture that verifies
        dataset.verify()
    first = sets[0][0]
    for dataset, count in sets:
        if (dataset.shape, dataset.label_dim) != (first.shape, first.label_dim):
            raise DataError(f"{dataset.path} holds {dataset.shape} images with {dataset.label_dim} classes, "
                            f"{first.path} {first.shape} with {first.label_dim}: mix sets of one shape and labels")
        if count is not None and not 1 <= count <= len(dataset):
            raise DataError(f"{dataset.path}: COUNT must lie in [1, {len(dataset)}], got {count}")
    latent = _same_latents([dataset for dataset, _ in sets])
    counts = [len(dataset) if count is None else count for dataset, count in sets]
    noise = any(dataset.has_noise for dataset, _ in sets)
    windows = any(dataset.meta.windows is not None for dataset, _ in sets)
    with DatasetWriter(dest, count=sum(counts), shape=first.shape, label_dim=first.label_dim, overwrite=overwrite,
                       values=noise or latent is not None, records=True, sigma_max=windows, latent=latent) as writer:
        for (dataset, _), count in zip(sets, counts):
            for start in range(0, count, CHUNK):
                rows = np.arange(start, min(start + CHUNK, count))
                observed, masks, _ = dataset.get(rows)
                stored = dataset.get_stored(rows)
                values = None
                if latent is not None:
                    values = stored.values
                elif noise:
                    values = stored.values if dataset.has_noise else level_values(stored.values, masks)
                writer.append(observed, masks, stored.labels, values, stored.records,
                              dataset.sigma_max(rows) if windows else None)
        record = {"kind": "mix", "delta": first.corruption.get("delta", 0.1),
                  "parts": [{"path": str(dataset.path.resolve()), "count": count, **dataset.corruption}
                            for (dataset, _), count in zip(sets, counts)]}
        return writer.commit(record, "mix of " + ", ".join(f"{dataset.path} ({count})"
                                                           for (dataset, _), count in zip(sets, counts)))


def prepare_latents(source_path, dest, autoencoder, *, resolution: Optional[int] = None,
                    max_size: Optional[int] = None, sigma_min=None, sigma_max=None, overwrite: bool = False,
                    device="cpu", indices=None) -> Path:
    """Encode the images of `source_path` with the diffusers AutoencoderKL in the folder `autoencoder`
    (EDM2's scaling of the SD VAE) and write them as a latent data set (`ambient_fast.data.latents`),
    with per-image sigma_min and sigma_max (see `sigma_min_values`; sigma_max: inf where none) and
    the source's labels. `indices`: only these images (as in `prepare_corrupted`)."""
    from ambient_fast.data.latents import LatentCodec, write_latent_dataset

    codec = LatentCodec.load(autoencoder, device=device)
    with ImageSource(source_path) as source:
        labels, _ = _labels_and_dim(source, _count(source, max_size))
        chosen = _chosen(source, max_size, indices)
        _common_size(source, chosen, resolution)
        minimum = sigma_min_values(sigma_min, source.names, len(chosen))
        maximum = sigma_min_values(sigma_max, source.names, len(chosen), flag="--sigma-max", absent=np.inf)
        return write_latent_dataset(dest, codec, lambda start, stop: source.read_all(chosen[start:stop], resolution),
                                    count=len(chosen), labels=None if labels is None else labels[chosen],
                                    sigma_min=minimum, sigma_max=maximum, source=source.describe(),
                                    overwrite=overwrite, chunk=CHUNK)


def prepare_crops(source_path, dest, crop: int, *, stride: int = 0, delta: float = 0.1,
                  resolution: Optional[int] = None, max_size: Optional[int] = None, overwrite: bool = False) -> Path:
    """Cut every image of `source_path` into crops of side `crop` (on a grid of step `stride`, default
    `crop`) and write each in place in an otherwise unobserved image, with Ambient-o's sigma_max for
    its size (`ambient_fast.data.crops`: the numbers and why). The masks keep one square each, so the
    set's kind is keep_patch (p = 1 - crop / R): B keeps a sub-square of each crop (--delta; 0 shows
    the network the whole crop). Labels follow their image."""
    from ambient_fast.data.crops import crop_examples

    with ImageSource(source_path) as source:
        count = _count(source, max_size)
        side = _common_size(source, count, resolution)
        if not 0 < crop < side:
            raise DataError(f"--crop must lie in 1..{side - 1} for {side}x{side} images (a crop of the whole image is "
                            "the image: prepare it without crops)")
        labels, label_dim = _labels_and_dim(source, count)
        per_image = len(crop_examples(np.zeros((1, side, side), np.uint8), crop, stride)[0])
        total = count * per_image
        with DatasetWriter(dest, count=total, shape=(source.channels, side, side), label_dim=label_dim,
                           overwrite=overwrite, sigma_max=True) as writer, _progress(total) as progress:
            task = progress.add_task("crops", total=total)
            for index in range(count):
                observed, masks, sigma_max = crop_examples(source.read(index, resolution), crop, stride)
                writer.append(observed, masks, None if labels is None else np.full(len(masks), labels[index]),
                              sigma_max=sigma_max)
                progress.advance(task, len(masks))
            record = {"kind": "keep_patch", "p": round(1 - crop / side, 9), "delta": delta, "shared_channels": True,
                      "crop": crop, "stride": stride or crop, "sigma_max": float(sigma_max[0])}
            return writer.commit(record, f"{source.describe()}, crops of {crop} pixels, step {stride or crop}")


def _as_float(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, C, R, R) -> float32 on [-1, 1] (the training input's levels)."""
    from ambient_fast.kernels import LEVELS

    return LEVELS[torch.from_numpy(images).long()]


def prepare_annotated(clean_path, poor_path, dest, *, resolution: Optional[int] = None,
                      max_size: Optional[int] = None, autoencoder=None, steps: int = 400, trials: int = 8,
                      seed: int = 0, overwrite: bool = False, device="cpu") -> "tuple[Path, np.ndarray]":
    """Find each poor image's sigma_min by comparing it with the clean images under noise
    (`ambient_fast.data.annotate`: a noise-conditioned classifier of the two groups, trained `steps`
    steps), then write the poor images with those levels: as pixels (the --sigma-min path of
    `prepare_corrupted`, nothing masked) or, with `autoencoder`, as latents (`prepare_latents`).
    Images the classifier tells apart even at the top of its grid (sigma_min inf) could never train
    and are left out. Returns (the set's path, every poor image's sigma_min, inf for those left out)."""
    from ambient_fast.data.annotate import annotate

    with ImageSource(clean_path) as clean, ImageSource(poor_path) as poor:
        clean_rows, poor_rows = np.arange(_count(clean, max_size)), np.arange(_count(poor, max_size))
        side = resolution or _common_size(poor, len(poor_rows), None)
        if clean.channels != poor.channels:
            raise DataError(f"{clean.describe()} holds {clean.channels}-channel images, {poor.describe()} "
                            f"{poor.channels}-channel ones: annotate images of one kind")
        _common_size(clean, len(clean_rows), side)
        levels = annotate(_as_float(clean.read_all(clean_rows, side)), _as_float(poor.read_all(poor_rows, side)),
                          steps=steps, trials=trials, seed=seed)
    kept = np.flatnonzero(np.isfinite(levels))
    if not len(kept):
        raise DataError("the classifier tells every poor image apart from the clean ones up to the top of its grid "
                        "of levels: none of them could train (are they images of another kind?)")
    if autoencoder is not None:
        path = prepare_latents(poor_path, dest, autoencoder, resolution=side, max_size=max_size,
                               sigma_min=levels[kept], overwrite=overwrite, device=device, indices=kept)
    else:
        path = prepare_corrupted(poor_path, dest, corruption="none", resolution=side, max_size=max_size,
                                 sigma_min=levels[kept], overwrite=overwrite, indices=kept)
    return path, levels


def summary(dataset: CorruptedDataset, headline: str) -> str:
    """`headline` and a few lines describing the data set."""
    meta = dataset.meta
    C, R, _ = meta.shape
    kinds = ""
    if meta.records is not None:
        levels = meta.records["sigma_n_range"]
        levels = "none" if levels is None else " to ".join(dict.fromkeys(f"{v:.4g}" for v in levels))
        kinds = (f"\n  records     {meta.records['clean']} clean, {meta.records['masked']} masked, "
                 f"{meta.records['noisy']} noisy, {meta.records['masked_noisy']} masked and noisy; noise level "
                 f"{levels}; {meta.records['with_sigma_min']} with sigma_min")
    if meta.windows is not None:
        bounded = meta.windows["sigma_max_range"]
        kinds += (f"\n  windows     {meta.windows['with_sigma_max']} with sigma_max"
                  + (f" ({' to '.join(dict.fromkeys(f'{v:.4g}' for v in bounded))})" if bounded else ""))
    if meta.latent is not None:
        kinds += (f"\n  latents     of {'x'.join(map(str, meta.latent['pixel_shape']))} images by the autoencoder in "
                  f"{meta.latent['folder']}")
    return "\n".join([
        f"{headline}: {dataset.path} (format version {meta.version})",
        f"  images      {meta.count} x {C}x{R}x{R} " + ("float16 latents and uint8 previews" if meta.latent else
                                                        "float16 values and uint8 previews" if meta.values else
                                                        "uint8 (observed A*x only)"),
        f"  labels      {f'{meta.label_dim} classes' if meta.label_dim else 'none'}",
        f"  corruption  {meta.corruption}" + kinds,
        f"  observed    {100 * meta.observed_fraction:.1f}% of values",
        f"  source      {meta.source}",
        f"  created     {meta.created}",
    ])
