"""Model FLOPs of a data2vec step, counted from the model config and the batch, and MFU.

Counted, per sequence of ``T`` real (non-padded) encoder positions, for ``L`` blocks of width
``d`` with feed-forward width ``f`` (matmul FLOPs: a ``[m, k] @ [k, n]`` product is ``2 m k n``):

    block forward = 8 T d^2        q, k, v and output projections (4 x 2 T d^2)
                  + 4 T d f        the two feed-forward matmuls (2 x 2 T d f)
                  + 4 T^2 d        attention scores q k^T (2 T^2 d) and scores x values (2 T^2 d)

This is the per-token ``6N + attention`` rule of Narayanan et al. 2021 ("Efficient Large-Scale
Language Model Training on GPU Clusters Using Megatron-LM", arXiv 2104.04473, section 5.1) and of
the PaLM paper's appendix B (Chowdhery et al. 2022, arXiv 2204.02311) written per sequence: the
forward is 2 FLOPs per weight per token plus the attention term, the backward twice the forward.
Norms, activations, softmax, biases and the EMA update are not counted (MFU convention: they are a
few percent of the matmuls). Padded positions are not counted either: MFU measures useful work, so
a batch with more padding shows a lower MFU.

The modality's frontend adds, per sequence: speech, each conv layer ``2 C_in k C_out L_out`` on
the real samples, the feature projection ``2 T C d`` and each positional-conv layer
``2 T' d (d / groups) k`` (``T'`` its output length before SamePad), once for the student's input
and once for the teacher's; vision, the patch embedding ``2 N (C p^2) d`` (in the encoder, so the
teacher runs it too) on ``T = N + 1`` positions (CLS); text, nothing (embedding lookups). The
student's regression head runs on the ``M`` masked positions only: linear ``2 M d^2``, mlp
``8 M d^2``, norm_linear ``2 M d^2``.

One optimizer step is, summed over its micro-batches and ranks,

    3 x student forward (forward + backward = 2 x forward)  +  teacher forward (no backward)

where the student forward runs the encoder on the masked input (the same T positions) and the
teacher forward is the EMA encoder on the unmasked input (plus speech's positional conv of it).
The backward of the first conv layer and of the frontend are counted as 2x forward as well
(they are a small share), so this slightly over-counts speech.

MFU = step FLOPs / step wall time / (world size x peak FLOP/s of one device). ``PEAK_TFLOPS``
holds the dense (no structured sparsity) peaks of NVIDIA's datasheets; :func:`peak_flops` returns
None for devices not in it (CPU among them) and the trainer then logs no MFU.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from scaling.config import ModelConfig

__all__ = ["ForwardFlops", "forward_flops", "batch_counts", "peak_flops", "PEAK_TFLOPS"]


def _conv_lengths(n: int, conv_layers) -> list[int]:
    out = []
    for _, k, s in conv_layers:
        n = max((n - k) // s + 1, 0)
        out.append(n)
    return out


def _encoder_flops(cfg: ModelConfig, T: int) -> float:
    d, f = cfg.dim, cfg.ffn_dim
    return float(cfg.depth) * (8.0 * T * d * d + 4.0 * T * d * f + 4.0 * T * T * d)


def _head_flops(cfg: ModelConfig, masked: int) -> float:
    d = cfg.dim
    per_row = {"linear": 2.0 * d * d, "mlp": 8.0 * d * d, "norm_linear": 2.0 * d * d}[cfg.head]
    return per_row * masked


def _pos_conv_flops(cfg: ModelConfig, T: int) -> float:
    from scaling.models.speech import pos_conv_kernel

    sc, d = cfg.speech, cfg.dim
    k = pos_conv_kernel(sc.conv_pos_width, sc.conv_pos_depth)
    t_out = T + 2 * (k // 2) - k + 1  # Conv1d with padding k // 2, before SamePad trims an even kernel's extra frame
    return float(sc.conv_pos_depth) * 2.0 * t_out * d * (d // sc.conv_pos_groups) * k


@dataclass
class ForwardFlops:
    """Forward matmul FLOPs of one micro-batch, split by what runs backward."""

    student: float  # frontend (student's input) + student encoder + head: runs backward too
    teacher_input: float  # speech: the positional conv of the teacher's input (no backward); else 0
    teacher: float  # the EMA teacher's encoder (forward only)

    @property
    def step(self) -> float:
        """What the micro-batch costs in a training step: backward = 2 x the student's forward."""
        return 3.0 * self.student + self.teacher_input + self.teacher


def forward_flops(cfg: ModelConfig, lengths: list[int], num_masked: int,
                  audio_lengths: list[int] | None = None) -> ForwardFlops:
    """FLOPs of a micro-batch of sequences with ``lengths`` real encoder positions each (vision:
    patches, without CLS) and ``num_masked`` masked positions; speech also needs each row's real
    ``audio_lengths`` (samples). v1: the positional conv (speech) belongs to the frontend, so the
    teacher's input costs it again with the student's weights."""
    from scaling.modalities import spec_for

    spec = spec_for(cfg.modality)
    student = teacher_input = teacher = 0.0
    assert audio_lengths is None or len(audio_lengths) == len(lengths), "one audio length per row"
    for i, T in enumerate(lengths):
        local = spec.frontend_flops(cfg, T, None if audio_lengths is None else audio_lengths[i])
        pos = spec.positional_conv_flops(cfg, T)
        encoder = _encoder_flops(cfg, T + spec.cls_positions)
        student += local + pos + encoder
        teacher_input += pos
        teacher += encoder + (local if spec.teacher_embeds else 0.0)
    student += _head_flops(cfg, num_masked)
    return ForwardFlops(student, teacher_input, teacher)


