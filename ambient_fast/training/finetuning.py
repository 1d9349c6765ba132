"""The trainer of `python -m ambient_fast.finetune`: a diffusers UNet (DiffusersDenoiser) in place of our
own network, graded by DiscreteVPSchedule, written as diffusers folders."""
import dataclasses
from pathlib import Path

from ambient_fast.files.checkpoints import check_finite
from ambient_fast.networks.diffusers import DiffusersDenoiser, load_denoiser, save_denoiser
from ambient_fast.objective.objective import DiscreteVPSchedule
from ambient_fast.training.trainer import Trainer

MODEL_PREFIX = "model."  # the UNet's parameters inside the denoiser


class FinetuneTrainer(Trainer):
    """The trainer with a diffusers UNet (DiffusersDenoiser) in place of our own network."""

    command = "python -m ambient_fast.finetune"
    final_name = "unet-ema"

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

    def network_from(self, state: dict):
        """A DiffusersDenoiser of the run's UNet holding `state` (the denoiser's full weights), in eval mode."""
        network = load_denoiser(self.cfg.unet, self.cfg.prompt_embeddings)
        network.load_state_dict(state, strict=True)
        return network.eval()

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
