"""Fine-tuning a pre-trained diffusers model on a few images, clean or corrupted (the paper's
section 5.2 at laptop scale): `python bench/finetune.py [--quick] [--jobs 2]`.

A small `UNet2DModel` pre-trained on clean images of the built-in synthetic distribution stands in
for the foundation model (DeepFloyd IF stage I in the paper): built with random weights, saved
with `save_pretrained` beside a DDPM scheduler config, then trained by `python -m
ambient_fast.finetune`'s trainer on 4,096 clean images (data seed 1) with the usual noise-prediction
objective (`--loss-weight snr`: with nothing hidden it is exactly diffusers' epsilon MSE). It is then
fine-tuned, from its EMA weights, on 64 other images of the same distribution (data seed 0), with
the same steps and seeds, twice:

    clean    the 64 images as they are (p 0, delta 0)
    ambient  the 64 images with 80% of their pixels erased (p 0.8, delta 0.1)

both with the same fine-tuning objective (--loss-weight: snr, the default of ambient_fast.finetune,
or x0, the authors' script; errors on the pixels of A only, uniform timesteps).
Each model (the foundation model too) draws samples with the fixed-mask sampler at its training
survival (1 for the clean models, 0.18 for the ambient one), scored as in bench/science.py:
  - memorization: each sample's nearest-neighbour similarity (pixel correlation) to the 64
    fine-tuning images: median, 90th percentile, share above 0.95 (near copies), at every snapshot;
  - quality: the Fréchet distance of pixel features to 4,096 held-out clean images, and the
    palette fraction.

Trained models stay in --work (default runs/finetune-bench) and a re-run reuses them. The report
goes to --results (default bench/results): finetune.md (finetune-quick.md; -x0 appended with
--loss-weight x0), the numbers as JSON,
the similarity histogram and the sample grids.
"""
import argparse
import concurrent.futures
import datetime
import json
import multiprocessing
import platform
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))      # bench/science.py: sampling, scores, plots

import science  # noqa: E402
from _harness import cpu_threads  # noqa: E402
from ambient_fast.data.synthetic import clean_images, synthetic_dataset  # noqa: E402
from ambient_fast.networks.diffusers import require_diffusers  # noqa: E402
from ambient_fast.training.config import FinetuneConfig  # noqa: E402
from ambient_fast.training.finetuning import FinetuneTrainer  # noqa: E402
from ambient_fast.evaluation.metrics import nearest_neighbour_similarity  # noqa: E402

RESOLUTION = science.RESOLUTION
FOUNDATION_IMAGES = 4096
FOUNDATION_DATA_SEED = 1   # the foundation model never sees the fine-tuning images (data seed 0)
FINETUNE_DATA_SEED = science.DATA_SEED
FINETUNE_P, FINETUNE_DELTA = 0.8, 0.1


class Settings(NamedTuple):
    pretrain_steps: int
    pretrain_lr: float
    finetune_steps: int
    finetune_lr: float
    loss_weight: str
    batch: int
    images: int          # fine-tuning images
    samples: int         # samples per model (the final networks)
    snapshot_samples: int  # samples per fine-tuning snapshot
    seed: int


def foundation_architecture():
    """The stand-in foundation model: a 0.7 M-parameter DDPM UNet (attention at 8x8), random weights."""
    diffusers = require_diffusers()
    return diffusers.UNet2DModel(sample_size=RESOLUTION, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)


def random_init(work: Path, seed: int) -> Path:
    """The foundation model before pre-training, as a diffusers directory (made once)."""
    folder = work / f"random-init-seed{seed}"
    if not (folder / "config.json").is_file():
        torch.manual_seed(seed)
        unet = foundation_architecture()
        require_diffusers().DDPMScheduler().save_pretrained(folder)  # linear betas, epsilon prediction
        unet.save_pretrained(folder)
    return folder


