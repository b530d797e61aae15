"""data2vec v1 speech: wav2vec 2.0 conv feature encoder, projection, mask embedding, conv positional
encoder (the frontend, shared with the teacher) and a post-LN transformer (the EMA-updated encoder).
docs/data2vec.md §2.2 (speech row), §3.2, §6.3.

HF ``Data2VecAudioModel`` export and import (docs/data2vec.md §5.1): the name map, the config fields and
what is refused live in ``scaling/hf/speech.py``; what equality holds is in docs/hf-transformers.md.
"""

from __future__ import annotations

import random
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaling.config import ModelConfig
from scaling.models.blocks import PostLNBlock, check_tap, collect_taps, init_bert_params
from scaling.models.outputs import EncoderOutput, FrontendOutput


def conv_output_length(num_samples, conv_layers: Sequence[Sequence[int]]):
    """Frames produced by the conv feature encoder: ``floor((len - k) / s + 1)`` per layer
    (docs/data2vec.md §3.2). Accepts an int or an integer Tensor and returns the same type (clamped at 0)."""
    if isinstance(num_samples, Tensor):
        n = num_samples.long()
        for _, k, s in conv_layers:
            n = torch.div(n - k, s, rounding_mode="floor") + 1
        return n.clamp(min=0)
    n = int(num_samples)
    for _, k, s in conv_layers:
        n = (n - k) // s + 1
    return max(n, 0)


# ----------------------------------------------------------------------------- conv feature encoder
class ConvLayer(nn.Module):
    """Conv1d (no bias) -> Dropout(0) -> fp32 LayerNorm over channels -> GELU
    (``extractor_mode: layer_norm``, docs/data2vec.md §3.2)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, eps: float):
        super().__init__()
        self.conv = nn.Conv1d(in_ch, out_ch, kernel, stride=stride, bias=False)
        self.dropout = nn.Dropout(0.0)
        self.layer_norm = nn.LayerNorm(out_ch, eps=eps)
        nn.init.kaiming_normal_(self.conv.weight)

    def forward(self, x_BCT: Tensor) -> Tensor:
        x = self.dropout(self.conv(x_BCT)).transpose(1, 2)
        ln = self.layer_norm
        # fairseq Fp32LayerNorm: normalise in fp32, return in the input dtype.
        y = F.layer_norm(x.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps)
        return F.gelu(y.to(x.dtype)).transpose(1, 2)


class FeatureExtractor(nn.Module):
    def __init__(self, conv_layers: Sequence[Sequence[int]], eps: float):
        super().__init__()
        layers, in_ch = [], 1
        for ch, k, s in conv_layers:
            layers.append(ConvLayer(in_ch, ch, k, s, eps))
            in_ch = ch
        self.conv_layers = nn.ModuleList(layers)
        self.out_channels = in_ch

    def forward(self, audio_BS: Tensor) -> Tensor:
        x = audio_BS.unsqueeze(1)  # [B, 1, S]
        for layer in self.conv_layers:
            x = layer(x)
        return x  # [B, C, F]


class FeatureProjection(nn.Module):
    """LayerNorm(C) -> Linear(C -> D) (fairseq ``layer_norm`` + ``post_extract_proj``)."""

    def __init__(self, in_ch: int, dim: int, eps: float):
        super().__init__()
        self.layer_norm = nn.LayerNorm(in_ch, eps=eps)
        self.projection = nn.Linear(in_ch, dim)  # PyTorch default init, as fairseq

    def forward(self, x_BTC: Tensor) -> Tensor:
        return self.projection(self.layer_norm(x_BTC))


# ----------------------------------------------------------------------------- positional conv
class PosConvLayer(nn.Module):
    """Conv1d(D, D, k, padding k//2, groups) -> SamePad -> LayerNorm(D, no affine) -> GELU."""

    def __init__(self, dim: int, kernel: int, groups: int, eps: float):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups)
        self.remove = 1 if kernel % 2 == 0 else 0  # SamePad
        self.eps = eps

    def forward(self, x_BDT: Tensor) -> Tensor:
        x = self.conv(x_BDT)
        if self.remove:
            x = x[:, :, : -self.remove]
        x = F.layer_norm(x.transpose(1, 2), (x.shape[1],), eps=self.eps)
        return F.gelu(x).transpose(1, 2)


