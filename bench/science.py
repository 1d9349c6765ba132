"""The paper's central claims at laptop scale: `python bench/science.py [--quick] [--memorization | --noisy]`.

On the built-in synthetic distribution (ambient_fast.data.synthetic: one coloured rectangle on a
black or gradient background, 16x16; its clean distribution is known exactly) the same model is
trained, with the same steps and seeds, as

    ambient      delta 0.1, mask-aware preconditioning (our default)
    reference    delta 0.1, the reference's preconditioning
    unit-weight  ambient with the loss on pixels B hid weighted 1 / c_out^2 (--hidden-weight unit)
    naive        delta 0: no further corruption, the network is never graded on a pixel it did not see
    clean        p 0, delta 0: trained on the clean images (the upper bound)

at corruption p in {0.6, 0.8, 0.9} (--quick: p 0.8, ambient and naive); unit-weight only at p 0.8 unless
--variants names it (the question is whether the weight changes the outcome, and a model per p costs
about 5 minutes on 2 cores). Each model then draws the
same number of samples with the fixed-mask sampler (18 Heun steps; survival (1 - p)(1 - delta), the
clean model 1), scored against held-out clean images by
  - the Fréchet distance of pixel features (lower is better),
  - the palette fraction: the share of sample pixels whose colour the distribution can produce
    (1 on clean images),
  - one-step restoration PSNR of held-out images corrupted with the same p.

--memorization trains on 64 images only (--memorization-images), clean and at p 0.8, for long
enough that the clean model copies its training images, and compares the nearest-neighbour
similarity of samples to the training set (the paper's Figure 6), at the end and at every snapshot.

--noisy trains the same model, with the same steps and seeds, on mixtures of clean, noisy (additive
Gaussian noise of level 0.2) and masked images (ambient_fast.objective.objective: noisy images only above their
noise level, with Tweedie targets): 100% clean; 10% clean only; 10% clean + 90% noisy, ambiently and
naively (the noise ignored); 100% noisy; 10% clean + 90% masked (p 0.8). Its report goes to
science-noisy.md (science-noisy-quick.md with --quick).

Every trained model stays in --work (default runs/science) and a re-run reuses it, so an
interrupted run loses at most the model it was training. The results go to --results (default
bench/results): science.md (or science-quick.md), the numbers as JSON, sample grids side by side,
and the memorization histogram.
"""
import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ambient_fast.files.checkpoints import load_network  # noqa: E402
from ambient_fast.training.config import TrainConfig  # noqa: E402
from ambient_fast.data.synthetic import clean_images, clean_twin, palette_fraction, synthetic_dataset  # noqa: E402
from ambient_fast.files.atomic import atomic_write, write_json, write_text  # noqa: E402
from ambient_fast.files.images import from_uint8, grid, save_png, to_uint8  # noqa: E402
from ambient_fast.evaluation.metrics import frechet_distance, nearest_neighbour_similarity, pixel_features, psnr  # noqa: E402
from ambient_fast.evaluation.restoration import restore  # noqa: E402
from ambient_fast.sampling.samplers import ambient_sample, sampling_sigmas, seeded_inputs  # noqa: E402
from ambient_fast.training.trainer import Trainer  # noqa: E402

RESOLUTION = 16
DATA_SEED = 0
RESTORE_SIGMA = 0.02  # the restore CLI's default noise level
FINAL_NETWORK = "network-final.safetensors"
FINAL_NETWORKS = (FINAL_NETWORK, "unet-ema")  # the end of a run: ours, and a fine-tuned diffusers UNet's (bench/finetune.py)
GRID_IMAGES = 4096  # training images of the grid; its held-out twin is the reference set of every score
HIDDEN_WEIGHT_P = 0.8  # the only p at which the default grid compares hidden-pixel weights


class Variant(NamedTuple):
    name: str
    clean_data: bool = False      # train on p = 0
    delta: float = 0.1
    mask_aware: bool = True
    hidden_weight: str = "lambda"


VARIANTS = {v.name: v for v in (
    Variant("ambient"),
    Variant("reference", mask_aware=False),
    Variant("unit-weight", hidden_weight="unit"),
    Variant("naive", delta=0.0),
    Variant("clean", clean_data=True, delta=0.0),
)}


class Settings(NamedTuple):
    steps: int
    batch: int
    samples: int
    seed: int
    n: int = GRID_IMAGES  # training images


