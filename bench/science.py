"""The paper's central claims at laptop scale: `python bench/science.py [--quick] [--memorization | --noisy [--edm2] |
--restoration | --completion | --annotation]`.

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
science-noisy.md (science-noisy-quick.md with --quick). With --edm2 every row also trains an EDM2
network (issue 24, item 7: --arch edm2 with EDM2's recipe, sized to DDPM++'s parameter count) on the
same set with the same steps and seeds, scored with the trainer's EMA and with EDM2's post-hoc EMA,
beside the DDPM++ row (science-noisy-edm2[-quick].md).

--annotation (issue 24, item 7) runs `prepare annotate` on the synthetic images against copies blurred
and JPEG-compressed with PIL at known strengths (and unaltered copies, the control), and reports the
recovered sigma_min per strength and its rank correlation with the strength (science-annotation.md).

Every row is also scored in a feature space that penalises smoothing and noise alike: the features
of a small classifier trained on fresh clean synthetic images to recognise what decides each image
(ambient_fast.evaluation.classifier: the rectangle's colour, size and corner, the background), with
their Fréchet distance, improved precision and recall (Kynkäänniemi et al. 2019, k = 3) and the share
of images it recognises with confidence (every attribute's top probability above 0.9).

--restoration (issue 23, item 4a) restores held-out images corrupted at p 0.8 with the p 0.8 ambient
model: masks (one step; posterior samples by the ambient method and by Tweedie moments) and Gaussian
compressed sensing (least squares; Tweedie moments; DPS), scored by PSNR, SSIM and the distance of
the restored set to clean held-out images. --completion (item 4b) runs completion rounds
(python -m ambient_fast.complete) from the same model and scores unconditional samples after 0..3
rounds against the clean model's. Their reports: science-restoration.md, science-completion.md
(-quick with --quick).

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
from ambient_fast.files.atomic import write_json, write_npy, write_text  # noqa: E402
from ambient_fast.files.images import from_uint8, grid, save_png, to_uint8  # noqa: E402
from ambient_fast.evaluation.classifier import ClassifierFeatures, train_classifier  # noqa: E402
from ambient_fast.evaluation.metrics import (frechet_distance, nearest_neighbour_similarity, pixel_features,  # noqa: E402
                                             precision_recall, psnr, ssim)
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
RUN_GRID_IMAGES = 16  # images of each run's own final sample grid (the trainer's overview.png; not scored)
SAMPLER_STEPS = 18  # Heun steps of the scored samples (EDM's default, the sample command's)


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
                      snapshot_every=max(settings.steps // 4, 1), sample_count=RUN_GRID_IMAGES,
                      sample_steps=SAMPLER_STEPS, **options)
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
        images.append(nchw_uint8(ambient_sample(loaded.model, latents, masks, num_steps=SAMPLER_STEPS,
                                                **sampling_sigmas(loaded))))
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
    write_npy(path, samples)
    return samples


def score(samples: np.ndarray, held_out: np.ndarray) -> dict:
    return dict(frechet_distance=frechet_distance(pixel_features(samples), pixel_features(held_out)),
                palette_fraction=palette_fraction(samples))


CLASSIFIER_STEPS = 1500  # of batch 256: every attribute of held-out clean images recognised (measured 99.6-100%)
CONFIDENT = 0.9          # "recognised": every attribute's top probability above this


def feature_scorer(work: Path, steps: int = CLASSIFIER_STEPS) -> ClassifierFeatures:
    """The attribute classifier of the synthetic set (trained once, kept in --work)."""
    path = work / f"classifier-r{RESOLUTION}-steps{steps}.safetensors"
    if path.is_file():
        return ClassifierFeatures.load(path)
    print(f"training the feature classifier ({steps} steps)", flush=True)
    scorer = ClassifierFeatures(train_classifier(RESOLUTION, steps=steps))
    scorer.save(path)
    return scorer


class FeatureScores:
    """Scores in the classifier's features against one reference set of clean images (its features
    computed once): Fréchet distance, precision and recall (between sets of one size, as
    Kynkäänniemi et al. compare them: the first len(images) reference images), and the share of the
    images the classifier recognises with confidence."""

    def __init__(self, scorer: ClassifierFeatures, reference: np.ndarray):
        self.scorer, self.real = scorer, scorer(reference)

    def __call__(self, images: np.ndarray) -> dict:
        generated = self.scorer(images)
        precision, recall = precision_recall(self.real[:len(generated)], generated)
        return dict(feature_frechet=frechet_distance(generated, self.real), precision=precision, recall=recall,
                    recognised=float((self.scorer.confidence(images) > CONFIDENT).mean()))


def feature_floor(data_root: Path, count: int, scorer: ClassifierFeatures) -> dict:
    """The feature scores of `count` new clean images (FRESH_SEED): what an exact model would show."""
    return FeatureScores(scorer, held_out_images(data_root, GRID_IMAGES))(clean_images(count, RESOLUTION, FRESH_SEED))


FEATURE_COLUMNS = ("feature_frechet", "precision", "recall", "recognised")
FEATURE_HEADER = "feature Fréchet | precision | recall | recognised"


def feature_cells(row: dict) -> str:
    """The row's feature scores as table cells."""
    return " | ".join(f"{row[key]:.3f}" if key != "feature_frechet" else f"{row[key]:.1f}" for key in FEATURE_COLUMNS)


def held_out_images(data_root: Path, n: int) -> np.ndarray:
    """The held-out clean images of the synthetic set (the same for every p)."""
    return np.load(clean_twin(synthetic_dataset(data_root, resolution=RESOLUTION, n=n, p=0.0, delta=0.0,
                                                seed=DATA_SEED)) / "held_out.npy")


