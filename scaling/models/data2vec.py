"""The data2vec v1 student: ``frontend`` -> ``encoder`` -> ``head`` (docs/data2vec.md §1.1, §2.2).

- ``frontend``: the part shared with the teacher (speech: CNN + projection + mask_emb + pos conv;
  text: embeddings; vision: nothing). It also makes the teacher's input (``teacher_x``) from the
  unmasked sample with student weights, under no_grad.
- ``encoder``: the EMA-updated part. The teacher is ``copy.deepcopy(student.encoder)``, run in eval
  mode under no_grad on ``teacher_x`` with the same padding mask and ``num_taps=K``.
- ``head``: the student's regression head, applied at masked positions only (docs/data2vec.md §1.2).

Head parameter names: ``head.proj`` (linear: speech ``final_proj``; norm_linear: vision ``lm_head``),
``head.norm`` (norm_linear: BEiT's final ``norm`` = HF vision ``layernorm``), ``head.fc1``/``head.fc2``
(mlp: text ``regression_head``). Heads are dropped in an HF export except ``head.norm``
(docs/data2vec.md §5.1-§5.3).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from scaling.config import ModelConfig
from scaling.models.data2vec2 import Data2Vec2, masked_rows
from scaling.models.outputs import EncoderOutput, FrontendOutput, StudentOutput


class RegressionHead(nn.Module):
    """``linear``: Linear(D,D); ``mlp``: Linear(D,2D)-GELU-Linear(2D,D); ``norm_linear``:
    LayerNorm(D) then Linear(D,D) (docs/data2vec.md §1.2)."""

    def __init__(self, kind: str, dim: int, eps: float):
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.proj = nn.Linear(dim, dim)
        elif kind == "mlp":
            self.fc1 = nn.Linear(dim, 2 * dim)
            self.fc2 = nn.Linear(2 * dim, dim)
        elif kind == "norm_linear":
            self.norm = nn.LayerNorm(dim, eps=eps)
            self.proj = nn.Linear(dim, dim)
        else:
            raise ValueError(f"unknown head {kind!r}; expected linear, mlp or norm_linear")

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "linear":
            return self.proj(x)
        if self.kind == "mlp":
            return self.fc2(F.gelu(self.fc1(x)))
        return self.proj(self.norm(x))


class Data2Vec(nn.Module):
    """Student with exactly three children: ``frontend``, ``encoder``, ``head``."""

    def __init__(self, frontend: nn.Module, encoder: nn.Module, head: nn.Module, modality: str):
        super().__init__()
        self.frontend = frontend
        self.encoder = encoder
        self.head = head
        self.modality = modality  # a plain attribute, not a child module

    def forward(self, batch: dict[str, Tensor]) -> StudentOutput:
        fo: FrontendOutput = self.frontend(batch)
        # The masking step (FrontendOutput.mask_embedding_D): in the encoder for images, done for speech and text.
        eo: EncoderOutput = self.encoder(fo.student_x, padding_mask_BT=fo.padding_mask_BT, mask_BT=fo.mask_BT,
                                         mask_embedding_D=fo.mask_embedding_D, num_taps=0)
        mask = fo.mask_BT
        if mask.shape != eo.x_BTD.shape[:2]:
            raise ValueError(f"mask_BT {tuple(mask.shape)} does not match encoder positions "
                             f"{tuple(eo.x_BTD.shape[:2])}")
        # Row-major order of mask_BT.nonzero() (docs/data2vec.md §1.1 item 4).
        pred = self.head(masked_rows(eo.x_BTD, mask, batch.get("mask_index_N")))
        return StudentOutput(
            pred_ND=pred,
            mask_BT=mask,
            padding_mask_BT=fo.padding_mask_BT,
            teacher_x=fo.teacher_x,
            local_features_BTD=fo.local_features_BTD,
        )


def build_model(cfg: ModelConfig) -> Data2Vec | Data2Vec2:
    """Build the student for ``cfg.modality`` (its pieces: :mod:`scaling.modalities`) and ``cfg.version``
    (docs/data2vec.md §3.1-§3.4, docs/data2vec2.md)."""
    from scaling.modalities import spec_for

    if cfg.dim % cfg.heads:
        raise ValueError(f"model.heads ({cfg.heads}) must divide model.dim ({cfg.dim})")
    spec = spec_for(cfg.modality)
    if cfg.version == 2:
        return Data2Vec2(*spec.build_v2(cfg), cfg.modality)
    # The head first: its default init draws from the RNG before the frontend's and the encoder's.
    head = RegressionHead(cfg.head, cfg.dim, cfg.layer_norm_eps)
    frontend, encoder, init_head = spec.build_v1(cfg)
    if init_head is not None:
        head.apply(init_head)
    return Data2Vec(frontend, encoder, head, cfg.modality)
