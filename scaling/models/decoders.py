"""data2vec 2.0's light conv decoders (fairseq ``examples/data2vec/models/modalities/modules.py``
``Decoder1d``, ``Decoder2d``; docs/data2vec2.md): the student encoder's outputs at the kept positions are
put back in place, the other positions filled with N(0, std^2) noise keyed by view (:func:`keyed_normal`),
and a few conv layers predict the teacher's targets at every position; the loss reads the masked ones.
Student only: never EMA-updated, dropped from an HF export. xavier-uniform Linear init (fairseq
data2vec2 ``_init_weights``)."""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from scaling.config import ModelConfig
from scaling.models.blocks import keyed_normal
from scaling.models.data2vec2 import pad_slots_at


def _xavier_linears(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


class DecoderBlock1d(nn.Module):
    """Conv1d(in -> dim, k, padding k // 2, groups) -> LayerNorm over channels (no affine) -> GELU."""

    def __init__(self, in_dim: int, dim: int, kernel: int, groups: int):
        super().__init__()
        self.conv = nn.Conv1d(in_dim, dim, kernel, padding=kernel // 2, groups=groups)

    def forward(self, x_BCT: Tensor) -> Tensor:
        x = self.conv(x_BCT).transpose(1, 2)
        return F.gelu(F.layer_norm(x, x.shape[-1:])).transpose(1, 2)


class Decoder1d(nn.Module):
    """fairseq ``Decoder1d``: kept outputs back in place, masked positions N(0, std^2) noise, padding 0;
    input dropout; ``decoder_layers`` conv blocks (residual where the width is kept and
    ``decoder_residual``); a 1- or 2-layer projection to ``dim``. Padded positions are zeroed before every
    conv, so a row's predictions do not depend on how much its batch is padded."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        v2 = cfg.v2
        self.noise_std = v2.mask_noise_std
        self.residual = v2.decoder_residual
        self.input_dropout = nn.Dropout(v2.decoder_input_dropout)
        self.blocks = nn.ModuleList(
            DecoderBlock1d(cfg.dim if i == 0 else v2.decoder_dim, v2.decoder_dim, v2.decoder_kernel, v2.decoder_groups)
            for i in range(v2.decoder_layers)
        )
        if v2.decoder_projection_layers == 1:
            self.proj = nn.Linear(v2.decoder_dim, cfg.dim)
        else:
            hidden = int(v2.decoder_dim * v2.decoder_projection_ratio)
            self.proj = nn.Sequential(nn.Linear(v2.decoder_dim, hidden), nn.GELU(), nn.Linear(hidden, cfg.dim))
        _xavier_linears(self)

    def forward(self, kept_RKD: Tensor, keep_index_RK: Tensor, noise_seed_R: Tensor, *, num_positions: int,
                padding_mask_RT: Optional[Tensor] = None, keep_padding_RK: Optional[Tensor] = None) -> Tensor:
        R, K, D = kept_RKD.shape
        T = num_positions
        x = keyed_normal(noise_seed_R, (T + 1, D), kept_RKD.dtype) * self.noise_std
        index = pad_slots_at(keep_index_RK, keep_padding_RK, T)
        x = x.scatter(1, index[..., None].expand(R, K, D), kept_RKD)[:, :T]  # pad slots land in column T
        keep = None if padding_mask_RT is None else (~padding_mask_RT)[:, None, :].to(x.dtype)
        x = self.input_dropout(x).transpose(1, 2)
        residual = x
        for block in self.blocks:
            x = block(x if keep is None else x * keep)
            if self.residual and x.shape == residual.shape:
                x = x + residual
            residual = x
        return self.proj(x.transpose(1, 2))


class DecoderBlock2d(nn.Module):
    """Conv2d(in -> dim, k, padding k // 2, groups) -> LayerNorm over channels (no affine) -> GELU."""

    def __init__(self, in_dim: int, dim: int, kernel: int, groups: int):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, dim, kernel, padding=kernel // 2, groups=groups)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        x = self.conv(x_BCHW).permute(0, 2, 3, 1)
        return F.gelu(F.layer_norm(x, x.shape[-1:])).permute(0, 3, 1, 2)


class Decoder2d(nn.Module):
    """fairseq ``Decoder2d``: the encoder's kept outputs are put back on the patch grid, masked patches
    filled with N(0, mask_noise_std^2) noise; ``decoder_layers`` conv blocks (a residual add wherever a
    block keeps the width, ``decoder_residual``), then Linear(decoder_dim -> dim) predicts every patch."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        v2 = cfg.v2
        self.grid = (cfg.vision.image_size // cfg.vision.patch_size,) * 2
        self.noise_std = v2.mask_noise_std
        self.residual = v2.decoder_residual
        self.blocks = nn.ModuleList(
            DecoderBlock2d(cfg.dim if i == 0 else v2.decoder_dim, v2.decoder_dim, v2.decoder_kernel, v2.decoder_groups)
            for i in range(v2.decoder_layers)
        )
        self.proj = nn.Linear(v2.decoder_dim, cfg.dim)
        _xavier_linears(self)

    def forward(self, kept_RKD: Tensor, keep_index_RK: Tensor, noise_seed_R: Tensor, *, num_positions: int,
                padding_mask_RT: Optional[Tensor] = None, keep_padding_RK: Optional[Tensor] = None) -> Tensor:
        """``kept_RKD``: encoder outputs at the kept patches (CLS stripped); ``noise_seed_R``: each view's key
        for its noise (:func:`keyed_normal`). Returns ``[R, N, D]``. Images have no padding."""
        R, K, D = kept_RKD.shape
        N = self.grid[0] * self.grid[1]
        assert num_positions == N and padding_mask_RT is None and keep_padding_RK is None, \
            "an image decoder takes whole, unpadded grids"
        x = keyed_normal(noise_seed_R, (N, D), kept_RKD.dtype) * self.noise_std
        x = x.scatter(1, keep_index_RK[..., None].expand(R, K, D), kept_RKD)
        x = x.transpose(1, 2).reshape(R, D, *self.grid)
        residual = x
        for block in self.blocks:
            x = block(x)
            if self.residual and x.shape == residual.shape:
                x = x + residual
            residual = x
        return self.proj(x.flatten(2).transpose(1, 2))
