"""`python -m ambient_fast.train`: train an ambient diffusion model on corrupted data.

With no arguments: a complete small run on the built-in synthetic data set (a few minutes on a
laptop CPU) that leaves a checkpoint, `overview.png` (labelled panels: corrupted training inputs,
samples, their clean originals, and held-out images restored in one step with their PSNR),
`stats.jsonl` and `log.txt`, and prints the commands to try next. With `--data DIR` (a set made
by `python -m ambient_fast.prepare`): the real thing, unchanged under `torchrun
--nproc_per_node=N` (FSDP2 by default, DDP on request; gloo on CPU). `--resume DIR` continues a
run exactly (a finished one only when `--steps` grows). Exit status: 0 finished, 1 an error, 3
interrupted by SIGTERM or Ctrl-C (its state saved: resume it). The options:
ambient_fast.training.config; the trainer: ambient_fast.training.trainer.
"""
import sys

from ambient_fast.options import build_parser
from ambient_fast.training.config import TrainConfig, add_run_options, config_from_args

EXAMPLES = (
    "python -m ambient_fast.train    # the built-in run: 16x16 synthetic set, a few CPU minutes",
    "python -m ambient_fast.train --data data/celeba-p08 --out runs/celeba --steps 200000",
    "torchrun --nproc_per_node=8 -m ambient_fast.train --data data/celeba-p08 --out runs/celeba",
    "python -m ambient_fast.train --resume runs/celeba --steps 400000    # continues exactly",
)


def parser():
    return build_parser(TrainConfig, prog="python -m ambient_fast.train", description=__doc__.split("\n\n")[0],
                        examples=EXAMPLES, extras=add_run_options)


def main(argv=None) -> int:
    try:
        cfg, resume, overwrite = config_from_args(parser(), argv)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    from ambient_fast.training.trainer import Trainer

    return run(Trainer, cfg, resume, overwrite)


def run(trainer_cls, cfg: TrainConfig, resume: bool, overwrite: bool) -> int:
    """Build the trainer and train; bad input, refused writes, a diverged run and missing optional
    packages end with a message (exit status 1); an interrupted run exits with EXIT_INTERRUPTED.
    Everything the console shows from here on goes to the run's log.txt too (main rank)."""
    from ambient_fast.training.console import RunLog
    from ambient_fast.training.distributed import close_world
    from ambient_fast.training.trainer import TrainingDiverged

    trainer, log = None, RunLog().open()
    try:
        trainer = trainer_cls(cfg, resume=resume, overwrite=overwrite)
        log.attach(trainer.run_dir / "log.txt" if trainer.world.is_main else None)
        return trainer.train()
    except (ValueError, OSError, TrainingDiverged, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except RuntimeError as error:
        if trainer is not None:
            raise  # a failure inside training keeps its traceback
        print(f"error: {error}", file=sys.stderr)  # e.g. --device cuda without a GPU
        return 1
    finally:
        if trainer is not None:
            trainer.close()
        close_world()
        log.close()


if __name__ == "__main__":
    sys.exit(main())
