"""Recipes: YAML files loaded into typed, frozen-by-convention dataclasses.

A recipe may name a parent with ``extends: <relative path>``; the child's keys
are merged over the parent's. ``--set a.b=value`` overrides are applied last
(the value is parsed as YAML, so ``--set train.max_steps=30`` gives an int).
Every key is checked against the dataclass tree: an unknown key, a value of
the wrong type or a number outside the key's range (declared beside the field
with :func:`bounded`; NaN and inf are never accepted) raises ``RecipeError``
naming the key and the file, before any training starts. Each component
receives only its own section.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class RecipeError(ValueError):
    """A recipe or an override is invalid; the message names the key and the file."""


@dataclass(frozen=True)
class Bounds:
    """The numbers a recipe key takes (for a list: every item); ``None``: unbounded on that side."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False

    def admits(self, value: float) -> bool:
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def __str__(self) -> str:
        lo, hi = (f"{v:g}" if isinstance(v, float) else v for v in (self.lo, self.hi))
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {lo}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {hi}"
        return "a finite number"


def bounded(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, ge: Optional[float] = None,
            gt: Optional[float] = None, le: Optional[float] = None, lt: Optional[float] = None) -> Any:
    """A numeric recipe field and its range, checked by :func:`validate`; no bound: any finite number."""
    assert ge is None or gt is None, "one lower bound"
    assert le is None or lt is None, "one upper bound"
    bounds = Bounds(lo=gt if ge is None else ge, hi=lt if le is None else le, lo_open=gt is not None,
                    hi_open=lt is not None)
    return field(default=default, default_factory=factory, metadata={"bounds": bounds})


