"""What `python -m ambient_fast.evaluate` reports: image sets read from folders, .npy files or the built-in
synthetic set; the Fréchet distance of their features, with a warning when the counts are too small
for the feature dimension and the reference set's own floor beside it; nearest-neighbour
similarities to the training images (the paper's memorisation study, Figure 6).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ambient_fast.data.format import META, CorruptedDataset
from ambient_fast.data.synthetic import clean_twin, is_synthetic
from ambient_fast.evaluation.metrics import (InceptionFeatures, cosine_nearest_neighbour, frechet_distance,
                                             nearest_neighbour_similarity, pixel_features)
from ambient_fast.files.atomic import read_json
from ambient_fast.files.images import load_png

SAMPLE_GRID = "grid.png"  # the overview `python -m ambient_fast.sample` writes beside the samples
SAMPLING_RECORD = "sampling.json"  # `python -m ambient_fast.sample`'s record of the images it wrote


@dataclass
class Images:
    """Images read for evaluation: uint8 (N, C, H, W), a name per image (its file, or its row of
    a .npy) and where they came from."""

    array: np.ndarray
    names: list[str]
    source: str

    @property
    def shape_text(self) -> str:
        return "x".join(map(str, self.array.shape[1:]))


def load_images(path, role: str) -> Images:
    """A folder of PNGs (sorted by name, grid.png skipped) or a uint8 .npy (N, C, H, W), C = 1 or 3.
    `role` (the option's name) starts every error message."""
    path = Path(path)
    if path.is_file() and path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:  # EOFError: an empty file
            raise ValueError(f"{role} {path} cannot be read ({error})") from None
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1] not in (1, 3):
            raise ValueError(f"{role} {path} holds {array.dtype} {array.shape}; expected uint8 (N, C, H, W), "
                             "channels first, C = 1 or 3")
        if not len(array):
            raise ValueError(f"{role} {path} holds no images")
        return Images(array, [f"{path.name}[{i}]" for i in range(len(array))], str(path))
    if not path.exists():
        raise ValueError(f"{role} {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"{role} {path} is neither a folder of PNG images nor a .npy file")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".png" and p.name != SAMPLE_GRID)
    if not files:
        raise ValueError(f"{role} {path} holds no .png images (a sample grid, {SAMPLE_GRID}, does not count)")
    _check_sampling_record(path, [file.name for file in files], role)
    arrays = [load_png(file) for file in files]
    first_of_shape = {}
    for file, array in zip(files, arrays):
        first_of_shape.setdefault(array.shape, file.name)
    if len(first_of_shape) > 1:
        found = ", ".join(f"{w}x{h} with {c} channel(s) (e.g. {name})" for (h, w, c), name in first_of_shape.items())
        raise ValueError(f"{role} {path} mixes image sizes: {found}; evaluate images of one size and kind")
    channels = arrays[0].shape[2]
    if channels not in (1, 3):
        raise ValueError(f"{role} {path}: the images have {channels} channels; use RGB or greyscale images")
    return Images(np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2)), [f.name for f in files], str(path))


def _check_sampling_record(path: Path, names: list[str], role: str) -> None:
    """A sample folder must hold exactly the images its sampling.json lists: a stale image left by
    another sampling would otherwise be scored with them."""
    record = path / SAMPLING_RECORD
    if not record.is_file():
        return
    listed = read_json(record).get("images")
    if listed is None:  # written before sampling.json listed its images
        return
    extra, missing = sorted(set(names) - set(listed)), sorted(set(listed) - set(names))
    if extra or missing:
        found = "; ".join(([f"not listed: {', '.join(extra[:4])}"] if extra else [])
                          + ([f"missing: {', '.join(missing[:4])}"] if missing else []))
        raise ValueError(f"{role} {path} does not hold the images its {SAMPLING_RECORD} lists ({found}); they are "
                         "not all from one sampling: sample again into an empty folder (or with --overwrite)")


def load_clean(path, role: str, twin_file: str, what: str) -> Images:
    """Clean images from a folder, a .npy, or the clean twin of the built-in synthetic data set
    (`twin_file` there, described as `what`). Other prepared data sets are refused: they hold
    only corrupted images."""
    path = Path(path)
    if not (path / META).is_file():
        return load_images(path, role)
    if not is_synthetic(CorruptedDataset(path)):
        raise ValueError(f"{role} {path} is a prepared (corrupted) data set: it holds only the observed pixels "
                         "A x, so it cannot serve as clean images; pass clean images instead (a folder of PNGs or "
                         "a uint8 .npy (N, C, H, W))")
    twin = clean_twin(path) / twin_file
    if not twin.is_file():
        raise ValueError(f"{role} {path} is the built-in synthetic set, but its clean twin {twin} is missing; "
                         "ambient_fast.data.synthetic.synthetic_dataset with the set's parameters writes it again")
    images = load_images(twin, role)
    images.source = f"{twin} ({what})"
    return images


