"""`python -m ambient_fast.complete --net MODEL --out DIR`: completion rounds, expectation-maximisation
over the training set's missing pixels, started from an ambient model.

Each round samples every training image's missing pixels given its observed ones (posterior sampling
with the current model; the fast path on CUDA), trains the model further on the completions (a
prepared set with nothing hidden, trained as clean data, warm-started from the current weights) and
records the round: images/s of the posterior sampling, a samples grid, and the Fréchet distance of
unconditional samples to clean held-out images when there are some. Every round is resumable:
`--resume` continues wherever an interruption (SIGTERM, Ctrl-C: exit status 3; a crash) left it. The rounds:
ambient_fast.training.completion.
"""
import sys
from dataclasses import dataclass
from typing import Optional

from ambient_fast.options import (INPUT, OUTPUT, POSTERIOR_METHODS, SEED_BOUNDS, SOLVERS, Options, above, at_least,
                                  between, build_parser, device_option, option, overwrite_option, parse)

EXAMPLES = (
    "python -m ambient_fast.complete --net runs/ambient --out runs/complete    # the built-in set, 3 rounds",
    "python -m ambient_fast.complete --net runs/celeba --data data/celeba-p08 --held-out clean/ --rounds 5 "
    "--steps 20000 --out runs/celeba-em",
    "python -m ambient_fast.complete --out runs/complete --resume    # continues an interrupted run",
)
# What may differ on --resume from the saved complete.json: how many rounds, and where it runs.
RESUMABLE = ("rounds", "device", "exact", "overwrite", "resume")


@dataclass
class CompleteConfig(Options):
    """What `python -m ambient_fast.complete` runs."""

    net: Optional[str] = option(None, "the starting ambient model: a .safetensors checkpoint or one of our run "
                                "folders", role=INPUT, default_text="required, except with --resume")
    data: Optional[str] = option(None, "its training set (prepared, masked, without noise)", role=INPUT,
                                 default_text="the built-in synthetic set the model's training record names")
    held_out: Optional[str] = option(None, "clean held-out images for the Fréchet distance: a uint8 .npy (N, C, H, W) "
                                     "or an image folder", role=INPUT,
                                     default_text="the built-in synthetic set's held-out images, else none")
    out: str = option("runs/complete", "output folder: round-K/ (completed set, training run, report), rounds.json",
                      role=OUTPUT)
    overwrite: bool = overwrite_option("the rounds of an earlier completion")
    resume: bool = option(False, "continue the rounds in --out (its complete.json; only --rounds, --device and "
                                 "--exact may change)", negative="")
    rounds: int = option(3, "completion rounds", bounds=at_least(1))
    max_images: Optional[int] = option(None, "complete and train on the first N training images only",
                                       bounds=at_least(1), default_text="all")
    posterior: str = option("ambient", "posterior method (see python -m ambient_fast.restore --help); ambient, one "
                            "network call per step, fills the missing pixels with their conditional mean given the "
                            "observed ones (not a sample); tweedie and dps sample, but through a prior that sees "
                            "only its sampling mask's pixels (bench/results/science-restoration.md)",
                            choices=POSTERIOR_METHODS)
    sampling_steps: int = option(18, "posterior and sampling solver steps", bounds=at_least(1))
    solver: str = option("heun", "ODE solver", choices=SOLVERS)
    sampling_batch: int = option(256, "images per batch of the posterior sampling", bounds=at_least(1))
    survival: Optional[float] = option(None, "probability that the prior's sampling mask keeps a pixel",
                                       bounds=between(0, 1, low_open=True),
                                       default_text="each round's model's training survival")
    cg_iterations: int = option(8, "tweedie: conjugate-gradient iterations per evaluation", bounds=at_least(1))
    dps_scale: float = option(0.1, "dps: step scale", bounds=above(0))
    steps: int = option(500, "training steps per round", bounds=at_least(1))
    batch: int = option(16, "training batch", bounds=at_least(1))
    lr: float = option(1e-3, "peak learning rate of each round's training", bounds=above(0))
    lr_rampup_kimg: float = option(0.5, "learning-rate ramp-up of each round, thousands of images",
                                   flag="--lr-rampup", bounds=at_least(0))
    ema: float = option(0.5, "EMA half-life, millions of images (with the trainer's ramp-up)", bounds=at_least(0))
    samples: int = option(256, "unconditional samples per round for its grid and scores", bounds=at_least(2))
    seed: int = option(0, "seed of the completions, the training runs and the samples", bounds=SEED_BOUNDS)
    exact: bool = option(False, "the exact path (float64 state) on a GPU too; the fast path (bf16 network, float32 "
                                "state) runs only on CUDA", per_device=("off", "on"))
    device: str = device_option()

    def __post_init__(self):
        super().__post_init__()
        if self.net is None and not self.resume:
            raise ValueError("--net is required (the starting ambient model)")


def parser():
    return build_parser(CompleteConfig, prog="python -m ambient_fast.complete", description=__doc__.split("\n\n")[0],
                        examples=EXAMPLES)