# ----------------------------------------------------------------------------- model
@dataclass
class SpeechModelConfig:
    # (channels, kernel, stride) per conv layer: wav2vec 2.0 feature encoder (docs/data2vec.md §3.2).
    conv_layers: list[list[int]] = bounded(
        factory=lambda: [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2, ge=1)
    conv_pos_depth: int = bounded(5, ge=1)
    conv_pos_width: int = bounded(95, ge=1)  # per-layer kernel is max(3, width // depth) = 19
    conv_pos_groups: int = bounded(16, ge=1)
    feature_dropout: float = bounded(0.0, ge=0, lt=1)  # fairseq dropout_input, applied to the student's features only
    layerdrop: float = bounded(0.05, ge=0, lt=1)


@dataclass
class VisionModelConfig:
    image_size: int = bounded(224, ge=1)
    patch_size: int = bounded(16, ge=1)
    channels: int = bounded(3, ge=1)
    layer_scale_init: float = bounded(1e-4, ge=0)  # BEiT gamma_1/gamma_2 init (1e-4 B, 1e-5 L)
    drop_path: float = bounded(0.25, ge=0, lt=1)


@dataclass
class TextModelConfig:
    vocab_size: int = bounded(50265, ge=1)
    max_positions: int = bounded(512, ge=1)
    # Special ids follow fairseq/RoBERTa: <s>=0, <pad>=1, </s>=2, <unk>=3; <mask> comes from the tokenizer.
    pad_id: int = bounded(1, ge=0)
    mask_id: int = bounded(4, ge=0)


@dataclass
class Data2Vec2Config:
    """data2vec 2.0 parts (model.version 2; docs/data2vec2.md): prenet, conv decoder, CLS loss."""
    # Blocks before the main ones (fairseq prenet_depth): part of the student and teacher encoder, never
    # tapped for targets. model.depth counts the main blocks only.
    prenet_depth: int = bounded(0, ge=0)
    # Conv decoder (fairseq Decoder2d / Decoder1d): layers of conv(k, groups) -> channel LayerNorm (no
    # affine) -> GELU, a residual between layers of equal width, then Linear(decoder_dim -> dim).
    decoder_dim: int = bounded(768, ge=1)
    decoder_kernel: int = bounded(3, ge=1)
    decoder_layers: int = bounded(6, ge=1)
    decoder_groups: int = bounded(16, ge=1)
    decoder_residual: bool = True
    mask_noise_std: float = bounded(0.01, ge=0)  # the decoder's input at masked positions: N(0, std^2)
    decoder_input_dropout: float = bounded(0.0, ge=0, lt=1)  # fairseq decoder input_dropout (text, speech: 0.1)
    # After the conv layers: 1 -> Linear(decoder_dim, dim); 2 -> Linear(decoder_dim, ratio x decoder_dim),
    # GELU, Linear(-> dim) (fairseq projection_layers / projection_ratio; text: 2 and 2).
    decoder_projection_layers: Literal[1, 2] = 1
    decoder_projection_ratio: float = bounded(2.0, gt=0)
    # Images: the student's CLS output regresses the mean of the teacher's targets over patches, each
    # view weighing cls_loss x (its masked patches) masked positions (fairseq cls_loss 0.01).
    cls_loss: float = bounded(0.0, ge=0)


@dataclass
class ModelConfig:
    modality: Literal["speech", "vision", "text"] = "speech"
    # 1: data2vec (mask embedding, full-length student, regression head); 2: data2vec 2.0 (the student
    # encoder drops the masked positions, a conv decoder predicts them, M masked views per sample).
    version: Literal[1, 2] = 1
    dim: int = bounded(768, ge=1)
    depth: int = bounded(12, ge=1)
    heads: int = bounded(12, ge=1)
    ffn_dim: int = bounded(3072, ge=1)
    dropout: float = bounded(0.1, ge=0, lt=1)
    attention_dropout: float = bounded(0.1, ge=0, lt=1)
    activation_dropout: float = bounded(0.0, ge=0, lt=1)
    layer_norm_eps: float = bounded(1e-5, gt=0)
    # Student regression head (docs/data2vec.md §1.2): linear (speech final_proj), mlp (text regression_head,
    # D -> 2D -> D), norm_linear (vision: final LayerNorm then lm_head).
    head: Literal["linear", "mlp", "norm_linear"] = "linear"
    speech: SpeechModelConfig = field(default_factory=SpeechModelConfig)
    vision: VisionModelConfig = field(default_factory=VisionModelConfig)
    text: TextModelConfig = field(default_factory=TextModelConfig)
    v2: Data2Vec2Config = field(default_factory=Data2Vec2Config)
    # Start the student (and its EMA teacher) from these weights instead of a random init: an HF
    # transformers Data2Vec directory (scaling-convert to-hf, or a released model) or a scaling checkpoint
    # (or checkpoint.dir). Ignored when the run resumes from its own checkpoint.
    init_from: str = ""


# ----------------------------------------------------------------------------- masking
@dataclass
class SpeechMaskConfig:
    # fairseq compute_mask_indices: int(prob * T / length + U[0,1)) span starts of `length` frames
    # (docs/data2vec.md §3.2, §7.4: 0.65 = start probability 0.065 x length 10).
    prob: float = bounded(0.65, ge=0, le=1)
    length: int = bounded(10, ge=1)
    min_masks: int = bounded(1, ge=0)


@dataclass
class VisionMaskConfig:
    # BEiT block-wise masking (docs/data2vec.md §3.3): 120 of 196 patches for ViT-B.
    ratio: float = bounded(0.6122449, ge=0, le=1)  # 120 / 196
    min_block_patches: int = bounded(16, ge=1)
    max_block_patches: int = bounded(0, ge=0)  # 0: no limit beyond the remaining budget
    min_aspect: float = bounded(0.3, gt=0, le=1)


@dataclass
class TextMaskConfig:
    # Released text/pretraining/base.yaml (docs/data2vec.md §3.4, §7.1): span starts with prob/span, span of 4,
    # every selected token replaced by <mask>. leave_unmasked/random_token give BERT 80/10/10.
    prob: float = bounded(0.35, ge=0, le=1)
    span: int = bounded(4, ge=1)
    leave_unmasked_prob: float = bounded(0.0, ge=0, le=1)
    random_token_prob: float = bounded(0.0, ge=0, le=1)


@dataclass
class InverseBlockMaskConfig:
    # data2vec 2.0 images (fairseq compute_block_mask_2d, inverse_mask): blocks of block x block patches
    # are KEPT around int(L((1 - ratio) + adjust) / block^2) centres, then exactly int(L(1 - ratio)) kept.
    ratio: float = bounded(0.8, ge=0, lt=1)
    adjust: float = bounded(0.07)  # any finite number: a negative one draws fewer centres
    block: int = bounded(3, ge=1)


@dataclass
class SpanMask2Config:
    ratio: float = bounded(0.5, ge=0, lt=1)
    adjust: float = bounded(0.05)  # any finite number, as vision_v2.adjust
    span: int = bounded(5, ge=1)


@dataclass
class MaskingConfig:
    speech: SpeechMaskConfig = field(default_factory=SpeechMaskConfig)
    vision: VisionMaskConfig = field(default_factory=VisionMaskConfig)
    text: TextMaskConfig = field(default_factory=TextMaskConfig)
    vision_v2: InverseBlockMaskConfig = field(default_factory=InverseBlockMaskConfig)
    # data2vec 2.0 speech (fairseq compute_block_mask_1d): spans of `span` frames around int(T (ratio +
    # adjust) / span) centres, then exactly int(T x ratio) of a clip's T frames masked per view.
    speech_v2: SpanMask2Config = field(default_factory=SpanMask2Config)
    # data2vec 2.0 text (fairseq random_masking, mask_length 1): int(n x ratio) of a block's n maskable
    # tokens (BOS/EOS/padding excluded) per view, dropped from the student encoder.
    text_v2_ratio: float = bounded(0.48, ge=0, lt=1)
    # data2vec 2.0 multi-mask (fairseq clone_batch): M masked views of every sample, drawn on the data
    # workers; the teacher runs once per sample. Batch sizes count unique samples. model.version 2 only.
    clones: int = bounded(1, ge=1)


# ----------------------------------------------------------------------------- objective
@dataclass
class ObjectiveConfig:
    top_k: int = bounded(8, ge=1)
    tap: Literal["ffn", "block"] = "ffn"  # FFN output before the last residual, or the block output
    layer_norm: Literal["instance", "layer", "none"] = "instance"  # per teacher layer, no affine
    post_norm: Literal["none", "layer", "instance"] = "none"  # after averaging the top K
    loss: Literal["l2", "smooth_l1"] = "l2"
    beta: float = bounded(0.0, ge=0)  # Smooth-L1 beta
    loss_scale: Optional[float] = bounded(None, gt=0)  # None: 1/sqrt(D), as fairseq's loss_scale: null
    # [DV] vision uses a mean over masked elements: the same as summing over D with scale 1/D.
    mean_over_dims: bool = False


@dataclass
class EMAConfig:
    decay: float = bounded(0.999, ge=0, le=1)
    end_decay: float = bounded(0.9999, ge=0, le=1)
    anneal_steps: int = bounded(30000, ge=0)


@dataclass
class MonitorConfig:
    # Collapse guard (docs/data2vec.md §1.3): stop with a checkpoint once past `after_steps`.
    min_target_var: float = bounded(0.1, ge=0)
    min_pred_var: float = bounded(0.01, ge=0)
    after_steps: int = bounded(5000, ge=0)
    # RankMe effective rank of the teacher targets (scaling/rankme.py; measured on log steps only, it
    # costs an SVD): fire when it falls below this. 0 disables.
    min_target_rank: float = bounded(0.0, ge=0)


# ----------------------------------------------------------------------------- optimisation
@dataclass
class OptimConfig:
    lr: float = bounded(5e-4, ge=0)  # peak; 0 leaves the weights as they are (tests of a frozen step)
    betas: list[float] = bounded(factory=lambda: [0.9, 0.98], ge=0, lt=1)
    eps: float = bounded(1e-6, gt=0)
    weight_decay: float = bounded(0.01, ge=0)
    grad_clip: float = bounded(0.0, ge=0)  # 0 disables clipping
    # torch's fused AdamW (one kernel over all parameters; 6.5x faster than foreach on a 15M-parameter
    # CPU step, benchmarks/step_vs_hf.py); false: the foreach implementation. The same update rule.
    fused: bool = True
    # How the peak LR follows a global batch other than train.reference_batch (scaling/plan.py).
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"


@dataclass
class ScheduleConfig:
    name: Literal["cosine", "tri_stage", "constant"] = "tri_stage"
    warmup_steps: int = bounded(0, ge=0)  # cosine
    min_lr_ratio: float = bounded(0.0, ge=0, le=1)  # cosine floor, as a fraction of the peak
    phase_ratio: list[float] = bounded(factory=lambda: [0.03, 0.9, 0.07], ge=0, le=1)  # tri_stage
    init_lr_scale: float = bounded(0.01, ge=0, le=1)
    final_lr_scale: float = bounded(0.01, gt=0, le=1)


@dataclass
class TrainConfig:
    # Optimizer steps at train.reference_batch (scaling.plan rescales it to keep the samples).
    max_steps: int = bounded(1000, ge=1)
    global_batch_size: int = bounded(8, ge=1)  # samples per optimizer step, job-wide
    # The most samples one rank takes in one forward (0: no bound, with batches by seconds of audio only).
    micro_batch_size: int = bounded(8, ge=0)
    # Speech, as fairseq batches it: seconds of padded audio (batch size x longest clip, fairseq's
    # max_tokens) per optimizer step job-wide, and the most per micro-batch and rank. When set (> 0)
    # they replace global/micro_batch_size and the loader builds length-bucketed batches.
    global_batch_seconds: float = bounded(0.0, ge=0)
    micro_batch_seconds: float = bounded(0.0, ge=0)
    # The global batch (same unit) at which max_steps, schedule.warmup_steps, ema.anneal_steps and
    # optim.lr are stated; 0: the global batch itself. See scaling/plan.py.
    reference_batch: float = bounded(0.0, ge=0)
    # auto: bf16 on CUDA devices that support it and on CPUs with bf16 units (avx512_bf16 / amx_bf16),
    # else fp32 (autocast bf16 is slower than fp32 on AVX2-only CPUs). Resolved by scaling/plan.py.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "bf16"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = bounded(10, ge=1)
    # Consecutive steps skipped for a non-finite loss or gradient norm (fp16 overflows included) that
    # stop the run, with a checkpoint of the last good weights (scaling/trainer.py).
    max_skipped_steps: int = bounded(10, ge=1)


# ----------------------------------------------------------------------------- data
@dataclass
class SpeechDataConfig:
    sample_rate: int = bounded(16000, ge=1)
    max_samples: int = bounded(320000, ge=1)  # random crop (docs/data2vec.md §3.2)
    min_samples: int = bounded(32000, ge=0)  # shorter utterances are skipped
    normalize: bool = True
    # Longer files are skipped as "too_large" from their header, before decoding (docs/data.md).
    max_seconds: float = bounded(600.0, gt=0)


@dataclass
class VisionDataConfig:
    augment: bool = True  # RandomResizedCrop + flip + normalise
    crop_scale: list[float] = bounded(factory=lambda: [0.08, 1.0], gt=0, le=1)
    mean: list[float] = bounded(factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = bounded(factory=lambda: [0.229, 0.224, 0.225], gt=0)
    # Bigger images (width x height, from the header, before decoding) are skipped as "too_large"; 64 Mi
    # pixels. At most 2 x PIL's MAX_IMAGE_PIXELS, past which PIL refuses to open an image (docs/data.md).
    max_pixels: int = bounded(64 * 1024 * 1024, ge=1, le=178_956_970)


@dataclass
class TextDataConfig:
    tokenizer: str = ""  # sentencepiece model file
    block_size: int = bounded(512, ge=3)  # tokens per sample, BOS/EOS included


@dataclass
class DataConfig:
    # A webdataset brace pattern (shards/train-{000000..000009}.tar) or a comma-separated list;
    # "synthetic" draws random samples (tests, smoke runs). No default: a run must say what it reads.
    train_shards: str = ""
    num_workers: int = bounded(0, ge=0)  # DataLoader workers per rank; each reads its own run of the epoch
    # Samples per shuffle window (encoded bytes are held in memory); 0 or 1: read in order.
    shuffle_buffer: int = bounded(256, ge=0)
    # Bad input: a sample bigger than this is skipped as "oversized"; the run stops once more than
    # max_bad_fraction of the samples read job-wide were bad, checked from bad_check_min_samples on.
    max_sample_bytes: int = bounded(64 * 1024 * 1024, ge=1)
    max_bad_fraction: float = bounded(0.01, ge=0, le=1)
    bad_check_min_samples: int = bounded(1000, ge=0)
    speech: SpeechDataConfig = field(default_factory=SpeechDataConfig)
    vision: VisionDataConfig = field(default_factory=VisionDataConfig)
    text: TextDataConfig = field(default_factory=TextDataConfig)
    # Vision on a CUDA device: the workers hand out uint8 crops and per-sample flip flags (4x fewer
    # bytes to pin and copy, no float work in the workers) and scaling.data.device.to_device flips,
    # converts and normalises the whole batch on the GPU; the result equals the workers' float
    # images. False, and on CPU devices (where the stage would only leave the workers for the
    # training process): the workers hand out finished float images.
    device_stage: bool = True
    # With train_shards=synthetic: the batches are made on the training device itself (no workers,
    # no copies, no per-sample work) with the CPU stream's keys, dtypes, shapes and mask kinds, but
    # random content: for measuring model speed, not for learning anything.
    synthetic_on_device: bool = False


# ----------------------------------------------------------------------------- infrastructure
@dataclass
class CheckpointConfig:
    dir: str = "checkpoints"
    every_steps: int = bounded(1000, ge=1)
    keep_last: int = bounded(3, ge=0)  # complete checkpoints kept in dir; 0: all of them
    resume: str = "auto"  # auto: newest complete checkpoint in dir, if any; never; or a path
    # fsdp: stage the state to host memory and write it in the background (DCP async_save); the
    # checkpoint completes at the next save or at the end of the run.
    async_save: bool = False


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = "sqlite:///mlruns.db"
    experiment: str = "scaling"
    run_name: str = ""
    # Seconds between MLflow system-metric samples (CPU, memory, GPU; scaling/tracking.py). MLflow's
    # default of 10 s leaves a short run with none; 0 turns system metrics off.
    system_metrics_every_s: float = bounded(5.0, ge=0)


@dataclass
class EngineConfig:
    name: Literal["single", "ddp", "fsdp", "deepspeed"] = "single"
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on GPU, gloo on CPU
    # Recompute each transformer block's activations in backward (student only; the teacher has no backward).
    activation_checkpointing: bool = False
    # fsdp: True reshards the student's blocks after forward (ZeRO-3-like), False keeps them
    # gathered until backward (ZeRO-2-like). The teacher always reshards (it never runs backward).
    reshard_after_forward: bool = True
    # fsdp: >1 gives hybrid sharding: `replicas` groups, each sharding over world_size / replicas ranks.
    replicas: int = bounded(1, ge=1)
    zero_stage: int = bounded(3, ge=1, le=3)  # deepspeed: 1, 2 or 3
    # torch.compile every encoder block of student and teacher (after activation checkpointing, before
    # sharding; scaling.engines.base.prepare_blocks). The first steps pay the compile time.
    compile: bool = False
    # One graph per block (an error at a graph break) rather than a silent fallback to eager pieces.
    compile_fullgraph: bool = True
    # Seconds a collective (and the process-group set-up) may wait for the other ranks before the rank
    # fails (gloo and nccl, DeepSpeed too): a hung or stopped rank ends the job after about this long,
    # instead of torch's default 30 min (gloo) or 10 min (nccl). Long enough for the slowest step plus
    # the slowest rank's checkpoint save or first-step compile (docs/performance.md, "Faults").
    timeout_s: float = bounded(600.0, ge=1, le=86400)


@dataclass
class Recipe:
    seed: int = bounded(0, ge=0, le=2**32 - 1)
    model: ModelConfig = field(default_factory=ModelConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


# ----------------------------------------------------------------------------- loading
def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in chain:
        raise RecipeError(f"{path}: 'extends' forms a cycle")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping, got {type(raw).__name__}")
    parents = raw.pop("extends", None)
    if parents is None:
        return raw
    # One parent, or a list merged in order (model, run, cluster settings): later files win.
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise RecipeError(f"{path}: 'extends' must be a file name or a list of them, got {parents!r}")
    base: dict[str, Any] = {}
    for parent in parents:
        base = merge(base, _read_yaml(path.parent / parent, chain + (path,)))
    return merge(base, raw)


def merge(base: dict, over: dict) -> dict:
    """``over`` merged into ``base``, section by section (a recipe over its ``extends:`` parent)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _apply_override(tree: dict, item: str) -> None:
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected key.path=value")
    key, text = item.split("=", 1)
    node = tree
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {item!r}: '{p}' is not a section")
    node[parts[-1]] = yaml.safe_load(text) if text.strip() else ""


def _check_value(value: Any, tp: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"{source}: '{key}' must be a section (mapping), got {value!r}")
        return _build(tp, value, key, source)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_value(value, a, key, source)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(errors[-1])
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise RecipeError(f"{source}: '{key}' must be one of {list(allowed)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{source}: '{key}' must be a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_check_value(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads `3e-4` (no dot) as a string; accept what float() reads.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{source}: '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{source}: '{key}' must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{source}: '{key}' must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{source}: '{key}' must be a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported recipe type {tp} for {key}")


def _build(cls: type, values: dict, prefix: str, source: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f"did you mean '{prefix + '.' if prefix else ''}{close[0]}'? " if close else ""
            raise RecipeError(f"{source}: unknown key '{key}' ({hint}known keys here: {', '.join(sorted(names))})")
        kwargs[k] = _check_value(v, hints[k], key, source)
    return cls(**kwargs)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, require_data: bool = True) -> Recipe:
    """Load a recipe file, apply ``key.path=value`` overrides, and validate every key.

    ``require_data=False``: for tools that read a recipe without training from it (planning,
    conversion), an unset ``data.train_shards`` is not an error."""
    path = Path(path)
    tree = _read_yaml(path)
    source = str(path)
    for item in overrides:
        _apply_override(tree, item)
    if overrides:
        source = f"{path} (with --set {' '.join(overrides)})"
    return recipe_from_dict(tree, source, require_data=require_data)


def recipe_from_dict(tree: dict, source: str = "<dict>", *, require_data: bool = True) -> Recipe:
    recipe = _build(Recipe, tree, "", source)
    validate(recipe, source, require_data=require_data)
    return recipe


def validate(r: Recipe, source: str, *, require_data: bool = True) -> None:
    """Every number finite and inside its key's :func:`bounded` range, then the cross-key checks that a
    type check cannot express. Also run on recipes built in code, so their defaults are checked too."""

    def fail(key: str, why: str):
        raise RecipeError(f"{source}: '{key}' {why}")

    # Ranges first: the cross-key checks below divide by some of these keys.
    _check_bounds(r, "", fail)
    if r.model.dim % r.model.heads:
        fail("model.heads", f"must divide model.dim ({r.model.dim})")
    if r.masking.clones > 1 and r.model.version != 2:
        fail("masking.clones", "(multi-mask) needs model.version 2")
    if r.model.version == 2:
        v2 = r.model.v2
        if v2.decoder_kernel % 2 == 0:
            fail("model.v2.decoder_kernel", f"must be odd (the conv keeps the length), got {v2.decoder_kernel}")
        if v2.decoder_dim % v2.decoder_groups:
            fail("model.v2.decoder_groups", f"must divide model.v2.decoder_dim ({v2.decoder_dim})")
        if not 0.0 < r.masking.vision_v2.ratio < 1.0:
            fail("masking.vision_v2.ratio", "must be in (0, 1)")
        if not 0.0 < r.masking.speech_v2.ratio < 1.0:
            fail("masking.speech_v2.ratio", "must be in (0, 1)")
        if not 0.0 < r.masking.text_v2_ratio < 1.0:
            fail("masking.text_v2_ratio", "must be in (0, 1)")
        if r.data.synthetic_on_device:
            fail("data.synthetic_on_device", "is not implemented for model.version 2 (masks come from the workers)")
    m, d = r.model, r.data
    if m.modality == "speech":
        if any(len(layer) != 3 for layer in m.speech.conv_layers):
            fail("model.speech.conv_layers", "must hold one [channels, kernel, stride] per layer")
        if m.dim % m.speech.conv_pos_groups:
            fail("model.speech.conv_pos_groups", f"must divide model.dim ({m.dim})")
        if d.speech.min_samples > d.speech.max_samples:
            fail("data.speech.min_samples", f"must be at most data.speech.max_samples ({d.speech.max_samples})")
    if m.modality == "vision":
        if len(d.vision.crop_scale) != 2 or d.vision.crop_scale[0] > d.vision.crop_scale[1]:
            fail("data.vision.crop_scale", f"must be [min, max] with min <= max, got {d.vision.crop_scale}")
        if len(d.vision.mean) < m.vision.channels or len(d.vision.std) < m.vision.channels:
            fail("data.vision.mean", f"and data.vision.std need {m.vision.channels} entries (model.vision.channels)")
    if m.modality == "text":
        for name in ("pad_id", "mask_id"):
            if getattr(m.text, name) >= m.text.vocab_size:
                fail(f"model.text.{name}", f"must be below model.text.vocab_size ({m.text.vocab_size})")
        if d.text.block_size > m.text.max_positions:
            fail("data.text.block_size", f"must be at most model.text.max_positions ({m.text.max_positions})")
        tm = r.masking.text
        if tm.leave_unmasked_prob + tm.random_token_prob > 1:
            fail("masking.text.leave_unmasked_prob", "plus masking.text.random_token_prob must be at most 1")
    if not 1 <= r.objective.top_k <= r.model.depth:
        fail("objective.top_k", f"must be in 1..model.depth ({r.model.depth})")
    t = r.train
    if t.global_batch_seconds > 0 or t.micro_batch_seconds > 0:
        if r.model.modality != "speech":
            fail("train.global_batch_seconds", f"batches by seconds of audio, for speech only (this is "
                 f"{r.model.modality}: use train.global_batch_size)")
        if t.global_batch_seconds <= 0 or t.micro_batch_seconds <= 0:
            fail("train.global_batch_seconds", "and train.micro_batch_seconds must be set together")
    elif t.micro_batch_size == 0:
        fail("train.micro_batch_size", "must be positive (0, no bound, is for batches by seconds of audio only)")
    if r.schedule.name == "tri_stage" and (len(r.schedule.phase_ratio) != 3 or abs(sum(r.schedule.phase_ratio) - 1) > 1e-6):
        fail("schedule.phase_ratio", "must be three fractions summing to 1")
    if len(r.optim.betas) != 2:
        fail("optim.betas", "must hold two numbers")
    if r.model.modality == "vision" and r.model.vision.image_size % r.model.vision.patch_size:
        fail("model.vision.patch_size", f"must divide model.vision.image_size ({r.model.vision.image_size})")
    if r.objective.loss == "smooth_l1" and r.objective.beta <= 0:
        fail("objective.beta", "must be positive for smooth_l1")
    if require_data and not r.data.train_shards.strip():
        fail("data.train_shards", "is not set: --set data.train_shards='/path/train-{000000..000099}.tar' "
             "(a webdataset pattern, pipe: command or URL), or 'synthetic' for random data")
    if r.checkpoint.async_save and r.engine.name != "fsdp":
        fail("checkpoint.async_save", f"needs engine.name=fsdp (DCP async_save), not {r.engine.name}")
    if r.train.precision == "fp16" and r.engine.name == "fsdp":
        fail("train.precision", "fp16 needs dynamic loss scaling: use bf16 with fsdp, or fp16 with deepspeed")


def _check_bounds(obj: Any, prefix: str, fail) -> None:
    """Every number in the tree finite and inside its field's :class:`Bounds` (list items one by one)."""
    for f in dataclasses.fields(obj):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_bounds(value, key + ".", fail)
            continue
        bounds = f.metadata.get("bounds")
        for item_key, item in _numbers(value, key):
            if not math.isfinite(item):
                fail(item_key, f"must be a finite number, got {item!r}")
            if bounds is not None and not bounds.admits(item):
                fail(item_key, f"must be {bounds}, got {item!r}")


def _numbers(value: Any, key: str):
    """(key, number) for a number, or for each number in a (nested) list: ``optim.betas[1]``."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            yield from _numbers(item, f"{key}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield key, value


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{'train.max_steps': 30, ...}``: the resolved recipe as flat keys (MLflow params)."""
    tree = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False)