def _check_shapes(samples: Images, others: dict) -> None:
    for role, images in others.items():
        if images.array.shape[1] != samples.array.shape[1]:
            raise ValueError(f"--samples have {samples.array.shape[1]} channel(s), {role} {images.array.shape[1]}; "
                             "compare images of one kind (RGB or greyscale)")
        if images.array.shape[2:] != samples.array.shape[2:]:
            raise ValueError(f"--samples are {samples.shape_text} images, {role} {images.shape_text}; "
                             "compare images of one size")


def small_count_warnings(counts: dict, dimension: int) -> list[str]:
    """A warning for each image set (`counts`: role -> number of images) too small for features of
    `dimension`: the Fréchet distance fits a covariance to each set, and N images give one of rank
    at most N - 1, so with N <= dimension it is singular and the distance measures the count as
    much as the images (it falls as N grows, whatever the images)."""
    return [f"{role} has {count} images for {dimension}-dimensional features: their covariance estimate has rank "
            f"at most {count - 1} < {dimension}, so the Fréchet distance is dominated by the estimate's error; use "
            f"well over {dimension} images, and compare only distances computed from equal counts"
            for role, count in counts.items() if count <= dimension]


def reference_floor(reference_features: np.ndarray) -> Optional[dict]:
    """The Fréchet distance of the reference set against itself, split in halves (even and odd rows,
    so that an ordered set splits fairly): what two samples of the true distribution of half the
    reference's size score, the floor to read a distance against. None below 4 images (a
    covariance needs 2 per half)."""
    if len(reference_features) < 4:
        return None
    halves = reference_features[0::2], reference_features[1::2]
    return dict(value=frechet_distance(*halves), count_per_half=len(halves[1]))


def evaluate(samples: Images, reference: Images, training: Optional[Images], features: str,
             weights: Optional[str], device, batch: int) -> dict:
    """The report: Fréchet distance, its reference floor, counts, warnings about small counts, and
    nearest-neighbour similarities when `training`."""
    _check_shapes(samples, {"--reference": reference, **({"--training": training} if training else {})})
    extract = InceptionFeatures(weights, device, batch) if features == "inception" else pixel_features
    extracted = []  # (images, their features): a set given twice (as --reference and --training, say) runs once

    def features_of(array: np.ndarray) -> np.ndarray:
        for seen, found in extracted:
            if seen.shape == array.shape and np.array_equal(seen, array):
                return found
        extracted.append((array, extract(array)))
        return extracted[-1][1]

    sample_features, reference_features = features_of(samples.array), features_of(reference.array)
    dimension = sample_features.shape[1]
    report = dict(
        samples=dict(source=samples.source, count=len(samples.array), shape=list(samples.array.shape[1:])),
        reference=dict(source=reference.source, count=len(reference.array)),
        features=features, feature_dim=dimension, weights=weights,
        frechet_distance=frechet_distance(sample_features, reference_features),
        reference_floor=reference_floor(reference_features),
        warnings=small_count_warnings({"--samples": len(samples.array), "--reference": len(reference.array)},
                                      dimension))
    if training is not None:
        if features == "inception":
            similarity, index = cosine_nearest_neighbour(sample_features, features_of(training.array))
        else:
            similarity, index = nearest_neighbour_similarity(samples.array, training.array)
        top = int(similarity.argmax())
        report["training"] = dict(source=training.source, count=len(training.array))
        report["nearest_neighbour"] = dict(
            features="inception pool3" if features == "inception" else "pixels, each image's mean subtracted",
            mean=float(similarity.mean()), median=float(np.median(similarity)),
            p95=float(np.percentile(similarity, 95)), max=float(similarity[top]),
            most_similar=dict(sample=samples.names[top], training=training.names[index[top]]),
            per_sample=[dict(sample=name, similarity=float(s), training=training.names[i])
                        for name, s, i in zip(samples.names, similarity, index)])
    return report


def print_table(report: dict) -> None:
    name = "FID (Inception pool3)" if report["features"] == "inception" else "Fréchet distance (pixels)"
    rows = [("samples", f"{report['samples']['count']} x {'x'.join(map(str, report['samples']['shape']))}  "
                        f"{report['samples']['source']}"),
            ("reference", f"{report['reference']['count']}  {report['reference']['source']}"),
            ("features", f"{report['features']}, {report['feature_dim']}-d"),
            (name, f"{report['frechet_distance']:.4f}")]
    floor = report["reference_floor"]
    if floor is not None:
        rows.append(("reference floor", f"{floor['value']:.4f}  (the reference's two halves of {floor['count_per_half']} "
                                        "images against each other)"))
    if "training" in report:
        nn = report["nearest_neighbour"]
        rows += [("training", f"{report['training']['count']}  {report['training']['source']}"),
                 ("top-1 similarity", f"mean {nn['mean']:.4f}  median {nn['median']:.4f}  95% {nn['p95']:.4f}  "
                                      f"max {nn['max']:.4f}  ({nn['features']})"),
                 ("most similar", f"{nn['most_similar']['sample']} ~ training {nn['most_similar']['training']}")]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label.ljust(width)}  {value}")
