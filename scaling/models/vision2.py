"""data2vec 2.0 images: a post-LN ViT with fixed 2-D sin-cos positions whose student drops the masked
patches, and the 2-D conv decoder that predicts them (fairseq ``examples/data2vec/models/data2vec2.py``,
``modalities/images.py``, ``modalities/modules.py``; docs/data2vec2.md).

The whole encoder is EMA-updated, patch embedding included (fairseq ``ema_encoder_only: false``,
``ema_local_encoder: true``): the teacher is a copy of :class:`VisionEncoder2` and reads the raw image.
The masking point is inside the encoder, after the patch embedding and the positions (MAE order): the
student passes ``keep_index_RK``, the kept patches of each of its R = B x M views, and the encoder runs
its blocks on those K patches (plus CLS) only. The sin-cos table is a non-persistent buffer: not a
parameter, so neither trained nor EMA-updated (fairseq's ``requires_grad=False`` table, copied).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from scaling.config import ModelConfig
from scaling.models.blocks import PostLNBlock, check_tap, collect_taps, init_bert_params
from scaling.models.data2vec2 import gather_kept
from scaling.models.outputs import EncoderOutput


def sincos_pos_embed_2d(dim: int, h: int, w: int) -> Tensor:
    """MAE ``get_2d_sincos_pos_embed`` (facebookresearch/mae ``util/pos_embed.py``) without the CLS row:
    ``[h*w, dim]`` fp32, row-major patches. The first half of the channels encodes the column, the second
    the row (MAE's ``np.meshgrid(grid_w, grid_h)`` puts w first); each half is ``[sin(p w_i), cos(p w_i)]``
    with ``w_i = 10000^(-i / (dim / 4))``, i < dim / 4."""
    if dim % 4:
        raise ValueError(f"sin-cos positions need model.dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))

    def one_axis(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1).double() * omega[None, :]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    # MAE: grid = meshgrid(grid_w, grid_h) (w first), grid[0] varies along w.
    gw, gh = torch.meshgrid(torch.arange(w), torch.arange(h), indexing="xy")
    return torch.cat([one_axis(gw), one_axis(gh)], dim=1).float()


def xavier_flat_(conv: nn.Conv2d) -> None:
    """MAE / fairseq patch embedding init: xavier-uniform of the weight seen as [out, in * k * k]."""
    w = conv.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class VisionEncoder2(nn.Module):
    """Patch embed + sin-cos positions -> [masking: keep K patches per view] -> CLS -> LayerNorm -> dropout
    -> ``prenet_depth + depth`` post-LN blocks (fairseq ``AltBlock``, ``layer_norm_first: false``).

    Taps come from the main blocks only (never the prenet). CLS is dropped from ``x_BTD`` and the taps, so
    they align with the (kept) patches; ``cls_BD`` holds it."""

    block_shapes_vary = False  # one image size, one micro-batch size and one kept count per recipe

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        vc, v2 = cfg.vision, cfg.v2
        if vc.image_size % vc.patch_size:
            raise ValueError(f"patch_size {vc.patch_size} must divide image_size {vc.image_size}")
        self.grid = (vc.image_size // vc.patch_size,) * 2
        self.num_patches = self.grid[0] * self.grid[1]
        self.prenet_depth = v2.prenet_depth
        self.patch_embed = nn.Conv2d(vc.channels, cfg.dim, kernel_size=vc.patch_size, stride=vc.patch_size)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(cfg.dim, *self.grid), persistent=False)
        self.cls_token = nn.Parameter(torch.empty(1, 1, cfg.dim))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)  # context encoder norm (post-LN model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            PostLNBlock(cfg.dim, cfg.heads, cfg.ffn_dim, dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
                        activation_dropout=cfg.activation_dropout, eps=cfg.layer_norm_eps)
            for _ in range(v2.prenet_depth + cfg.depth)
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.apply(init_bert_params)  # fairseq mae_init: false
        xavier_flat_(self.patch_embed)
        nn.init.normal_(self.cls_token)  # init_extra_token_zero: false -> nn.init.normal_ (std 1)

    def embed(self, x_BCHW: Tensor) -> Tensor:
        """Patch embeddings plus positions, ``[B, N, D]``."""
        if tuple(x_BCHW.shape[-2:]) != (self.grid[0] * self.patch_embed.kernel_size[0],) * 2:
            raise ValueError(f"image of size {tuple(x_BCHW.shape[-2:])} does not match the configured "
                             f"{self.grid} grid of patches")
        x = self.patch_embed(x_BCHW).flatten(2).transpose(1, 2)
        return x + self.pos_embed.to(x.dtype)

    def forward(self, x: Tensor, *, padding_mask_BT: Optional[Tensor] = None, mask_BT: Optional[Tensor] = None,
                num_taps: int = 0, tap: str = "ffn", keep_index_RK: Optional[Tensor] = None,
                keep_padding_RK: Optional[Tensor] = None) -> EncoderOutput:
        """``x``: images ``[B, C, H, W]``. ``keep_index_RK`` (student): the kept patches of each of the
        R = B x M views, views of a sample consecutive (``repeat_interleave`` order); the patch embedding
        runs once per image. None (teacher, probe): every patch."""
        assert keep_padding_RK is None, "image views keep equal numbers of patches: no pad slots"
        check_tap(tap)
        first = self.prenet_depth + collect_taps(num_taps, len(self.blocks) - self.prenet_depth)
        h = self.embed(x)
        if keep_index_RK is not None:
            h = gather_kept(h, keep_index_RK)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1).to(h.dtype), h], dim=1)
        h = self.dropout(self.norm(h))
        taps: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            h, t = block(h, tap=tap)
            if i >= first:
                taps.append(t[:, 1:])
        return EncoderOutput(x_BTD=h[:, 1:], taps=taps, cls_BD=h[:, 0])
