"""What the model parts return: dataclasses shared by the student, the teacher and the modality files
(their own module, so that ``scaling/models/data2vec.py`` and the modality files do not import each other)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.utils._pytree as pytree
from torch import Tensor


@dataclass
class FrontendOutput:
    student_x: Tensor  # input to the student's encoder (speech/text [B,T,D], mask applied; vision: pixels)
    teacher_x: Tensor  # input to the teacher's encoder: unmasked sample, student weights, no_grad, detached
    padding_mask_BT: Optional[Tensor]  # bool, True = padding, at encoder positions; None for vision
    mask_BT: Tensor  # bool [B,T], True = masked, at encoder positions
    # local encoder output, for a variance monitor (docs/data2vec.md §1.3)
    local_features_BTD: Optional[Tensor]
    # v1's one masking step, where the modality puts it: the embedding that the encoder's masking point
    # substitutes at the masked positions (images: the student's mask token, after the patch embedding that
    # the teacher owns). None where the frontend has masked student_x itself: speech substitutes its mask
    # embedding before the positional conv it shares with the teacher, text masks ids on the data workers
    # (BERT's <mask> / keep / random). data2vec 2.0 drops masked positions instead (keep_index_RK).
    mask_embedding_D: Optional[Tensor] = None


@dataclass
class EncoderOutput:
    x_BTD: Tensor  # final output at encoder positions (vision: CLS dropped)
    taps: list[Tensor]  # taps [B,T,D] of the last num_taps blocks, in layer order (vision: CLS dropped)
    cls_BD: Optional[Tensor] = None  # data2vec 2.0 images: the CLS output (the CLS loss reads it)


@dataclass
class StudentOutput:
    pred_ND: Tensor  # head output at masked positions, in row-major order of mask_BT.nonzero()
    mask_BT: Tensor  # [B*M, T] for M masked views per sample (data2vec 2.0), else [B, T]
    padding_mask_BT: Optional[Tensor]
    teacher_x: Tensor
    local_features_BTD: Optional[Tensor]
    # data2vec 2.0 images: the student encoder's CLS output per view [B*M, D] (the CLS loss); else None
    cls_pred_BD: Optional[Tensor] = None


# FSDP2 finds a module's output tensors with pytree's tree_flatten, to hook the re-gather of its
# parameters before their backward. A plain dataclass is one opaque leaf: a root resharded after
# forward then ran backward on freed storage ("setStorage ... storage of size 0"; seen with
# torch 2.11 on CUDA). Registered, every tensor field is visible (tests/test_models.py).
for _cls in (FrontendOutput, EncoderOutput, StudentOutput):
    pytree.register_dataclass(_cls)
