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
    prepare latents --source SRC --dest DEST --autoencoder VAE [--sigma-min ...] [--sigma-max ...]
        encode images once with a diffusers AutoencoderKL read from the local folder VAE (EDM2's
        scaling of the SD VAE) and store the latents (float16): a set EDM2 trains on in latent space.
        Masks do not live in latent space: latent sets train with noise-level windows only.
    prepare crops --source SRC --dest DEST --crop C [--stride S]
        cut images into crops of side C, each stored in place in an otherwise unobserved image with
        Ambient-o's sigma_max for its size: it trains only at levels below it.
    prepare annotate --clean GOOD --poor POOR --dest DEST [--autoencoder VAE]
        find each poor image's sigma_min (the lowest noise level at which a classifier can no longer
        tell it from the clean images) and write the poor images with it (as latents with
        --autoencoder); images it can tell apart at every level are left out.

--sigma-min marks images that must not train below a noise level (degraded in ways the model does
not know, such as blur or compression): one number for every image, a .npy of one value per image
in sorted-file-name order, or a .json mapping image names (as in the source) to values (others 0).

--delta is recorded as the training default; the trainer draws the further corruption B itself,
fresh at every step. Bad input prints one line saying what is wrong and exits with status 1.

The work is done by ambient_fast.data.prepare.
"""
import sys
from dataclasses import dataclass
from typing import Optional

from ambient_fast.options import (CORRUPTIONS, GENERATOR_SEED_BOUNDS, INPUT, OUTPUT, Options, at_least, between,
                                  build_parser, device_option, option, overwrite_option, parse)

PROG = "python -m ambient_fast.prepare"
EXAMPLES = (
    f"{PROG} --source images/ --dest data/celeba-p08 --corruption dust --p 0.8 --shared-channels --resolution 64",
    f"{PROG} --source images/ --dest data/noisy --corruption none --noise 0.2",
    f"{PROG} --source observed/ --masks masks/ --dest data/mine",
    f"{PROG} mix --dest data/mix data/clean:500 data/noisy",
    f"{PROG} verify data/mine",
    f"{PROG} latents --source images/ --dest data/latents --autoencoder sd-vae/ --resolution 512",
    f"{PROG} crops --source poor/ --dest data/crops --crop 16 --resolution 64",
    f"{PROG} annotate --clean good/ --poor poor/ --dest data/poor-annotated --resolution 64",
)


@dataclass
class PrepareConfig(Options):
    """`prepare`: corrupt clean images, or (--masks) import corrupted ones with their masks."""

    source: Optional[str] = option(None, "image folder (searched recursively) or EDM-style zip", required=True,
                                   role=INPUT)
    dest: Optional[str] = option(None, "data-set folder to create", required=True, role=OUTPUT)
    corruption: str = option("dust", "mask operator (none: no masks, a clean or only noisy set)", choices=CORRUPTIONS)
    p: Optional[float] = option(None, "corruption level, e.g. the erased fraction for dust",
                                bounds=between(0, 1, high_open=True),
                                default_text="none; needed with every --corruption but none")
    noise: float = option(0.0, "add Gaussian noise of this level (on the [-1, 1] scale) first", bounds=at_least(0))
    sigma_min: Optional[str] = option(None, "noise level below which images must not train: a number, a .npy (one "
                                      "per image, sorted-file-name order) or a .json {image name: value}", role=INPUT,
                                      default_text="none, every image trains at every level")
    delta: float = option(0.1, "further corruption recorded as the training default",
                          bounds=between(0, 1, high_open=True))
    shared_channels: bool = option(False, "dust: one mask for all colour channels")
    resolution: Optional[int] = option(None, "center-crop and resize every image to R x R", bounds=at_least(1),
                                       default_text="the images' own size")
    max_size: Optional[int] = option(None, "use the first N images (sorted by path)", bounds=at_least(1),
                                     default_text="all")
    seed: int = option(0, "seed of the masks and the noise", bounds=GENERATOR_SEED_BOUNDS)
    masks: Optional[str] = option(None, "import already corrupted images: a folder of mask images named like the "
                                  "images (white = observed) or a .npy of 0/1 masks", role=INPUT,
                                  default_text="none, clean images are corrupted")
    overwrite: bool = overwrite_option("a data set")

    def __post_init__(self):
        super().__post_init__()
        if self.masks is not None:
            given = [flag for flag, value in (("--p", self.p), ("--resolution", self.resolution)) if value is not None]
            given += ["--noise"] if self.noise else []
            if given or self.shared_channels:
                raise ValueError(f"--masks imports masks as they are: drop {', '.join(given) or '--shared-channels'} "
                                 "(resizing would blend erased pixels into observed ones; resize images and masks "
                                 "beforehand)")
        elif self.p is None and self.corruption != "none":
            raise ValueError("give --p (with --corruption) to corrupt clean images, --corruption none for no masks, "
                             "or --masks to import masks")


@dataclass
class MixConfig(Options):
    """`prepare mix`: merge prepared sets."""

    dest: Optional[str] = option(None, "data-set folder to create", required=True, role=OUTPUT)
    sets: Optional[list] = option(None, "prepared sets, SET[:COUNT]: the first COUNT images of SET (all without "
                                  ":COUNT)", positional=True, nargs="+", required=True, flag="SET[:COUNT]")
    overwrite: bool = overwrite_option("a data set")

    def __post_init__(self):
        super().__post_init__()
        self.parts()

    def parts(self) -> "list[tuple[str, Optional[int]]]":
        """(set, count or None) of each SET[:COUNT]."""
        parts = []
        for text in self.sets:
            path, _, count = text.rpartition(":") if ":" in text else (text, "", "")
            if not count:  # no COUNT (a trailing ':' included)
                parts.append((path or text, None))
                continue
            if not count.isdigit() or int(count) < 1:
                raise ValueError(f"{text}: COUNT must be an integer >= 1 (SET:COUNT)")
            parts.append((path, int(count)))
        return parts

    def paths(self, role: str) -> "list[str]":
        return [path for path, _ in self.parts()] if role == INPUT else super().paths(role)


@dataclass
class VerifyConfig(Options):
    """`prepare verify`: check a data set."""

    dest: Optional[str] = option(None, "the data set to check", positional=True, required=True, role=INPUT)


@dataclass
class LatentsConfig(Options):
    """`prepare latents`: encode images into a latent data set."""

    source: Optional[str] = option(None, "image folder (searched recursively) or EDM-style zip", required=True,
                                   role=INPUT)
    dest: Optional[str] = option(None, "data-set folder to create", required=True, role=OUTPUT)
    autoencoder: Optional[str] = option(None, "local folder of a diffusers AutoencoderKL (save_pretrained's layout: "
                                        "config.json and weights; nothing is downloaded)", required=True, role=INPUT)
    sigma_min: Optional[str] = option(None, "noise level below which images must not train: a number, a .npy or a "
                                      ".json {image name: value}", role=INPUT,
                                      default_text="none, every image trains at every level")
    sigma_max: Optional[str] = option(None, "noise level above which images must not train: a number, a .npy or a "
                                      ".json {image name: value} (inf: none)", role=INPUT, default_text="none")
    resolution: Optional[int] = option(None, "center-crop and resize every image to R x R first", bounds=at_least(1),
                                       default_text="the images' own size")
    max_size: Optional[int] = option(None, "use the first N images (sorted by path)", bounds=at_least(1),
                                     default_text="all")
    device: str = device_option()
    overwrite: bool = overwrite_option("a data set")


@dataclass
class CropsConfig(Options):
    """`prepare crops`: crops with their upper noise level."""

    source: Optional[str] = option(None, "image folder (searched recursively) or EDM-style zip", required=True,
                                   role=INPUT)
    dest: Optional[str] = option(None, "data-set folder to create", required=True, role=OUTPUT)
    crop: Optional[int] = option(None, "side of the crops, in pixels (at least 1/16 of the image's side, the "
                                 "smallest Ambient-o measured a noise bound for)", required=True, bounds=at_least(1))
    stride: Optional[int] = option(None, "step between crops", bounds=at_least(1),
                                   default_text="the crop's side (a tiling)")
    delta: float = option(0.1, "further corruption recorded as the training default (B keeps a sub-square of each "
                               "crop; 0: the whole crop)", bounds=between(0, 1, high_open=True))
    resolution: Optional[int] = option(None, "center-crop and resize every image to R x R first", bounds=at_least(1),
                                       default_text="the images' own size")
    max_size: Optional[int] = option(None, "use the first N images (sorted by path)", bounds=at_least(1),
                                     default_text="all")
    overwrite: bool = overwrite_option("a data set")


@dataclass
class AnnotateConfig(Options):
    """`prepare annotate`: each poor image's sigma_min, found against clean images."""

    clean: Optional[str] = option(None, "clean images: folder (searched recursively) or EDM-style zip", required=True,
                                  role=INPUT)
    poor: Optional[str] = option(None, "the poor images to annotate (blurred, compressed, ...)", required=True,
                                 role=INPUT)
    dest: Optional[str] = option(None, "data-set folder to create: the poor images with their sigma_min",
                                 required=True, role=OUTPUT)
    autoencoder: Optional[str] = option(None, "write latents, encoded by this local diffusers AutoencoderKL folder",
                                        role=INPUT, default_text="none, pixels")
    resolution: Optional[int] = option(None, "center-crop and resize every image to R x R first", bounds=at_least(1),
                                       default_text="the poor images' own size")
    max_size: Optional[int] = option(None, "use the first N images of each folder (sorted by path)",
                                     bounds=at_least(1), default_text="all")
    steps: int = option(400, "classifier training steps (batches of 64, half clean, half poor)", bounds=at_least(1))
    trials: int = option(8, "noise draws per image and level when reading the classifier", bounds=at_least(1))
    seed: int = option(0, "seed of the classifier and its noise", bounds=GENERATOR_SEED_BOUNDS)
    device: str = device_option()
    overwrite: bool = overwrite_option("a data set")


