"""A plain data2vec v1 training step written on HF transformers, the way a user would write it
without this repository's framework: the reference that ``benchmarks/step_vs_hf.py`` times ours
against and that ``tests/test_step_vs_hf.py`` checks ours against, loss for loss.

What it is made of (docs/data2vec.md §1-§2):

- student: transformers' ``Data2VecAudioModel`` / ``Data2VecVisionModel`` / ``Data2VecTextModel``
  in train mode, plus the recipe's regression head as plain modules (speech ``final_proj``
  ``nn.Linear``; text ``regression_head`` Linear-GELU-Linear; vision ``lm_head`` ``nn.Linear`` after
  HF's final ``layernorm``, which is our ``head.norm``);
- teacher: ``copy.deepcopy`` of the student's HF model, in eval mode, run under ``no_grad`` on the
  unmasked input;
- masking: HF's own mask path: ``mask_time_indices`` (speech: ``masked_spec_embed``),
  ``bool_masked_pos`` (vision: ``mask_token``); text gets our collate's ``input_tokens_BT``, in
  which the masked ids are already ``<mask>``;
- targets: the mean of the teacher's top-K taps, each normalised in fp32 (instance norm over time
  for speech, layer norm over features for text and vision), then a layer norm for vision; the
  loss summed over masked positions and feature dims, times the recipe's scale, divided by the
  masked count (Smooth-L1 and L2 written out here, not taken from ``scaling.objective``);
- optimiser: ``torch.optim.AdamW`` with its defaults for the implementation, two groups (1-D
  parameters without weight decay, docs/data2vec.md §7.7), the recipe's LR schedule (the factor
  comes from ``scaling.optim.lr_factor``, a formula of the recipe, so both sides use the same LR)
  and gradient clipping;
- EMA: a Python loop ``pt.mul_(d).add_(ps, alpha=1 - d)`` over the EMA-updated parameters after
  every optimizer step, with the decay ramp written out here (fairseq ``get_annealed_rate``).

Taps (our ``tap``: ``scaling/models/blocks.py``; docs/data2vec.md §1.2) and where HF has them:

| modality | our tap | HF module whose output it is | read with |
|---|---|---|---|
| speech | ``ffn``: ``fc2`` output, before dropout, the residual add and the block's last LayerNorm | ``encoder.layers[i].feed_forward.output_dense`` | a forward hook |
| text | ``ffn`` (same definition) | ``encoder.layer[i].output.dense`` (``Data2VecTextOutput`` then adds dropout, the residual, LayerNorm) | a forward hook |
| vision | ``block``: block output after both residual adds, before the final norm; CLS dropped | ``hidden_states[i + 1][:, 1:]`` (the output of ``encoder.layer[i]``) | ``output_hidden_states=True`` |

HF's ``hidden_states`` of the post-LN speech and text models are block outputs after the last
LayerNorm, which is not the ffn tap; hence the hooks (registered on the top-K layers only).

What the teacher averages (docs/data2vec.md §2.2): speech ``encoder.layers.*`` and
``encoder.layer_norm``; text ``encoder.layer.*``; vision everything (HF's final ``layernorm`` is
averaged too; the block taps are taken before it, so it never reaches the targets). The teacher's
other parameters (speech CNN, feature projection, mask embedding and positional conv; text
embeddings) are copied from the student after every update (fairseq's ``skip_keys``), so they
equal ours, which shares them. The plain teacher still runs them again on its own (speech: the
CNN twice per step, once with and once without grad), where ours computes the frontend once.

Where the two steps are not the same model (not met by the test and benchmark settings):
padded speech batches (HF zeroes padded frames before the first positional conv layer only,
docs/hf-transformers.md; the plain instance norm counts padded frames, as fairseq, docs/data2vec.md
§7.6); LayerDrop (HF draws with ``torch.rand``, ours from its own generator); and the text model's
token-type row, which HF adds to every token and data2vec does not have: exported as zeros and
frozen here, else it would be one more trained bias.

``weights``: the student starts from our model's ``state_dict()`` exported with our adapters
(``scaling.hf.ADAPTERS[modality].hf_config`` / ``to_hf``: the code behind ``scaling-convert
to-hf``) and loaded with ``strict=True``; the head's tensors are our ``head.*``.

Importing this module builds nothing.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections import defaultdict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PlainHFStep", "RegionTimer", "sync_fn", "EMA_PREFIXES"]

# Parameters (HF names) the teacher averages; the rest are copied from the student (docs/data2vec.md §2.2).
EMA_PREFIXES = {"speech": ("encoder.layers.", "encoder.layer_norm."), "text": ("encoder.layer.",), "vision": ("",)}
_TEXT_TOKEN_TYPES = "embeddings.token_type_embeddings.weight"


def sync_fn(device: torch.device):
    """What waits for the device's queued work: ``torch.cuda.synchronize`` on CUDA, nothing on CPU."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


