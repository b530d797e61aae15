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

from torch import nn

from scaling.config import ModelConfig
from scaling.models.outputs import EncoderOutput, FrontendOutput, StudentOutput


def masked_rows(x_BTD, mask_BT, index_N=None):
    """Rows of ``x_BTD`` at the masked positions, in row-major order of ``mask_BT.nonzero()``. The
    trainer passes those flat indices computed on the host (``mask_index_N``): boolean indexing on a GPU
    makes the host wait for the count of rows."""
    if index_N is None:
        return x_BTD[mask_BT]
    return x_BTD.flatten(0, 1).index_select(0, index_N)


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
        eo: EncoderOutput = self.encoder(fo.student_x, padding_mask_BT=fo.padding_mask_BT, keep_index_RK=keep)
        pred_RTD = self.decoder(eo.x_BTD, keep, batch["noise_seed_R"])
        return StudentOutput(
            pred_ND=masked_rows(pred_RTD, mask, batch.get("mask_index_N")),
            mask_BT=mask,
            padding_mask_BT=fo.padding_mask_BT,
            teacher_x=fo.teacher_x,
            local_features_BTD=fo.local_features_BTD,
            cls_pred_BD=eo.cls_BD,
        )


def build_model2(cfg: ModelConfig) -> Data2Vec2:
    if cfg.modality != "vision":
        raise ValueError(f"model.version 2 is implemented for vision only so far, not {cfg.modality}")
    from scaling.models.vision import VisionFrontend
    from scaling.models.vision2 import Decoder2d, VisionEncoder2

    return Data2Vec2(VisionFrontend(cfg), VisionEncoder2(cfg), Decoder2d(cfg), cfg.modality)
