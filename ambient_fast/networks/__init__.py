"""Networks: gated U-Nets (DDPM++, NCSN++, ADM) and ambient preconditioning."""
from .layers import Conv2d, GroupNorm, Linear, UNetBlock
from .precond import (PRECONDITIONERS, AmbientPrecond, EDMPrecond, VPPrecond, build_model, build_reference_model,
                      from_reference)
from .unets import ARCHITECTURES, DhariwalUNet, SongUNet

__all__ = [
    "Conv2d", "GroupNorm", "Linear", "UNetBlock", "SongUNet", "DhariwalUNet", "ARCHITECTURES",
    "AmbientPrecond", "EDMPrecond", "VPPrecond", "PRECONDITIONERS", "build_model", "build_reference_model", "from_reference",
]
