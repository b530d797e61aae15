"""Vision <-> HF ``Data2VecVisionModel`` (transformers ``models/data2vec/modeling_data2vec_vision.py``,
BEiT's code with the data2vec names).

Exported as BEiT v1 pretraining has it: one relative-position table shared by all layers
(``use_shared_relative_position_bias``), no absolute positions, a mask token, layer scale
(``lambda_1/2`` = our ``gamma_1/2``; none when the init value is 0, on both sides), and the final
LayerNorm on every position (``use_mean_pooling=False``: HF's ``layernorm`` is our ``head.norm``).
HF's default ``layer_norm_eps`` is 1e-12; ours comes from the recipe (1e-6 for base).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from scaling.config import Recipe
from scaling.hf.common import NameMap, gelu_problems, hf_transformer_fields, our_transformer_fields

MODEL_TYPE = "data2vec-vision"
MODEL_KWARGS: dict = {}
REL_POS_TABLE = "encoder.rel_pos_bias.relative_position_bias_table"

NAMES = NameMap([
    ("encoder.patch_embed.proj.", "embeddings.patch_embeddings.projection."),
    ("encoder.cls_token", "embeddings.cls_token"),
    ("frontend.mask_token", "embeddings.mask_token"),
    (REL_POS_TABLE, "encoder.relative_position_bias.relative_position_bias_table"),
    ("encoder.blocks.{i}.norm1.", "encoder.layer.{i}.layernorm_before."),
    ("encoder.blocks.{i}.attn.q_proj.", "encoder.layer.{i}.attention.attention.query."),
    ("encoder.blocks.{i}.attn.k_proj.", "encoder.layer.{i}.attention.attention.key."),  # no bias on either side
    ("encoder.blocks.{i}.attn.v_proj.", "encoder.layer.{i}.attention.attention.value."),
    ("encoder.blocks.{i}.attn.out_proj.", "encoder.layer.{i}.attention.output.dense."),
    ("encoder.blocks.{i}.gamma_1", "encoder.layer.{i}.lambda_1"),
    ("encoder.blocks.{i}.gamma_2", "encoder.layer.{i}.lambda_2"),
    ("encoder.blocks.{i}.norm2.", "encoder.layer.{i}.layernorm_after."),
    ("encoder.blocks.{i}.fc1.", "encoder.layer.{i}.intermediate.dense."),
    ("encoder.blocks.{i}.fc2.", "encoder.layer.{i}.output.dense."),
    ("head.norm.", "layernorm."),
    ("head.proj.", None),  # [DV] lm_head: the pretraining regression head
])


# ----------------------------------------------------------------------------- export
def export_problems(recipe: Recipe, tokenizer: Optional[str]) -> list[str]:
    m, d = recipe.model, recipe.data.vision
    if m.version == 2:  # nothing else to check: the layer itself does not map
        return ["data2vec 2.0 images use post-LN blocks (LayerNorm after each residual add, fairseq AltBlock) "
                "with fixed sin-cos positions; HF's Data2VecVisionLayer is pre-LN (BEiT), so the encoder would "
                "compute something else (docs/data2vec2.md); export the checkpoint with scaling-convert "
                "consolidate instead"]
    problems = []
    if m.head != "norm_linear":
        problems.append(f"model.head {m.head!r} has no final LayerNorm: HF's layernorm is the norm of norm_linear")
    if len(d.mean) < m.vision.channels or len(d.std) < m.vision.channels:
        problems.append(f"data.vision.mean/std need {m.vision.channels} entries (model.vision.channels) "
                        "for the image processor")
    return problems


def hf_config(recipe: Recipe):
    from transformers import Data2VecVisionConfig

    m, v = recipe.model, recipe.model.vision
    return Data2VecVisionConfig(
        **hf_transformer_fields(m), hidden_dropout_prob=m.dropout, attention_probs_dropout_prob=m.attention_dropout,
        image_size=v.image_size, patch_size=v.patch_size, num_channels=v.channels,
        use_mask_token=True, use_absolute_position_embeddings=False,
        use_relative_position_bias=False, use_shared_relative_position_bias=True,
        layer_scale_init_value=max(v.layer_scale_init, 0.0), drop_path_rate=v.drop_path, use_mean_pooling=False,
    )


def to_hf(model_state: dict, recipe: Recipe) -> dict:
    return NAMES.to_hf(model_state)


def processor_writer(recipe: Recipe, tokenizer: Optional[str]) -> Callable[[Path], None]:
    from transformers import BeitImageProcessor
    from transformers.image_utils import PILImageResampling

    C, size, d = recipe.model.vision.channels, recipe.model.vision.image_size, recipe.data.vision
    # Our eval path (scaling/data/collate.py, augment off): bicubic resize straight to the model
    # size, /255, normalise with the first C entries of mean/std; no crop.
    processor = BeitImageProcessor(
        do_resize=True, size={"height": size, "width": size}, resample=PILImageResampling.BICUBIC,
        do_center_crop=False, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(d.mean[:C]), image_std=list(d.std[:C]), do_reduce_labels=False,
    )
    return processor.save_pretrained


# ----------------------------------------------------------------------------- import
def _side(value) -> int:
    return int(value[0]) if isinstance(value, (list, tuple)) else int(value)


def import_problems(config) -> list[str]:
    problems = []
    if config.use_relative_position_bias:
        problems.append("use_relative_position_bias=True: ours has one relative-position table shared by all layers")
    if config.use_absolute_position_embeddings:
        problems.append("use_absolute_position_embeddings=True: ours has no absolute position embeddings")
    if config.use_mean_pooling:
        problems.append("use_mean_pooling=True: the final LayerNorm (our head.norm) is not applied to the sequence")
    problems += gelu_problems(config, "hidden_act")
    for name in ("image_size", "patch_size"):
        value = getattr(config, name)
        if isinstance(value, (list, tuple)) and len(set(value)) != 1:
            problems.append(f"{name}={list(value)}: ours is square")
    if _side(config.image_size) % _side(config.patch_size):
        problems.append(f"patch_size {_side(config.patch_size)} does not divide image_size {_side(config.image_size)}")
    return problems


def load_overrides(config) -> dict:
    # Build mask_token always, so a checkpoint without one shows as a missing key (refused).
    return {"use_mask_token": True}


def weight_problems(hf_state: dict, config) -> list[str]:
    return []


def from_hf(hf_state: dict, config) -> dict:
    ours = NAMES.from_hf(hf_state)
    if REL_POS_TABLE not in ours:
        # No relative positions at all: a zero shared table adds nothing, so it is the same model.
        grid = _side(config.image_size) // _side(config.patch_size)
        ours[REL_POS_TABLE] = torch.zeros((2 * grid - 1) ** 2 + 3, config.num_attention_heads)
    return ours


def model_section(config, hf_dir: Path) -> dict:
    return {
        "modality": "vision", **our_transformer_fields(config),
        "dropout": config.hidden_dropout_prob, "attention_dropout": config.attention_probs_dropout_prob,
        "head": "norm_linear",
        "vision": {
            "image_size": _side(config.image_size), "patch_size": _side(config.patch_size),
            "channels": config.num_channels, "layer_scale_init": max(float(config.layer_scale_init_value), 0.0),
            "drop_path": config.drop_path_rate,
        },
    }


def data_hints(hf_dir: Path, config) -> dict:
    if not (hf_dir / "preprocessor_config.json").is_file():
        return {}
    from transformers import AutoImageProcessor

    processor, C = AutoImageProcessor.from_pretrained(hf_dir), config.num_channels
    if not processor.do_normalize:  # our pipeline always normalises: mean 0, std 1 is the same as none
        return {"vision": {"mean": [0.0] * C, "std": [1.0] * C}}

    def per_channel(value) -> list[float]:
        return [float(x) for x in value] if isinstance(value, (list, tuple)) else [float(value)] * C

    return {"vision": {"mean": per_channel(processor.image_mean), "std": per_channel(processor.image_std)}}
