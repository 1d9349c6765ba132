"""EDM2's magnitude-preserving U-Net (Karras et al., "Analyzing and Improving the Training Dynamics of
Diffusion Models", CVPR 2024), computing what NVlabs/edm2's `training/networks_edm2.py` computes.

Every layer keeps the magnitude of its input: weights are normalised to unit norm per output channel on
every use (and, in training mode, overwritten by their normalised value: forced weight normalisation),
activations go through `mp_silu`, and sums and concatenations are rescaled (`mp_sum`, `mp_cat`). There
are no biases and no group norms; a block's only normalisation is a pixel norm. Its preconditioning
and log-variance head live in `precond.py` (`EDM2Precond`): the network knows nothing of sigma.

Module and parameter names equal the reference's (`enc.16x16_block0.conv_res0.weight`, `emb_gain`,
`dec.8x8_in0.attn_qkv.weight`, `emb_fourier.freqs`, ...) so that its state dicts load with strict=True.
"""
import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .layers import fused_attention, initial_values, use_fused_attention

# EDM2's resampling filter: a 2x2 box. Nothing else is supported (no published EDM2 model uses another).
RESAMPLE_FILTER = [1, 1]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision storage, otherwise the dtype itself (float64 stays exact for tests)."""
    return torch.promote_types(dtype, torch.float32)


def normalize(x: torch.Tensor, dim: Union[int, Sequence[int], None] = None, eps: float = 1e-4) -> torch.Tensor:
    """`x / (eps + rms(x))`, the root mean square taken over `dim` (default: every dimension but the first),
    in float32 at least. Over a weight's input dimensions this is the weight normalisation; over the
    channels of an activation (`dim=1`), the pixel norm. eps is added to the RMS, not to its square."""
    dims = list(range(1, x.ndim)) if dim is None else [dim] if isinstance(dim, int) else list(dim)
    count = math.prod([x.shape[d] for d in dims])  # a list: a generator here would break torch.compile's graph
    norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=_compute_dtype(x.dtype))
    # eps + norm / sqrt(count) as one operation, rounded as the reference rounds it: forced weight
    # normalisation then writes the reference's weights bit for bit.
    norm = torch.add(eps, norm, alpha=math.sqrt(1 / count))
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU scaled so that a unit normal input gives a unit-RMS output (0.596 = E[silu(z)^2]^0.5)."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """`(1 - t) a + t b`, rescaled to unit magnitude for independent unit-magnitude a and b."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenation of a (Na channels) and b (Nb channels) along `dim`, weighted (1 - t) : t per
    tensor rather than per channel, and scaled so that the result keeps unit magnitude."""
    na, nb = a.shape[dim], b.shape[dim]
    scale = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (scale / math.sqrt(na) * (1 - t)), b * (scale / math.sqrt(nb) * t)], dim=dim)


def resample(x: torch.Tensor, mode: str) -> torch.Tensor:
    """EDM2's [1,1] resampling of (N, C, H, W): 'down' = 2x2 box average with stride 2, 'up' = nearest
    neighbour (the transposed box filter times 4), 'keep' = x itself."""
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x


class MPFourier(torch.nn.Module):
    """Magnitude-preserving Fourier features: `sqrt(2) cos(x freqs + phases)`, (N,) -> (N, num_channels).
    `freqs` (2 pi times normal) and `phases` are random buffers, saved with the weights."""

    def __init__(self, num_channels: int, bandwidth: float = 1):
        super().__init__()
        shape = [num_channels]
        self.register_buffer("freqs", initial_values(shape, lambda: 2 * math.pi * torch.randn(*shape) * bandwidth))
        self.register_buffer("phases", initial_values(shape, lambda: 2 * math.pi * torch.rand(*shape)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x.dtype)
        y = torch.outer(x.to(dtype), self.freqs.to(dtype)) + self.phases.to(dtype)
        return (y.cos() * math.sqrt(2)).to(x.dtype)


@torch.no_grad()  # outside compiled graphs: MPConv._overwrite_outside_graphs
def _overwrite_normalized(weight: torch.nn.Parameter, w: torch.Tensor) -> None:
    weight.copy_(normalize(w))


class MPConv(torch.nn.Module):
    """Magnitude-preserving convolution (4-D weight) or fully connected layer (`kernel=()`), no bias:
    the weight normalised per output channel, times `gain / sqrt(fan_in)`.

    Forced weight normalisation. In training mode each call first overwrites the stored weight by its
    normalised value (in place, without gradient, as the reference does it) and then normalises again
    for the computation. With float32 parameters the reference's float32 view of the weight is the
    parameter itself, so the computation sees normalize(normalize(w)), which differs from normalize(w)
    by the eps in the RMS; with half-precision parameters the view is a copy taken before the overwrite.
    Both behaviours are kept, so training outputs match the reference's in either.

    torch.compile: Inductor (torch 2.13) silently drops that in-place overwrite of a parameter from a
    compiled graph, and the gradient it then computes is wrong, so the overwrite runs outside the graph
    (a graph break). A trainer that wants whole graphs sets `normalize_in_forward = False` and calls
    `normalize_weight_()` before each training forward instead, which computes the same, bit for bit
    with float32 parameters.
    """

    # `_overwrite_normalized` under torch.compiler.disable, wrapped when the first MPConv is built rather
    # than at import: the wrapper imports torch._dynamo, half a second of the start of every command that
    # imports the networks. A class attribute, so that it is no part of a module's pickled state.
    _overwrite_outside_graphs = None

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int] = ()):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.normalize_in_forward = True
        if MPConv._overwrite_outside_graphs is None:
            MPConv._overwrite_outside_graphs = staticmethod(torch.compiler.disable(_overwrite_normalized))
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    @torch.no_grad()
    def normalize_weight_(self) -> None:
        """Forced weight normalisation as a step of its own: weight <- normalize(weight), in place. A weight
        sharded by FSDP2 (a DTensor split along its output channels) is normalised shard by shard: each
        output channel's row lies whole on one rank."""
        weight = self.weight.to_local() if hasattr(self.weight, "to_local") else self.weight
        weight.copy_(normalize(weight.to(_compute_dtype(weight.dtype))))

    def forward(self, x: torch.Tensor, gain: Union[float, torch.Tensor] = 1) -> torch.Tensor:
        """x (N, in_channels, H, W) or (N, in_channels) -> (N, out_channels, ...). A 0-dim tensor `gain`
        divides by sqrt(fan_in) in its own dtype (float16 for a float16 snapshot), as the reference."""
        w = self.weight.to(_compute_dtype(self.weight.dtype))  # the parameter itself when float32 (see above)
        if self.training and self.normalize_in_forward:
            self._overwrite_outside_graphs(self.weight, w)
        w = normalize(w) * (gain / math.sqrt(w[0].numel()))
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


