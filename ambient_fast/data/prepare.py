"""`python -m ambient_fast.prepare`: make a corrupted data set (see ambient_fast.data.format).

    prepare --source SRC --dest DEST --corruption dust --p 0.8 [--delta 0.1] [--shared-channels]
            [--noise SIGMA] [--sigma-min FILE_OR_VALUE] [--resolution R] [--max-size N] [--seed S]
        corrupt clean images (a folder, searched recursively, or an EDM-style zip with an
        optional dataset.json of labels); only A * x and A are written. --noise SIGMA adds
        Gaussian noise of level SIGMA (on the [-1, 1] scale) first and stores only the result,
        unclipped (float16); --corruption none masks nothing (a clean set, or a noisy one).
    prepare --source SRC --masks MASKS --dest DEST [--delta 0.1] [--sigma-min FILE_OR_VALUE]
        import data that is already corrupted: MASKS is a folder of mask images named like the
        source images (white = observed), or one .npy of 0/1 masks (N, H, W) or (N, C, H, W) in
        sorted-file-name order.
    prepare mix --dest DEST SET[:COUNT] SET[:COUNT] ...
        merge prepared sets (one resolution, channels and labels) into one, the first COUNT images
        of each (all without :COUNT), every image keeping its record (clean, masked, noisy).
    prepare verify DEST
        check checksums (of the arrays and of meta.json) and recompute what meta.json claims,
        print a summary.

--sigma-min marks images that must not train below a noise level (degraded in ways the model does
not know, such as blur or compression): one number for every image, a .npy of one value per image
in sorted-file-name order, or a .json mapping image names (as in the source) to values (others 0).

--delta is recorded as the training default; the trainer draws the further corruption B itself,
fresh at every step. Bad input prints one line saying what is wrong and exits with status 1.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ambient_fast.objective.corruption import OPERATORS, MaskOperator, make_operator
from ambient_fast.data.format import RECORD, CorruptedDataset, DataError, DatasetWriter, corruption_record
from ambient_fast.objective.seeds import derive_seed
from ambient_fast.data.sources import ImageSource, mask_array, mask_folder, mask_rows, read_mask

__all__ = ["MASK_KINDS", "prepare_corrupted", "import_masked", "mix_datasets", "summary", "main"]

MASK_KINDS = sorted(name for name, cls in OPERATORS.items() if issubclass(cls, MaskOperator))
CORRUPTIONS = ["none", *MASK_KINDS]  # "none": nothing masked (a clean set, or one with only noise)
_NOISE_STREAM = 1  # the noise's generator is seeded apart from the masks' one
CHUNK = 256           # images decoded, corrupted and written at a time
PROGRESS_FROM = 1024  # show a progress bar from this many images on


def _progress(total: int):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]prepare"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=total < PROGRESS_FROM)


def _common_size(source: ImageSource, count: int, resolution: Optional[int]) -> int:
    """The side of the square images to write; DataError when they are not all the same square
    size and no --resolution was given."""
    if resolution is not None:
        if resolution < 1:
            raise DataError(f"--resolution must be a positive integer, got {resolution}")
        return resolution
    sizes = {source.size_of(i) for i in range(count)}
    if len(sizes) > 1:
        examples = {}
        for i in range(count):
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


def sigma_min_values(spec, names: list[str]) -> Optional[np.ndarray]:
    """float32 (len(names),) from --sigma-min: a number for every image, a .npy of one value per
    image (in the source's order), or a .json {image name: value} (images it leaves out: 0). None
    for no spec. DataError for a bad file, a count that differs, or a negative or non-finite value."""
    if spec is None:
        return None
    path = Path(str(spec))
    try:
        values = np.full(len(names), float(spec), np.float32)
    except ValueError:
        if path.suffix == ".npy":
            values = np.asarray(np.load(path, allow_pickle=False), np.float32).reshape(-1)
            if len(values) < len(names):
                raise DataError(f"--sigma-min {path} holds {len(values)} values for {len(names)} images") from None
            values = values[: len(names)]
        elif path.suffix == ".json":
            from ambient_fast.files.atomic import read_json

            mapping = read_json(path)
            unknown = sorted(set(mapping) - set(names))
            if unknown:
                raise DataError(f"--sigma-min {path} names images the source does not hold: {unknown[:3]}") from None
            values = np.array([float(mapping.get(name, 0.0)) for name in names], np.float32)
        else:
            raise DataError(f"--sigma-min takes a number, a .npy or a .json file, got {spec!r}") from None
    if not (np.isfinite(values).all() and (values >= 0).all()):
        raise DataError("--sigma-min values must be finite and >= 0")
    return values


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
                      sigma_min=None) -> Path:
    """Corrupt the images of `source_path` with a mask operator (or none), optionally noise them
    first (`noise`: sigma_n on the [-1, 1] scale), and write the data set.

    Masks are drawn from one torch.Generator seeded with `seed`, CHUNK images at a time, in the
    source's sorted order, the noise from another seeded from `seed` too: the same inputs and seed
    give the same data set (and the same masks with or without noise). `sigma_min`: see
    `sigma_min_values`. Raises DataError (bad input) or ValueError (the operator's parameters).
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
        count = _count(source, max_size)
        side = _common_size(source, count, resolution)
        labels, label_dim = _labels_and_dim(source, count)
        minimum = sigma_min_values(sigma_min, source.names[:count])
        shape = (source.channels, side, side)
        generator = torch.Generator().manual_seed(seed)
        noise_generator = torch.Generator().manual_seed(derive_seed(seed, _NOISE_STREAM))
        with_records = noise > 0 or minimum is not None
        with DatasetWriter(dest, count=count, shape=shape, label_dim=label_dim, overwrite=overwrite,
                           values=noise > 0, records=with_records) as writer, _progress(count) as progress:
            task = progress.add_task("prepare", total=count)
            for start in range(0, count, CHUNK):
                rows = range(start, min(start + CHUNK, count))
                images = source.read_all(rows, resolution)
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
        minimum = sigma_min_values(sigma_min, source.names[:count])
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


def _set_and_count(text: str) -> "tuple[Path, Optional[int]]":
    """SET[:COUNT] of `prepare mix`."""
    path, _, count = text.rpartition(":") if ":" in text else (text, "", "")
    if not count:
        return Path(path or text), None
    try:
        return Path(path), int(count)
    except ValueError:
        raise DataError(f"{text}: COUNT must be an integer (SET:COUNT)") from None


def mix_datasets(parts: "list[tuple[Path, Optional[int]]]", dest, *, overwrite: bool = False) -> Path:
    """Merge prepared sets into one: the first COUNT images of each (all for None), in the order
    given, every image keeping its record (masked or clean, its noise level, its sigma_min). The
    sets must share resolution, channels and labels; a set with noise makes the mixture store
    float16 values (the others' as their exact levels). meta.json's corruption is
    {"kind": "mix", "parts": [each set's path, count and corruption]}."""
    if not parts:
        raise DataError("prepare mix needs at least one SET")
    sets = [(CorruptedDataset(path), count) for path, count in parts]
    first = sets[0][0]
    for dataset, count in sets:
        if (dataset.shape, dataset.label_dim) != (first.shape, first.label_dim):
            raise DataError(f"{dataset.path} holds {dataset.shape} images with {dataset.label_dim} classes, "
                            f"{first.path} {first.shape} with {first.label_dim}: mix sets of one shape and labels")
        if count is not None and not 1 <= count <= len(dataset):
            raise DataError(f"{dataset.path}: COUNT must lie in [1, {len(dataset)}], got {count}")
    counts = [len(dataset) if count is None else count for dataset, count in sets]
    noise = any(dataset.has_noise for dataset, _ in sets)
    with DatasetWriter(dest, count=sum(counts), shape=first.shape, label_dim=first.label_dim, overwrite=overwrite,
                       values=noise, records=True) as writer:
        for (dataset, _), count in zip(sets, counts):
            for start in range(0, count, CHUNK):
                rows = np.arange(start, min(start + CHUNK, count))
                observed, masks, _ = dataset.get(rows)
                stored = dataset.get_stored(rows)
                values = None
                if noise:
                    values = stored.values if dataset.has_noise else level_values(stored.values, masks)
                writer.append(observed, masks, stored.labels, values, stored.records)
        record = {"kind": "mix", "delta": first.corruption.get("delta", 0.1),
                  "parts": [{"path": str(dataset.path.resolve()), "count": count, **dataset.corruption}
                            for (dataset, _), count in zip(sets, counts)]}
        return writer.commit(record, "mix of " + ", ".join(f"{dataset.path} ({count})"
                                                           for (dataset, _), count in zip(sets, counts)))


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
    return "\n".join([
        f"{headline}: {dataset.path} (format version {meta.version})",
        f"  images      {meta.count} x {C}x{R}x{R} " + ("float16 values and uint8 previews" if meta.values else
                                                        "uint8 (observed A*x only)"),
        f"  labels      {f'{meta.label_dim} classes' if meta.label_dim else 'none'}",
        f"  corruption  {meta.corruption}" + kinds,
        f"  observed    {100 * meta.observed_fraction:.1f}% of values",
        f"  source      {meta.source}",
        f"  created     {meta.created}",
    ])


# ----------------------------------------------------------------------------------------------
# Command line.

class _UsageError(DataError):
    """A command-line mistake; argparse's own exit (status 2) is replaced by our status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _UsageError(f"{message} (see {self.prog} --help)")


def number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m ambient_fast.prepare", description=__doc__.split("\n\n")[0],
                     epilog="prepare verify DEST checks a data set; prepare mix --dest DEST SET[:COUNT] ... merges sets.")
    add = parser.add_argument
    add("--source", required=True, help="image folder (recursive) or EDM-style zip")
    add("--dest", required=True, help="data-set directory to create")
    add("--corruption", default="dust", choices=CORRUPTIONS, help="mask operator (default dust; none: no masks)")
    add("--p", type=number, help="corruption level, e.g. the erased fraction for dust")
    add("--noise", type=number, default=0.0, help="add Gaussian noise of this level (on the [-1, 1] scale) first")
    add("--sigma-min", dest="sigma_min", help="noise level below which images must not train: a number, a .npy "
        "(one per image, sorted-file-name order) or a .json {image name: value}")
    add("--delta", type=number, default=0.1, help="further corruption recorded as the training default (0.1)")
    add("--shared-channels", action="store_true", help="dust: one mask for all colour channels")
    add("--resolution", type=int, help="center-crop and resize every image to R x R")
    add("--max-size", type=int, help="use the first N images (sorted by path)")
    add("--seed", type=int, default=0, help="seed of the masks (default 0)")
    add("--masks", help="import already corrupted images: folder of mask images or a .npy of 0/1 masks")
    add("--overwrite", action="store_true", help="replace an existing data set at --dest")
    return parser


def _run(argv: list[str]) -> str:
    """Run one command; returns what to print."""
    if argv[:1] == ["verify"]:
        verify = _Parser(prog="python -m ambient_fast.prepare verify", description="check a data set")
        verify.add_argument("dest")
        dataset = CorruptedDataset(verify.parse_args(argv[1:]).dest)
        notes = dataset.verify()
        return "\n".join([summary(dataset, "ok, checksums and content verified"), *(f"  note: {n}" for n in notes)])
    if argv[:1] == ["mix"]:
        mix = _Parser(prog="python -m ambient_fast.prepare mix", description=mix_datasets.__doc__.split("\n\n")[0])
        mix.add_argument("--dest", required=True, help="data-set directory to create")
        mix.add_argument("--overwrite", action="store_true", help="replace an existing data set at --dest")
        mix.add_argument("sets", nargs="+", metavar="SET[:COUNT]", help="prepared sets, each with the number of its "
                         "first images to take (all without :COUNT)")
        args = mix.parse_args(argv[1:])
        path = mix_datasets([_set_and_count(text) for text in args.sets], args.dest, overwrite=args.overwrite)
        return summary(CorruptedDataset(path), "wrote")
    args = build_parser().parse_args(argv)
    if args.masks is not None:
        given = [flag for flag, value in (("--p", args.p), ("--resolution", args.resolution)) if value is not None]
        given += ["--noise"] if args.noise else []
        if given or args.shared_channels:
            raise DataError(f"--masks imports masks as they are: drop {', '.join(given) or '--shared-channels'} "
                            "(resizing would blend erased pixels into observed ones; resize images and masks "
                            "beforehand)")
        path = import_masked(args.source, args.masks, args.dest, delta=args.delta, max_size=args.max_size,
                             overwrite=args.overwrite, sigma_min=args.sigma_min)
    else:
        if args.p is None and args.corruption != "none":
            raise DataError("give --p (with --corruption) to corrupt clean images, --corruption none for no masks, "
                            "or --masks to import masks")
        path = prepare_corrupted(args.source, args.dest, corruption=args.corruption, p=args.p, delta=args.delta,
                                 shared_channels=args.shared_channels, resolution=args.resolution,
                                 max_size=args.max_size, seed=args.seed, overwrite=args.overwrite, noise=args.noise,
                                 sigma_min=args.sigma_min)
    return summary(CorruptedDataset(path), "wrote")


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: 0 on success, 1 with a one-line error on bad input."""
    try:
        print(_run(sys.argv[1:] if argv is None else list(argv)))
    except (ValueError, OSError) as error:  # DataError is a ValueError; the operators raise ValueError
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