def training_p(variant: Variant, p: float) -> float:
    """The erasure probability of the data `variant` trains on at grid level p."""
    return 0.0 if variant.clean_data else p


def run_dir(work: Path, variant: Variant, p: float, settings: Settings) -> Path:
    """The folder of one trained model, keyed by everything that decides it."""
    return work / f"p{training_p(variant, p):g}-{variant.name}-n{settings.n}-steps{settings.steps}-batch{settings.batch}-seed{settings.seed}"


def training_seconds(run: Path) -> "float | None":
    """Training wall time from the run's stats.jsonl (images seen / the last reported rate)."""
    try:
        last = json.loads((run / "stats.jsonl").read_text().splitlines()[-1])
        return 1000 * last["Progress/kimg"] / last["Timing/images_per_sec"]
    except (OSError, IndexError, KeyError, ValueError, ZeroDivisionError):
        return None


def cached(path: Path, compute):
    """compute() once: its JSON-able result is kept at `path` and read back on re-runs."""
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    write_json(path, value)
    return value


def train(work: Path, data_root: Path, variant: Variant, p: float, settings: Settings) -> Path:
    """Train (or reuse) one model of the grid; returns its final EMA network."""
    run = run_dir(work, variant, p, settings)
    if (run / FINAL_NETWORK).is_file():
        return train_run(run, None, settings)
    data = synthetic_dataset(data_root, resolution=RESOLUTION, n=settings.n, p=training_p(variant, p), delta=variant.delta,
                             seed=DATA_SEED)
    return train_run(run, data, settings, delta=variant.delta, mask_aware=variant.mask_aware,
                     hidden_weight=variant.hidden_weight)


