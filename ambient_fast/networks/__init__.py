"""Networks: gated U-Nets (DDPM++, NCSN++, ADM), EDM2's magnitude-preserving U-Net, and their
preconditioning (ambient, mask-aware or the reference's)."""
from .edm2 import EDM2UNet
from .layers import Conv2d, GroupNorm, Linear, UNetBlock
from .precond import (PRECONDITIONERS, AmbientPrecond, EDM2Precond, EDMPrecond, VPPrecond, build_model,
                      build_reference_model, edm2_from_reference, from_reference)
from .unets import ARCHITECTURES, DhariwalUNet, SongUNet

__all__ = [
    "Conv2d", "GroupNorm", "Linear", "UNetBlock", "SongUNet", "DhariwalUNet", "ARCHITECTURES", "EDM2UNet",
    "AmbientPrecond", "EDMPrecond", "VPPrecond", "EDM2Precond", "PRECONDITIONERS", "build_model",
    "build_reference_model", "from_reference", "edm2_from_reference",
]
