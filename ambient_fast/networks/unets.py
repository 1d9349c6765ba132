"""The denoiser backbones: DDPM++ / NCSN++ (`SongUNet`) and ADM (`DhariwalUNet`), as in EDM,
with every convolution that has a kernel gated (Ambient Diffusion).

The networks know nothing of sigma: they map (x, noise label, class labels, augment labels)
to an output with `out_channels` channels; preconditioning lives in `precond.py`.
Submodule names (`enc.16x16_block0`, `dec.32x32_aux_conv`, ...) equal the reference's so
that its state dicts load unchanged; the role of each entry is recorded at construction
time so that `forward` never parses names.
"""
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .layers import Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock, check_gate


def _drop_labels(labels: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Zero each sample's class label with probability p during training (classifier-free guidance)."""
    if not (training and p):
        return labels
    keep = torch.rand([labels.shape[0], 1], device=labels.device) >= p
    return labels * keep.to(labels.dtype)


class SongUNet(torch.nn.Module):
    """DDPM++ (positional embedding, standard encoder, filter [1,1]) and NCSN++ (Fourier
    embedding, residual encoder, filter [1,3,3,1]) from Song et al., as reimplemented by EDM.

    forward(x (N, in_channels, R, R), noise_labels (N,), class_labels (N, label_dim) or None,
    augment_labels (N, augment_dim) or None) -> (N, out_channels, R, R).
    """

    def __init__(self,
        img_resolution: int,                         # Image resolution at input and output.
        in_channels: int,                            # Channels at input.
        out_channels: int,                           # Channels at output.
        label_dim: int = 0,                          # Number of class labels, 0 = unconditional.
        augment_dim: int = 0,                        # Augmentation label size, 0 = no augmentation.
        model_channels: int = 128,                   # Base channel count.
        channel_mult: Sequence[int] = (1, 2, 2, 2),  # Channel multiplier per resolution.
        channel_mult_emb: int = 4,                   # Embedding size multiplier.
        num_blocks: int = 4,                         # Residual blocks per resolution.
        attn_resolutions: Sequence[int] = (16,),     # Resolutions with self-attention.
        dropout: float = 0.10,                       # Dropout probability inside blocks.
        label_dropout: float = 0,                    # Class-label dropout (classifier-free guidance).
        embedding_type: str = "positional",          # 'positional' (DDPM++) or 'fourier' (NCSN++).
        channel_mult_noise: int = 1,                 # Noise embedding size: 1 for DDPM++, 2 for NCSN++.
        encoder_type: str = "standard",              # 'standard' (DDPM++), 'skip' or 'residual' (NCSN++).
        decoder_type: str = "standard",              # 'standard' or 'skip'.
        resample_filter: Sequence[int] = (1, 1),     # [1,1] for DDPM++, [1,3,3,1] for NCSN++.
        gate: str = "sigmoid",                       # 'sigmoid', 'double_sigmoid' (published checkpoints) or 'none'.
    ):
        for name, value, allowed in [("embedding_type", embedding_type, ("fourier", "positional")),
                                     ("encoder_type", encoder_type, ("standard", "skip", "residual")),
                                     ("decoder_type", decoder_type, ("standard", "skip"))]:
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        check_gate(gate)
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=np.sqrt(0.2))
        block_kwargs = dict(
            emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5), eps=1e-6,
            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
            init=init, init_zero=init_zero, init_attn=init_attn, gate=gate,
        )

        # Mapping of noise, class and augmentation labels to the block embedding.
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder. `roles` records what each entry does: a main-path layer or an auxiliary one.
        self.enc = torch.nn.ModuleDict()
        self._enc_roles = {}
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self._add(self.enc, self._enc_roles, f"{res}x{res}_conv", "main", Conv2d(cin, cout, 3, gate=gate, **init))
            else:
                self._add(self.enc, self._enc_roles, f"{res}x{res}_down", "main",
                          UNetBlock(cout, cout, down=True, **block_kwargs))
                if encoder_type == "skip":
                    self._add(self.enc, self._enc_roles, f"{res}x{res}_aux_down", "aux_down",
                              Conv2d(caux, caux, 0, down=True, resample_filter=resample_filter, gate=gate))
                    self._add(self.enc, self._enc_roles, f"{res}x{res}_aux_skip", "aux_skip",
                              Conv2d(caux, cout, 1, gate=gate, **init))
                if encoder_type == "residual":
                    self._add(self.enc, self._enc_roles, f"{res}x{res}_aux_residual", "aux_residual",
                              Conv2d(caux, cout, 3, down=True, resample_filter=resample_filter,
                                     fused_resample=True, gate=gate, **init))
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self._add(self.enc, self._enc_roles, f"{res}x{res}_block{idx}", "main",
                          UNetBlock(cin, cout, attention=(res in attn_resolutions), **block_kwargs))
        skips = [self.enc[name].out_channels for name, role in self._enc_roles.items() if role == "main"]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        self._dec_roles = {}
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self._add(self.dec, self._dec_roles, f"{res}x{res}_in0", "main",
                          UNetBlock(cout, cout, attention=True, **block_kwargs))
                self._add(self.dec, self._dec_roles, f"{res}x{res}_in1", "main", UNetBlock(cout, cout, **block_kwargs))
            else:
                self._add(self.dec, self._dec_roles, f"{res}x{res}_up", "main", UNetBlock(cout, cout, up=True, **block_kwargs))
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attention = idx == num_blocks and res in attn_resolutions
                self._add(self.dec, self._dec_roles, f"{res}x{res}_block{idx}", "main",
                          UNetBlock(cin, cout, attention=attention, **block_kwargs))
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self._add(self.dec, self._dec_roles, f"{res}x{res}_aux_up", "aux_up",
                              Conv2d(out_channels, out_channels, 0, up=True, resample_filter=resample_filter, gate=gate))
                self._add(self.dec, self._dec_roles, f"{res}x{res}_aux_norm", "aux_norm", GroupNorm(cout, eps=1e-6))
                self._add(self.dec, self._dec_roles, f"{res}x{res}_aux_conv", "aux_conv",
                          Conv2d(cout, out_channels, 3, gate=gate, **init_zero))

    @staticmethod
    def _add(modules: torch.nn.ModuleDict, roles: dict, name: str, role: str, module: torch.nn.Module) -> None:
        modules[name] = module
        roles[name] = role

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                augment_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        sin_cos = emb.shape[1] // 2
        emb = torch.cat([emb[:, sin_cos:], emb[:, :sin_cos]], dim=1)  # DDPM++ orders sin before cos
        if self.map_label is not None:
            labels = _drop_labels(class_labels, self.label_dropout, self.training)
            emb = emb + self.map_label(labels * np.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        skips = []
        aux = x
        for name, block in self.enc.items():
            role = self._enc_roles[name]
            if role == "aux_down":
                aux = block(aux)
            elif role == "aux_skip":
                x = skips[-1] = x + block(aux)
            elif role == "aux_residual":
                x = skips[-1] = aux = (x + block(aux)) / np.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        aux = None
        tmp = None
        for name, block in self.dec.items():
            role = self._dec_roles[name]
            if role == "aux_up":
                aux = block(aux)
            elif role == "aux_norm":
                tmp = block(x)
            elif role == "aux_conv":
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux


class DhariwalUNet(torch.nn.Module):
    """ADM from Dhariwal and Nichol, as reimplemented by EDM.

    forward(x (N, in_channels, R, R), noise_labels (N,), class_labels (N, label_dim) or None,
    augment_labels (N, augment_dim) or None) -> (N, out_channels, R, R).
    """

    def __init__(self,
        img_resolution: int,                          # Image resolution at input and output.
        in_channels: int,                             # Channels at input.
        out_channels: int,                            # Channels at output.
        label_dim: int = 0,                           # Number of class labels, 0 = unconditional.
        augment_dim: int = 0,                         # Augmentation label size, 0 = no augmentation.
        model_channels: int = 192,                    # Base channel count.
        channel_mult: Sequence[int] = (1, 2, 3, 4),   # Channel multiplier per resolution.
        channel_mult_emb: int = 4,                    # Embedding size multiplier.
        num_blocks: int = 3,                          # Residual blocks per resolution.
        attn_resolutions: Sequence[int] = (32, 16, 8),  # Resolutions with self-attention.
        dropout: float = 0.10,                        # Dropout probability inside blocks.
        label_dropout: float = 0,                     # Class-label dropout (classifier-free guidance).
        gate: str = "sigmoid",                        # 'sigmoid', 'double_sigmoid' (published checkpoints) or 'none'.
    ):
        check_gate(gate)
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=np.sqrt(1 / 3), init_bias=np.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout,
                            init=init, init_zero=init_zero, gate=gate)

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                 init_weight=np.sqrt(label_dim)) if label_dim else None)

        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, gate=gate, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=(res in attn_resolutions), **block_kwargs)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3, gate=gate, **init_zero)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                augment_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(_drop_labels(class_labels, self.label_dropout, self.training))
        emb = F.silu(emb)

        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


ARCHITECTURES = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}
