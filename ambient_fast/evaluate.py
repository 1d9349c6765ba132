"""`python -m ambient_fast.evaluate --samples DIR --reference DIR_OR_DATASET`: sample quality and memorisation.

Reports the Fréchet distance between the samples and clean reference images (FID with
`--features inception --weights pt_inception-2015-12-05-6726825d.pth`; in pixel space by default,
which needs no weights) and, with `--training`, each sample's top-1 cosine similarity to the
training images (the paper's memorisation study, Figure 6).

Images are read from a folder of PNGs (what `python -m ambient_fast.sample` writes; its grid.png
is skipped, and where its sampling.json lists the images, the folder must hold exactly those), a
uint8 .npy (N, C, H, W), or, for --reference and --training, the built-in
synthetic data set: its clean twin's held-out images serve as the reference and its clean
originals as the training set. Any other prepared data set holds only corrupted images and is
refused: pass its clean images instead.
"""
import sys
from dataclasses import dataclass
from typing import Optional

from ambient_fast.options import INPUT, OUTPUT, Options, at_least, build_parser, device_option, option, overwrite_option, parse

FEATURE_SPACES = ("pixel", "inception")
EXAMPLES = (
    "python -m ambient_fast.evaluate --samples samples --reference ~/.cache/ambient-fast/synthetic-r16-n4096-p0.6-"
    "delta0.1-shared-seed0",
    "python -m ambient_fast.evaluate --samples samples --reference clean.npy --training train-clean/ --out report.json",
    "python -m ambient_fast.evaluate --samples samples --reference cifar10-test/ --features inception "
    "--weights pt_inception-2015-12-05-6726825d.pth",
)


@dataclass
class EvaluateConfig(Options):
    """What `python -m ambient_fast.evaluate` compares, in which feature space."""

    samples: Optional[str] = option(None, "folder of PNGs (python -m ambient_fast.sample --out) or a uint8 .npy "
                                    "(N, C, H, W)", required=True, role=INPUT)
    reference: Optional[str] = option(None, "clean images: folder of PNGs, uint8 .npy, or the built-in synthetic "
                                      "data set (its held-out clean images)", required=True, role=INPUT)
    training: Optional[str] = option(None, "training images for nearest-neighbour similarity: folder, .npy, or the "
                                     "built-in synthetic data set (its clean originals)", role=INPUT,
                                     default_text="none, no memorisation study")
    features: str = option("pixel", "feature space: pixel, or inception (FID; needs --weights)",
                           choices=FEATURE_SPACES)
    weights: Optional[str] = option(None, "FID Inception weights: pytorch-fid's pt_inception-*.pth or a .safetensors "
                                    "copy (a local file; nothing is downloaded)", role=INPUT,
                                    default_text="none (--features inception needs them)")
    out: Optional[str] = option(None, "write the report (with every sample's similarity) to this JSON file",
                                role=OUTPUT, default_text="none, the table is only printed")
    overwrite: bool = overwrite_option("an earlier report")
    batch: int = option(64, "images per Inception forward pass", bounds=at_least(1))
    device: str = device_option()

    def __post_init__(self):
        super().__post_init__()
        if self.features == "inception" and not self.weights:
            from ambient_fast.evaluation.inception import WEIGHTS_FILE

            raise ValueError(f"--features inception needs --weights: pytorch-fid's {WEIGHTS_FILE} (or a "
                             ".safetensors copy), a local file")
        if self.features == "pixel" and self.weights:
            raise ValueError("--weights is only used with --features inception")


def parser():
    return build_parser(EvaluateConfig, prog="python -m ambient_fast.evaluate", description=__doc__.split("\n\n")[0],
                        examples=EXAMPLES)


def is_report(path) -> bool:
    """An earlier report of this command: a JSON object with a Fréchet distance (what --overwrite replaces)."""
    from ambient_fast.files.atomic import read_json

    try:
        report = read_json(path)
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and "frechet_distance" in report


def main(argv=None) -> int:
    try:
        cfg = parse(EvaluateConfig, parser(), argv)
        import torch

        from ambient_fast.evaluation.report import evaluate, load_clean, load_images, print_table
        from ambient_fast.files.atomic import claim_output, write_json
        from ambient_fast.memory import check_memory

        if cfg.out:
            claim_output(cfg.out, "--out", folder=False, what="an evaluation report", owned=is_report,
                         overwrite=cfg.overwrite, inputs=cfg.paths(INPUT))
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(auto if cfg.device == "auto" else cfg.device)
        samples = load_images(cfg.samples, "--samples")
        reference = load_clean(cfg.reference, "--reference", "held_out.npy",
                               "held-out clean images of the synthetic set")
        training = (load_clean(cfg.training, "--training", "images.npy",
                               "clean originals of the synthetic training set") if cfg.training else None)
        if cfg.features == "inception":  # each image is resized to 299 x 299 for the network
            largest = max(len(images.array) for images in (samples, reference, training) if images is not None)
            check_memory(2 * 4 * 3 * 299 * 299 * min(cfg.batch, largest), f"--batch {cfg.batch} of Inception inputs",
                         "lower --batch", device=str(device))
        report = evaluate(samples, reference, training, cfg.features, cfg.weights, device, cfg.batch)
        print_table(report)
        for warning in report["warnings"]:
            print(f"warning: {warning}", file=sys.stderr)
        if cfg.out:
            write_json(cfg.out, report)
            print(f"report: {cfg.out}")
    except (OSError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
