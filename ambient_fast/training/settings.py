"""The run settings: every choice of a run that depends on the device, resolved in one place.

The trainer, the fine-tuner and the sample command ask `resolve_training` or `resolve_sampling`
and do what the answer says; no other code picks a default by looking at the device. Options the
user gave win; the defaults ('auto', unset) follow the device.

`target` resolves the defaults as on another kind of device than the one the run uses: on the CPU,
`target="cuda"` is the exact configuration a GPU run takes, and the CPU tests run it wherever the
CPU can execute it (channels_last, FSDP2 and DDP on gloo, torch.compile, bf16 autocast, the fused
Adam, the fused kernels in Triton's interpreter, the DALI pipeline, the fast sampler path). The
commands take it from the environment: `AMBIENT_FAST_DEFAULTS_FOR=cuda` rehearses a GPU run on the
CPU (with TRITON_INTERPRET=1 for the kernels).
"""
import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

import torch

from ambient_fast import kernels
from ambient_fast.data.batches import dali_available

TARGET_VARIABLE = "AMBIENT_FAST_DEFAULTS_FOR"
TARGETS = ("cpu", "cuda")

__all__ = ["TrainingSettings", "SamplingSettings", "resolve_training", "resolve_sampling", "defaults_target",
           "device_dependent", "TARGET_VARIABLE"]


class _Described:
    """`describe()`: every field as 'name value' (booleans on/off), in declaration order."""

    def describe(self) -> str:
        return ", ".join(setting_text(self, field.name) for field in dataclasses.fields(self))

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def setting_text(settings, name: str) -> str:
    """'compile on', 'parallel fsdp': one setting as `describe()` prints it."""
    value = getattr(settings, name)
    return f"{name} {('on' if value else 'off') if isinstance(value, bool) else value}"


@dataclass(frozen=True)
class TrainingSettings(_Described):
    """What a training (or fine-tuning) run does, resolved from its config and device."""

    channels_last: bool   # activations channels_last; parameters stay contiguous (training.parallel)
    parallel: str         # fsdp, ddp or none
    compile: bool         # torch.compile per U-Net block
    bf16: bool            # bf16 autocast over fp32 parameters
    tf32: bool            # TF32 in CUDA's matrix products and convolutions
    cudnn_benchmark: bool  # cuDNN times its algorithms once per shape and keeps the fastest (EDM does)
    fused_optimizer: bool  # Adam(fused=True): one kernel for the whole update
    fused_kernels: bool   # the Triton kernels of ambient_fast.kernels (ambient input, loss, gated activation)
    loader: str           # torch or dali

    def set_backend_flags(self) -> None:
        """Switch TF32 and cuDNN's autotuning as resolved: process-wide switches of CUDA's libraries,
        which the CPU's ignore (the trainer sets them for a CUDA target only)."""
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.tf32
        torch.backends.cudnn.benchmark = self.cudnn_benchmark


@dataclass(frozen=True)
class SamplingSettings(_Described):
    """How the sample command runs the sampler, resolved from its options and device. The fast
    path's CUDA graph is not a setting: ambient_fast.sampling.graphs captures one exactly when the
    tensors live on CUDA, the one part of the CUDA path a CPU cannot run (tests/test_gpu.py does)."""

    channels_last: bool   # the network's weights, and so its input, channels_last
    fast: bool            # float32 state, bf16 network, fused step (ambient_sample's fast path)
    fused_kernels: bool   # the fused sampler step of ambient_fast.kernels


def defaults_target(device: torch.device) -> str:
    """The kind of device whose defaults a command resolves: AMBIENT_FAST_DEFAULTS_FOR if set, else
    the device's own."""
    target = os.environ.get(TARGET_VARIABLE, "").strip().lower() or torch.device(device).type
    if target not in TARGETS:
        raise ValueError(f"{TARGET_VARIABLE}={target} is not a kind of device this resolves defaults for: use "
                         f"{' or '.join(TARGETS)}, or unset it")
    return target


def _fused_kernels(device: torch.device, target: str) -> bool:
    """Whether the fused kernels run: on CUDA wherever Triton is there and they are not switched off
    (AMBIENT_FAST_KERNELS=0); on the CPU in Triton's interpreter only. A CUDA target on the CPU must
    run them, or it would not be the CUDA configuration."""
    wanted = target == "cuda" and kernels.kernels_enabled() and kernels.triton_available()
    runs = kernels.fused_device(device)
    if wanted and not runs:
        raise ValueError(f"the CUDA configuration on {device} runs the fused kernels in Triton's interpreter: set "
                         f"TRITON_INTERPRET=1 as well (or AMBIENT_FAST_KERNELS=0 to leave the kernels out)")
    return wanted or runs


def resolve_training(cfg, device: torch.device, world_size: int, target: Optional[str] = None) -> TrainingSettings:
    """The settings of a training run of `cfg` (a TrainConfig) on `device` with `world_size`
    ranks, its defaults those of a `target` device ('cpu' or 'cuda'; default: the device's kind)."""
    device = torch.device(device)
    target = target or device.type
    cuda = target == "cuda"
    parallel = "fsdp" if cfg.parallel == "auto" else cfg.parallel
    return TrainingSettings(
        channels_last=cuda if cfg.channels_last is None else cfg.channels_last,
        parallel=parallel if world_size > 1 else "none",
        compile=cuda if cfg.compile is None else cfg.compile,
        bf16=cfg.precision == "bf16" or (cfg.precision == "auto" and cuda),
        tf32=cfg.tf32 and cuda,
        cudnn_benchmark=cuda,
        fused_optimizer=cuda,
        fused_kernels=_fused_kernels(device, target),
        loader=("dali" if cuda and dali_available() else "torch") if cfg.loader == "auto" else cfg.loader,
    )


def resolve_sampling(device: torch.device, *, exact: bool = False, guidance: float = 0.0, churn: float = 0.0,
                     target: Optional[str] = None) -> SamplingSettings:
    """The sample command's settings on `device`: the fast path on CUDA unless `exact` is asked
    for or guidance or churn need the exact one; defaults as on `target` (default: the device's)."""
    device = torch.device(device)
    target = target or device.type
    cuda = target == "cuda"
    return SamplingSettings(channels_last=cuda, fast=cuda and not exact and guidance == 0 and churn == 0,
                            fused_kernels=_fused_kernels(device, target))


def device_dependent(settings_on_cpu, settings_on_cuda) -> "dict[str, tuple]":
    """{name: (cpu value, cuda value)} of the settings that differ between the two resolutions."""
    return {field.name: (getattr(settings_on_cpu, field.name), getattr(settings_on_cuda, field.name))
            for field in dataclasses.fields(settings_on_cpu)
            if getattr(settings_on_cpu, field.name) != getattr(settings_on_cuda, field.name)}
