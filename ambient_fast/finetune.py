"""`python -m ambient_fast.finetune --unet DIR --data PREPARED --out OUT`: fine-tune a pixel-space
diffusers model with the ambient objective (Daras et al. 2023, section 5.2: DeepFloyd IF stage I
fine-tuned on corrupted images memorises them far less than when fine-tuned on clean ones).

DIR is a diffusers `UNet2DModel` or `UNet2DConditionModel` written by `save_pretrained`, its scheduler
config beside it (it decides the noise schedule and the prediction type); a conditional model takes
`--prompt-embeddings FILE` (see ambient_fast.networks.diffusers: one embedding for every image, or one per
class of the data set's labels). The UNet trains through the same trainer as our own networks
(ambient_fast.train: data sets, B redrawn every step, EMA, bf16, compile, FSDP2 / DDP under torchrun,
snapshots, exact `--resume`), wrapped as an EDM denoiser, with sigma drawn uniformly over its
training timesteps and the x0 error on the pixels of A as the loss (DiscreteVPSchedule).

OUT receives `unet/` (the fine-tuned weights) and `unet-ema/` (their EMA), each a diffusers directory
loadable by `from_pretrained` as it is, with the scheduler config and prompt embeddings beside the
weights; `unet-ema-snapshot-NNNNNNNNN/` during the run; the training states for `--resume`; and
samples drawn from `unet-ema` with the fixed-mask sampler (`python -m ambient_fast.sample --net
OUT/unet-ema` draws more).
"""
import sys

from ambient_fast import train
from ambient_fast.options import build_parser
from ambient_fast.training.config import FinetuneConfig, add_run_options, config_from_args

EXAMPLES = (
    "python -m ambient_fast.finetune --unet models/if-stage1/unet --data data/faces-p08 --out runs/if-p08",
    "python -m ambient_fast.finetune --resume runs/if-p08 --steps 4000",
    "python -m ambient_fast.sample --net runs/if-p08/unet-ema --out samples --seeds 0-63",
)


def parser():
    """The trainer's options without those that define our own networks or write them (post-hoc EMA
    snapshots), and the fine-tuner's."""
    return build_parser(FinetuneConfig, prog="python -m ambient_fast.finetune", description=__doc__.split("\n\n")[0],
                        examples=EXAMPLES, leave_out=("architecture", "posthoc_ema"), extras=add_run_options)


def main(argv=None) -> int:
    try:
        cfg, resume, overwrite = config_from_args(parser(), argv, FinetuneConfig)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    from ambient_fast.training.finetuning import FinetuneTrainer

    return train.run(FinetuneTrainer, cfg, resume, overwrite)


if __name__ == "__main__":
    sys.exit(main())