def run_grid(args, settings: Settings, ps, variants) -> "tuple[list[dict], dict[str, np.ndarray]]":
    """Train, sample and score every (p, variant); returns the rows and 64 samples of each."""
    data_root = args.work / "data"
    held_out = held_out_images(data_root, settings.n)
    restore_set = held_out[:256]
    features = FeatureScores(feature_scorer(args.work, args.classifier_steps), held_out)
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
            row.update(cached(run / f"science-features-{settings.samples}-c{args.classifier_steps}.json",
                              lambda: features(samples)))
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


# The networks of the --noisy rows. EDM2 keeps the tiny preset's levels, blocks and attention, with its
# width raised from 32 to 44 so that it has about DDPM++ tiny's parameters (counted: DDPM++ 1.41 M; EDM2
# 0.72 M at width 32, 1.37 M at 44): the comparison is then of networks and recipes, not of capacity.
EDM2_CHANNELS = 44
# EDM2's learning rate decays from t_ref on; EDM2-S on ImageNet-64 sets t_ref at 35,000 of its 524,288
# batches of 2,048 (1,073,741 kimg). The trainer's default t_ref (71,680 kimg) lies far beyond a laptop
# run, so the rows keep EDM2's proportion of the run instead.
EDM2_DECAY_SHARE = 35000 / 524288
POSTHOC_STD = 0.075  # the post-hoc EMA length of EDM2-S ImageNet-64's published network (edm2-img64-s-1073741-0.075)


class Network(NamedTuple):
    """One network scored from a --noisy run: its label and which average of the run's weights it is."""
    label: str
    posthoc_std: "float | None" = None  # the post-hoc EMA of this length; None: the trainer's EMA (network-final)


NETWORKS = {  # --noisy's architectures (--arch) -> the networks scored from each of their runs
    "ddpmpp": (Network("DDPM++"),),
    "edm2": (Network("EDM2"), Network(f"EDM2, post-hoc EMA {POSTHOC_STD:g}", POSTHOC_STD)),
}


def arch_options(arch: str, settings: Settings) -> dict:
    """The trainer options of `arch`'s runs beyond the rows' own (DDPM++: the defaults)."""
    if arch == "ddpmpp":
        return {}
    decay_kimg = settings.steps * settings.batch / 1000 * EDM2_DECAY_SHARE
    return dict(arch="edm2", model_channels=EDM2_CHANNELS, lr_decay_kimg=decay_kimg)


def posthoc_network(run: Path, std: float) -> Path:
    """The post-hoc EMA of length `std` at the end of `run`, reconstructed once from its profiles
    (python -m ambient_fast.ema) into a folder of its own, so that its samples and scores are kept
    apart from the trainer's EMA's (the folder's network-final is the final network of that average)."""
    from ambient_fast.training.posthoc_ema import reconstruct

    path = run / f"posthoc-ema-{std:g}" / FINAL_NETWORK
    if not path.is_file():
        path.parent.mkdir(exist_ok=True)
        reconstruct(run / "phema", std, path)
    return path


def parameter_count(network: Path) -> int:
    return sum(p.numel() for p in load_network(network).model.parameters())


