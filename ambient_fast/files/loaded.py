"""What loading a network gives, whatever file it came from (ours, a published snapshot, a diffusers
folder): the model in eval mode and what it was trained on."""
from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class LoadedNetwork:
    """A network ready to sample or restore with, and what it was trained on."""

    model: torch.nn.Module                            # an AmbientPrecond or a DiffusersDenoiser
    corruption: dict = field(default_factory=dict)   # kind, p, delta, shared_channels, ...
    source: str = ""                                  # path it came from
    metadata: dict = field(default_factory=dict)      # anything else the file recorded

    @property
    def survival(self) -> Optional[float]:
        """The sampling mask's default survival: the training survival (1 - p)(1 - delta) if known,
        or the one the trainer recorded (1 when the model also trained on images A hides nothing of)."""
        if "survival" in self.corruption:
            return float(self.corruption["survival"])
        p, delta = self.corruption.get("p"), self.corruption.get("delta")
        return None if p is None or delta is None else (1 - p) * (1 - delta)

    @property
    def sigma_floor(self) -> float:
        """The lowest noise level the model trained at (0 unless it trained only on noisy images);
        the samplers stop there (`ambient_fast.sampling.samplers.sampling_sigmas`)."""
        return float(self.corruption.get("sigma_floor", 0.0))
