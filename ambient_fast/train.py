"""`python -m ambient_fast.train`: train an ambient diffusion model on corrupted data.

With no arguments: a complete small run on the built-in synthetic data set (a few minutes on a
laptop CPU) that leaves a checkpoint, a grid of samples beside a grid of the corrupted training
inputs, and `stats.jsonl`. With `--data DIR` (a set made by `python -m ambient_fast.prepare`): the
real thing, unchanged under `torchrun --nproc_per_node=N` (FSDP2 by default, DDP on request; gloo
on CPU). `--resume DIR` continues a run exactly. The options: ambient_fast.training.config; the trainer:
ambient_fast.training.trainer.
"""
import sys
from typing import Optional

from ambient_fast.training.config import TrainConfig, build_parser, config_from_args
from ambient_fast.training.distributed import close_world
from ambient_fast.training.trainer import Trainer, TrainingDiverged


def main(argv=None, parser=None, config_cls=TrainConfig, trainer_cls=Trainer) -> int:
    """Parse, build the trainer, train; bad input, refused writes, a diverged run and missing
    optional packages end with a message (exit status 1)."""
    parser = parser or build_parser(config_cls, description=__doc__.split("\n\n")[0])
    trainer: Optional[Trainer] = None
    try:
        cfg, resume, overwrite = config_from_args(argv, parser, config_cls)
        trainer = trainer_cls(cfg, resume=resume, overwrite=overwrite)
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


if __name__ == "__main__":
    sys.exit(main())
