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

from torch import Tensor, nn

from scaling.config import ModelConfig
from scaling.models.blocks import PostLNBlock, check_tap, collect_taps, init_bert_params
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