class Block(torch.nn.Module):
    """EDM2's U-Net block. Encoder flavour: resample, 1x1 `conv_skip` when the width changes, pixel norm,
    then the residual branch. Decoder flavour: resample, residual branch, `conv_skip` on the main path.
    The residual branch is conv_res0(mp_silu(x)), scaled by (emb_linear(emb) + 1) per channel, mp_silu,
    dropout, conv_res1, joined by mp_sum; then optional self-attention, then clipping.

    forward(x (N, in_channels, R, R), emb (N, emb_channels)) -> (N, out_channels, R', R').
    """

    def __init__(self,
        in_channels: int,                # Channels at input.
        out_channels: int,               # Channels at output.
        emb_channels: int,               # Channels of the embedding.
        flavor: str = "enc",             # 'enc' or 'dec'.
        resample_mode: str = "keep",     # 'keep', 'up' or 'down'.
        attention: bool = False,         # Self-attention after the residual branch.
        channels_per_head: int = 64,     # Channels per attention head (fewer channels: no attention).
        dropout: float = 0,              # Dropout probability in the residual branch (training only).
        res_balance: float = 0.3,        # mp_sum weight of the residual branch against the main path.
        attn_balance: float = 0.3,       # mp_sum weight of the attention against the main path.
        clip_act: Optional[float] = 256,  # Clip the output to +-clip_act; None: no clipping.
    ):
        if flavor not in ("enc", "dec"):
            raise ValueError(f"flavor must be 'enc' or 'dec', got {flavor!r}")
        if resample_mode not in ("keep", "up", "down"):
            raise ValueError(f"resample_mode must be 'keep', 'up' or 'down', got {resample_mode!r}")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_mode = resample_mode
        # As the reference: C // channels_per_head heads, so a block narrower than one head has none.
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels)
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)

        y = self.conv_res0(mp_silu(x))
        scale = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * scale[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)

        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        if self.num_heads:
            x = mp_sum(x, self.attn_proj(self._attend(self.attn_qkv(x))), t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x

    def _attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """Self-attention over pixels of qkv (N, 3C, H, W), channels laid out (head, c, q/k/v); q, k and v
        each pixel-normalised over their c channels; logits q.k / sqrt(c). Returns (N, C, H, W).
        On CUDA `fused_attention`; elsewhere the reference's arithmetic (logits and softmax in fp32 at least)."""
        n, _, h, w = qkv.shape
        q, k, v = normalize(qkv.reshape(n, self.num_heads, -1, 3, h * w), dim=2).unbind(3)  # (N, heads, c, HW)
        if use_fused_attention(qkv):
            return fused_attention(q, k, v).reshape(n, -1, h, w)
        exact = _compute_dtype(q.dtype)
        logits = torch.einsum("nhcq,nhck->nhqk", q.to(exact), (k / math.sqrt(k.shape[2])).to(exact))
        weights = logits.softmax(dim=3).to(v.dtype)
        return torch.einsum("nhqk,nhck->nhcq", weights, v).reshape(n, -1, h, w)


class EDM2UNet(torch.nn.Module):
    """EDM2's U-Net: Fourier noise embedding, optional label embedding, an encoder of Blocks with one
    extra constant input channel, a decoder joining the skips with mp_cat, a gained output convolution.
    The reference's `img_channels` is `in_channels` and `out_channels` here (an ambient model takes the
    mask as extra input channels and predicts the image only).

    forward(x (N, in_channels, R, R), noise_labels (N,) or (1,), class_labels (N or 1, label_dim) or None)
    -> (N, out_channels, R, R).
    """

    def __init__(self,
        img_resolution: int,                            # Image resolution.
        in_channels: int,                               # Channels at input.
        out_channels: int,                              # Channels at output.
        label_dim: int = 0,                             # Number of class labels, 0 = unconditional.
        model_channels: int = 192,                      # Base channel count.
        channel_mult: Sequence[int] = (1, 2, 3, 4),     # Channel multiplier per resolution.
        channel_mult_noise: Optional[int] = None,       # Noise embedding size / model_channels; None: channel_mult[0].
        channel_mult_emb: Optional[int] = None,         # Block embedding size / model_channels; None: max(channel_mult).
        num_blocks: int = 3,                            # Blocks per resolution.
        attn_resolutions: Sequence[int] = (16, 8),      # Resolutions with self-attention.
        label_balance: float = 0.5,                     # mp_sum weight of the label embedding against the noise's.
        concat_balance: float = 0.5,                    # mp_cat weight of the main path against the skip.
        channels_per_head: int = 64,                    # Channels per attention head.
        dropout: float = 0,                             # Dropout probability inside blocks.
        res_balance: float = 0.3,                       # mp_sum weight of each residual branch.
        attn_balance: float = 0.3,                      # mp_sum weight of each attention.
        clip_act: Optional[float] = 256,                # Clip each block's output; None: no clipping.
        resample_filter: Sequence[int] = (1, 1),        # Resampling filter; only EDM2's [1,1] is supported.
    ):
        if list(resample_filter) != RESAMPLE_FILTER:
            raise ValueError(f"EDM2's resampling filter is {RESAMPLE_FILTER}; got {list(resample_filter)}, which this "
                             "implementation does not support")
        super().__init__()
        widths = [model_channels * mult for mult in channel_mult]
        noise_channels = model_channels * channel_mult_noise if channel_mult_noise is not None else widths[0]
        emb_channels = model_channels * channel_mult_emb if channel_mult_emb is not None else max(widths)
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        block_kwargs = dict(channels_per_head=channels_per_head, dropout=dropout, res_balance=res_balance,
                            attn_balance=attn_balance, clip_act=clip_act)
        self.out_gain = torch.nn.Parameter(torch.zeros([]))

        self.emb_fourier = MPFourier(noise_channels)
        self.emb_noise = MPConv(noise_channels, emb_channels)
        self.emb_label = MPConv(label_dim, emb_channels) if label_dim else None

        # Encoder: a convolution at full resolution (input plus a constant channel), then Blocks.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels + 1
        for level, width in enumerate(widths):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, width
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, kernel=[3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, emb_channels, "enc", "down", **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, width
                self.enc[f"{res}x{res}_block{idx}"] = Block(cin, cout, emb_channels, "enc",
                                                            attention=res in attn_resolutions, **block_kwargs)

        # Decoder: the lowest resolution starts with two blocks (the first always with attention); every
        # `blockN` takes a skip from the encoder (recorded here, so that forward never parses names).
        self.dec = torch.nn.ModuleDict()
        self._takes_skip = set()
        skips = [block.out_channels for block in self.enc.values()]
        for level, width in reversed(list(enumerate(widths))):
            res = img_resolution >> level
            if level == len(widths) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, emb_channels, "dec", attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, emb_channels, "dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, emb_channels, "dec", "up", **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), width
                self.dec[f"{res}x{res}_block{idx}"] = Block(cin, cout, emb_channels, "dec",
                                                            attention=res in attn_resolutions, **block_kwargs)
                self._takes_skip.add(f"{res}x{res}_block{idx}")
        self.out_conv = MPConv(cout, out_channels, kernel=[3, 3])

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor,
                class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            labels = self.emb_label(class_labels * math.sqrt(class_labels.shape[1]))
            emb = mp_sum(emb, labels, t=self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, Block) else block(x)
            skips.append(x)
        for name, block in self.dec.items():
            if name in self._takes_skip:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)