class RegionTimer:
    """Seconds per named region, with a device synchronize on both sides of each region (for
    split measurements only: the syncs would change what a timed step costs)."""

    def __init__(self, device: torch.device):
        self.sync = sync_fn(device)
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def region(self, name: str):
        self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[name] += time.perf_counter() - t0


def _no_region(name: str):
    return contextlib.nullcontext()


def _head(kind: str, dim: int, state: dict[str, Tensor]) -> nn.Module:
    """The recipe's regression head as plain modules, with our ``head.*`` tensors."""
    if kind == "linear":  # speech final_proj
        head = nn.Linear(dim, dim)
        head.load_state_dict({"weight": state["head.proj.weight"], "bias": state["head.proj.bias"]})
    elif kind == "mlp":  # text regression_head
        head = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        head.load_state_dict({"0.weight": state["head.fc1.weight"], "0.bias": state["head.fc1.bias"],
                              "2.weight": state["head.fc2.weight"], "2.bias": state["head.fc2.bias"]})
    elif kind == "norm_linear":  # vision lm_head; its LayerNorm is HF's final layernorm, inside the model
        head = nn.Linear(dim, dim)
        head.load_state_dict({"weight": state["head.proj.weight"], "bias": state["head.proj.bias"]})
    else:
        raise ValueError(f"model.head {kind!r} has no plain counterpart here (linear | mlp | norm_linear)")
    return head