def train_run(run: Path, data: "Path | None", settings: Settings, **options) -> Path:
    """Train (or reuse, or resume) the model of `run` on `data` with the config `options`; returns its
    final EMA network."""
    final = run / FINAL_NETWORK
    if final.is_file():
        print(f"reusing {final}", flush=True)
        return final
    cfg = TrainConfig(data=str(data), out=str(run), steps=settings.steps, batch=settings.batch, seed=settings.seed,
                      snapshot_every=max(settings.steps // 4, 1), sample_count=16, **options)
    resume = (run / "config.json").is_file()
    trainer = Trainer(cfg, resume=resume)
    try:
        finished = trainer.train() == 0 and final.is_file()
    finally:
        trainer.close()
    if not finished:
        raise RuntimeError(f"training {run.name} did not finish")
    return final


def nchw_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 (N, C, H, W), the metrics' layout."""
    return np.ascontiguousarray(to_uint8(images).transpose(0, 3, 1, 2))


def sample(network: Path, count: int, seed: int) -> np.ndarray:
    """`count` samples (uint8 (N, C, H, W)) from the fixed-mask sampler at the model's training survival."""
    loaded = load_network(network)
    shape = (loaded.model.img_channels // 2, loaded.model.img_resolution, loaded.model.img_resolution)
    shared = bool(loaded.corruption.get("shared_channels", True))
    images = []
    for start in range(0, count, 128):
        seeds = range(seed * 10 ** 6 + start, seed * 10 ** 6 + min(start + 128, count))
        latents, masks = seeded_inputs(seeds, shape, 1, loaded.survival, shared, "cpu")
        images.append(nchw_uint8(ambient_sample(loaded.model, latents, masks, **sampling_sigmas(loaded))))
    return np.concatenate(images)


def restoration_psnr(network: Path, clean: np.ndarray, p: float, seed: int) -> float:
    """Mean PSNR of one-step restorations of `clean` corrupted by shared-channel dust of erasure p."""
    model = load_network(network).model
    generator = torch.Generator().manual_seed(seed)
    n, c, h, w = clean.shape
    mask = (torch.rand((n, 1, h, w), generator=generator) >= p).float().expand(n, c, h, w)
    observed = from_uint8(torch.from_numpy(clean))
    restored = restore(model, observed * mask, mask, RESTORE_SIGMA)
    return float(psnr(nchw_uint8(restored), clean).mean())


def snapshot_step(network: Path, settings: Settings) -> int:
    """The training step a saved network was written at (network-snapshot-000002000 -> 2000)."""
    return settings.steps if network.name in FINAL_NETWORKS else int(network.stem.rsplit("-", 1)[-1])


def cached_samples(network: Path, settings: Settings) -> np.ndarray:
    """sample(), kept in the run folder (uint8 .npy) so that a re-run scores without sampling again."""
    snapshot = "" if network.name in FINAL_NETWORKS else f"-step{snapshot_step(network, settings)}"
    path = network.parent / f"science-samples-{settings.samples}-seed{settings.seed}{snapshot}.npy"
    if path.is_file():
        return np.load(path)
    samples = sample(network, settings.samples, settings.seed)
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to the temporary name
            np.save(f, samples)

    atomic_write(path, write)
    return samples


def score(samples: np.ndarray, held_out: np.ndarray) -> dict:
    return dict(frechet_distance=frechet_distance(pixel_features(samples), pixel_features(held_out)),
                palette_fraction=palette_fraction(samples))


def held_out_images(data_root: Path, n: int) -> np.ndarray:
    """The held-out clean images of the synthetic set (the same for every p)."""
    return np.load(clean_twin(synthetic_dataset(data_root, resolution=RESOLUTION, n=n, p=0.0, delta=0.0,
                                                seed=DATA_SEED)) / "held_out.npy")


def run_grid(args, settings: Settings, ps, variants) -> "tuple[list[dict], dict[str, np.ndarray]]":
    """Train, sample and score every (p, variant); returns the rows and 64 samples of each."""
    data_root = args.work / "data"
    held_out = held_out_images(data_root, settings.n)
    restore_set = held_out[:256]
    rows, grids = [], {}
    for p in ps:
        for name in variants:
            if name == "clean" and p != ps[0]:
                continue  # one clean model serves every p
            if name == "unit-weight" and p != HIDDEN_WEIGHT_P and not args.variants:
                continue
            network = train(args.work, data_root, VARIANTS[name], p, settings)
            run = network.parent
            samples = cached_samples(network, settings)
            row = dict(p=0.0 if name == "clean" else p, variant=name,
                       **cached(run / f"science-score-{settings.samples}.json", lambda: score(samples, held_out)))
            # The clean model restores images corrupted at every p of the grid; the others at their own.
            row["restoration_psnr"] = {
                f"{q:g}": cached(run / f"science-psnr-p{q:g}.json",
                                 lambda q=q: restoration_psnr(network, restore_set, q, settings.seed))
                for q in (ps if name == "clean" else [p])}
            row["training_seconds"] = training_seconds(run)
            rows.append(row)
            grids[f"p={row['p']:g} {name}"] = samples[:64]
            print(json.dumps(row), flush=True)
    return rows, grids


# ----------------------------------------------------------------------------------------------
# Noisy images and mixtures (--noisy): Daras et al. 2024-2025 at laptop scale


FRESH_SEED = 1000    # data seed of new clean images for the floor (neither the training nor the held-out images)
NOISE_LEVEL = 0.2    # sigma_n of the noisy images, on the [-1, 1] scale (the published CIFAR-10 experiment's)
MIX_P = 0.8          # erasure of the masked images of the clean + masked mixture
MIXTURE_ROWS = {     # row -> (set: (clean share, noisy share, masked share, images), trainer options)
    "100% clean": ((1.0, 0.0, 0.0, GRID_IMAGES), {}),
    "10% clean only": ((1.0, 0.0, 0.0, GRID_IMAGES // 10), {}),
    "10% clean + 90% noisy, ambient": ((0.1, 0.9, 0.0, GRID_IMAGES), {}),
    "10% clean + 90% noisy, naive": ((0.1, 0.9, 0.0, GRID_IMAGES), dict(ignore_noise=True)),
    "100% noisy, ambient": ((0.0, 1.0, 0.0, GRID_IMAGES), {}),
    "10% clean + 90% masked (p 0.8), ambient": ((0.1, 0.0, 0.9, GRID_IMAGES), {}),
    # Where clean images are scarce (the published regime: 5,000 clean CIFAR-10 images do not suffice).
    "1% clean only": ((1.0, 0.0, 0.0, GRID_IMAGES // 100), {}),
    "1% clean + 99% noisy, ambient": ((0.01, 0.99, 0.0, GRID_IMAGES), {}),
}


def mixture_set(data_root: Path, clean: float, noisy: float, masked: float, n: int) -> Path:
    """Prepare (once) a set of the first n synthetic training images: the first `clean` share as they
    are, then a `noisy` share with Gaussian noise of NOISE_LEVEL, then a `masked` share with shared
    dust masks of MIX_P (delta 0.1), each image with its record (the format's version 2)."""
    from ambient_fast.objective.corruption import make_operator
    from ambient_fast.data.format import RECORD, CorruptedDataset, DataError, DatasetWriter
    from ambient_fast.data.prepare import level_values, noisy_values

    path = data_root / f"mixture-n{n}-clean{clean:g}-noisy{noisy:g}-sigma{NOISE_LEVEL:g}-masked{masked:g}-p{MIX_P:g}"
    try:
        return CorruptedDataset(path).path
    except DataError:
        pass
    images = clean_images(n, RESOLUTION, DATA_SEED)
    counts = np.round(np.array([clean, noisy, masked]) * n).astype(int)
    counts[0] = n - counts[1:].sum()
    kinds = np.repeat([0, 1, 2], counts)
    masks = np.ones(images.shape, bool)
    if counts[2]:
        _, A = make_operator("dust", p=MIX_P, delta=0.1, shared_channels=True).corrupt(
            torch.zeros((counts[2], *images.shape[1:])), torch.Generator().manual_seed(DATA_SEED))
        masks[kinds == 2] = A.numpy() != 0
    records = np.zeros(n, RECORD)
    records["masked"] = kinds == 2
    records["sigma_n"] = np.where(kinds == 1, NOISE_LEVEL, 0.0)
    observed, values = images * masks, None
    if counts[1]:
        values = level_values(observed, masks)
        noisy_rows, noisy_observed = noisy_values(images[kinds == 1], masks[kinds == 1], NOISE_LEVEL,
                                                  torch.Generator().manual_seed(DATA_SEED + 1))
        values[kinds == 1], observed[kinds == 1] = noisy_rows, noisy_observed
    parts = [{"kind": "none", "count": int(counts[0])}, {"kind": "none", "sigma_n": NOISE_LEVEL, "count": int(counts[1])},
             {"kind": "dust", "p": MIX_P, "delta": 0.1, "shared_channels": True, "count": int(counts[2])}]
    corruption = {"kind": "mix", "delta": 0.1, "parts": [part for part in parts if part["count"]]}
    with DatasetWriter(path, count=n, shape=images.shape[1:], values=values is not None, records=True) as writer:
        writer.append(observed, masks, None, values, records)
        return writer.commit(corruption, f"synthetic mixture ({counts[0]} clean, {counts[1]} noisy at sigma "
                                         f"{NOISE_LEVEL:g}, {counts[2]} masked at p {MIX_P:g}; seed {DATA_SEED})")


def run_mixtures(args, settings: Settings) -> "tuple[list[dict], dict[str, np.ndarray]]":
    """Train, sample and score every row of MIXTURE_ROWS (same model, steps and seeds)."""
    data_root = args.work / "data"
    held_out = held_out_images(data_root, GRID_IMAGES)
    rows, grids = [], {}
    for name, ((clean, noisy, masked, n), options) in MIXTURE_ROWS.items():
        data = mixture_set(data_root, clean, noisy, masked, n)
        slug = name.replace("%", "pc").replace(" ", "-").replace(",", "").replace("(", "").replace(")", "").replace("+", "and")
        run = args.work / f"mixture-{slug}-steps{settings.steps}-batch{settings.batch}-seed{settings.seed}"
        network = train_run(run, data, settings, **options)
        samples = cached_samples(network, settings)
        # Copies of the clean training images (all of them a model saw unnoised and unmasked).
        clean_seen = clean_images(n, RESOLUTION, DATA_SEED)[: int(round(clean * n))]
        copies = None
        if len(clean_seen):
            similarity, _ = nearest_neighbour_similarity(samples, clean_seen)
            copies = dict(clean_images=len(clean_seen), copy_share=float((similarity > 0.95).mean()),
                          median_similarity=float(np.median(similarity)))
        row = dict(model=name, images=n, **cached(run / f"science-score-{settings.samples}.json",
                                                   lambda: score(samples, held_out)),
                   copies=copies, training_seconds=training_seconds(run))
        rows.append(row)
        grids[name] = samples[:64]
        print(json.dumps(row), flush=True)
    return rows, grids


def report_header(title: str, elapsed: float) -> "list[str]":
    """A report's title and its date, device, software, wall time and command lines."""
    return [f"# {title}", "",
            f"- Date: {datetime.date.today()}. Device: CPU ({platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads), torch {torch.__version__}. Wall time of this invocation "
            f"{elapsed / 60:.1f} min (models, samples and scores found in --work are reused, not redone).",
            "- Command: `" + " ".join(["python bench/science.py", *sys.argv[1:]]) + "`"]


def mixture_report(args, settings: Settings, rows, grids, elapsed: float) -> Path:
    stem = "science-noisy" + ("-quick" if args.quick else "")
    args.results.mkdir(parents=True, exist_ok=True)
    # The floor: as many new images of the distribution as a model's samples, scored as its samples are.
    fresh = clean_images(settings.samples, RESOLUTION, FRESH_SEED)
    floor = score(fresh, held_out_images(args.work / "data", GRID_IMAGES))
    published = {"100% clean": 1.99, "10% clean + 90% noisy, ambient": 2.81, "10% clean only": 17.30,
                 "100% noisy, ambient": 11.93}
    lines = [*report_header(f"Noisy images and mixtures at laptop scale ({'quick' if args.quick else 'full'})", elapsed),
             f"- Data: the built-in synthetic set's first {GRID_IMAGES} training images, {RESOLUTION}x{RESOLUTION}: "
             f"clean, with Gaussian noise of level {NOISE_LEVEL:g} on the [-1, 1] scale (stored unclipped), or "
             f"masked (shared dust, p {MIX_P:g}, delta 0.1), as each row says (a mixture's clean images first); "
             f"'10% clean only' and '1% clean only' train on the first {GRID_IMAGES // 10} and {GRID_IMAGES // 100} "
             "images, clean. Scored against 4,096 held-out clean images; copies: the share of samples whose pixel "
             "correlation with one of the model's clean training images exceeds 0.95.",
             f"- Training: DDPM++ (the default 16x16 size), {settings.steps} steps of batch {settings.batch}, seed "
             f"{settings.seed}, for every row; {settings.samples} samples per model, 18 Heun steps, unmasked "
             "(every model saw images A hides nothing of); the 100% noisy model's sampler stops at sigma "
             f"{NOISE_LEVEL:g}, the lowest level it trained at. Naive: the noisy images trained as if clean.", "",
             "| model | images | Fréchet distance (pixels) | palette fraction | copies of its clean images | "
             "published FID (CIFAR-10, sigma_n 0.2) | training |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        seconds, copies = row.get("training_seconds"), row.get("copies")
        copied = "-" if copies is None else f"{100 * copies['copy_share']:.1f}% (of {copies['clean_images']})"
        lines.append(f"| {row['model']} | {row['images']} | {row['frechet_distance']:.2f} | {row['palette_fraction']:.3f} | "
                     f"{copied} | {published.get(row['model'], '-')} | "
                     f"{'?' if seconds is None else f'{seconds / 60:.1f} min'} |")
    lines += ["", f"Floor: {settings.samples} new clean images of the distribution, scored like a model's samples "
              f"(against the same 4,096 held-out images), give Fréchet distance {floor['frechet_distance']:.2f} and "
              f"palette fraction {floor['palette_fraction']:.3f}: what a model that samples the distribution "
              "exactly would show.", "",
              f"![samples]({stem}-samples.png)", "", "Samples, left to right: " + ", ".join(grids), ""]
    side_by_side(grids, args.results / f"{stem}-samples.png")
    path = args.results / f"{stem}.md"
    write_text(path, "\n".join(lines))
    write_text(args.results / f"{stem}.json", json.dumps(dict(rows=rows, settings=settings._asdict(),
                                                              floor=floor), indent=1))
    return path


def run_memorization(args, settings: Settings) -> "tuple[dict, dict]":
    """Clean and p = 0.8 models on a few images: nearest-neighbour similarity of their samples to the
    training set, at the end of training (name -> similarities) and at every snapshot (name -> {step: ...})."""
    data_root = args.work / "data"
    training = clean_images(settings.n, RESOLUTION, DATA_SEED)  # what the clean model saw (the p 0.8 one, masked)
    final, by_step = {}, {}
    for name, p in (("clean", 0.0), ("ambient", 0.8)):
        label = f"{name} (p {p:g})"
        network = train(args.work, data_root, VARIANTS[name], p, settings)
        # The snapshots show when copying starts: the EMA network after k steps, as a k-step run would end.
        networks = sorted(network.parent.glob("network-snapshot-*.safetensors")) + [network]
        by_step[label] = {snapshot_step(n, settings): nearest_neighbour_similarity(cached_samples(n, settings), training)[0]
                          for n in networks}
        final[label] = by_step[label][settings.steps]
    # What a model that generalises perfectly would show: new clean images against the same training set.
    fresh = held_out_images(data_root, GRID_IMAGES)[: settings.samples]
    final["held-out clean images"], _ = nearest_neighbour_similarity(fresh, training)
    return final, by_step


def histogram_png(similarities: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(min(v.min() for v in similarities.values()), 1.0, 41)
    for label, values in similarities.items():
        axes.hist(values, bins=bins, alpha=0.6, label=label)
    axes.set_xlabel("similarity of a sample to its nearest training image (pixel correlation)")
    axes.set_ylabel("samples")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def side_by_side(grids: dict, path: Path) -> None:
    """One PNG: the sample grids in a row, each 8 x 8, separated by white columns."""
    tiles = [grid(list(samples.transpose(0, 2, 3, 1)), columns=8) for samples in grids.values()]
    height = max(t.shape[0] for t in tiles)
    gap = np.full((height, 6, 3), 255, np.uint8)
    parts = []
    for tile in tiles:
        padded = np.full((height, tile.shape[1], 3), 255, np.uint8)
        padded[: tile.shape[0]] = tile
        parts += [padded, gap]
    save_png(np.concatenate(parts[:-1], axis=1), path)


def report(args, settings, rows, grids, memorization, memorization_by_step, memo_settings, elapsed: float) -> Path:
    stem = "science-quick" if args.quick else "science-memorization" if args.memorization else "science"
    args.results.mkdir(parents=True, exist_ok=True)
    lines = [*report_header(f"Ambient diffusion at laptop scale ({'quick' if args.quick else 'grid'})", elapsed),
             f"- Data: built-in synthetic set, {RESOLUTION}x{RESOLUTION}, {settings.n} training images, dust "
             "corruption shared over channels; scored against 4,096 held-out clean images.",
             f"- Training: DDPM++ (the default 16x16 size), {settings.steps} steps of batch {settings.batch}, "
             f"training seed {settings.seed} (initial weights, sigma, noise, B, loader order), data seed {DATA_SEED}; "
             f"{settings.samples} samples per model from sample seeds {settings.seed * 10 ** 6}.."
             f"{settings.seed * 10 ** 6 + settings.samples - 1} (one latent and one mask per seed; 18 Heun steps, "
             "fixed mask at the training survival (1 - p)(1 - delta); the clean model unmasked); restoration: "
             f"256 held-out images, dust masks from seed {settings.seed}, one evaluation at sigma {RESTORE_SIGMA}.", ""]
    if rows:
        lines += ["| p | variant | Fréchet distance (pixels) | palette fraction | restoration PSNR (dB) | training |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for row in rows:
            restoration = ", ".join(f"{v:.2f} (p {q})" for q, v in row["restoration_psnr"].items())
            seconds = row.get("training_seconds")
            lines.append(f"| {row['p']:g} | {row['variant']} | {row['frechet_distance']:.2f} | "
                         f"{row['palette_fraction']:.3f} | {restoration} | "
                         f"{'?' if seconds is None else f'{seconds / 60:.1f} min'} |")
        clean = held_out_images(args.work / "data", settings.n)
        reference = score(clean[:settings.samples], clean[settings.samples: 2 * settings.samples])
        lines += ["", f"Floor: {settings.samples} held-out clean images against other held-out clean images score "
                  f"Fréchet distance {reference['frechet_distance']:.2f}, palette fraction "
                  f"{reference['palette_fraction']:.3f}.", "",
                  f"![samples]({stem}-samples.png)", "", "Samples, left to right: " + ", ".join(grids), ""]
        side_by_side(grids, args.results / f"{stem}-samples.png")
    if memorization:
        histogram_png(memorization, args.results / f"{stem}-memorization.png")
        lines += ["## Memorization", "",
                  f"{memo_settings.n} training images, {memo_settings.steps} steps of batch {memo_settings.batch}; "
                  f"{memo_settings.samples} samples per model; similarity = correlation of the pixels with the "
                  "nearest training image (1 = a copy). The held-out row is new clean images from the "
                  "distribution against the same training set: what a model that does not copy shows.", "",
                  "| model | median | 90th percentile | share above 0.95 |", "| --- | --- | --- | --- |"]
        for name, values in memorization.items():
            lines.append(f"| {name} | {np.median(values):.3f} | {np.quantile(values, 0.9):.3f} | "
                         f"{(values > 0.95).mean():.3f} |")
        lines += ["", f"![memorization]({stem}-memorization.png)", "",
                  "By training step (the EMA network of each snapshot, the same sample seeds): median similarity "
                  "and share above 0.95.", "",
                  "| step | " + " | ".join(f"{name} median | {name} > 0.95" for name in memorization_by_step) + " |",
                  "| --- |" + " --- | --- |" * len(memorization_by_step)]
        for step in sorted(next(iter(memorization_by_step.values()))):
            lines.append(f"| {step} | " + " | ".join(f"{np.median(by[step]):.3f} | {(by[step] > 0.95).mean():.3f}"
                                                     for by in memorization_by_step.values()) + " |")
        lines.append("")
    path = args.results / f"{stem}.md"
    write_text(path, "\n".join(lines))
    write_text(args.results / f"{stem}.json", json.dumps(dict(
        rows=rows, memorization={k: v.tolist() for k, v in memorization.items()},
        memorization_by_step={k: {step: v.tolist() for step, v in by.items()} for k, by in memorization_by_step.items()},
        settings=settings._asdict(), memorization_settings=memo_settings._asdict() if memo_settings else None), indent=1))
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="p 0.8, ambient against naive (about 15 min on 2 cores)")
    parser.add_argument("--memorization", action="store_true", help="only the memorization experiment")
    parser.add_argument("--noisy", action="store_true", help="only the noisy-image and mixture experiment (with "
                        "--quick: 600 steps and 128 samples a model, about 12 min on 2 cores)")
    parser.add_argument("--no-memorization", action="store_true", help="the grid without the memorization experiment")
    parser.add_argument("--p", type=lambda t: [float(v) for v in t.split(",")], help="corruption levels (default 0.6,0.8,0.9)")
    parser.add_argument("--variants", type=lambda t: t.split(","), help=f"of {', '.join(VARIANTS)} (default all)")
    parser.add_argument("--steps", type=int, default=2000, help="training steps per model (default 2000)")
    parser.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    parser.add_argument("--samples", type=int, default=512, help="samples per model (default 512)")
    parser.add_argument("--memorization-images", type=int, default=64,
                        help="training images of the memorization models (default 64)")
    parser.add_argument("--memorization-samples", type=int, default=256,
                        help="samples per memorization model and snapshot (default 256)")
    parser.add_argument("--memorization-steps", type=int, default=8000,
                        help="training steps of the memorization models (default 8000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("runs/science"), help="trained models (reused on re-runs)")
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    ps = args.p or ([0.8] if args.quick else [0.6, 0.8, 0.9])
    variants = args.variants or (["ambient", "naive"] if args.quick else list(VARIANTS))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or any(not 0 < p < 1 for p in ps):
        parser.error(f"--variants among {list(VARIANTS)} and --p in (0, 1); got {variants}, {ps}")
    settings = Settings(args.steps, args.batch, args.samples, args.seed)
    start = time.time()
    if args.noisy:
        if args.quick:
            settings = settings._replace(steps=min(args.steps, 600), samples=min(args.samples, 128))
        rows, grids = run_mixtures(args, settings)
        print(f"wrote {mixture_report(args, settings, rows, grids, time.time() - start)}")
        return 0
    rows, grids = ([], {}) if args.memorization else run_grid(args, settings, ps, variants)
    memorization, memorization_by_step, memo_settings = {}, {}, None
    if args.memorization or not (args.quick or args.no_memorization):
        memo_settings = Settings(steps=args.memorization_steps, batch=args.batch, samples=args.memorization_samples, seed=args.seed,
                                 n=args.memorization_images)
        memorization, memorization_by_step = run_memorization(args, memo_settings)
    path = report(args, settings, rows, grids, memorization, memorization_by_step, memo_settings, time.time() - start)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
