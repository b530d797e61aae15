"""data2vec 2.0 text: RoBERTa embeddings shared with the teacher, post-LN blocks whose student runs on the
kept tokens of M views, and the 1-D conv decoder (fairseq ``examples/data2vec/models/modalities/text.py``,
``modalities/modules.py`` ``Decoder1d``, ``config/v2/base_text_only_task.yaml``; docs/data2vec2.md).

What the teacher owns (fairseq ``ema_encoder_only: true``): the blocks only. The embeddings (token,
learned positions, LayerNorm) are the student's ``frontend``; the teacher reads their output, detached, as
fairseq does: computed once per step in training mode, so the embedding dropout is applied to the
teacher's input too. Parameter names are v1's (``frontend.embed_tokens``, ``encoder.blocks.*``), so the
encoder exports to HF ``Data2VecTextModel`` like a v1 one.

Rows keep different numbers of tokens (a document's last block is shorter): the kept index is padded to
the longest row's count and ``keep_padding_RK`` marks the pad slots, which attention ignores and the
decoder never writes back.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaling.config import ModelConfig
from scaling.models.blocks import PostLNBlock, check_tap, collect_taps, init_bert_params, keyed_normal
from scaling.models.data2vec2 import gather_kept
from scaling.models.outputs import EncoderOutput, FrontendOutput
from scaling.models.text import TextFrontend, make_positions


class TextFrontend2(TextFrontend):
    """v1's embeddings of the ORIGINAL tokens (2.0 has no ``<mask>`` input): LayerNorm(token + position)
    -> dropout, padded positions zeroed; the teacher's input is the same tensor, detached."""

    def forward(self, batch: dict[str, Tensor]) -> FrontendOutput:
        tokens = batch["tokens_BT"]
        padding_mask = batch["padding_mask_BT"].bool()
        if tokens.shape[1] > self.max_positions:
            raise ValueError(f"sequence of {tokens.shape[1]} tokens exceeds model.text.max_positions "
                             f"({self.max_positions})")
        x = self._zero_pad(self.dropout(self.embed(tokens, make_positions(padding_mask, self.pad_id))), padding_mask)
        return FrontendOutput(student_x=x, teacher_x=x.detach(), padding_mask_BT=padding_mask,
                              mask_BT=batch["mask_BT"].bool(), local_features_BTD=x.detach())


class TextEncoder2(nn.Module):
    """The EMA-updated part: post-LN blocks only (the main ones; text 2.0 has no prenet)."""

    block_shapes_vary = True  # [R, K] follow the batch's longest block
    prenet_depth = 0

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.blocks = nn.ModuleList(
            PostLNBlock(cfg.dim, cfg.heads, cfg.ffn_dim, dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
                        activation_dropout=cfg.activation_dropout, eps=cfg.layer_norm_eps)
            for _ in range(cfg.depth)
        )
        self.blocks.apply(init_bert_params)

    def forward(self, x: Tensor, *, padding_mask_BT: Optional[Tensor] = None, mask_BT: Optional[Tensor] = None,
                num_taps: int = 0, tap: str = "ffn", keep_index_RK: Optional[Tensor] = None,
                keep_padding_RK: Optional[Tensor] = None) -> EncoderOutput:
        check_tap(tap)
        first = collect_taps(num_taps, len(self.blocks))
        key_padding = padding_mask_BT
        if keep_index_RK is not None:
            x, key_padding = gather_kept(x, keep_index_RK), keep_padding_RK
        taps: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            x, t = block(x, key_padding_mask=key_padding, tap=tap)
            if i >= first:
                taps.append(t)
        return EncoderOutput(x_BTD=x, taps=taps)


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
        for m in self.modules():  # fairseq data2vec2 _init_weights for the decoder: xavier-uniform Linear
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, kept_RKD: Tensor, keep_index_RK: Tensor, noise_seed_R: Tensor, *, num_positions: int,
                padding_mask_RT: Optional[Tensor] = None, keep_padding_RK: Optional[Tensor] = None) -> Tensor:
        R, K, D = kept_RKD.shape
        T = num_positions
        x = keyed_normal(noise_seed_R, (T + 1, D), kept_RKD.dtype) * self.noise_std
        index = keep_index_RK if keep_padding_RK is None else keep_index_RK.masked_fill(keep_padding_RK, T)
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
