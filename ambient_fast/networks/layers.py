"""Building blocks of the U-Nets: linear and gated convolution layers, group norm, noise
embeddings and the U-Net block.

Module and parameter names follow EDM (NVlabs/edm) and its Ambient Diffusion fork, so that
their state dicts load with `strict=True`: a convolution has `weight` [O, I, k, k],
`gate_weight` [O, I, k, k] when gated, `bias` [O], and a `resample_filter` buffer when it
resamples. Initialisation follows EDM's schemes (it matters for new models only).
"""
import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ambient_fast.kernels import gated_activation_packed
from ambient_fast.options import GATES


def initial_values(shape: Sequence[int], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """`compute()`, a parameter's or buffer's random initial values of `shape`; on the meta device (a
    network built for its shapes only, as a checkpoint's header is checked before its weights load)
    an empty tensor instead. Meta tensors hold no values anyway, and arithmetic on them runs PyTorch's
    Python reference kernels: their first use imports torch._dynamo (1.5 s of a 3.6 s sample command
    on a 2-core CPU), and each operation then takes ten times the CPU's time."""
    if torch.get_default_device().type == "meta":
        return torch.empty(shape)
    return compute()


def weight_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int, scale: float = 1) -> torch.Tensor:
    """EDM's initialisation schemes (xavier/kaiming, uniform/normal), times `scale`."""
    schemes = {
        "xavier_uniform": lambda: math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1),
        "xavier_normal": lambda: math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape),
        "kaiming_uniform": lambda: math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1),
        "kaiming_normal": lambda: math.sqrt(1 / fan_in) * torch.randn(*shape),
    }
    if mode not in schemes:
        raise ValueError(f"unknown init mode {mode!r}; expected xavier_uniform, xavier_normal, kaiming_uniform or "
                         "kaiming_normal")
    return initial_values(shape, lambda: schemes[mode]() * scale)


def check_gate(gate: str) -> str:
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    return gate