class PlainHFStep:
    """One data2vec v1 optimizer step per :meth:`step` call, on HF transformers' models.

    ``recipe``: a resolved recipe (``scaling.plan.resolve(recipe, 1).resolved()``: the LR and step
    counts that the run trains with). ``student_state``: our ``Data2Vec.state_dict()`` to start from.
    ``precision``: ``fp32`` or ``bf16`` (autocast around the student's and the teacher's forward,
    as our engines do; targets and loss in fp32).
    """

    def __init__(self, recipe, student_state: dict[str, Tensor], *, device: str | torch.device = "cpu",
                 precision: Optional[str] = None):
        from transformers import AutoModel

        from scaling.hf import ADAPTERS
        from scaling.optim import lr_factor

        m = recipe.model
        self.modality = m.modality
        self.device = torch.device(device)
        self.objective = recipe.objective
        self.ema_cfg = recipe.ema
        self.grad_clip = recipe.optim.grad_clip
        self.top_k = recipe.objective.top_k
        precision = precision or recipe.train.precision
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision {precision!r}: the plain HF step runs fp32 or bf16")
        self.precision = precision
        self.timer: Optional[RegionTimer] = None  # set for split measurements only

        adapter = ADAPTERS[m.modality]
        student = AutoModel.from_config(adapter.hf_config(recipe), **adapter.MODEL_KWARGS)
        student.load_state_dict(adapter.to_hf(student_state, recipe), strict=True)
        if m.modality == "text":  # zeros in the export; data2vec has no segment embedding to train
            student.get_parameter(_TEXT_TOKEN_TYPES).requires_grad_(False)
        self.student = student.to(self.device).train()
        self.head = _head(m.head, m.dim, student_state).to(self.device).train()
        self.teacher = copy.deepcopy(self.student).eval()
        self.teacher.requires_grad_(False)

        teacher_params = dict(self.teacher.named_parameters())
        self._ema_pairs, self._copied_pairs = [], []
        for name, ps in self.student.named_parameters():
            pair = (teacher_params[name], ps)
            (self._ema_pairs if name.startswith(EMA_PREFIXES[m.modality]) else self._copied_pairs).append(pair)

        self._taps: list[Tensor] = []
        if m.modality == "speech":
            tap_modules = [layer.feed_forward.output_dense for layer in self.teacher.encoder.layers]
        elif m.modality == "text":
            tap_modules = [layer.output.dense for layer in self.teacher.encoder.layer]
        else:
            tap_modules = []  # vision: the block taps are HF's hidden_states
        for module in tap_modules[len(tap_modules) - self.top_k:]:
            module.register_forward_hook(lambda _module, _inputs, out: self._taps.append(out))

        params = [p for p in list(self.student.parameters()) + list(self.head.parameters()) if p.requires_grad]
        self.params = params
        o = recipe.optim
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for p in params if p.ndim > 1], "weight_decay": o.weight_decay},
             {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}],
            lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        schedule, max_steps = recipe.schedule, recipe.train.max_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lambda s: lr_factor(schedule, s, max_steps))
        self.num_updates = 0

    # ------------------------------------------------------------------ pieces
    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _student(self, batch: dict[str, Tensor], mask_BT: Tensor) -> Tensor:
        """Head output at the masked positions, in row-major order of ``mask_BT``."""
        if self.modality == "speech":
            padding = batch.get("audio_padding_BT")
            out = self.student(input_values=batch["audio_BT"], mask_time_indices=mask_BT,
                               attention_mask=None if padding is None else (~padding).long())
            x = out.last_hidden_state
        elif self.modality == "vision":
            x = self.student(pixel_values=batch["image_BCHW"], bool_masked_pos=mask_BT).last_hidden_state[:, 1:]
        else:
            out = self.student(input_ids=batch["input_tokens_BT"], attention_mask=(~batch["padding_mask_BT"]).long())
            x = out.last_hidden_state
        return self.head(x[mask_BT])

    @torch.no_grad()
    def _teacher_taps(self, batch: dict[str, Tensor]) -> list[Tensor]:
        self._taps = []
        if self.modality == "speech":
            padding = batch.get("audio_padding_BT")
            self.teacher(input_values=batch["audio_BT"], attention_mask=None if padding is None else (~padding).long())
            return self._taps
        if self.modality == "vision":
            out = self.teacher(pixel_values=batch["image_BCHW"], output_hidden_states=True)
            return [h[:, 1:] for h in out.hidden_states[-self.top_k:]]
        self.teacher(input_ids=batch["tokens_BT"], attention_mask=(~batch["padding_mask_BT"]).long())
        return self._taps

    @staticmethod
    def _normalise(x_BTD: Tensor, kind: str) -> Tensor:
        if kind == "instance":  # each channel over time, per sample (fairseq instance_norm_target_layer)
            return F.instance_norm(x_BTD.transpose(1, 2), eps=1e-5).transpose(1, 2)
        if kind == "layer":
            return F.layer_norm(x_BTD, x_BTD.shape[-1:], eps=1e-5)
        return x_BTD

    def _targets(self, taps: list[Tensor]) -> Tensor:
        obj = self.objective
        y = sum(self._normalise(t.float(), obj.layer_norm) for t in taps) / len(taps)
        return self._normalise(y, obj.post_norm)

    def _loss_sum(self, pred_ND: Tensor, target_ND: Tensor) -> Tensor:
        obj = self.objective
        d = pred_ND.float() - target_ND
        D = d.shape[-1]
        if obj.loss == "l2":
            per_elem = d.square()
        elif obj.beta > 0:  # Smooth-L1: 0.5 x^2 / beta below beta, |x| - 0.5 beta above
            a = d.abs()
            per_elem = torch.where(a < obj.beta, 0.5 * d.square() / obj.beta, a - 0.5 * obj.beta)
        else:
            per_elem = d.abs()
        scale = obj.loss_scale if obj.loss_scale is not None else 1.0 / math.sqrt(D)
        if obj.mean_over_dims:
            scale = scale / D
        return per_elem.sum() * scale

    def _ema_decay(self) -> float:
        e, t = self.ema_cfg, self.num_updates
        if e.decay == e.end_decay or e.anneal_steps <= 0 or t >= e.anneal_steps:
            return e.end_decay
        return e.end_decay - (e.end_decay - e.decay) * (1.0 - t / e.anneal_steps)

    # ------------------------------------------------------------------ one step
    def step(self, micro_batches: list[dict[str, Tensor]]) -> Tensor:
        """One optimizer step over ``micro_batches`` (CPU tensors, as the loader gives them). Returns
        the loss (sum over masked positions / masked count) as a device scalar: no host sync."""
        region = self.timer.region if self.timer is not None else _no_region
        num_masked = sum(int(b["mask_BT"].sum()) for b in micro_batches)  # CPU tensors: no device sync
        loss_total = None
        for batch in micro_batches:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            mask_BT = batch["mask_BT"].bool()
            with region("student fwd"), self._autocast():
                pred_ND = self._student(batch, mask_BT)
            with region("teacher fwd"), self._autocast():
                taps = self._teacher_taps(batch)
            with region("targets+loss"):
                target_ND = self._targets(taps)[mask_BT]
                loss = self._loss_sum(pred_ND, target_ND) / num_masked
            with region("student bwd"):
                loss.backward()
            loss_total = loss.detach() if loss_total is None else loss_total + loss.detach()
        with region("optimizer"):
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        with region("EMA"), torch.no_grad():
            decay = self._ema_decay()
            if decay < 1.0:  # a frozen teacher is not updated (fairseq `if self.ema.get_decay() < 1`)
                for pt, ps in self._ema_pairs:
                    pt.mul_(decay).add_(ps, alpha=1.0 - decay)
            for pt, ps in self._copied_pairs:
                pt.copy_(ps)
        self.num_updates += 1
        return loss_total