def _cnn_flops(cfg: ModelConfig, n_samples: int) -> float:
    """The speech conv feature encoder on one clip of ``n_samples`` audio samples."""
    layers, flops, c_in = cfg.speech.conv_layers, 0.0, 1
    for (c_out, k, _), l_out in zip(layers, _conv_lengths(n_samples, layers)):
        flops += 2.0 * c_in * k * c_out * l_out
        c_in = c_out
    return flops


def forward_flops2(cfg: ModelConfig, samples: int, views: int, kept: int, positions: int,
                   audio_lengths: list[int] | None = None) -> ForwardFlops:
    """data2vec 2.0: ``samples`` rows of ``positions`` encoder positions (image patches, tokens), ``views``
    masked views of each keeping ``kept``. Student: the blocks on the kept positions (+ CLS for images) of
    every view, the conv decoder on every position of every view, the patch embedding once per image;
    teacher: one pass per sample."""
    from scaling.modalities import spec_for

    spec = spec_for(cfg.modality)
    v2, d = cfg.v2, cfg.dim
    N, extra = positions, spec.cls_positions
    kernel_area = v2.decoder_kernel ** spec.decoder_kernel_dims
    # The frontend once per sample (speech: the CNN per clip, averaged over the micro-batch's clips).
    clips = audio_lengths if audio_lengths is not None else [None] * samples
    local = sum(spec.frontend_flops(cfg, N, n) for n in clips) / max(len(clips), 1)
    pos = spec.positional_conv_flops(cfg, N)  # 2.0 speech: the encoder's, on every view and on the teacher's
    blocks = replace(cfg, depth=cfg.depth + v2.prenet_depth)
    widths = [d] + [v2.decoder_dim] * v2.decoder_layers
    decoder = sum(2.0 * N * (c_in // v2.decoder_groups) * kernel_area * v2.decoder_dim for c_in in widths[:-1])
    hidden = v2.decoder_dim * (v2.decoder_projection_ratio if v2.decoder_projection_layers == 2 else 0)
    decoder += 2.0 * N * (v2.decoder_dim * d if not hidden else v2.decoder_dim * hidden + hidden * d)
    R = samples * views
    student = samples * local + R * (pos + _encoder_flops(blocks, kept + extra) + decoder)
    teacher = samples * (pos + _encoder_flops(blocks, N + extra) + (local if spec.teacher_embeds else 0.0))
    return ForwardFlops(student, 0.0, teacher)


def batch_counts(cfg: ModelConfig, batch: dict[str, torch.Tensor]) -> tuple[int, int, float]:
    """(rows, real encoder positions, step FLOPs) of one collated micro-batch (CPU tensors, before
    the model: no device sync). Positions are speech frames of the real audio, vision patches and
    CLS, text non-pad tokens."""
    from scaling.modalities import spec_for

    spec = spec_for(cfg.modality)
    mask = batch["mask_BT"]
    lengths, audio = spec.row_lengths(cfg, batch)  # per sample row
    if "keep_index_RK" in batch:  # data2vec 2.0: rows are samples; positions: the student encoder's kept ones
        samples, (R, K) = int(batch["sample_id_B"].shape[0]), batch["keep_index_RK"].shape
        pad = batch.get("keep_padding_RK")
        kept = R * K if pad is None else int((~pad).sum())
        flops = forward_flops2(cfg, samples, R // samples, K, int(mask.shape[1]), audio).step
        return samples, kept + R * spec.cls_positions, flops
    rows = int(mask.shape[0])
    flops = forward_flops(cfg, lengths, int(mask.sum()), audio).step
    return rows, int(sum(lengths) + rows * spec.cls_positions), flops


# Dense peak TFLOP/s per GPU by datasheet (the sparsity figures halved). First match of the
# device name wins, so the more specific names come first. fp32 is plain IEEE fp32 matmul (what
# PyTorch runs unless TF32 is allowed); tf32 applies when torch allows TF32 matmuls.
# A100: NVIDIA A100 Tensor Core GPU datasheet (SXM and PCIe alike): BF16/FP16 312, TF32 156, FP32 19.5.
# H100: NVIDIA H100 Tensor Core GPU datasheet: SXM BF16/FP16 989.4, TF32 494.7, FP32 66.9;
#       PCIe 756, 378, 51; NVL 835.5, 417.5, 60.
# H200: NVIDIA H200 Tensor Core GPU datasheet: SXM BF16/FP16 989.4, TF32 494.7, FP32 66.9 (the H100
#       SXM compute with more memory); NVL 835.5, 417.5, 60.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
]


def peak_flops(device: torch.device, precision: str) -> tuple[float, str] | None:
    """(peak FLOP/s of one device at the run's matmul precision, the device name), or None when
    the device has no entry in :data:`PEAK_TFLOPS` (CPU, other GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    kind = precision
    if precision == "fp32":
        kind = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            return (peaks[kind] * 1e12, name) if kind in peaks else None
    return None