class Linear(torch.nn.Module):
    """Fully connected layer, `x @ weight.T + bias`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 init_mode: str = "kaiming_normal", init_weight: float = 1, init_bias: float = 0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **fans, scale=init_weight))
        self.bias = torch.nn.Parameter(weight_init([out_features], **fans, scale=init_bias)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype)
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, w, b)


class Conv2d(torch.nn.Module):
    """Convolution with optional 2x up/down-sampling by a separable FIR filter, optionally gated.

    Gated: `out = conv(x, weight) * s(conv(x, gate_weight)) + bias`, with `s` the sigmoid
    (`gate="sigmoid"`, the paper's gated convolution) or the sigmoid applied twice
    (`gate="double_sigmoid"`, what the published checkpoints were trained with). Both
    branches run as ONE convolution over the concatenated weights; the bias is added after
    gating (and after resampling). `kernel=0` means a pure resampling layer: no weights,
    no gate.

    Resampling order (EDM's): up/down-sample then convolve; with `fused_resample` a
    down-sampling layer convolves at full resolution first and then applies the strided
    filter, and an up-sampling layer applies the transposed filter first.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True,
                 up: bool = False, down: bool = False, resample_filter: Sequence[int] = (1, 1),
                 fused_resample: bool = False, init_mode: str = "kaiming_normal",
                 init_weight: float = 1, init_bias: float = 0, gate: str = "sigmoid"):
        if up and down:
            raise ValueError("Conv2d cannot both up- and down-sample")
        if not kernel and not (up or down):
            raise ValueError("Conv2d with kernel=0 must up- or down-sample (it has no weights)")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        self.gate = check_gate(gate) if kernel else "none"
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        shape = [out_channels, in_channels, kernel, kernel]
        self.weight = torch.nn.Parameter(weight_init(shape, **fans, scale=init_weight)) if kernel else None
        has_bias = kernel and bias
        self.bias = torch.nn.Parameter(weight_init([out_channels], **fans, scale=init_bias)) if has_bias else None
        if self.gate != "none":
            self.gate_weight = torch.nn.Parameter(weight_init(shape, **fans, scale=init_weight))
        taps = np.asarray(resample_filter, dtype=np.float32)  # in NumPy: no arithmetic on meta (initial_values)
        f = torch.as_tensor(np.outer(taps, taps) / np.square(taps.sum()))[None, None]
        self.register_buffer("resample_filter", f if up or down else None)

    def _conv(self, x: torch.Tensor, padding: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The (gated) convolution, with `bias` added last when given."""
        w = self.weight.to(x.dtype)
        b = bias.to(x.dtype) if bias is not None else None
        if self.gate == "none":
            return F.conv2d(x, w, b, padding=padding)
        both = F.conv2d(x, torch.cat([w, self.gate_weight.to(x.dtype)]), padding=padding)
        return gated_activation_packed(both, b, self.gate == "double_sigmoid")  # a, g = both.chunk(2, dim=1)

    def _resample(self, x: torch.Tensor, channels: int, up: bool, padding: int) -> torch.Tensor:
        f = self.resample_filter.to(x.dtype)
        if up:
            return F.conv_transpose2d(x, f.mul(4).tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=padding)
        return F.conv2d(x, f.tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:  # pure resampling
            return self._resample(x, self.in_channels, up=self.up, padding=self._filter_pad)
        w_pad = self.weight.shape[-1] // 2
        f_pad = self._filter_pad
        if self.fused_resample and self.up:
            x = self._resample(x, self.in_channels, up=True, padding=max(f_pad - w_pad, 0))
            return self._conv(x, max(w_pad - f_pad, 0), self.bias)
        if self.fused_resample and self.down:
            x = self._resample(self._conv(x, w_pad + f_pad, None), self.out_channels, up=False, padding=0)
            return x if self.bias is None else x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        if self.up or self.down:
            x = self._resample(x, self.in_channels, up=self.up, padding=f_pad)
        return self._conv(x, w_pad, self.bias)

    @property
    def _filter_pad(self) -> int:
        return (self.resample_filter.shape[-1] - 1) // 2 if self.resample_filter is not None else 0


class GroupNorm(torch.nn.Module):
    """Group normalisation with EDM's group count: min(num_groups, channels // 4)."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class PositionalEmbedding(torch.nn.Module):
    """Transformer-style sinusoidal embedding of the noise label: [cos(x f), sin(x f)]."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(torch.nn.Module):
    """Random Fourier features of the noise label (NCSN++): [cos(2 pi x f), sin(2 pi x f)]."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        shape = [num_channels // 2]
        self.register_buffer("freqs", initial_values(shape, lambda: torch.randn(*shape) * scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.outer(x, (2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class UNetBlock(torch.nn.Module):
    """Residual block with optional up/down-sampling and self-attention: the union of what
    DDPM++, NCSN++ and ADM use (EDM's `UNetBlock`)."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, num_heads: Optional[int] = None,
                 channels_per_head: int = 64, dropout: float = 0, skip_scale: float = 1, eps: float = 1e-5,
                 resample_filter: Sequence[int] = (1, 1), resample_proj: bool = False,
                 adaptive_scale: bool = True, init: dict = {}, init_zero: dict = dict(init_weight=0),
                 init_attn: Optional[dict] = None, gate: str = "sigmoid"):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale
        conv = dict(gate=gate)

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter, **conv, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **conv, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down,
                               resample_filter=resample_filter, **conv, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **conv, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, 1, **conv, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))

        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))

        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = x + (self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale

        if self.num_heads:
            x = self.proj(self._attend(self.qkv(self.norm2(x)), x.shape)) + x
            x = x * self.skip_scale
        return x

    def _attend(self, qkv: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Multi-head self-attention over pixels; channels of `qkv` are laid out as
        (head, channel, q/k/v), as EDM's reshape implies.

        On CUDA: `fused_attention`. Elsewhere: the reference's own arithmetic (logits and softmax in
        fp32, or in float64 for a float64 network), which reproduces its outputs bit for bit on CPU.
        """
        n, c, h, w = shape
        if use_fused_attention(qkv):
            q, k, v = qkv.reshape(n, self.num_heads, c // self.num_heads, 3, h * w).unbind(3)
            return fused_attention(q, k, v).reshape(n, c, h, w)
        q, k, v = qkv.reshape(n * self.num_heads, c // self.num_heads, 3, h * w).unbind(2)
        exact = torch.promote_types(q.dtype, torch.float32)
        logits = torch.einsum("ncq,nck->nqk", q.to(exact), (k / np.sqrt(k.shape[1])).to(exact))
        weights = logits.softmax(dim=2).to(q.dtype)
        return torch.einsum("nqk,nck->ncq", weights, v).reshape(n, c, h, w)


def use_fused_attention(qkv: torch.Tensor) -> bool:
    return qkv.is_cuda


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q^T k / sqrt(c)) applied to v, for q, k, v of shape (N, heads, c, L) (channels, then
    pixels); returns (N, heads, c, L), contiguous.

    `scaled_dot_product_attention` takes its fused kernels (flash, memory-efficient) only for 4-D
    (N, heads, L, c) inputs whose last dimension is contiguous; anything else falls back to the math
    path, which materialises the L x L matrix. Hence the copies to that layout."""
    q, k, v = (t.transpose(-1, -2).contiguous() for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).contiguous()
