"""HF transformers export and import of our data2vec v1 encoders.

``export_pretrained`` writes a directory that ``transformers.AutoModel.from_pretrained`` loads into
``Data2VecAudioModel`` / ``Data2VecVisionModel`` / ``Data2VecTextModel``, with the processor a user
needs (feature extractor, image processor, or tokenizer plus our sentencepiece model).
``import_pretrained`` reads such a directory back into our names. The per-modality facts (name
maps, config fields, what is refused and why) live in ``scaling/hf/{speech,vision,text}.py``;
docs/hf-transformers.md says what equality holds where.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from scaling.config import Recipe
from scaling.modalities import all_specs
from scaling.hf.common import refuse

__all__ = ["export_pretrained", "import_pretrained"]

# Each modality names its adapter module in its spec (scaling.modalities).
ADAPTERS: dict[str, ModuleType] = {name: spec.hf() for name, spec in all_specs().items()}
BY_MODEL_TYPE: dict[str, ModuleType] = {a.MODEL_TYPE: a for a in ADAPTERS.values()}


def _fit_problems(model, hf_state: dict[str, Tensor], adapter: ModuleType) -> list[str]:
    """What keeps ``hf_state`` from loading strictly into ``model``, in our names."""
    expected = model.state_dict()
    missing = sorted(adapter.NAMES.from_hf(dict.fromkeys(expected.keys() - hf_state.keys())))
    extra = sorted(adapter.NAMES.from_hf(dict.fromkeys(hf_state.keys() - expected.keys())))
    wrong = [f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}"
             for k, v in hf_state.items() if k in expected and v.shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"model_state lacks {len(missing)} keys that recipe.model has, e.g. {missing[:3]}")
    if extra:
        problems.append(f"model_state has {len(extra)} keys that recipe.model has not, e.g. {extra[:3]}")
    if wrong:
        problems.append(f"model_state shapes differ from recipe.model's (HF names): {wrong[:3]}")
    return problems


def export_pretrained(recipe: Recipe, model_state: dict[str, Tensor], out_dir: str | Path, *,
                      tokenizer: Optional[str] = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (by transformers' own ``save_pretrained``) and the
    processor files into ``out_dir``. ``model_state`` has the keys of ``Data2Vec.state_dict()``; the
    regression head is dropped. ``tokenizer`` (text only): the sentencepiece model, default
    ``recipe.data.text.tokenizer``. Raises ValueError, before writing anything, for what HF cannot
    represent exactly."""
    from transformers import AutoModel

    modality = recipe.model.modality
    adapter = ADAPTERS[modality]
    what = f"export this {modality} model to HF transformers"
    problems = adapter.export_problems(recipe, tokenizer)
    if tokenizer is not None and modality != "text":
        problems.append(f"tokenizer= is for text models, this one is {modality}")
    refuse(problems, what)

    model = AutoModel.from_config(adapter.hf_config(recipe), **adapter.MODEL_KWARGS)
    hf_state = adapter.to_hf(model_state, recipe)
    refuse(_fit_problems(model, hf_state, adapter), what)
    model.load_state_dict(hf_state, strict=True)
    write_processor = adapter.processor_writer(recipe, tokenizer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    write_processor(out)
    return out


def import_pretrained(hf_dir: str | Path) -> tuple[dict, dict[str, Tensor], dict]:
    """Read an HF Data2Vec{Audio,Vision,Text} directory (any head class; transformers strips the
    prefix). Returns ``(model section, tensors in our names, data-section hints)``: the model section
    is a ``model:`` recipe mapping, the tensors cover frontend.* and encoder.* (and head.norm for
    vision), everything but the randomly initialised regression head. Raises ValueError for what our
    model cannot represent."""
    from transformers import AutoConfig, AutoModel

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ValueError(f"{hf_dir} has no config.json: not an HF model directory")
    config = AutoConfig.from_pretrained(hf_dir)
    adapter = BY_MODEL_TYPE.get(config.model_type)
    if adapter is None:
        raise ValueError(f"{hf_dir}: model_type {config.model_type!r} is not one of {sorted(BY_MODEL_TYPE)}")
    what = f"import {hf_dir}"
    refuse(adapter.import_problems(config), what)

    model, info = AutoModel.from_pretrained(hf_dir, output_loading_info=True, dtype=torch.float32,
                                            **adapter.MODEL_KWARGS, **adapter.load_overrides(config))
    hf_state = model.state_dict()
    problems = [f"the checkpoint lacks {k}" for k in sorted(info["missing_keys"])]
    refuse(problems + adapter.weight_problems(hf_state, model.config), what)
    ours = adapter.from_hf(hf_state, model.config)
    return adapter.model_section(model.config, hf_dir), ours, adapter.data_hints(hf_dir, model.config)