def run_mixtures(args, settings: Settings, archs=("ddpmpp",)) -> "tuple[list[dict], dict[str, np.ndarray]]":
    """Train, sample and score every row of MIXTURE_ROWS (same steps and seeds) with every network of
    NETWORKS[arch] for each of `archs`."""
    data_root = args.work / "data"
    held_out = held_out_images(data_root, GRID_IMAGES)
    features = FeatureScores(feature_scorer(args.work, args.classifier_steps), held_out)
    rows, grids = [], {}
    for number, (name, ((clean, noisy, masked, n), options)) in enumerate(MIXTURE_ROWS.items(), 1):
        if args.rows and number not in args.rows:
            continue
        data = mixture_set(data_root, clean, noisy, masked, n)
        slug = name.replace("%", "pc").replace(" ", "-").replace(",", "").replace("(", "").replace(")", "").replace("+", "and")
        # Copies of the clean training images (all of them a model saw unnoised and unmasked).
        clean_seen = clean_images(n, RESOLUTION, DATA_SEED)[: int(round(clean * n))]
        for arch in archs:
            tag = "" if arch == "ddpmpp" else f"-{arch}"  # DDPM++'s runs keep the folders they had before --edm2
            run = args.work / f"mixture-{slug}{tag}-steps{settings.steps}-batch{settings.batch}-seed{settings.seed}"
            final = train_run(run, data, settings, **options, **arch_options(arch, settings))
            for net in NETWORKS[arch]:
                network = final if net.posthoc_std is None else posthoc_network(run, net.posthoc_std)
                samples = cached_samples(network, settings)
                copies = None
                if len(clean_seen):
                    similarity, _ = nearest_neighbour_similarity(samples, clean_seen)
                    copies = dict(clean_images=len(clean_seen), copy_share=float((similarity > 0.95).mean()),
                                  median_similarity=float(np.median(similarity)))
                row = dict(model=name, network=net.label, parameters=parameter_count(network), images=n,
                           **cached(network.parent / f"science-score-{settings.samples}.json",
                                    lambda: score(samples, held_out)),
                           copies=copies, training_seconds=training_seconds(run))
                row.update(cached(network.parent / f"science-features-{settings.samples}-c{args.classifier_steps}.json",
                                  lambda: features(samples)))
                rows.append(row)
                grids[name if len(archs) == 1 else f"{name} ({net.label})"] = samples[:64]
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
    edm2 = any(row["network"] != "DDPM++" for row in rows)
    stem = "science-noisy" + ("-edm2" if edm2 else "") + ("-quick" if args.quick else "")
    args.results.mkdir(parents=True, exist_ok=True)
    # The floor: as many new images of the distribution as a model's samples, scored as its samples are.
    fresh = clean_images(settings.samples, RESOLUTION, FRESH_SEED)
    floor = score(fresh, held_out_images(args.work / "data", GRID_IMAGES))
    floor.update(feature_floor(args.work / "data", settings.samples, feature_scorer(args.work, args.classifier_steps)))
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
             f"{NOISE_LEVEL:g}, the lowest level it trained at. Naive: the noisy images trained as if clean.", ""]
    if edm2:
        lines += [f"- EDM2 (`--arch edm2`): the tiny preset's two levels, one block per level and attention at 8x8, "
                  f"width {EDM2_CHANNELS} rather than 32 so that its parameters (counted in the table) about match "
                  "DDPM++'s; EDM2's recipe: Adam (0.9, 0.99) at reference rate 0.01, decaying as 1 / sqrt(t) from "
                  f"{settings.steps * settings.batch / 1000 * EDM2_DECAY_SHARE:.2f} kimg on (the share of the run "
                  "EDM2-S trains on ImageNet-64 before its decay: 35,000 of 524,288 batches), the loss weighted by "
                  "its log-variance head, EDM2's noise levels (ln sigma ~ N(-0.8, 1.6^2), ImageNet-64's); the same "
                  "data, steps, batch, seed, learning-rate ramp-up (1 kimg), trainer EMA "
                  "and sampler as DDPM++. Rows 'EDM2' sample the trainer's EMA (as DDPM++'s do); 'EDM2, post-hoc "
                  f"EMA {POSTHOC_STD:g}' the same run's post-hoc EMA of relative length {POSTHOC_STD:g} (EDM2-S "
                  "ImageNet-64's published choice), reconstructed from the profiles 0.05 and 0.10 it tracked "
                  "(python -m ambient_fast.ema).", ""]
    lines += ["- Feature scores: the attribute classifier's features (see bench/science.py's docstring), "
              "against the held-out images; recognised = every attribute's top probability above 0.9.", "",
              f"| model | network (parameters) | images | Fréchet distance (pixels) | palette fraction | {FEATURE_HEADER} "
              "| copies of its clean images | published FID (CIFAR-10, sigma_n 0.2) | training |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        seconds, copies = row.get("training_seconds"), row.get("copies")
        copied = "-" if copies is None else f"{100 * copies['copy_share']:.1f}% (of {copies['clean_images']})"
        lines.append(f"| {row['model']} | {row['network']} ({row['parameters'] / 1e6:.2f} M) | {row['images']} | "
                     f"{row['frechet_distance']:.2f} | {row['palette_fraction']:.3f} | "
                     f"{feature_cells(row)} | {copied} | {published.get(row['model'], '-')} | "
                     f"{'?' if seconds is None else f'{seconds / 60:.1f} min'} |")
    if edm2:
        lines += ["", *network_comparison(rows)]
    lines += ["", f"Floor: {settings.samples} new clean images of the distribution, scored like a model's samples "
              f"(against the same 4,096 held-out images), give Fréchet distance {floor['frechet_distance']:.2f} and "
              f"palette fraction {floor['palette_fraction']:.3f}, feature scores {feature_cells(floor)}: what a model "
              "that samples the distribution exactly would show.", "",
              f"![samples]({stem}-samples.png)", "", "Samples, left to right: " + ", ".join(grids), ""]
    side_by_side(grids, args.results / f"{stem}-samples.png")
    path = args.results / f"{stem}.md"
    write_text(path, "\n".join(lines))
    write_text(args.results / f"{stem}.json", json.dumps(dict(rows=rows, settings=settings._asdict(),
                                                              floor=floor), indent=1))
    return path


def network_comparison(rows) -> "list[str]":
    """The Fréchet distances of each row's networks side by side (pixels / features), and how many rows
    each EDM2 network scores lower than DDPM++ on (a count, not a significance: one seed per model)."""
    labels = list(dict.fromkeys(row["network"] for row in rows))
    by_model = {}
    for row in rows:
        by_model.setdefault(row["model"], {})[row["network"]] = row
    lines = ["Fréchet distances side by side, pixels / features (lower is better):", "",
             "| model | " + " | ".join(labels) + " |", "| --- |" + " --- |" * len(labels)]
    for model, scored in by_model.items():
        lines.append(f"| {model} | " + " | ".join(
            f"{scored[label]['frechet_distance']:.2f} / {scored[label]['feature_frechet']:.1f}" if label in scored
            else "-" for label in labels) + " |")
    lines.append("")
    for label in labels[1:]:
        pairs = [(scored["DDPM++"], scored[label]) for scored in by_model.values() if {"DDPM++", label} <= set(scored)]
        lower = {key: sum(other[key] < ddpmpp[key] for ddpmpp, other in pairs)
                 for key in ("frechet_distance", "feature_frechet")}
        lines.append(f"- {label} scores lower than DDPM++ on {lower['frechet_distance']} of {len(pairs)} rows in pixels "
                     f"and {lower['feature_frechet']} of {len(pairs)} in features.")
    return lines


# ----------------------------------------------------------------------------------------------
# Annotation (--annotation): does `prepare annotate` recover known corruption strengths? (issue 24, item 7)


ANNOTATION_SEED = 2000   # data seed of its images (neither the grid's training, held-out nor fresh images)
ANNOTATION_IMAGES = 128  # poor images per strength and in the control (each a different scene); clean: CLEAN_FACTOR x
ANNOTATION_STEPS = 400   # prepare annotate's default classifier training


def jpeg(image: "Image.Image", quality: int, subsampling: str) -> "Image.Image":
    """`image` after a round trip through PIL's JPEG encoder at `quality` with chroma `subsampling`."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling=subsampling)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def gaussian_blur(image: "Image.Image", radius: float) -> "Image.Image":
    from PIL import ImageFilter

    return image.filter(ImageFilter.GaussianBlur(radius))


# kind -> (what the strength is, strengths from weak to strong, the corruption). The blur radii are
# tests/test_annotate.py's; the JPEG qualities span light to heavy compression, once with PIL's default
# 4:2:0 chroma, which halves the colour resolution at every quality (on these 16x16 images of coloured
# rectangles that alone is a large loss), and once with chroma kept whole (4:4:4), where the quality is
# the only strength. Strength 0 of every kind is the control: unaltered images, which no classifier
# can tell from clean ones, so their sigma_min should be the grid's lowest.
CORRUPTIONS = {
    "blur": ("PIL Gaussian blur, radius (pixels)", (0.4, 1.2, 3.0), gaussian_blur),
    "jpeg 4:2:0": ("PIL JPEG, quality (PIL's default 4:2:0 chroma)", (90, 50, 10),
                   lambda image, quality: jpeg(image, quality, "4:2:0")),
    "jpeg 4:4:4": ("PIL JPEG, quality (4:4:4 chroma)", (90, 50, 10), lambda image, quality: jpeg(image, quality, "4:4:4")),
}
# Clean images per poor image of one strength. Its classifier draws 32 clean images a step, 400 steps:
# with as few clean images as one strength's poor ones it sees each about 100 times and tells the
# unaltered control from them more often (the blur set, 128 images a strength, classifier seeds 0, 1,
# 2: the control's median sigma_min 1.05, 0.74, 0.01 with 128 clean images; 0.65, 0.01, 0.01 with 512).
CLEAN_FACTOR = 4


def annotation_sets(root: Path, n: int) -> "tuple[dict[str, Path], dict[str, list]]":
    """Folders of PNGs (written once): 'clean', CLEAN_FACTOR x n images, and per kind of CORRUPTIONS n
    unaltered images (named 0-*) then n per strength (1-*, 2-*, ...: the sorted order prepare reads is
    the strengths' order), every image a different synthetic scene; and per kind the mean PSNR of each
    strength's images against their unaltered scenes (None for the control)."""
    from PIL import Image

    from ambient_fast.files.images import save_png

    per_kind = 4 * n  # the control and 3 strengths
    scenes = clean_images(CLEAN_FACTOR * n + len(CORRUPTIONS) * per_kind, RESOLUTION, ANNOTATION_SEED)
    scenes = scenes.transpose(0, 2, 3, 1)  # (N, H, W, C), PIL's layout
    groups = {"clean": scenes[:CLEAN_FACTOR * n]}
    psnrs = {}
    for index, (kind, (_, strengths, corrupt)) in enumerate(CORRUPTIONS.items()):
        first = CLEAN_FACTOR * n + index * per_kind
        sources = scenes[first:first + per_kind]
        poor, psnrs[kind] = sources.copy(), [None]  # the control: unaltered
        for k, strength in enumerate(strengths, 1):
            group = slice(k * n, (k + 1) * n)
            poor[group] = [np.asarray(corrupt(Image.fromarray(image), strength)) for image in sources[group]]
            psnrs[kind].append(float(psnr(poor[group], sources[group]).mean()))
        groups[kind] = poor
    folders = {}
    for name, images in groups.items():
        folder = folders[name] = root / f"{name.replace(' ', '-').replace(':', '')}-n{len(images)}"
        done = folder.with_name(folder.name + ".done")  # a folder cut short by an interruption is written again
        if not done.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images):
                save_png(image, folder / (f"{i:05d}.png" if name == "clean" else f"{i // n}-{i % n:05d}.png"))
            done.write_text("")
    return folders, psnrs


def rank_correlation(x, y) -> float:
    """Spearman's rank correlation: the Pearson correlation of the ranks, tied values given their mean
    rank (inf ranks above every number). NaN where either side is constant."""
    def ranks(values):
        values = np.asarray(values, np.float64)
        order = np.argsort(values, kind="stable")
        rank = np.empty(len(values))
        rank[order] = np.arange(len(values))
        _, tie, counts = np.unique(values, return_inverse=True, return_counts=True)
        return (np.bincount(tie, rank) / counts)[tie]

    a, b = ranks(x), ranks(y)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def annotation_rows(args) -> "tuple[list[dict], dict, dict]":
    """Annotate each kind's poor folder against the clean one with `prepare annotate`
    (prepare_annotated), once per classifier seed. Returns rows per (kind, strength), every image's
    levels ({kind: {seed: array}}, inf for an image told apart at every level) and each kind's rank
    correlation of the levels with the strength ({kind: [one per seed]})."""
    from ambient_fast.data.prepare import prepare_annotated

    n, steps = args.annotation_images, args.annotation_steps
    root = args.work / "annotation"
    folders, psnrs = annotation_sets(root, n)
    rows, levels, correlations = [], {}, {}
    for kind, (_, strengths, _) in CORRUPTIONS.items():
        strength_of = np.repeat(np.arange(1 + len(strengths)), n)  # each poor image's strength index, 0 the control
        levels[kind] = {}
        for seed in range(args.annotation_seeds):
            dest = root / f"{folders[kind].name}-steps{steps}-seed{seed}"
            found = cached(root / f"{dest.name}.json", lambda: [
                None if not np.isfinite(v) else float(v) for v in
                prepare_annotated(folders["clean"], folders[kind], dest, steps=steps, seed=seed, overwrite=True)[1]])
            levels[kind][seed] = np.array([np.inf if v is None else v for v in found])
        for k, strength in enumerate(("none (control)", *strengths)):
            per_seed = [found[strength_of == k] for found in levels[kind].values()]
            rows.append(dict(kind=kind, strength=strength, images=n, psnr=psnrs[kind][k],
                             median=[float(np.median(v)) for v in per_seed],
                             left_out=[float(np.isinf(v).mean()) for v in per_seed]))
        correlations[kind] = [rank_correlation(strength_of, found) for found in levels[kind].values()]
        print(json.dumps(dict(kind=kind, rows=rows[-len(strengths) - 1:], rank_correlation=correlations[kind])),
              flush=True)
    return rows, levels, correlations


def annotation_report(args, rows, levels, correlations, elapsed: float) -> Path:
    from ambient_fast.data.annotate import GRID_POINTS, SIGMA_RANGE, THRESHOLD

    stem = "science-annotation"
    args.results.mkdir(parents=True, exist_ok=True)
    n, seeds = args.annotation_images, args.annotation_seeds

    def cells(values, fmt="{:.3g}") -> str:
        return " / ".join("inf" if np.isinf(v) else fmt.format(v) for v in values)

    lines = [*report_header("Annotation at laptop scale: sigma_min of known corruptions", elapsed),
             f"- Data: built-in synthetic images, {RESOLUTION}x{RESOLUTION} RGB (data seed {ANNOTATION_SEED}): "
             f"{CLEAN_FACTOR * n} clean images; per corruption, {n} unaltered images (the control) and {n} per "
             "strength, corrupted with PIL, every image a different scene. "
             + "; ".join(f"{kind}: {what} {', '.join(map(str, strengths))}"
                         for kind, (what, strengths, _) in CORRUPTIONS.items()) + ".",
             f"- Annotation: `prepare annotate` (ambient_fast.data.prepare.prepare_annotated) of each corruption's "
             f"{4 * n} poor images against the clean ones: its classifier trained {args.annotation_steps} steps of "
             f"batch 64, {GRID_POINTS} levels log-spaced over {SIGMA_RANGE[0]:g}..{SIGMA_RANGE[1]:g} (the [-1, 1] "
             f"scale), threshold {THRESHOLD:g}; once per classifier seed ({', '.join(map(str, range(seeds)))}), "
             "figures given per seed (seed 0 / 1 / ...). Left out: images the classifier tells apart at every "
             "level (sigma_min inf). PSNR: the corrupted images against their unaltered scenes, mean.",
             "- Rank correlation: Spearman's, of sigma_min with the strength's order (control 0, then weak to strong) "
             f"over the corruption's {4 * n} images; 1 would be levels that order the strengths perfectly.", "",
             "| corruption | strength | PSNR (dB) | images | median sigma_min | share left out |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        quality = "- (unaltered)" if row["psnr"] is None else f"{row['psnr']:.1f}"
        lines.append(f"| {row['kind']} | {row['strength']} | {quality} | {row['images']} | {cells(row['median'])} | "
                     f"{cells(row['left_out'], '{:.2f}')} |")
    lines += ["", "| corruption | rank correlation of sigma_min with strength |", "| --- | --- |"]
    lines += [f"| {kind} | {cells(values, '{:.2f}')} |" for kind, values in correlations.items()]
    lines.append("")
    path = args.results / f"{stem}.md"
    write_text(path, "\n".join(lines))
    write_json(args.results / f"{stem}.json", dict(
        rows=rows, rank_correlation=correlations, images=n, steps=args.annotation_steps,
        strengths={kind: list(strengths) for kind, (_, strengths, _) in CORRUPTIONS.items()},
        sigma_min={kind: {str(seed): [None if np.isinf(v) else float(v) for v in found] for seed, found in by.items()}
                   for kind, by in levels.items()}))
    return path


# ----------------------------------------------------------------------------------------------
# Posterior sampling (--restoration) and completion rounds (--completion): issue 23, item 4


POSTERIOR_P = 0.8          # the corruption of the restored images and of the completion rounds' training set
CS_ROWS = 192              # Gaussian compressed sensing: 192 measurements of the 768 values (a quarter)
CS_NOISE = 0.01            # their noise level on the [-1, 1] scale
DPS_SCALE = 0.3            # DPS's step scale for these 16x16 images and 18 Heun steps (not tuned further)


def restoration_rows(args, settings: Settings) -> "tuple[list[dict], dict[str, np.ndarray], dict]":
    """Restore `args.restoration_images` held-out images corrupted at POSTERIOR_P (masks) and measured by
    Gaussian CS, by every method; rows of scores and the first restorations of each."""
    from ambient_fast.data.format import CorruptedDataset, write_dataset
    from ambient_fast.objective.corruption import make_operator
    from ambient_fast.sampling.restoration import (MaskedImages, MeasuredArray, PosteriorSettings, least_squares,
                                                   measure, posterior_method, posterior_restorations)

    data_root = args.work / "data"
    network = train(args.work, data_root, VARIANTS["ambient"], POSTERIOR_P, settings)
    loaded = load_network(network)
    model = loaded.model
    held_out = held_out_images(data_root, GRID_IMAGES)
    count = args.restoration_images
    clean, reference = held_out[:count], held_out[count:]  # restored images, and the clean set scored against
    features = FeatureScores(feature_scorer(args.work, args.classifier_steps), reference)
    shape = clean.shape[1:]
    # The masked images as a prepared set (what restore reads), masks from the sample seed.
    operator = make_operator("dust", p=POSTERIOR_P, delta=0.1, shared_channels=True)
    _, A = operator.corrupt(torch.zeros(clean.shape), torch.Generator().manual_seed(settings.seed))
    masks = A.numpy() != 0
    path = args.work / f"restoration-p{POSTERIOR_P:g}-n{count}-seed{settings.seed}"
    if not (path / "meta.json").is_file():
        write_dataset(path, clean * masks, masks, {"kind": "dust", "p": POSTERIOR_P, "delta": 0.1, "shared_channels": True},
                      source="held-out synthetic images for bench/science.py --restoration")
    masked = MaskedImages(CorruptedDataset(path))
    cs = {"kind": "gaussian_cs", "m": CS_ROWS, "seed": settings.seed, "noise_level": CS_NOISE}
    y = measure(cs, from_uint8(torch.from_numpy(clean)), range(count), seed=settings.seed).numpy()
    measured = MeasuredArray(y, cs, shape)

    def posterior(source, name: str, noise_level: float) -> np.ndarray:
        sigmas = sampling_sigmas(loaded)
        method = posterior_method(name, cg_iterations=args.cg_iterations, dps_scale=DPS_SCALE,
                                  sigma_floor=sigmas["sigma_min"])
        options = PosteriorSettings(method, noise_level, loaded.survival, True, num_steps=args.posterior_steps,
                                    dtype=torch.float32, **sigmas)
        restored = dict(posterior_restorations(model, source, range(count), samples=1, seed=settings.seed, batch=128,
                                               settings=options, device="cpu"))
        return nchw_uint8(torch.cat([restored[i] for i in range(count)]))

    def baseline(source) -> np.ndarray:
        measurement, values, _ = source.measurements(np.arange(count), "cpu", torch.float64)
        return nchw_uint8(values if source is masked else least_squares(measurement, values))

    def one_step() -> np.ndarray:
        measurement, values, _ = masked.measurements(np.arange(count), "cpu", torch.float32)
        return nchw_uint8(restore(model, values, measurement.mask, RESTORE_SIGMA))

    methods = {
        ("masks", "observed pixels only"): lambda: baseline(masked),
        ("masks", "one step"): one_step,
        ("masks", "posterior: ambient"): lambda: posterior(masked, "ambient", 0.0),
        ("masks", "posterior: Tweedie moments"): lambda: posterior(masked, "tweedie", 0.0),
        ("Gaussian CS", "least squares (no prior)"): lambda: baseline(measured),
        ("Gaussian CS", "posterior: Tweedie moments"): lambda: posterior(measured, "tweedie", CS_NOISE),
        ("Gaussian CS", "posterior: DPS"): lambda: posterior(measured, "dps", CS_NOISE),
    }
    rows, grids = [], {"clean": clean[:64]}
    for (problem, name), make in methods.items():
        slug = f"{problem}-{name}".lower().replace(" ", "-").replace(":", "").replace("(", "").replace(")", "")
        file = path.parent / f"{path.name}-{slug}-steps{args.posterior_steps}-cg{args.cg_iterations}.npy"
        began = time.time()
        if file.is_file():
            restored = np.load(file)
        else:
            restored = make()
            write_npy(file, restored)
        row = dict(problem=problem, method=name, psnr=float(psnr(restored, clean).mean()),
                   ssim=float(ssim(restored, clean).mean()), palette_fraction=palette_fraction(restored),
                   frechet_distance=frechet_distance(pixel_features(restored), pixel_features(reference)),
                   seconds=time.time() - began, **features(restored))
        rows.append(row)
        grids[f"{problem}: {name}"] = restored[:64]
        print(json.dumps(row), flush=True)
    floor = dict(frechet_distance=frechet_distance(pixel_features(clean), pixel_features(reference)),
                 **features(clean))
    return rows, grids, floor


def restoration_report(args, settings: Settings, rows, grids, floor, elapsed: float) -> Path:
    stem = "science-restoration" + ("-quick" if args.quick else "")
    lines = [*report_header("Restoration at laptop scale: one step against posterior sampling", elapsed),
             f"- Model: the p {POSTERIOR_P:g} ambient model of the grid (DDPM++ 16x16, {settings.steps} steps of batch "
             f"{settings.batch}, seed {settings.seed}). Images: the first {args.restoration_images} held-out clean "
             f"images, scored against the other {GRID_IMAGES - args.restoration_images} held-out ones.",
             f"- Masks: shared dust of p {POSTERIOR_P:g} (seed {settings.seed}), noiseless; one step at sigma "
             f"{RESTORE_SIGMA}; posterior: one sample per image ({args.posterior_steps} Heun steps; the prior's "
             "sampling mask at the training survival; Tweedie moments with "
             f"{args.cg_iterations} conjugate-gradient iterations). Gaussian CS: {CS_ROWS} measurements of the 768 "
             f"values, each image its own N(0, 1/m) matrix, noise level {CS_NOISE}; DPS scale {DPS_SCALE}.",
             "- Distances: Fréchet distance of the restored set to the clean reference set in pixels and in the "
             "attribute classifier's features (with its precision, recall and recognised share: bench/science.py's "
             "docstring).", "",
             f"| problem | method | PSNR (dB) | SSIM | Fréchet distance (pixels) | palette fraction | {FEATURE_HEADER} | "
             "time |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['problem']} | {row['method']} | {row['psnr']:.2f} | {row['ssim']:.3f} | "
                     f"{row['frechet_distance']:.2f} | {row['palette_fraction']:.3f} | {feature_cells(row)} | "
                     f"{row['seconds'] / 60:.1f} min |")
    lines += ["", f"Floor: the {args.restoration_images} clean images themselves score Fréchet distance "
              f"{floor['frechet_distance']:.2f} (pixels), feature scores {feature_cells(floor)}.", "",
              f"![restorations]({stem}-samples.png)", "", "Left to right: " + ", ".join(grids), ""]
    side_by_side(grids, args.results / f"{stem}-samples.png")
    path = args.results / f"{stem}.md"
    write_text(path, "\n".join(lines))
    write_text(args.results / f"{stem}.json", json.dumps(dict(rows=rows, floor=floor, settings=settings._asdict(),
                                                              images=args.restoration_images,
                                                              posterior_steps=args.posterior_steps,
                                                              cg_iterations=args.cg_iterations), indent=1))
    return path


def completion_rows(args, settings: Settings) -> "tuple[list[dict], dict[str, np.ndarray]]":
    """Completion rounds from the p POSTERIOR_P ambient model (python -m ambient_fast.complete), the
    clean model (unless --no-clean-model) and new clean images (the floor) for comparison: scores of
    unconditional samples after each round."""
    from ambient_fast.complete import main as complete_main

    data_root = args.work / "data"
    network = train(args.work, data_root, VARIANTS["ambient"], POSTERIOR_P, settings)
    clean_network = None if args.no_clean_model else train(args.work, data_root, VARIANTS["clean"], POSTERIOR_P,
                                                           settings)
    held_out = held_out_images(data_root, GRID_IMAGES)
    features = FeatureScores(feature_scorer(args.work, args.classifier_steps), held_out)
    data = synthetic_dataset(data_root, resolution=RESOLUTION, n=settings.n, p=POSTERIOR_P, delta=0.1, seed=DATA_SEED)
    out = args.work / (f"completion-{args.posterior}-n{args.completion_images}-steps{args.round_steps}-"
                       f"posterior{args.posterior_steps}-{network.parent.name}")
    common = ["--out", str(out), "--rounds", str(args.rounds)]
    if (out / "complete.json").is_file():
        argv = [*common, "--resume"]
    else:
        argv = [*common, "--net", str(network), "--data", str(data), "--max-images", str(args.completion_images),
                "--posterior", args.posterior, "--sampling-steps", str(args.posterior_steps), "--steps",
                str(args.round_steps), "--batch", str(settings.batch), "--samples", str(settings.samples),
                "--seed", str(settings.seed), "--cg-iterations", str(args.cg_iterations), "--sampling-batch", "128"]
    if complete_main(argv) != 0:
        raise RuntimeError(f"completion rounds in {out} failed")
    rows, grids = [], {}
    for report in json.loads((out / "rounds.json").read_text()):
        samples = np.load(out / f"round-{report['round']}" / "samples.npy")
        row = dict(model=f"round {report['round']}", **score(samples, held_out),
                   completion_images_per_second=report["completion_images_per_second"],
                   **features(samples))
        rows.append(row)
        grids[row["model"]] = samples[:64]
        print(json.dumps(row), flush=True)
    comparisons = {"new clean images (floor)": clean_images(settings.samples, RESOLUTION, FRESH_SEED)}
    if clean_network is not None:
        comparisons["clean model (p 0)"] = cached_samples(clean_network, settings)
    for name, samples in comparisons.items():
        rows.append(dict(model=name, **score(samples, held_out), completion_images_per_second=None, **features(samples)))
        grids[name] = samples[:64]
    return rows, grids


def completion_report(args, settings: Settings, rows, grids, elapsed: float) -> Path:
    stem = "science-completion" + ("-quick" if args.quick else "")
    lines = [*report_header("Completion rounds at laptop scale", elapsed),
             f"- Start: the p {POSTERIOR_P:g} ambient model of the grid ({settings.steps} steps of batch {settings.batch}). "
             f"Each round completes the first {args.completion_images} training images ({args.posterior} posterior, "
             f"{args.posterior_steps} Heun steps, observed pixels kept) and trains {args.round_steps} steps of batch "
             f"{settings.batch} on them, warm-started (python -m ambient_fast.complete). Round 0 is the start.",
             f"- Scores: {settings.samples} unconditional samples per round (the same seeds; the fixed-mask sampler at "
             "each model's survival: the training survival for round 0, 1 afterwards) against 4,096 held-out clean "
             "images; the clean model (p 0, the grid's, unless --no-clean-model) sampled alike; the floor: as many "
             "new clean images of the distribution, scored alike.", "",
             f"| model | Fréchet distance (pixels) | palette fraction | {FEATURE_HEADER} | completion images/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        rate = row["completion_images_per_second"]
        lines.append(f"| {row['model']} | {row['frechet_distance']:.2f} | {row['palette_fraction']:.3f} | "
                     f"{feature_cells(row)} | {'-' if rate is None else f'{rate:.1f}'} |")
    lines += ["", f"![samples]({stem}-samples.png)", "", "Left to right: " + ", ".join(grids), ""]
    side_by_side(grids, args.results / f"{stem}-samples.png")
    path = args.results / f"{stem}.md"
    write_text(path, "\n".join(lines))
    write_text(args.results / f"{stem}.json", json.dumps(dict(
        rows=rows, settings=settings._asdict(), rounds=args.rounds, completion_images=args.completion_images,
        round_steps=args.round_steps, posterior=args.posterior, posterior_steps=args.posterior_steps), indent=1))
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
        lines += [f"| p | variant | Fréchet distance (pixels) | palette fraction | {FEATURE_HEADER} | restoration PSNR "
                  "(dB) | training |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in rows:
            restoration = ", ".join(f"{v:.2f} (p {q})" for q, v in row["restoration_psnr"].items())
            seconds = row.get("training_seconds")
            lines.append(f"| {row['p']:g} | {row['variant']} | {row['frechet_distance']:.2f} | "
                         f"{row['palette_fraction']:.3f} | {feature_cells(row)} | {restoration} | "
                         f"{'?' if seconds is None else f'{seconds / 60:.1f} min'} |")
        clean = held_out_images(args.work / "data", settings.n)
        reference = score(clean[:settings.samples], clean[settings.samples: 2 * settings.samples])
        features = feature_floor(args.work / "data", settings.samples, feature_scorer(args.work, args.classifier_steps))
        lines += ["", f"Floor: {settings.samples} held-out clean images against other held-out clean images score "
                  f"Fréchet distance {reference['frechet_distance']:.2f}, palette fraction "
                  f"{reference['palette_fraction']:.3f}; {settings.samples} new clean images against the held-out "
                  f"ones, feature scores {feature_cells(features)}.", "",
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
    parser.add_argument("--edm2", action="store_true", help="with --noisy: an EDM2 network of DDPM++'s parameter count "
                        "beside every DDPM++ row, trained with EDM2's recipe and scored with the trainer's EMA and "
                        f"EDM2's post-hoc EMA {POSTHOC_STD:g}")
    parser.add_argument("--rows", type=lambda t: [int(v) for v in t.split(",")],
                        help=f"with --noisy: only these rows, numbered from 1 in the table's order (1 to "
                        f"{len(MIXTURE_ROWS)}; default all)")
    parser.add_argument("--annotation", action="store_true", help="only the annotation experiment (prepare annotate "
                        "on copies blurred and JPEG-compressed at known strengths)")
    parser.add_argument("--annotation-images", type=int, default=ANNOTATION_IMAGES,
                        help=f"poor images per strength, and unaltered ones; {CLEAN_FACTOR}x as many clean images "
                        f"(default {ANNOTATION_IMAGES})")
    parser.add_argument("--annotation-steps", type=int, default=ANNOTATION_STEPS,
                        help=f"training steps of prepare annotate's classifier (default {ANNOTATION_STEPS}, its own)")
    parser.add_argument("--annotation-seeds", type=int, default=3,
                        help="classifier seeds, each a separate annotation (default 3)")
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
    parser.add_argument("--restoration", action="store_true", help="only the restoration experiment (one step "
                        "against posterior sampling, masks and Gaussian CS)")
    parser.add_argument("--completion", action="store_true", help="only the completion rounds")
    parser.add_argument("--no-clean-model", action="store_true", help="--completion without the clean model's row "
                        "(it trains a clean model of --steps when the grid has none)")
    parser.add_argument("--restoration-images", type=int, default=256, help="held-out images restored (default 256)")
    parser.add_argument("--posterior-steps", type=int, default=18, help="Heun steps of posterior sampling (default 18)")
    parser.add_argument("--cg-iterations", type=int, default=8, help="Tweedie moments' CG iterations (default 8)")
    parser.add_argument("--posterior", default="ambient", help="completion rounds' posterior method (default ambient)")
    parser.add_argument("--rounds", type=int, default=3, help="completion rounds (default 3)")
    parser.add_argument("--completion-images", type=int, default=1024, help="training images completed (default 1024)")
    parser.add_argument("--round-steps", type=int, default=500, help="training steps per round (default 500)")
    parser.add_argument("--classifier-steps", type=int, default=CLASSIFIER_STEPS,
                        help=f"training steps of the feature classifier (default {CLASSIFIER_STEPS})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("runs/science"), help="trained models (reused on re-runs)")
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    ps = args.p or ([0.8] if args.quick else [0.6, 0.8, 0.9])
    variants = args.variants or (["ambient", "naive"] if args.quick else list(VARIANTS))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or any(not 0 < p < 1 for p in ps):
        parser.error(f"--variants among {list(VARIANTS)} and --p in (0, 1); got {variants}, {ps}")
    if args.rows and (not args.noisy or not set(args.rows) <= set(range(1, len(MIXTURE_ROWS) + 1))):
        parser.error(f"--rows goes with --noisy and numbers rows 1 to {len(MIXTURE_ROWS)}; got {args.rows}")
    if args.edm2 and not args.noisy:
        parser.error("--edm2 adds EDM2 rows to --noisy only (its masked mixture row stands for the masked grid, "
                     "whose 2,000-step models take about 4 minutes each on 2 cores)")
    settings = Settings(args.steps, args.batch, args.samples, args.seed)
    start = time.time()
    if args.restoration:
        rows, grids, floor = restoration_rows(args, settings)
        print(f"wrote {restoration_report(args, settings, rows, grids, floor, time.time() - start)}")
        return 0
    if args.completion:
        rows, grids = completion_rows(args, settings)
        print(f"wrote {completion_report(args, settings, rows, grids, time.time() - start)}")
        return 0
    if args.annotation:
        rows, levels, correlations = annotation_rows(args)
        print(f"wrote {annotation_report(args, rows, levels, correlations, time.time() - start)}")
        return 0
    if args.noisy:
        if args.quick:
            settings = settings._replace(steps=min(args.steps, 600), samples=min(args.samples, 128))
        rows, grids = run_mixtures(args, settings, ("ddpmpp", "edm2") if args.edm2 else ("ddpmpp",))
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