def train(run: Path, unet: Path, data: Path, threads: int, **options) -> Path:
    """Fine-tune (or reuse) one model with ambient_fast.finetune's trainer; returns its EMA UNet.
    A run stopped half-way is resumed."""
    final = run / "unet-ema"
    if final.is_dir():
        print(f"reusing {final}", flush=True)
        return final
    cfg = FinetuneConfig(unet=str(unet), data=str(data), out=str(run), sample_count=science.RUN_GRID_IMAGES,
                         sample_steps=science.SAMPLER_STEPS, **options)
    with cpu_threads(threads):
        trainer = FinetuneTrainer(cfg, resume=(run / "config.json").is_file())
        if trainer.train() != 0 or not final.is_dir():
            raise RuntimeError(f"training {run.name} did not finish")
    return final


def finetune_data(root: Path, name: str, images: int) -> Path:
    p, delta = (0.0, 0.0) if name == "clean" else (FINETUNE_P, FINETUNE_DELTA)
    return synthetic_dataset(root, resolution=RESOLUTION, n=images, p=p, delta=delta, seed=FINETUNE_DATA_SEED)


def train_all(args, settings: Settings) -> "dict[str, Path]":
    """The foundation model, then the clean and ambient fine-tunes (side by side with --jobs 2)."""
    data_root = args.work / "data"
    s = settings
    foundation_data = synthetic_dataset(data_root, resolution=RESOLUTION, n=FOUNDATION_IMAGES, p=0.0, delta=0.0,
                                        seed=FOUNDATION_DATA_SEED)
    foundation = train(args.work / f"foundation-steps{s.pretrain_steps}-lr{s.pretrain_lr:g}-seed{s.seed}",
                       random_init(args.work, s.seed), foundation_data, args.threads, steps=s.pretrain_steps,
                       batch=s.batch, lr=s.pretrain_lr, delta=0.0, loss_weight="snr", seed=s.seed,
                       snapshot_every=s.pretrain_steps)
    jobs = {}
    for name in ("clean", "ambient"):
        run = args.work / (f"{name}-n{s.images}-steps{s.finetune_steps}-lr{s.finetune_lr:g}-{s.loss_weight}-"
                           f"batch{s.batch}-seed{s.seed}-from-{foundation.parent.name}")
        jobs[name] = (run, foundation, finetune_data(data_root, name, s.images), max(1, args.threads // args.jobs))
    options = dict(steps=s.finetune_steps, batch=s.batch, lr=s.finetune_lr, loss_weight=s.loss_weight, seed=s.seed,
                   snapshot_every=max(s.finetune_steps // 4, 1))
    deltas = dict(clean=0.0, ambient=FINETUNE_DELTA)
    if args.jobs == 1:
        networks = {name: train(*job, delta=deltas[name], **options) for name, job in jobs.items()}
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
            futures = {name: pool.submit(train, *job, delta=deltas[name], **options) for name, job in jobs.items()}
            networks = {name: future.result() for name, future in futures.items()}
    return {"foundation": foundation, **networks}


def evaluate(args, settings: Settings, networks: "dict[str, Path]") -> dict:
    """Scores of every model, the similarities of every fine-tuning snapshot, 64 samples of each."""
    s = settings
    held_out = science.held_out_images(args.work / "data", science.GRID_IMAGES)
    training = clean_images(s.images, RESOLUTION, FINETUNE_DATA_SEED)  # what the clean fine-tune saw
    rows, similarities, by_step, grids = [], {}, {}, {"fine-tuning images": training[:64]}
    for name, network in networks.items():
        steps = s.pretrain_steps if name == "foundation" else s.finetune_steps
        final_settings = science.Settings(steps=steps, batch=s.batch, samples=s.samples, seed=s.seed, n=s.images)
        samples = science.cached_samples(network, final_settings)
        similarity, _ = nearest_neighbour_similarity(samples, training)
        label = "foundation (pre-trained, not fine-tuned)" if name == "foundation" else \
            f"{name} fine-tune (p {0 if name == 'clean' else FINETUNE_P:g})"
        similarities[label] = similarity
        rows.append(dict(model=name, label=label, **summary(similarity),
                         **science.cached(network.parent / f"finetune-score-{s.samples}-seed{s.seed}.json",
                                          lambda: science.score(samples, held_out)),
                         training_seconds=science.training_seconds(network.parent)))
        grids[label] = samples[:64]
        print(json.dumps(rows[-1]), flush=True)
        if name != "foundation":
            snapshot_settings = final_settings._replace(samples=s.snapshot_samples)
            by_step[label] = {science.snapshot_step(n, snapshot_settings): summary(nearest_neighbour_similarity(
                science.cached_samples(n, snapshot_settings), training)[0])
                for n in sorted(network.parent.glob("unet-ema-snapshot-*"))}
            by_step[label][s.finetune_steps] = summary(similarity[: s.snapshot_samples])
    fresh = held_out[: s.samples]
    similarities["held-out clean images"], _ = nearest_neighbour_similarity(fresh, training)
    rows.append(dict(model="held-out", label="held-out clean images", **summary(similarities["held-out clean images"]),
                     **science.score(fresh, held_out[s.samples: 2 * s.samples])))
    return dict(rows=rows, similarities=similarities, by_step=by_step, grids=grids)


def summary(similarity: np.ndarray) -> dict:
    return dict(median=float(np.median(similarity)), p90=float(np.quantile(similarity, 0.9)),
                above_095=float((similarity > 0.95).mean()))


def report(args, settings: Settings, results: dict, elapsed: float) -> Path:
    stem = "finetune" + ("-quick" if args.quick else "") + ("" if settings.loss_weight == "snr" else f"-{settings.loss_weight}")
    args.results.mkdir(parents=True, exist_ok=True)
    s = settings
    lines = [f"# Fine-tuning a diffusers model on 64 images, clean or corrupted ({'quick' if args.quick else 'full'})", "",
             f"- Date: {datetime.date.today()}. Device: CPU ({platform.processor() or platform.machine()}, "
             f"{args.threads} thread(s), {args.jobs} fine-tune(s) at a time), torch {torch.__version__}, diffusers "
             f"{require_diffusers().__version__}. Wall time of this invocation {elapsed / 60:.1f} min (models and samples "
             "found in --work are reused, not redone).",
             "- Command: `" + " ".join(["python bench/finetune.py", *sys.argv[1:]]) + "`",
             f"- Foundation stand-in: diffusers UNet2DModel, 0.7 M parameters, linear DDPM schedule (1,000 steps, "
             f"epsilon prediction), pre-trained on {FOUNDATION_IMAGES} clean synthetic 16x16 images (data seed "
             f"{FOUNDATION_DATA_SEED}) for {s.pretrain_steps} steps of batch {s.batch}, lr {s.pretrain_lr:g}, noise-"
             "prediction loss (`--loss-weight snr`).",
             f"- Fine-tuning: from the foundation's EMA weights, on {s.images} images (data seed {FINETUNE_DATA_SEED}), "
             f"{s.finetune_steps} steps of batch {s.batch}, lr {s.finetune_lr:g}, `--loss-weight {s.loss_weight}`; clean: p 0, "
             f"delta 0; ambient: p {FINETUNE_P}, delta {FINETUNE_DELTA} (dust shared over channels). Same seed "
             f"{s.seed} for both (sigma, noise, B, loader order).",
             f"- Sampling: {s.samples} samples per model (seeds {s.seed * 10 ** 6}..), fixed-mask sampler, 18 Heun steps, "
             "sigma 0.01 (the schedule's smallest) to 80, mask survival = the training survival (1 for foundation and "
             f"clean, {(1 - FINETUNE_P) * (1 - FINETUNE_DELTA):.2f} for ambient). Similarity: pixel correlation with the "
             f"nearest of the {s.images} fine-tuning images (1 = a copy). Fréchet distance: pixel features against "
             f"{science.GRID_IMAGES} held-out clean images.", "",
             "| model | similarity median | 90th percentile | share above 0.95 | Fréchet distance | palette fraction | training |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in results["rows"]:
        seconds = row.get("training_seconds")
        lines.append(f"| {row['label']} | {row['median']:.3f} | {row['p90']:.3f} | {row['above_095']:.3f} | "
                     f"{row['frechet_distance']:.2f} | {row['palette_fraction']:.3f} | "
                     f"{'-' if seconds is None else f'{seconds / 60:.1f} min'} |")
    lines += ["", "The held-out row: new clean images from the distribution against the same 64 images (what a "
              "model that does not copy shows), and their Fréchet distance to other held-out images (the floor).", "",
              f"![similarity]({stem}-similarity.png)", "", f"![samples]({stem}-samples.png)", "",
              "Left to right: " + ", ".join(results["grids"]), "",
              f"By fine-tuning step (the EMA UNet of each snapshot, {s.snapshot_samples} samples, the same seeds): "
              "median similarity and share above 0.95.", "",
              "| step | " + " | ".join(f"{label} median | > 0.95" for label in results["by_step"]) + " |",
              "| --- |" + " --- | --- |" * len(results["by_step"])]
    for step in sorted(next(iter(results["by_step"].values()))):
        lines.append(f"| {step} | " + " | ".join(f"{by[step]['median']:.3f} | {by[step]['above_095']:.3f}"
                                                 for by in results["by_step"].values()) + " |")
    lines.append("")
    science.histogram_png(results["similarities"], args.results / f"{stem}-similarity.png")
    science.side_by_side(results["grids"], args.results / f"{stem}-samples.png")
    path = args.results / f"{stem}.md"
    path.write_text("\n".join(lines))
    (args.results / f"{stem}.json").write_text(json.dumps(dict(
        settings=settings._asdict(), rows=results["rows"], by_step=results["by_step"],
        similarities={k: v.tolist() for k, v in results["similarities"].items()}), indent=1))
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs: the pipeline end to end, no science")
    parser.add_argument("--pretrain-steps", type=int, help="foundation pre-training steps (default 2000; quick 300)")
    parser.add_argument("--pretrain-lr", type=float, default=1e-3, help="foundation learning rate (default 1e-3)")
    parser.add_argument("--steps", type=int, help="fine-tuning steps (default 8000; quick 200)")
    parser.add_argument("--lr", type=float, default=5e-4, help="fine-tuning learning rate (default 5e-4)")
    parser.add_argument("--loss-weight", choices=["snr", "x0"], default="snr", help="fine-tuning loss weighting "
                        "(ambient_fast.finetune --loss-weight; default snr)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--images", type=int, default=64, help="fine-tuning images (default 64)")
    parser.add_argument("--samples", type=int, help="samples per model (default 512; quick 64)")
    parser.add_argument("--snapshot-samples", type=int, help="samples per fine-tuning snapshot (default 256; quick 32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, choices=[1, 2], help="fine-tunes run side by side (default 1)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads in all")
    parser.add_argument("--work", type=Path, default=Path("runs/finetune-bench"), help="trained models (reused)")
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    quick = args.quick
    settings = Settings(pretrain_steps=args.pretrain_steps or (300 if quick else 2000), pretrain_lr=args.pretrain_lr,
                        finetune_steps=args.steps or (200 if quick else 8000), finetune_lr=args.lr,
                        loss_weight=args.loss_weight, batch=args.batch,
                        images=args.images, samples=args.samples or (64 if quick else 512),
                        snapshot_samples=args.snapshot_samples or (32 if quick else 256), seed=args.seed)
    if min(settings.pretrain_steps, settings.finetune_steps, settings.samples, settings.snapshot_samples) < 1 or \
            settings.snapshot_samples > settings.samples:
        parser.error("steps and samples must be positive, --snapshot-samples at most --samples")
    start = time.time()
    networks = train_all(args, settings)
    with cpu_threads(args.threads):
        path = report(args, settings, evaluate(args, settings, networks), time.time() - start)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