def pos_conv_kernel(width: int, depth: int) -> int:
    """Kernel of each positional conv layer: fairseq data2vec_audio's ``max(3, conv_pos_width // depth)``."""
    return max(3, width // depth)


class PosConv(nn.Module):
    """``conv_pos_depth`` stacked PosConvLayers with kernel max(3, width // depth) (docs/data2vec.md §3.2).
    Returns the conv output; the caller adds it to the input."""

    def __init__(self, dim: int, width: int, depth: int, groups: int, eps: float):
        super().__init__()
        kernel = pos_conv_kernel(width, depth)
        self.layers = nn.ModuleList(PosConvLayer(dim, kernel, groups, eps) for _ in range(depth))

    def forward(self, x_BTD: Tensor, padding_mask_BT: Optional[Tensor] = None) -> Tensor:
        # fairseq zeroes padded frames once, before the first layer; with 2+ layers the first layer's
        # output at padded frames then leaks into real frames near the end of a clip, so a clip's
        # features would depend on how much its batch is padded (and on the micro-batch split). We
        # zero padded frames before every layer: identical for an unpadded clip, padding-invariant.
        keep = None if padding_mask_BT is None else (~padding_mask_BT)[:, None, :]
        x = x_BTD.transpose(1, 2)
        for layer in self.layers:
            x = layer(x if keep is None else x * keep.to(x.dtype))
        return x.transpose(1, 2)


# ----------------------------------------------------------------------------- frontend
class SpeechFrontend(nn.Module):
    """Shared prefix (docs/data2vec.md §2.2 speech row): CNN -> LN -> proj; the teacher's input is the
    projected features cloned before dropout and masking, padded frames zeroed, plus pos conv."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        sc = cfg.speech
        eps = cfg.layer_norm_eps
        self.conv_layers = [list(c) for c in sc.conv_layers]
        self.feature_extractor = FeatureExtractor(self.conv_layers, eps)
        self.feature_projection = FeatureProjection(self.feature_extractor.out_channels, cfg.dim, eps)
        self.feature_dropout = nn.Dropout(sc.feature_dropout)
        self.mask_emb = nn.Parameter(torch.empty(cfg.dim).uniform_())
        self.pos_conv = PosConv(cfg.dim, sc.conv_pos_width, sc.conv_pos_depth, sc.conv_pos_groups, eps)

    def frame_padding_mask(self, audio_padding_BS: Optional[Tensor], num_frames: int) -> Optional[Tensor]:
        """Frames at or past conv_output_length(valid samples) are padding (fairseq data2vec_audio)."""
        if audio_padding_BS is None:
            return None
        lengths = (~audio_padding_BS).sum(-1)
        frames = conv_output_length(lengths, self.conv_layers)
        return torch.arange(num_frames, device=lengths.device)[None, :] >= frames[:, None]

    def _add_pos(self, x: Tensor, padding_mask_BT: Optional[Tensor]) -> Tensor:
        if padding_mask_BT is not None:
            x = torch.where(padding_mask_BT[..., None], torch.zeros((), dtype=x.dtype, device=x.device), x)
        return x + self.pos_conv(x, padding_mask_BT)

    def forward(self, batch: dict[str, Tensor]) -> FrontendOutput:
        audio = batch["audio_BT"]
        feats = self.feature_extractor(audio).transpose(1, 2)  # [B, F, C]
        feats = self.feature_projection(feats)  # [B, F, D]
        B, T, _ = feats.shape
        padding_mask = self.frame_padding_mask(batch.get("audio_padding_BT"), T)
        mask = batch["mask_BT"].bool()
        if mask.shape != (B, T):
            raise ValueError(f"speech mask_BT has shape {tuple(mask.shape)}, expected {(B, T)} "
                             f"(conv_output_length of {audio.shape[-1]} samples)")

        with torch.no_grad():  # teacher input: unmasked features, student weights (docs/data2vec.md §2.2)
            teacher_x = self._add_pos(feats.detach(), padding_mask).detach()

        x = self.feature_dropout(feats)
        x = torch.where(mask[..., None], self.mask_emb.to(x.dtype), x)
        x = self._add_pos(x, padding_mask)
        return FrontendOutput(
            student_x=x,
            teacher_x=teacher_x,
            padding_mask_BT=padding_mask,
            mask_BT=mask,
            local_features_BTD=feats.detach(),
        )


# ----------------------------------------------------------------------------- encoder
class SpeechEncoder(nn.Module):
    """EMA-updated part (docs/data2vec.md §2.2): LayerNorm -> dropout -> post-LN blocks, LayerDrop in
    training only. LayerDrop draws from the encoder's own ``random.Random``, which the trainer reseeds
    before every optimizer step from the recipe seed and the step (``set_layerdrop_seed`` with
    ``scaling.trainer.layerdrop_seed``): every rank drops the same blocks (FSDP and ZeRO-3 gather a
    block's shards with a collective, so all ranks must run it or none), and a resumed run drops the
    same blocks as an uninterrupted one with no generator state to save. Outside the trainer
    (probes, tests) the generator starts from seed 0."""

    # The blocks' [B, T] change from batch to batch (clip lengths; B under length bucketing): a
    # compiled block traces them dynamic from the first call (scaling.engines.base.prepare_blocks).
    block_shapes_vary = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layer_norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            PostLNBlock(cfg.dim, cfg.heads, cfg.ffn_dim, dropout=cfg.dropout,
                        attention_dropout=cfg.attention_dropout,
                        activation_dropout=cfg.activation_dropout, eps=cfg.layer_norm_eps)
            for _ in range(cfg.depth)
        )
        self.layerdrop = cfg.speech.layerdrop
        self._layerdrop_rng = random.Random(0)
        self.blocks.apply(init_bert_params)

    def set_layerdrop_seed(self, seed: int) -> None:
        """The next LayerDrop draws come from ``random.Random(seed)`` (one draw per block and forward)."""
        self._layerdrop_rng = random.Random(seed)

    def forward(self, x: Tensor, *, padding_mask_BT: Optional[Tensor] = None, mask_BT: Optional[Tensor] = None,
                num_taps: int = 0, tap: str = "ffn", mask_embedding_D: Optional[Tensor] = None) -> EncoderOutput:
        assert mask_embedding_D is None, "this modality's frontend masks its output (FrontendOutput.mask_embedding_D)"
        check_tap(tap)
        first = collect_taps(num_taps, len(self.blocks))
        x = self.dropout(self.layer_norm(x))
        taps: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            if self.training and self.layerdrop > 0 and self._layerdrop_rng.random() < self.layerdrop:
                continue  # dropped: no tap either, as fairseq (only matters for a training-mode caller)
            x, t = block(x, key_padding_mask=padding_mask_BT, tap=tap)
            if i >= first:
                taps.append(t)
        return EncoderOutput(x_BTD=x, taps=taps)
