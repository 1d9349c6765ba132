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
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ambient_fast import train
from ambient_fast.files.checkpoints import check_finite
from ambient_fast.training.config import TrainConfig, build_parser, option
from ambient_fast.training.trainer import Trainer
from ambient_fast.networks.diffusers import DiffusersDenoiser, load_denoiser, save_denoiser
from ambient_fast.objective.objective import DiscreteVPSchedule

MODEL_PREFIX = "model."  # the UNet's parameters inside the denoiser


def _default(name: str, value):
    """The TrainConfig field `name` with another default (its help and checks kept)."""
    field = TrainConfig.__dataclass_fields__[name]
    return dataclasses.field(default=value, metadata=field.metadata)


@dataclass
class FinetuneConfig(TrainConfig):
    unet: Optional[str] = option(None, "diffusers UNet directory written by save_pretrained (safetensors), its "
                                 "scheduler_config.json beside it or in ../scheduler/; or a pipeline root with unet/ "
                                 "and scheduler/ (required)")
    prompt_embeddings: Optional[str] = option(None, "safetensors file with 'prompt_embeddings' (K, L, D) for a "
                                              "UNet2DConditionModel: K = 1 conditions every image on it (e.g. the "
                                              "empty prompt), K > 1 picks by the data set's labels")
    loss_weight: str = option("snr", "snr: the noise-prediction error where the network saw the pixel, the x0 error "
                              "where B hid it; x0: weight 1 on the x0 error everywhere, as the authors' DeepFloyd "
                              "script (bench/results/finetune.md: it leaves the hidden pixels untrained far longer)",
                              choices=DiscreteVPSchedule.WEIGHTINGS)
    # Fine-tuning defaults: a pre-trained model moves with a small learning rate.
    out: str = _default("out", "runs/finetune")
    lr: float = _default("lr", 1e-4)
    lr_rampup_kimg: float = _default("lr_rampup_kimg", 0.5)
    ema: float = _default("ema", 0.01)
    steps: int = _default("steps", 2000)

    def __post_init__(self):
        super().__post_init__()
        if self.unet is None or self.data is None:
            raise ValueError("--unet DIR (a diffusers UNet) and --data DIR (a prepared data set) are required")


class FinetuneTrainer(Trainer):
    """The trainer with a diffusers UNet (DiffusersDenoiser) in place of our own network."""

    command = "python -m ambient_fast.finetune"

    def build_model(self):
        cfg, dataset = self.cfg, self.dataset
        net: DiffusersDenoiser = load_denoiser(cfg.unet, cfg.prompt_embeddings)
        shape = (net.channels, net.img_resolution, net.img_resolution)
        if (dataset.channels, dataset.resolution, dataset.resolution) != shape:
            raise ValueError(f"{cfg.unet} takes {'x'.join(map(str, shape))} images (in_channels, sample_size), the "
                             f"data set {dataset.path} holds {dataset.channels}x{dataset.resolution}x{dataset.resolution}: "
                             "prepare the data at the model's resolution")
        if net.label_dim and net.label_dim != dataset.label_dim:
            raise ValueError(f"{net.label_dim} prompt embeddings are chosen by the data set's labels, so the data set "
                             f"needs {net.label_dim} classes (it has {dataset.label_dim}); pass one embedding to "
                             "condition every image on it")
        return net, DiscreteVPSchedule(net.train_sigmas, self.cfg.loss_weight)

    def describe_model(self) -> str:
        return f"{self.net.describe()} from {self.cfg.unet}"

    def write_networks(self, final: bool) -> Path:
        """unet-ema-snapshot-NNNNNNNNN, or at the end unet-ema and unet (the trained weights)."""
        targets = {"unet-ema": True, "unet": False} if final else {f"unet-ema-snapshot-{self.step:09d}": True}
        info = dict(corruption=self.training_record(), step=self.step,
                    images_seen=self.images_seen, base_unet=str(self.cfg.unet), config=dataclasses.asdict(self.cfg))
        for name, ema in targets.items():
            state = {key[len(MODEL_PREFIX):]: value for key, value in self._full_state_dict(ema).items()}
            check_finite(state, self.run_dir / name)  # on every rank: all stop together
            if self.world.is_main:
                save_denoiser(self.run_dir / name, self.net, state, info)
        return self.run_dir / next(iter(targets))


def finetune_parser():
    """The trainer's options without those that define our own networks, and the fine-tuner's."""
    return build_parser(FinetuneConfig, prog="python -m ambient_fast.finetune", description=__doc__.split("\n\n")[0],
                        leave_out=("architecture",))


def main(argv=None) -> int:
    return train.main(argv, parser=finetune_parser(), config_cls=FinetuneConfig, trainer_cls=FinetuneTrainer)


if __name__ == "__main__":
    sys.exit(main())
