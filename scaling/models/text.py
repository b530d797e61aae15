"""data2vec v1 text: RoBERTa-style embeddings (the frontend, shared with the teacher) and a post-LN
transformer (the EMA-updated encoder). docs/data2vec.md §2.2 (text row), §3.4, §6.1.

HF ``Data2VecTextModel`` export and import (docs/data2vec.md §5.3): the name map, the config fields, the
token-type fold and what is refused live in ``scaling/hf/text.py``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from scaling.config import ModelConfig
from scaling.models.blocks import PostLNBlock, check_tap, collect_taps, init_bert_params
from scaling.models.outputs import EncoderOutput, FrontendOutput


def make_positions(padding_mask_BT: Tensor, pad_id: int) -> Tensor:
    """fairseq ``make_positions``: real tokens get pad_id + 1, pad_id + 2, ... (counting only
    non-pad tokens); pad tokens get pad_id (docs/data2vec.md §3.4)."""
    real = (~padding_mask_BT).long()
    return torch.cumsum(real, dim=1) * real + pad_id


class TextFrontend(nn.Module):
    """Token + learned positions (no sqrt(D) scaling) -> embedding LayerNorm -> dropout.

    The teacher's input is the same embedding of the ORIGINAL ids (``tokens_BT``) with student
    weights, under no_grad and without dropout (the v1 teacher runs in eval mode). It must not be
    the mostly-pad ``target_tokens`` of fairseq bug #4881 (docs/data2vec.md §6.1)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        tc = cfg.text
        self.pad_id = tc.pad_id
        self.max_positions = tc.max_positions
        self.embed_tokens = nn.Embedding(tc.vocab_size, cfg.dim, padding_idx=tc.pad_id)
        self.embed_positions = nn.Embedding(tc.max_positions + tc.pad_id + 1, cfg.dim, padding_idx=tc.pad_id)
        self.layernorm_embedding = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.apply(init_bert_params)

    def embed(self, tokens_BT: Tensor, positions_BT: Tensor) -> Tensor:
        return self.layernorm_embedding(self.embed_tokens(tokens_BT) + self.embed_positions(positions_BT))

    @staticmethod
    def _zero_pad(x: Tensor, padding_mask_BT: Tensor) -> Tensor:
        # fairseq TransformerEncoder zeroes padded embeddings before the layers.
        return torch.where(padding_mask_BT[..., None], torch.zeros((), dtype=x.dtype, device=x.device), x)

    def forward(self, batch: dict[str, Tensor]) -> FrontendOutput:
        tokens = batch["tokens_BT"]
        inputs = batch["input_tokens_BT"]
        padding_mask = batch.get("padding_mask_BT")
        if padding_mask is None:
            padding_mask = tokens.eq(self.pad_id)
        padding_mask = padding_mask.bool()
        if tokens.shape[1] > self.max_positions:
            raise ValueError(f"sequence of {tokens.shape[1]} tokens exceeds model.text.max_positions "
                             f"({self.max_positions})")
        positions = make_positions(padding_mask, self.pad_id)

        with torch.no_grad():
            teacher_x = self._zero_pad(self.embed(tokens, positions), padding_mask).detach()

        emb = self.embed(inputs, positions)
        x = self._zero_pad(self.dropout(emb), padding_mask)
        return FrontendOutput(
            student_x=x,
            teacher_x=teacher_x,
            padding_mask_BT=padding_mask,
            mask_BT=batch["mask_BT"].bool(),
            local_features_BTD=teacher_x,  # the unmasked embeddings (variance monitor only)
        )


class TextEncoder(nn.Module):
    """EMA-updated part (docs/data2vec.md §2.2 text row, ``ema_transformer_layers_only``): the post-LN
    blocks only, with a key padding mask."""

    # T is the longest block of a micro-batch (documents end in shorter blocks): a compiled block
    # traces [B, T] dynamic from the first call (scaling.engines.base.prepare_blocks).
    block_shapes_vary = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.blocks = nn.ModuleList(
            PostLNBlock(cfg.dim, cfg.heads, cfg.ffn_dim, dropout=cfg.dropout,
                        attention_dropout=cfg.attention_dropout,
                        activation_dropout=cfg.activation_dropout, eps=cfg.layer_norm_eps)
            for _ in range(cfg.depth)
        )
        self.blocks.apply(init_bert_params)

    def forward(self, x: Tensor, *, padding_mask_BT: Optional[Tensor] = None, mask_BT: Optional[Tensor] = None,
                num_taps: int = 0, tap: str = "ffn", mask_embedding_D: Optional[Tensor] = None) -> EncoderOutput:
        assert mask_embedding_D is None, "this modality's frontend masks its output (FrontendOutput.mask_embedding_D)"
        check_tap(tap)
        first = collect_taps(num_taps, len(self.blocks))
        taps: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            x, t = block(x, key_padding_mask=padding_mask_BT, tap=tap)
            if i >= first:
                taps.append(t)
        return EncoderOutput(x_BTD=x, taps=taps)
