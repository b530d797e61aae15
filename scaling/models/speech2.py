"""data2vec 2.0 speech: the wav2vec 2.0 conv feature encoder and projection shared with the teacher, an
EMA-updated encoder (conv positional encoder, ALiBi with a learned scale per head, LayerNorm, prenet and
main post-LN blocks) whose student runs on the kept frames of M views, and the 1-D conv decoder
(fairseq ``examples/data2vec/models/modalities/audio.py``, ``modalities/base.py``
``contextualized_features``, ``config/v2/base_audio_only_task.yaml``; docs/data2vec2.md).

The teacher (fairseq ``ema_encoder_only: false``, ``ema_local_encoder: false``) reuses the student's local
features, computed once per step, and applies its own positional conv, ALiBi scale and blocks. The student
zeroes the frames it does not keep (``encoder_zero_mask``), runs the positional conv over the whole
sequence, adds it and keeps its K frames; ALiBi biases are taken at the kept frames' true positions.
"""

from __future__ import annotations

import math
import random
from typing import Optional

import torch
from torch import Tensor, nn

from scaling.config import ModelConfig
from scaling.models.blocks import PostLNBlock, check_tap, collect_taps, init_bert_params
from scaling.models.data2vec2 import gather_kept, pad_slots_at
from scaling.models.outputs import EncoderOutput, FrontendOutput
from scaling.models.speech import FeatureExtractor, FeatureProjection, PosConv, SpeechFrontend


def alibi_slopes(heads: int) -> list[float]:
    """The ALiBi paper's head slopes (Press et al., arXiv 2108.12409; ofirpress/attention_with_linear_biases,
    as fairseq ``get_alibi``): a geometric sequence from 2^(-8/n) for a power-of-two n, else the closest
    power of two's slopes plus every other slope of twice that."""
    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]

    if math.log2(heads).is_integer():
        return power_of_2(heads)
    closest = 2 ** math.floor(math.log2(heads))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][: heads - closest]


class SpeechFrontend2(nn.Module):
    """CNN -> LayerNorm -> projection, padded frames zeroed; the teacher reads the same tensor, detached."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        sc, eps = cfg.speech, cfg.layer_norm_eps
        self.conv_layers = [list(c) for c in sc.conv_layers]
        self.feature_extractor = FeatureExtractor(self.conv_layers, eps)
        self.feature_projection = FeatureProjection(self.feature_extractor.out_channels, cfg.dim, eps)

    frame_padding_mask = SpeechFrontend.frame_padding_mask

    def forward(self, batch: dict[str, Tensor]) -> FrontendOutput:
        feats = self.feature_projection(self.feature_extractor(batch["audio_BT"]).transpose(1, 2))  # [B, T, D]
        padding = self.frame_padding_mask(batch.get("audio_padding_BT"), feats.shape[1])
        if padding is not None:
            feats = torch.where(padding[..., None], torch.zeros((), dtype=feats.dtype, device=feats.device), feats)
        mask = batch["mask_BT"].bool()
        if mask.shape[1] != feats.shape[1]:
            raise ValueError(f"speech mask_BT has {mask.shape[1]} frames, the feature encoder gives {feats.shape[1]}")
        return FrontendOutput(student_x=feats, teacher_x=feats.detach(), padding_mask_BT=padding, mask_BT=mask,
                              local_features_BTD=feats.detach())


class SpeechEncoder2(nn.Module):
    """Positional conv (on the zeroed full sequence) + add -> [keep K frames per view] -> LayerNorm ->
    dropout -> ``prenet_depth + depth`` post-LN blocks with ALiBi. LayerDrop on the main blocks in training,
    from the encoder's own ``random.Random``, reseeded by the trainer before every optimizer step from the
    recipe seed and the step (``set_layerdrop_seed``; see ``SpeechEncoder``): every rank drops the same
    blocks, and a resumed run the same as an uninterrupted one."""

    block_shapes_vary = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        sc, eps = cfg.speech, cfg.layer_norm_eps
        self.prenet_depth = cfg.v2.prenet_depth
        self.pos_conv = PosConv(cfg.dim, sc.conv_pos_width, sc.conv_pos_depth, sc.conv_pos_groups, eps)
        # fairseq learned_alibi_scale_per_head, alibi_scale_init 1.0; one scale per head for every block.
        self.alibi_scale = nn.Parameter(torch.ones(cfg.heads))
        self.register_buffer("alibi_slopes", torch.tensor(alibi_slopes(cfg.heads)), persistent=False)
        self.norm = nn.LayerNorm(cfg.dim, eps=eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            PostLNBlock(cfg.dim, cfg.heads, cfg.ffn_dim, dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
                        activation_dropout=cfg.activation_dropout, eps=eps)
            for _ in range(cfg.v2.prenet_depth + cfg.depth)
        )
        self.blocks.apply(init_bert_params)
        self.layerdrop = sc.layerdrop
        self._layerdrop_rng = random.Random(0)

    def set_layerdrop_seed(self, seed: int) -> None:
        """The next LayerDrop draws come from ``random.Random(seed)`` (one draw per main block and forward)."""
        self._layerdrop_rng = random.Random(seed)

    def alibi(self, positions_RK: Tensor, dtype: torch.dtype) -> Tensor:
        """``-|p_i - p_j| x slope_h x max(scale_h, 0)`` at the given (true) positions: ``[R, H, K, K]``."""
        distance = (positions_RK[:, None, :, None] - positions_RK[:, None, None, :]).abs().to(dtype)
        per_head = (self.alibi_slopes * self.alibi_scale.clamp_min(0.0)).to(dtype)
        return -distance * per_head[None, :, None, None]

    def forward(self, x: Tensor, *, padding_mask_BT: Optional[Tensor] = None, mask_BT: Optional[Tensor] = None,
                num_taps: int = 0, tap: str = "ffn", keep_index_RK: Optional[Tensor] = None,
                keep_padding_RK: Optional[Tensor] = None) -> EncoderOutput:
        check_tap(tap)
        first = self.prenet_depth + collect_taps(num_taps, len(self.blocks) - self.prenet_depth)
        B, T, _ = x.shape
        if keep_index_RK is None:  # teacher, probe: every frame
            h = x + self.pos_conv(x, padding_mask_BT)
            positions = torch.arange(T, device=x.device)[None, :]
            key_padding = padding_mask_BT
        else:
            R, K = keep_index_RK.shape
            index = pad_slots_at(keep_index_RK, keep_padding_RK, T)
            # The frames a view does not keep are zeroed at the positional conv's input (fairseq
            # encoder_zero_mask); padding is zeroed before every conv layer, as for the teacher (PosConv).
            keep_RT = torch.zeros(R, T + 1, dtype=torch.bool, device=x.device).scatter(1, index, True)[:, :T]
            xr = x.repeat_interleave(R // B, dim=0) * keep_RT[..., None].to(x.dtype)
            padding_RT = None if padding_mask_BT is None else padding_mask_BT.repeat_interleave(R // B, dim=0)
            h = gather_kept(xr + self.pos_conv(xr, padding_RT), keep_index_RK)
            positions, key_padding = keep_index_RK, keep_padding_RK
        bias = self.alibi(positions, h.dtype)
        h = self.dropout(self.norm(h))
        taps: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            if (i >= self.prenet_depth and self.training and self.layerdrop > 0
                    and self._layerdrop_rng.random() < self.layerdrop):
                continue
            h, t = block(h, key_padding_mask=key_padding, attn_bias=bias, tap=tap)
            if i >= first:
                taps.append(t)
        return EncoderOutput(x_BTD=h, taps=taps)
