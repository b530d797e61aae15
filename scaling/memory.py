"""Per-rank memory of a recipe on N ranks, before booking the cluster: an analytic estimate.

What one rank holds is split into the kinds ``Engine.memory_report()`` measures, plus what no
report can see before a step runs:

- ``params``: the student as the engine stores it between steps; ``grads``: the gradients kept
  from backward to the optimizer step; ``optimizer``: AdamW's two fp32 moments (and its per-parameter
  ``step`` scalar where torch keeps one per tensor), plus the fp32 master copy where the engine
  holds a low-precision student (DeepSpeed bf16/fp16); ``teacher``: the fp32 EMA copy of the
  student's **encoder** (scaling/teacher.py), sharded exactly like the student.
- ``gathered``: unsharded parameters (and gradient buffers) that FSDP2 / ZeRO-3 all-gather for a
  forward or backward and free again; DDP's gradient buckets. Transient, but part of the peak.
- ``activations``: what autograd keeps per micro-batch, without and with activation checkpointing.

Parameters are counted from the real model built on the meta device (``build_model`` under
``torch.device("meta")``), so the estimate follows the model code; each parameter's shape then goes
through the engine's partition rule for rank 0, which always holds the largest piece:

- single / ddp: everything whole on every rank (ddp adds its gradient buckets, a second copy of the
  gradients: ``gradient_as_bucket_view`` is off).
- fsdp (FSDP2 ``fully_shard``, scaling/engines/fsdp.py): every student and teacher parameter is a
  DTensor sharded on dim 0 over the shard group (``world / engine.replicas``), in chunks of
  ``ceil(dim0 / shard)`` rows, and each rank allocates its padded chunk. Masters, gradients (the
  ``reduce_dtype``, fp32) and AdamW state are fp32 shards; bf16 exists only in the all-gathered copy.
- deepspeed ZeRO-3: each parameter's ``ds_tensor`` is ``ceil(numel / world)`` elements in the
  student dtype (``Init._aligned_size`` / ``_partition_param``); the fp32 masters and AdamW moments
  are flats of those partitions; parameters of at most ``stage3_param_persistence_threshold``
  (1e5) elements are persistent: gathered at the first forward and kept whole on every rank.
- deepspeed ZeRO-1/2: each optimizer param group (encoder decay / no-decay, then the rest, as
  scaling/engines/deepspeed.py builds them) is one flat of the whole group in the student dtype,
  padded to a multiple of ``2 * world`` (``nccl_start_alignment_factor``), partitioned in
  ``flat / world`` pieces; masters, moments and the teacher are this rank's piece of the encoder
  groups; ZeRO-1 keeps whole gradients, ZeRO-2 only its partition.

Activations (per micro-batch of B samples of T encoder positions, element size a = 2 for bf16 /
fp16, 4 for fp32; ``auto`` counts as bf16, what a GPU resolves it to). Assumptions: SDPA runs a
flash / memory-efficient kernel (no T x T matrix is stored; its log-sum-exp is B*H*T fp32), every
tensor is saved in the compute dtype (autocast's fp32 LayerNorm inputs are not counted extra),
dropout masks are 1 byte per element when the probability is above 0, and every position is
masked for the head and the loss (an upper bound). Tensors a block saves for backward, per
position:

- post-LN block (speech, text): qkv input, q, k, v, attention output, both LayerNorm inputs, fc1
  input, fc1 output, GELU output = ``a (8D + 2F)``; dropout masks ``2D`` (+ ``F`` for activation
  dropout). For D=768, F=4D, bf16 with dropout this is Korthikanti et al.'s ``34 s b h`` without
  the attention-matrix term (arXiv 2205.05198, Table 2).
- pre-LN BEiT block (vision): the same plus the block input LayerNorm and the two layer-scale
  operands = ``a (10D + 2F)`` with layer scale.
- the EMA teacher runs under no_grad after the student forward: it holds its K taps ``K a D``,
  one block's working set ``a (4D + F)``, and the fp32 target ``8 D`` (average and one tap).
- frontend: speech per conv layer ``C F_i (4 + 2a)`` (fp32 LayerNorm copy, GELU in and out) over
  the conv's output frames, the projection and ``conv_pos_depth`` positional convs ``(8 + a) D``;
  vision the image and the patch embeddings; text the embedding sum, LayerNorm and dropout.
- with activation checkpointing (every encoder block wrapped, non-reentrant): only each block's
  input ``a D`` is kept, plus one block's activations recomputed during its backward.

T is the encoder's sequence length: speech ``conv_output_length(audio samples)`` (320 samples per
frame for the wav2vec 2.0 CNN), vision patches + CLS, text ``data.text.block_size``. Speech batches
in seconds of audio use the plan's padded audio samples per micro-batch (B x longest clip).

``scaling.dry_run`` measures params/grads/optimizer/teacher of the real engines at world size N on
a fake process group; docs/planning.md has the sources.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch.utils._device import DeviceContext

from scaling.config import ModelConfig, Recipe

GiB = 1024**3
ENGINE_ROWS = ("single", "ddp", "fsdp", "zero1", "zero2", "zero3")
KINDS = ("params", "grads", "optimizer", "teacher")  # what the dry run measures
# DeepSpeed's defaults (deepspeed/runtime/zero/config.py): parameters up to this many elements stay
# gathered under ZeRO-3; ZeRO-1/2 align each flat group to this many elements per rank.
ZERO3_PERSISTENCE_THRESHOLD = 100_000
ZERO12_ALIGNMENT = 2


@dataclass(frozen=True)
class ParamInfo:
    name: str
    shape: tuple[int, ...]
    part: str  # "frontend", "encoder" or "head": the student's child that owns it
    block: int | None  # index in encoder.blocks (an FSDP unit), None outside the blocks
    trainable: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class _MetaBuild(DeviceContext):
    """``torch.device("meta")`` for building a model, except ``torch.linspace``: VisionEncoder reads
    its drop-path rates with ``.tolist()``, which a meta tensor cannot give (a one-line
    ``device="cpu"`` in scaling/models/vision.py would make plain ``torch.device("meta")`` work)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.linspace and kwargs.get("device") is None:
            kwargs = {**kwargs, "device": "cpu"}
        return super().__torch_function__(func, types, args, kwargs)


