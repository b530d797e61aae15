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

from torch import Tensor

from scaling.models.data2vec2 import gather_kept
from scaling.models.outputs import EncoderOutput, FrontendOutput
from scaling.models.text import TextEncoder, TextFrontend, make_positions


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


class TextEncoder2(TextEncoder):
    """The EMA-updated part: v1's post-LN blocks (text 2.0 has no prenet), run by the student on the kept
    tokens of its views (``keep_padding_RK`` masks the pad slots) and by the teacher on every token."""

    prenet_depth = 0

    def forward(self, x: Tensor, *, padding_mask_BT: Optional[Tensor] = None, mask_BT: Optional[Tensor] = None,
                num_taps: int = 0, tap: str = "ffn", keep_index_RK: Optional[Tensor] = None,
                keep_padding_RK: Optional[Tensor] = None) -> EncoderOutput:
        if keep_index_RK is not None:
            x, padding_mask_BT = gather_kept(x, keep_index_RK), keep_padding_RK
        return super().forward(x, padding_mask_BT=padding_mask_BT, num_taps=num_taps, tap=tap)
