"""The Inception-v3 network that FID is defined with, and its weights read from a local file.

FID uses one particular Inception-v3: TensorFlow's 2015-12-05 ImageNet graph (pool3, 2048
features), whose weights pytorch-fid publishes ported to PyTorch as
`pt_inception-2015-12-05-6726825d.pth`. It differs from torchvision's Inception-v3 in three
places, all kept here because the features (and so every FID) depend on them:
- the 3x3 average pools inside the A, C and first E blocks leave the zero padding out of the
  average (TensorFlow's pooling);
- the last E block pools its pool branch with a max, not an average;
- there are 1008 classes, not 1000 (we stop at pool3 and never use the classifier).

Parameter names follow torchvision's `Inception3` (`Mixed_5b.branch1x1.conv.weight`, ...), the
names the published state dict uses, so the file loads as it is. Nothing is ever downloaded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FIDInceptionV3", "load_inception_weights", "WEIGHTS_FILE", "RESOLUTION", "FEATURES"]

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
RESOLUTION = 299  # the network's input size: every image is resized to it
FEATURES = 2048   # pool3


class ConvBN(nn.Module):
    """Convolution without bias, batch norm (TensorFlow's eps 1e-3), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _average_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3, stride 1, averaging over the pixels inside the image only (TensorFlow's padding)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pooled 1x1 branches."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_average_pool(x)),
        ], dim=1)


class BlockB(nn.Module):
    """35x35 -> 17x17 reduction."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], dim=1)


class BlockC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 then 7x1)."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c = channels_7x7
        self.branch1x1 = ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = ConvBN(in_channels, c, 1)
        self.branch7x7_2 = ConvBN(c, c, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(in_channels, c, 1)
        self.branch7x7dbl_2 = ConvBN(c, c, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c, c, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c, c, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = conv(double)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            double,
            self.branch_pool(_average_pool(x)),
        ], dim=1)


class BlockD(nn.Module):
    """17x17 -> 8x8 reduction."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seven = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            seven = conv(seven)
        return torch.cat([
            self.branch3x3_2(self.branch3x3_1(x)),
            seven,
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], dim=1)


class BlockE(nn.Module):
    """8x8 block whose 3x3 branches split into parallel 1x3 and 3x1 convolutions.

    `max_pool`: the pool branch takes a max (the graph's last block) instead of a padding-free
    average.
    """

    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _average_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(single), self.branch3x3_2b(single),
            self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
            self.branch_pool(pooled),
        ], dim=1)


class FIDInceptionV3(nn.Module):
    """(N, 3, 299, 299) images in [-1, 1] -> (N, 2048) pool3 features."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = BlockA(192, pool_features=32)
        self.Mixed_5c = BlockA(256, pool_features=64)
        self.Mixed_5d = BlockA(288, pool_features=64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, channels_7x7=128)
        self.Mixed_6c = BlockC(768, channels_7x7=160)
        self.Mixed_6d = BlockC(768, channels_7x7=160)
        self.Mixed_6e = BlockC(768, channels_7x7=192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))    # 64 x 147 x 147
        x = F.max_pool2d(x, kernel_size=3, stride=2)                          # 64 x 73 x 73
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                         # 192 x 71 x 71
        x = F.max_pool2d(x, kernel_size=3, stride=2)                          # 192 x 35 x 35
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)                                                      # ... 2048 x 8 x 8
        return x.mean(dim=(2, 3))                                             # pool3


# The published state dict also holds the 1008-class classifier (fc.*), unused here, and, saved
# by a later PyTorch, batch norm's step counters, which inference never reads.
_IGNORED_PREFIXES, _IGNORED_SUFFIXES = ("fc.",), (".num_batches_tracked",)


def _ignored(key: str) -> bool:
    return key.startswith(_IGNORED_PREFIXES) or key.endswith(_IGNORED_SUFFIXES)


def load_inception_weights(weights: Union[str, Path]) -> FIDInceptionV3:
    """The network with the weights of `weights`, in eval mode.

    `weights`: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (read with
    torch.load(weights_only=True): no code in it runs) or a .safetensors copy of the same state
    dict. ValueError, naming the expected file, when the file is missing or is not that network.
    """
    path = Path(weights)
    where = (f"the FID Inception weights are pytorch-fid's {WEIGHTS_FILE} (or a .safetensors copy); "
             f"nothing is downloaded: fetch it yourself from {WEIGHTS_URL} and pass its path")
    if not path.is_file():
        raise ValueError(f"Inception weights {path} not found; {where}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged or foreign file fails in many ways; all mean the same to the user
        # The type names the failure; torch's own text advises weights_only=False, which is not ours to change.
        raise ValueError(f"cannot read Inception weights {path}: not a PyTorch or safetensors state dict "
                         f"({type(error).__name__}); {where}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors; {where}")

    model = FIDInceptionV3()
    expected = {k: v.shape for k, v in model.state_dict().items() if not _ignored(k)}
    found = {k: v for k, v in state.items() if not _ignored(k)}
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    wrong = [f"{k} {tuple(found[k].shape)} (expected {tuple(expected[k])})"
             for k in sorted(set(expected) & set(found)) if found[k].shape != expected[k]]
    if missing or unexpected or wrong:
        problems = [f"{len(missing)} missing (e.g. {', '.join(missing[:3])})" if missing else "",
                    f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})" if unexpected else "",
                    f"{len(wrong)} of the wrong shape (e.g. {'; '.join(wrong[:2])})" if wrong else ""]
        raise ValueError(f"{path} is not the FID Inception network: tensors "
                         f"{', '.join(p for p in problems if p)}; {where}")
    # strict=False only for the step counters a file may lack; every other tensor was checked above.
    model.load_state_dict(found, strict=False)
    return model.eval().requires_grad_(False)
