"""`python -m ambient_fast.ema --run RUN --std 0.1 --out net.safetensors`: build the post-hoc EMA of a
chosen length from a run's snapshots (EDM2's post-hoc EMA, Karras et al. 2024).

A run that tracks post-hoc EMA profiles (`train --ema-stds`, on by default for `--arch edm2`) stores
snapshots of them in RUN/phema. This writes the weights averaged with the power-function profile of
relative standard deviation STD at the last snapshot (or at `--images`), combined from those snapshots
(ambient_fast.training.posthoc_ema: the least-squares combination of their profiles), as a network file
that every command takes (`sample --net`, `restore --net`). A length the snapshots cannot reach within
`--max-error` is refused before anything is written.
"""
import sys
from dataclasses import dataclass
from typing import Optional

from ambient_fast.options import INPUT, OUTPUT, Options, above, at_least, between, build_parser, option, \
    overwrite_option, parse

EXAMPLES = (
    "python -m ambient_fast.ema --run runs/edm2 --std 0.1 --out edm2-ema010.safetensors",
    "python -m ambient_fast.ema --run runs/edm2 --std 0.15 --images 2000000 --out early.safetensors",
)


@dataclass
class EmaConfig(Options):
    """What `python -m ambient_fast.ema` reconstructs."""

    run: Optional[str] = option(None, "a training run whose phema/ folder holds post-hoc EMA snapshots (or that "
                                "folder itself)", required=True, role=INPUT)
    std: Optional[float] = option(None, "the EMA length: its profile's standard deviation relative to the training "
                                  "time (EDM2's best lie around 0.05 to 0.2)", required=True,
                                  bounds=between(0, 0.2886, low_open=True, high_open=True))
    out: Optional[str] = option(None, "the .safetensors file to write", required=True, role=OUTPUT,
                                check=((lambda v: str(v).endswith(".safetensors")), "a .safetensors path"))
    images: Optional[int] = option(None, "the training time of the average, in images seen", bounds=at_least(1),
                                   default_text="the last snapshot's")
    max_error: float = option(0.05, "refuse a reconstruction whose profile is further than this from the target "
                                    "(relative L2 error)", bounds=above(0))
    overwrite: bool = overwrite_option("a checkpoint of ours")


def parser():
    return build_parser(EmaConfig, prog="python -m ambient_fast.ema", description=__doc__.split("\n\n")[0],
                        examples=EXAMPLES)


def main(argv=None) -> int:
    try:
        cfg = parse(EmaConfig, parser(), argv)
        from pathlib import Path

        from ambient_fast.files.atomic import claim_output
        from ambient_fast.files.checkpoints import is_checkpoint
        from ambient_fast.training.posthoc_ema import reconstruct

        folder = Path(cfg.run) / "phema" if (Path(cfg.run) / "phema").is_dir() else Path(cfg.run)
        claim_output(cfg.out, "--out", folder=False, what="an ambient-fast checkpoint", owned=is_checkpoint,
                     overwrite=cfg.overwrite, inputs=cfg.paths(INPUT))
        record = reconstruct(folder, cfg.std, cfg.out, images=cfg.images, max_error=cfg.max_error)
    except (OSError, ValueError) as error:  # a folder without snapshots is a FileNotFoundError
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {cfg.out}: the EMA of relative std {record['std']:g} at {record['images']} images from "
          f"{len(record['snapshots'])} snapshots (profile error {record['profile_error']:.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