def build_on_meta(model_cfg: ModelConfig):
    """The real student, every parameter on the meta device (no storage)."""
    from scaling.models import build_model

    with _MetaBuild("meta"):
        return build_model(model_cfg)


_PARAMS: dict[str, tuple[ParamInfo, ...]] = {}  # by the model section's repr: a meta build costs seconds


def model_params(model_cfg: ModelConfig) -> tuple[ParamInfo, ...]:
    """The student's parameters (name, shape, owner) from the model built on the meta device."""
    key = repr(dataclasses.asdict(model_cfg))
    if key not in _PARAMS:
        out = []
        for name, p in build_on_meta(model_cfg).named_parameters():
            block = int(name.split(".")[2]) if name.startswith("encoder.blocks.") else None
            out.append(ParamInfo(name, tuple(p.shape), name.split(".", 1)[0], block, p.requires_grad))
        _PARAMS[key] = tuple(out)
    return _PARAMS[key]


# ----------------------------------------------------------------------------- partition rules (rank 0)
def fsdp_local_numel(shape: tuple[int, ...], shard: int) -> int:
    """FSDP2 ``Shard(0)``: chunks of ceil(dim0 / shard) rows; rank 0 allocates a full chunk."""
    if not shape:
        return 1
    rows = -(-shape[0] // shard)
    return rows * math.prod(shape[1:])


def zero3_partition_numel(numel: int, world: int) -> int:
    """ZeRO-3 ``ds_tensor``: numel padded to a multiple of the world size, divided by it."""
    return -(-numel // world)


def zero12_partition_numel(group_numel: int, world: int, alignment: int = ZERO12_ALIGNMENT) -> int:
    """ZeRO-1/2: a group's flat padded to a multiple of alignment x world, one piece per rank."""
    unit = alignment * world
    return -(-group_numel // unit) * unit // world


def deepspeed_groups(params: tuple[ParamInfo, ...]) -> list[list[ParamInfo]]:
    """Optimizer groups as DeepSpeedEngine.setup builds them: encoder decay, encoder no-decay, then
    the rest decay / no-decay (scaling.optim.param_groups' rule: matrices decay, 1-D do not); empty
    groups dropped. The first groups up to the last encoder one are the encoder groups."""
    trainable = [p for p in params if p.trainable]
    enc = [p for p in trainable if p.part == "encoder"]
    rest = [p for p in trainable if p.part != "encoder"]
    groups = []
    for members in (enc, rest):
        groups += [g for g in ([p for p in members if len(p.shape) > 1], [p for p in members if len(p.shape) <= 1]) if g]
    return groups


# ----------------------------------------------------------------------------- estimate
@dataclass(frozen=True)
class MemoryEstimate:
    engine: str  # a row of ENGINE_ROWS
    world_size: int
    params: int
    grads: int
    optimizer: int
    teacher: int
    gathered: int
    activations: int  # per micro-batch, no activation checkpointing
    activations_ac: int  # per micro-batch, every encoder block checkpointed
    micro_batch: str  # what the activations are for, in words

    def kinds(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in KINDS}

    def total(self, checkpointed: bool) -> int:
        return (self.params + self.grads + self.optimizer + self.teacher + self.gathered
                + (self.activations_ac if checkpointed else self.activations))


def _low_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2  # auto: bf16, what CUDA devices resolve it to


def engine_row(recipe: Recipe) -> str:
    """The table row of the recipe's own engine."""
    e = recipe.engine
    return f"zero{e.zero_stage}" if e.name == "deepspeed" else e.name


def estimate(recipe: Recipe, world_size: int, row: str | None = None, *, micro_batch: tuple[int, int] | None = None
             ) -> MemoryEstimate:
    """Bytes rank 0 holds for ``recipe`` on ``world_size`` ranks under ``row`` (default: the recipe's
    engine). ``micro_batch``: (samples, encoder positions each) for the activations; default from the
    batch plan at this world size (:func:`micro_batch_shape`)."""
    row = row or engine_row(recipe)
    if row not in ENGINE_ROWS:
        raise ValueError(f"engine {row!r}: expected one of {', '.join(ENGINE_ROWS)}")
    if world_size < 1:
        raise ValueError(f"the world size must be at least 1, got {world_size}")
    params = model_params(recipe.model)
    low = _low_bytes(recipe.train.precision)
    n_tensors = sum(p.trainable for p in params)
    all_numel = sum(p.numel for p in params)
    trainable_numel = sum(p.numel for p in params if p.trainable)
    encoder = [p for p in params if p.part == "encoder"]
    blocks: dict[int, int] = {}
    for p in params:
        if p.block is not None:
            blocks[p.block] = blocks.get(p.block, 0) + p.numel
    largest_block = max(blocks.values(), default=0)
    outside_blocks = all_numel - sum(blocks.values())
    teacher_outside = sum(p.numel for p in encoder if p.block is None)

    if row in ("single", "ddp"):
        p_bytes = 4 * all_numel
        grads = 4 * trainable_numel
        optimizer = 8 * trainable_numel + 4 * n_tensors  # exp_avg, exp_avg_sq, step scalar
        teacher = 4 * sum(p.numel for p in encoder)
        gathered = grads if row == "ddp" else 0  # DDP's bucket copy of the gradients
    elif row == "fsdp":
        replicas = recipe.engine.replicas
        if world_size % replicas:
            raise ValueError(f"engine.replicas ({replicas}) must divide the world size ({world_size})")
        shard = world_size // replicas
        local = {p.name: fsdp_local_numel(p.shape, shard) for p in params}
        p_bytes = 4 * sum(local.values())
        grads = 4 * sum(local[p.name] for p in params if p.trainable)
        optimizer = 8 * sum(local[p.name] for p in params if p.trainable) + 4 * n_tensors
        teacher = 4 * sum(local[p.name] for p in encoder)
        # Student: the root's own parameters stay gathered from forward to backward (FSDP2's root
        # heuristic), blocks too when reshard_after_forward is false, else the current and the
        # prefetched block; plus one block's fp32 gradients for its reduce-scatter. Teacher: the
        # current and the prefetched block, and its root's own parameters (its forward only).
        held = outside_blocks * low + (sum(blocks.values()) * low if not recipe.engine.reshard_after_forward else 0)
        working = max(2 * largest_block * low + largest_block * 4,
                      2 * largest_block * low + teacher_outside * low)
        gathered = held + working
    else:
        stage = int(row[-1])
        if row == "zero3":
            part = {p.name: zero3_partition_numel(p.numel, world_size) for p in params}
            persistent = sum(p.numel for p in params if p.numel <= ZERO3_PERSISTENCE_THRESHOLD)
            p_bytes = low * sum(part.values()) + low * persistent
            grads = low * sum(part[p.name] for p in params if p.trainable)
            master = sum(part[p.name] for p in params if p.trainable)
            teacher = 4 * sum(part[p.name] for p in encoder)
            # Gathered for compute: one block and the prefetched one (the whole encoder's outside
            # parameters during a forward).
            gathered = 2 * largest_block * low + teacher_outside * low
        else:
            groups = deepspeed_groups(params)
            flats = [zero12_partition_numel(sum(p.numel for p in g), world_size) for g in groups]
            p_bytes = low * sum(f * world_size for f in flats)
            master = sum(flats)
            grads = low * (sum(f * world_size for f in flats) if stage == 1 else master)
            n_enc = sum(1 for g in groups if g[0].part == "encoder")
            teacher = 4 * sum(flats[:n_enc])
            gathered = 4 * sum(flats[:n_enc]) * world_size  # the teacher's forward gathers its groups
        own_master = master * 4 if low != 4 or row != "zero3" else 0  # ZeRO-1/2 always clones its fp32 piece
        optimizer = own_master + 8 * master
    shape = micro_batch or micro_batch_shape(recipe, world_size)
    no_ac, with_ac = activation_bytes(recipe, *shape)
    return MemoryEstimate(row, world_size, p_bytes, grads, optimizer, teacher, gathered, no_ac, with_ac,
                          f"{shape[0]} x {shape[1]} positions")


def estimate_table(recipe: Recipe, world_size: int) -> list[MemoryEstimate]:
    """One row per engine that runs at this world size: single only on one rank, ddp on more."""
    rows = ["single"] if world_size == 1 else ["ddp"]
    rows += ["fsdp", "zero1", "zero2", "zero3"]
    shape = micro_batch_shape(recipe, world_size)
    return [estimate(recipe, world_size, r, micro_batch=shape) for r in rows]


# ----------------------------------------------------------------------------- activations
def sequence_length(recipe: Recipe, audio_samples: int | None = None) -> int:
    """Encoder positions per sample (speech: for ``audio_samples``, default the longest crop)."""
    from scaling.modalities import spec_for

    return spec_for(recipe.model.modality).positions(recipe, audio_samples)


def micro_batch_shape(recipe: Recipe, world_size: int) -> tuple[int, int]:
    """(samples, encoder positions each) of one micro-batch at this world size. When the global
    batch does not split over the world size, the recipe's ``train.micro_batch_size``."""
    from scaling.plan import BatchPlan

    try:  # warn=False: a micro-batch much smaller than asked is one of the plan's notes, not repeated here
        plan = BatchPlan.from_config(recipe.train, world_size, recipe.data.speech.sample_rate, warn=False)
    except ValueError:
        return max(1, recipe.train.micro_batch_size), sequence_length(recipe)
    audio = getattr(plan, "micro_batch_audio_samples", 0)
    if audio:  # seconds of padded audio: B x longest clip; activations scale with B x T
        clips = max(1, round(audio / min(recipe.data.speech.max_samples, audio)))
        return clips, sequence_length(recipe, audio // clips)
    return plan.micro_batch_size, sequence_length(recipe)


def activation_bytes(recipe: Recipe, batch: int, positions: int) -> tuple[int, int]:
    """(without, with activation checkpointing) bytes autograd keeps for one micro-batch; the
    formula and its assumptions are in the module docstring."""
    from scaling.modalities import spec_for

    m = recipe.model
    a = _low_bytes(recipe.train.precision)
    D, F, H, L = m.dim, m.ffn_dim, m.heads, m.depth
    BT = batch * positions
    mask = (2 * D if m.dropout > 0 else 0) + (F if m.activation_dropout > 0 else 0)
    lse = 4 * H  # SDPA log-sum-exp, fp32
    spec = spec_for(m.modality)
    per_block = a * (8 * D + 2 * F) + spec.block_extra_bytes(m, a) + mask + lse
    block = BT * per_block
    teacher = BT * (recipe.objective.top_k * a * D + a * (4 * D + F) + 8 * D)
    head_width = {"linear": D, "mlp": 5 * D, "norm_linear": 2 * D}[m.head]
    head = BT * (a * head_width + 8 * D)  # head input/hidden, fp32 prediction and target
    frontend = spec.frontend_bytes(recipe, batch, positions, a)
    outside = frontend + teacher + head
    no_ac = L * block + outside
    with_ac = L * BT * a * D + block + outside
    return int(no_ac), int(with_ac)