def main(argv=None, rounds_cls=None) -> int:
    """`rounds_cls`: the CompletionRounds class (tests pass one that interrupts at a known point)."""
    try:
        cfg = parse(CompleteConfig, parser(), argv)
        prepared = _prepare(cfg)
    except (OSError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    from ambient_fast.training.completion import CompletionInterrupted, CompletionRounds
    from ambient_fast.training.config import EXIT_INTERRUPTED

    cfg, data, held_out, synthetic, device, fast = prepared
    hint = f"python -m ambient_fast.complete --out {cfg.out} --resume"
    rounds = (rounds_cls or CompletionRounds)(cfg, data, held_out, synthetic, device, fast, hint)
    try:
        reports = rounds.run()
    except CompletionInterrupted as stop:
        print(f"{stop}: what finished is kept; continue with {hint} (exit status {EXIT_INTERRUPTED})", flush=True)
        return EXIT_INTERRUPTED  # as train's: a script tells an interrupted run from a finished one (0)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print("round | images/s (completion) | Fréchet distance | palette fraction")
    for report in reports:
        rate, distance, palette = (report.get(key) for key in
                                   ("completion_images_per_second", "frechet_distance", "palette_fraction"))
        print(f"{report['round']:5d} | " + " | ".join("-" if v is None else f"{v:.4g}" for v in (rate, distance, palette)))
    print(f"wrote {cfg.out}/rounds.json")
    return 0


def _resumed(cfg: CompleteConfig) -> CompleteConfig:
    """The saved config of --out with the resumable options of `cfg` over it."""
    import dataclasses
    from pathlib import Path

    from ambient_fast.files.atomic import read_json

    path = Path(cfg.out) / "complete.json"
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {path} not found (is {cfg.out} a completion's output folder?)")
    saved = read_json(path, "restore it, or start again with --overwrite")
    given = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    changed = sorted(name for name, value in given.items()
                     if name not in RESUMABLE and value != defaults[name] and value != saved.get(name))
    if changed:
        raise ValueError(f"--resume keeps the completion's options; these differ from {path}: {changed} (only "
                         f"{', '.join(RESUMABLE[:3])} may change)")
    return CompleteConfig(**{**saved, **{name: given[name] for name in RESUMABLE}})


def _prepare(cfg: CompleteConfig):
    """Check everything before any work: (cfg, data set, held-out images, synthetic?, device, fast path)."""
    from pathlib import Path

    import numpy as np
    import torch

    from ambient_fast.data.format import CorruptedDataset
    from ambient_fast.data.synthetic import clean_twin, is_synthetic, synthetic_dataset
    from ambient_fast.files.atomic import check_output_place, claim_output, write_json
    from ambient_fast.files.checkpoints import load_network
    from ambient_fast.training.completion import COMPLETE_OUTPUT
    from ambient_fast.training.settings import defaults_target, resolve_sampling
    from ambient_fast.training.trainer import SYNTHETIC_P, synthetic_root

    if cfg.resume:
        cfg = _resumed(cfg)
    else:
        check_output_place(cfg.out, "--out", cfg.paths(INPUT))
    loaded = load_network(cfg.net)
    if cfg.data is None:
        if loaded.corruption.get("kind") != "dust" or loaded.corruption.get("p") != SYNTHETIC_P:
            raise ValueError("--data is required: the model's training record does not name the built-in synthetic set")
        data = synthetic_dataset(synthetic_root(), p=SYNTHETIC_P, delta=float(loaded.corruption.get("delta", 0.1)))
    else:
        data = Path(cfg.data)
    dataset = CorruptedDataset(data)
    model = loaded.model
    if (model.img_channels // 2, model.img_resolution) != (dataset.channels, dataset.resolution):
        raise ValueError(f"the network takes {model.img_channels // 2}x{model.img_resolution}x{model.img_resolution} "
                         f"images, the data set holds {'x'.join(map(str, dataset.shape))}")
    if min(len(dataset), cfg.max_images or len(dataset)) < cfg.batch:
        raise ValueError(f"the rounds train on {min(len(dataset), cfg.max_images or len(dataset))} images, fewer than "
                         f"one --batch ({cfg.batch}): complete more images or use a smaller --batch")
    if dataset.has_noise or dataset.is_latent:
        raise ValueError(f"{data} holds noisy images or latents; completion rounds complete masked images")
    held_out = None
    if cfg.held_out:
        path = Path(cfg.held_out)
        if path.suffix == ".npy":
            held_out = np.load(path, allow_pickle=False)
        else:
            from ambient_fast.data.sources import ImageSource

            with ImageSource(path) as source:
                held_out = source.read_all(range(len(source)))
    elif is_synthetic(dataset) and (clean_twin(data) / "held_out.npy").is_file():
        held_out = np.load(clean_twin(data) / "held_out.npy")
    if held_out is not None and (held_out.dtype != np.uint8 or held_out.shape[1:] != dataset.shape):
        raise ValueError(f"--held-out must hold uint8 images of shape {dataset.shape}, got {held_out.dtype} "
                         f"{held_out.shape}")
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    fast = resolve_sampling(device, exact=cfg.exact, target=defaults_target(device)).fast
    if not cfg.resume:
        claim_output(cfg.out, "--out", owned=lambda entry: bool(COMPLETE_OUTPUT.match(entry.name)),
                     what="completion rounds", overwrite=cfg.overwrite, inputs=cfg.paths(INPUT))
        import dataclasses

        write_json(Path(cfg.out) / "complete.json", {**dataclasses.asdict(cfg), "data": str(data)})
    return cfg, data, held_out, is_synthetic(dataset), device, fast


if __name__ == "__main__":
    sys.exit(main())
