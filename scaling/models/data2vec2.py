"""The data2vec 2.0 student: ``frontend`` -> ``encoder`` on the kept positions of M views -> ``decoder``
(docs/data2vec2.md; fairseq ``examples/data2vec/models/data2vec2.py``).

- ``frontend``: the part shared with the teacher (images: nothing; the teacher embeds its own patches).
- ``encoder``: EMA-updated; the teacher is a copy of it. The student calls it with ``keep_index_RK``, the
  kept positions of each of its R = B x M views (drawn on the data workers, equal counts per row): the
  patch embedding runs once per sample, the blocks only on the kept positions of each view.
- ``decoder``: student only; puts the kept outputs back in place, fills the masked positions with noise and
  predicts every position with a light conv net; the loss reads the masked ones.

The teacher runs once per sample (B rows, not R) on the clean input ``teacher_x``; the trainer maps each
view's masked positions to its sample's target rows (``scaling.trainer``), so targets are never repeated.
"""

from __future__ import annotations

import torch
from torch import nn

from scaling.models.outputs import EncoderOutput, FrontendOutput, StudentOutput


def masked_rows(x_BTD, mask_BT, index_N=None):
    """Rows of ``x_BTD`` at the masked positions, in row-major order of ``mask_BT.nonzero()``. The
    trainer passes those flat indices computed on the host (``mask_index_N``): boolean indexing on a GPU
    makes the host wait for the count of rows."""
    if index_N is None:
        return x_BTD[mask_BT]
    return x_BTD.flatten(0, 1).index_select(0, index_N)


def gather_kept(x_BTD, keep_index_RK):
    """Each sample's rows repeated for its R / B views (views of a sample consecutive), then each view's
    kept positions: ``[R, K, D]``. The embedding ran once per sample."""
    R, K = keep_index_RK.shape
    x = x_BTD.repeat_interleave(R // x_BTD.shape[0], dim=0)
    return torch.gather(x, 1, keep_index_RK[..., None].expand(R, K, x.shape[-1]))


def pad_slots_at(keep_index_RK, keep_padding_RK, sentinel: int):
    """The kept index with its pad slots (``keep_padding_RK``; rows that keep fewer positions than the
    longest) pointing at ``sentinel``: a scatter into ``sentinel + 1`` columns then drops them with the
    last column."""
    return keep_index_RK if keep_padding_RK is None else keep_index_RK.masked_fill(keep_padding_RK, sentinel)


class Data2Vec2(nn.Module):
    """Student with exactly three children: ``frontend``, ``encoder``, ``decoder``."""

    def __init__(self, frontend: nn.Module, encoder: nn.Module, decoder: nn.Module, modality: str):
        super().__init__()
        self.frontend = frontend
        self.encoder = encoder
        self.decoder = decoder
        self.modality = modality

    def forward(self, batch: dict) -> StudentOutput:
        fo: FrontendOutput = self.frontend(batch)
        keep = batch["keep_index_RK"]
        mask = fo.mask_BT
        if mask.shape[0] != keep.shape[0] or mask.shape[0] % fo.student_x.shape[0]:
            raise ValueError(f"{mask.shape[0]} mask rows, {keep.shape[0]} kept-index rows and "
                             f"{fo.student_x.shape[0]} samples: expected M views of every sample")
        keep_padding = batch.get("keep_padding_RK")  # speech, text: rows that keep fewer positions than the longest
        eo: EncoderOutput = self.encoder(fo.student_x, padding_mask_BT=fo.padding_mask_BT, keep_index_RK=keep,
                                         keep_padding_RK=keep_padding)
        padding_RT = None
        if fo.padding_mask_BT is not None:
            padding_RT = fo.padding_mask_BT.repeat_interleave(mask.shape[0] // fo.padding_mask_BT.shape[0], dim=0)
        pred_RTD = self.decoder(eo.x_BTD, keep, batch["noise_seed_R"], num_positions=mask.shape[1],
                                padding_mask_RT=padding_RT, keep_padding_RK=keep_padding)
        return StudentOutput(
            pred_ND=masked_rows(pred_RTD, mask, batch.get("mask_index_N")),
            mask_BT=mask,
            padding_mask_BT=fo.padding_mask_BT,
            teacher_x=fo.teacher_x,
            local_features_BTD=fo.local_features_BTD,
            cls_pred_BD=eo.cls_BD,
        )
