"""data2vec v1 vision: a BEiT pre-LN ViT (data2vec_vision ``beit/modeling_cyclical.py``,
docs/data2vec.md §3.3). Nothing is shared with the teacher (docs/data2vec.md §2.2: the v1 vision
teacher is an EMA of the whole model), so the frontend only passes the pixels through and the
encoder holds everything.

HF ``Data2VecVisionModel`` export and import (docs/data2vec.md §5.2): the name map, the config fields and
what is refused live in ``scaling/hf/vision.py``. The relative position index is not a parameter
or buffer (HF regenerates it too).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from scaling.config import ModelConfig
from scaling.models.blocks import PreLNBlock, check_tap, collect_taps
from scaling.models.outputs import EncoderOutput, FrontendOutput


def relative_position_index(h: int, w: int) -> Tensor:
    """BEiT ``relative_position_index`` for an h x w patch grid plus CLS: LongTensor [N+1, N+1]
    with N = h*w. Patch pairs index ``(dh + h-1) * (2w-1) + (dw + w-1)``; the last three rows of the
    table are CLS-to-token (row 0), token-to-CLS (column 0) and CLS-to-CLS ([0, 0])
    (docs/data2vec.md §3.3)."""
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)  # [2, N]
    rel = coords[:, :, None] - coords[:, None, :]  # [2, N, N]
    idx = (rel[0] + h - 1) * (2 * w - 1) + (rel[1] + w - 1)
    n_rel = (2 * h - 1) * (2 * w - 1) + 3
    out = torch.zeros(h * w + 1, h * w + 1, dtype=torch.long)
    out[1:, 1:] = idx
    out[0, :] = n_rel - 3
    out[:, 0] = n_rel - 2
    out[0, 0] = n_rel - 1
    return out


class RelativePositionBias(nn.Module):
    """One table of (2h-1)(2w-1)+3 rows x heads shared by all blocks (``use_shared_rel_pos_bias``).
    Zero init, as BEiT. ``forward()`` returns the bias [heads, N+1, N+1]."""

    def __init__(self, h: int, w: int, heads: int):
        super().__init__()
        self.grid = (h, w)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * h - 1) * (2 * w - 1) + 3, heads))
        # Not a buffer: computed from (h, w), cached per device; survives meta-device init/to_empty.
        self._index_cache: dict[torch.device, Tensor] = {}

    def index(self, device: torch.device) -> Tensor:
        idx = self._index_cache.get(device)
        if idx is None:
            idx = relative_position_index(*self.grid).to(device)
            self._index_cache[device] = idx
        return idx

    def forward(self) -> Tensor:
        table = self.relative_position_bias_table
        n = self.grid[0] * self.grid[1] + 1
        bias = table[self.index(table.device).view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous()


class PatchEmbed(nn.Module):
    def __init__(self, channels: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        return self.proj(x_BCHW).flatten(2).transpose(1, 2)  # [B, N, D], row-major patches


class VisionFrontend(nn.Module):
    """Nothing shared: student and teacher both get the (same augmented) image. v1 (``mask_token``): the
    student's learned mask embedding lives here, with the student only: the encoder substitutes it at the
    masked patches (its masking point is after the patch embedding, which the teacher owns too), and the
    teacher, an EMA copy of the encoder, never holds one."""

    def __init__(self, cfg: Optional[ModelConfig] = None, *, mask_token: bool = False):
        super().__init__()
        if mask_token:
            assert cfg is not None, "a mask token needs the model's width"
            # Initialised by VisionEncoder.reset_parameters, in BEiT's order (CLS, mask token, weights).
            self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))

    def forward(self, batch: dict[str, Tensor]) -> FrontendOutput:
        image = batch["image_BCHW"].detach()
        return FrontendOutput(
            student_x=image,
            teacher_x=image,
            padding_mask_BT=None,
            mask_BT=batch["mask_BT"].bool(),
            local_features_BTD=None,
            mask_embedding_D=getattr(self, "mask_token", None),  # v1's; 2.0 drops masked patches
        )


def beit_init_weights(m: nn.Module) -> None:
    """[DV] ``_init_weights``: trunc-normal(0.02) Linear/Conv2d weights, zero biases; LN 1 / 0."""
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class VisionEncoder(nn.Module):
    """BEiT v1 backbone without the final norm (that is in the head, ``norm_linear``).

    The student's mask token (``mask_embedding_D``) replaces the masked patch embeddings when ``mask_BT`` is
    given (student only), CLS is
    prepended, no absolute positions, shared relative position bias, PreLNBlocks with layer scale and
    drop path rising linearly from 0 to ``model.vision.drop_path``. The CLS position is dropped from
    ``x_BTD`` and from the taps, so positions align with ``mask_BT`` (docs/data2vec.md §1.2, §3.3)."""

    # One image size and micro-batch size per recipe: compiled blocks keep static shapes.
    block_shapes_vary = False

    def __init__(self, cfg: ModelConfig, mask_token: Optional[nn.Parameter] = None):
        super().__init__()
        vc = cfg.vision
        if vc.image_size % vc.patch_size:
            raise ValueError(f"patch_size {vc.patch_size} must divide image_size {vc.image_size}")
        self.grid = (vc.image_size // vc.patch_size, vc.image_size // vc.patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.patch_embed = PatchEmbed(vc.channels, cfg.dim, vc.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_drop = nn.Dropout(cfg.dropout)
        self.rel_pos_bias = RelativePositionBias(*self.grid, cfg.heads)
        dpr = torch.linspace(0, vc.drop_path, cfg.depth).tolist() if cfg.depth > 1 else [0.0] * cfg.depth
        self.blocks = nn.ModuleList(
            PreLNBlock(cfg.dim, cfg.heads, cfg.ffn_dim, dropout=cfg.dropout,
                       attention_dropout=cfg.attention_dropout, drop_path=dpr[i],
                       layer_scale_init=vc.layer_scale_init, eps=cfg.layer_norm_eps)
            for i in range(cfg.depth)
        )
        self.reset_parameters(mask_token)

    @torch.no_grad()
    def reset_parameters(self, mask_token: Optional[nn.Parameter] = None) -> None:
        """[DV] init. ``mask_token``: the student's (``VisionFrontend.mask_token``, not a parameter of this
        module), drawn right after CLS as in BEiT, so the random stream is BEiT's whoever owns it."""
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if mask_token is not None:
            nn.init.trunc_normal_(mask_token, std=0.02)
        self.apply(beit_init_weights)
        # [DV] fix_init_weight: divide attn proj and fc2 weights of block l (1-based) by sqrt(2 l).
        for layer_id, block in enumerate(self.blocks, start=1):
            block.attn.out_proj.weight.div_(math.sqrt(2.0 * layer_id))
            block.fc2.weight.div_(math.sqrt(2.0 * layer_id))

    def embed(self, x_BCHW: Tensor, mask_BT: Optional[Tensor] = None,
              mask_embedding_D: Optional[Tensor] = None) -> Tensor:
        """Patch embeddings with the masked patches replaced by ``mask_embedding_D`` (the student's mask
        token), CLS prepended: [B, N+1, D]."""
        if tuple(x_BCHW.shape[-2:]) != (self.grid[0] * self.patch_embed.proj.kernel_size[0],
                                        self.grid[1] * self.patch_embed.proj.kernel_size[1]):
            raise ValueError(f"image of size {tuple(x_BCHW.shape[-2:])} does not match the configured "
                             f"{self.grid} grid of patches")
        x = self.patch_embed(x_BCHW)
        B = x.shape[0]
        if mask_BT is not None:
            assert mask_embedding_D is not None, "masked patches need the student's mask embedding"
            x = torch.where(mask_BT[..., None], mask_embedding_D.to(x.dtype).reshape(-1), x)
        return torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)

    def forward(self, x: Tensor, *, padding_mask_BT: Optional[Tensor] = None, mask_BT: Optional[Tensor] = None,
                num_taps: int = 0, tap: str = "ffn", mask_embedding_D: Optional[Tensor] = None) -> EncoderOutput:
        check_tap(tap)
        first = collect_taps(num_taps, len(self.blocks))
        h = self.pos_drop(self.embed(x, mask_BT, mask_embedding_D))
        key_padding = None
        if padding_mask_BT is not None:  # not used by v1 vision; CLS is never padding
            key_padding = torch.cat([padding_mask_BT.new_zeros(padding_mask_BT.shape[0], 1), padding_mask_BT], 1)
        bias = self.rel_pos_bias()
        taps: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            h, t = block(h, key_padding_mask=key_padding, attn_bias=bias, tap=tap)
            if i >= first:
                taps.append(t[:, 1:])
        return EncoderOutput(x_BTD=h[:, 1:], taps=taps)