SUBCOMMANDS = {  # name -> (config, description)
    "mix": (MixConfig, "merge prepared sets (one resolution, channels and labels) into one, every image keeping its "
                       "record (clean, masked, noisy)"),
    "verify": (VerifyConfig, "check a data set's checksums (of the arrays and of meta.json), recompute what "
                             "meta.json claims, print a summary"),
    "latents": (LatentsConfig, "encode images once with a local diffusers AutoencoderKL (EDM2's scaling of the SD "
                               "VAE) into a latent data set; masks do not live in latent space, so latent sets train "
                               "with noise-level windows only"),
    "crops": (CropsConfig, "cut images into crops, each in place in an unobserved image with Ambient-o's sigma_max "
                           "for its size (it trains only below that level)"),
    "annotate": (AnnotateConfig, "find each poor image's sigma_min (the lowest noise level at which a classifier "
                                 "trained on both can no longer tell it from the clean images) and write the poor "
                                 "images with it; images it tells apart at every level are left out"),
}


def parser(subcommand: Optional[str] = None):
    """The parser of `prepare`, or of `prepare SUBCOMMAND`."""
    if subcommand is None:
        return build_parser(PrepareConfig, prog=PROG, description=__doc__.split("\n\nThe work is done")[0],
                            examples=EXAMPLES)
    config_cls, description = SUBCOMMANDS[subcommand]
    return build_parser(config_cls, prog=f"{PROG} {subcommand}", description=description,
                        examples=[line for line in EXAMPLES if line.startswith(f"{PROG} {subcommand} ")])


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: 0 on success, 1 with a one-line error on bad input."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    subcommand = argv[0] if argv[:1] and argv[0] in SUBCOMMANDS else None
    config_cls = SUBCOMMANDS[subcommand][0] if subcommand else PrepareConfig
    try:
        cfg = parse(config_cls, parser(subcommand), argv[1:] if subcommand else argv)
        print(_run(cfg))
    except (ValueError, OSError) as error:  # DataError is a ValueError; the operators raise ValueError
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _run(cfg) -> str:
    """Do what `cfg` asks; returns what to print."""
    from ambient_fast.data.format import DATASET_FILES, CorruptedDataset
    from ambient_fast.data.prepare import (import_masked, mix_datasets, prepare_annotated, prepare_corrupted,
                                           prepare_crops, prepare_latents, summary)
    from ambient_fast.files.atomic import claim_output

    if isinstance(cfg, VerifyConfig):
        dataset = CorruptedDataset(cfg.dest)
        notes = dataset.verify()
        return "\n".join([summary(dataset, "ok, checksums and content verified"), *(f"  note: {n}" for n in notes)])
    # Checked before the work; the data set replaces the folder as a whole at its end.
    claim_output(cfg.dest, "--dest", what="a data set", owned=lambda entry: entry.name in DATASET_FILES,
                 overwrite=cfg.overwrite, inputs=cfg.paths(INPUT), make_ready=False)
    note = ""
    if isinstance(cfg, MixConfig):
        path = mix_datasets(cfg.parts(), cfg.dest, overwrite=cfg.overwrite)
    elif isinstance(cfg, LatentsConfig):
        path = prepare_latents(cfg.source, cfg.dest, cfg.autoencoder, resolution=cfg.resolution,
                               max_size=cfg.max_size, sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max,
                               overwrite=cfg.overwrite, device=_device(cfg.device))
    elif isinstance(cfg, CropsConfig):
        path = prepare_crops(cfg.source, cfg.dest, cfg.crop, stride=cfg.stride or 0, delta=cfg.delta,
                             resolution=cfg.resolution, max_size=cfg.max_size, overwrite=cfg.overwrite)
    elif isinstance(cfg, AnnotateConfig):
        import numpy as np

        path, levels = prepare_annotated(cfg.clean, cfg.poor, cfg.dest, resolution=cfg.resolution,
                                         max_size=cfg.max_size, autoencoder=cfg.autoencoder, steps=cfg.steps,
                                         trials=cfg.trials, seed=cfg.seed, overwrite=cfg.overwrite,
                                         device=_device(cfg.device))
        found = levels[np.isfinite(levels)]
        note = (f"\n  annotated   sigma_min of {len(found)} of {len(levels)} poor images: median {np.median(found):.4g}, "
                f"range {found.min():.4g} to {found.max():.4g}; {len(levels) - len(found)} told apart at every "
                "level, left out")
    elif cfg.masks is not None:
        path = import_masked(cfg.source, cfg.masks, cfg.dest, delta=cfg.delta, max_size=cfg.max_size,
                             overwrite=cfg.overwrite, sigma_min=cfg.sigma_min)
    else:
        path = prepare_corrupted(cfg.source, cfg.dest, corruption=cfg.corruption, p=cfg.p, delta=cfg.delta,
                                 shared_channels=cfg.shared_channels, resolution=cfg.resolution,
                                 max_size=cfg.max_size, seed=cfg.seed, overwrite=cfg.overwrite, noise=cfg.noise,
                                 sigma_min=cfg.sigma_min)
    return summary(CorruptedDataset(path), "wrote") + note


def _device(name: str):
    """The torch device of --device (auto: CUDA when present); ValueError for CUDA without a GPU."""
    from ambient_fast.training.distributed import init_world

    try:
        return init_world(name)[1]
    except RuntimeError as error:
        raise ValueError(str(error)) from None


if __name__ == "__main__":
    sys.exit(main())
