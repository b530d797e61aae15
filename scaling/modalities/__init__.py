"""What differs between speech, vision and text, behind one small spec per modality.

Everything else (the student's ``frontend -> encoder -> head | decoder`` contract, the EMA teacher, the
objective, the trainer, the engines, checkpoints) is shared and never asks which modality it runs. A
modality is one file here, :mod:`scaling.modalities.speech`, ``vision`` or ``text``, holding

- its **sample processor**: decode a webdataset sample, crop/augment, draw its masks on the data worker,
  and the batch keys it collates (:class:`scaling.data.collate.SampleProcessor` does the rest);
- its **synthetic source**: learnable synthetic samples (``data.train_shards=synthetic``), on the CPU and
  made on the device (``data.synthetic_on_device``);
- which **model** pieces it builds for data2vec v1 and 2.0 (the nn.Modules live in ``scaling/models``);
- its **HF adapter** module (``scaling/hf``) and **demo data** builder (``scaling/data/demo_sets.py``);
- the few numbers the **cost models** need (:mod:`scaling.flops`, :mod:`scaling.memory`,
  :mod:`scaling.plan`): encoder positions per sample, the frontend's FLOPs and activation bytes.

and registering one :class:`ModalitySpec` (``SPEC``). Callers look the spec up with
:func:`spec_for` instead of branching on ``model.modality``. Adding a modality means one new file and one
line in :func:`all_specs`.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    from torch import nn

    from scaling.config import ModelConfig, Recipe

__all__ = ["ModalitySpec", "all_specs", "spec_for", "build_processor"]


@dataclass(frozen=True)
class ModalitySpec:
    """One modality's pieces (module docstring). Functions take the configs they need, nothing more."""

    name: str
    processor: type  # a scaling.data.collate.SampleProcessor subclass
    # data2vec v1: (frontend, encoder, head initialiser); 2.0: (frontend, encoder, decoder).
    build_v1: Callable[["ModelConfig"], tuple["nn.Module", "nn.Module", Callable]]
    build_v2: Callable[["ModelConfig"], tuple["nn.Module", "nn.Module", "nn.Module"]]
    hf_adapter: str  # module name, imported on use (scaling.hf imports the data package)
    # The synthetic sample of a global index: (decoded sample, label) from the sample's rng.
    synthetic_sample: Callable
    # data.synthetic_on_device: an index's item description, and a batch of them made on the device.
    device_item: Callable
    device_batch: Callable
    demo_data: Callable  # out_dir -> (recipe overrides, builder info)
    # ---- cost models
    positions: Callable[["Recipe", Optional[int]], int]  # encoder positions per sample (CLS included)
    cls_positions: int  # encoder positions that are not input positions (vision: CLS)
    decoder_kernel_dims: int  # the 2.0 decoder's conv: 2 for images, 1 for sequences
    # FLOPs of the frontend for one sample of T encoder positions (speech: n audio samples): the part in
    # the encoder's scope runs in the teacher too (teacher_embeds).
    frontend_flops: Callable[["ModelConfig", int, Optional[int]], float]
    teacher_embeds: bool  # the teacher runs its own embedding (vision v1 and 2.0: the patch embedding)
    positional_conv_flops: Callable[["ModelConfig", int], float]  # speech's positional conv on T frames
    row_lengths: Callable  # (cfg, batch) -> (real encoder positions per row, audio samples per row | None)
    frontend_bytes: Callable[["Recipe", int, int, int], int]  # activation bytes (recipe, batch, positions, a)
    block_extra_bytes: Callable[["ModelConfig", int], int]  # per position and block, beyond the shared ones
    sample_id_shift: int = 0  # text: blocks of a document share its id in sample_id >> 16

    def hf(self) -> ModuleType:
        return importlib.import_module(self.hf_adapter)


@functools.cache
def all_specs() -> dict[str, ModalitySpec]:
    """Every registered modality's spec, by name (the modality files are imported on first use: they
    import the data and model packages, which import this one)."""
    from scaling.modalities import speech, text, vision

    return {m.SPEC.name: m.SPEC for m in (speech, vision, text)}


def spec_for(modality: str) -> ModalitySpec:
    """The spec of ``model.modality``; ValueError naming the known ones."""
    specs = all_specs()
    if modality not in specs:
        raise ValueError(f"unknown model.modality {modality!r}; expected one of {sorted(specs)}")
    return specs[modality]


def build_processor(data_cfg, model_cfg, masking_cfg, seed: int, *, device_stage: bool = False):
    """The sample processor of ``model_cfg.modality``."""
    return spec_for(model_cfg.modality).processor(data_cfg, model_cfg, masking_cfg, seed, device_stage=device_stage)
