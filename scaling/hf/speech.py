"""Speech <-> HF ``Data2VecAudioModel`` (transformers ``models/data2vec/modeling_data2vec_audio.py``).

The architectures match layer for layer; what differs is fixed in HF's code and checked here:
its conv-encoder LayerNorms (``Data2VecAudioConvLayer``) and positional-conv LayerNorms
(``Data2VecAudioPositionalConvLayer``) are built without ``eps`` (PyTorch's 1e-5), only the feature
projection and the transformer use ``config.layer_norm_eps``; we use one eps for all. HF's
``num_conv_pos_embeddings`` is the number of positional conv layers and ``conv_pos_kernel_size``
their kernel (ours: ``max(3, conv_pos_width // conv_pos_depth)``, scaling/models/speech.py).
Padded clips differ by design: HF zeroes padded frames before the first positional conv layer
only, we zero them before every one (docs/hf-transformers.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from scaling.config import Recipe
from scaling.hf.common import NameMap, gelu_problems, hf_transformer_fields, our_transformer_fields

MODEL_TYPE = "data2vec-audio"
MODEL_KWARGS: dict = {}
HF_FIXED_EPS = 1e-5  # nn.LayerNorm's default, what HF's conv and pos-conv norms use

NAMES = NameMap([
    ("frontend.feature_extractor.", "feature_extractor."),
    ("frontend.feature_projection.", "feature_projection."),
    ("frontend.mask_emb", "masked_spec_embed"),
    ("frontend.pos_conv.layers.", "encoder.pos_conv_embed.layers."),
    ("encoder.layer_norm.", "encoder.layer_norm."),
    ("encoder.blocks.{i}.attn.", "encoder.layers.{i}.attention."),  # q_proj/k_proj/v_proj/out_proj on both sides
    ("encoder.blocks.{i}.norm1.", "encoder.layers.{i}.layer_norm."),
    ("encoder.blocks.{i}.fc1.", "encoder.layers.{i}.feed_forward.intermediate_dense."),
    ("encoder.blocks.{i}.fc2.", "encoder.layers.{i}.feed_forward.output_dense."),
    ("encoder.blocks.{i}.norm2.", "encoder.layers.{i}.final_layer_norm."),
    ("head.", None),  # fairseq final_proj: the pretraining regression head
])


# ----------------------------------------------------------------------------- export
def export_problems(recipe: Recipe, tokenizer: Optional[str]) -> list[str]:
    m = recipe.model
    if m.version == 2:
        return ["data2vec 2.0 speech attends with ALiBi biases (a learned scale per head), which HF's "
                "Data2VecAudio attention does not have, so the encoder would compute something else "
                "(docs/data2vec2.md); export the checkpoint with scaling-convert consolidate instead"]
    problems = []
    if m.layer_norm_eps != HF_FIXED_EPS:
        problems.append(f"model.layer_norm_eps {m.layer_norm_eps} is not {HF_FIXED_EPS}: HF's conv-encoder and "
                        "positional-conv LayerNorms always use 1e-5, ours use model.layer_norm_eps")
    return problems


def hf_config(recipe: Recipe):
    from transformers import Data2VecAudioConfig

    from scaling.models.speech import pos_conv_kernel

    m, s = recipe.model, recipe.model.speech
    kernel = pos_conv_kernel(s.conv_pos_width, s.conv_pos_depth)
    return Data2VecAudioConfig(
        **hf_transformer_fields(m), feat_extract_activation="gelu",
        hidden_dropout=m.dropout, attention_dropout=m.attention_dropout, activation_dropout=m.activation_dropout,
        feat_proj_dropout=s.feature_dropout, layerdrop=s.layerdrop,
        conv_dim=[c for c, _, _ in s.conv_layers], conv_kernel=[k for _, k, _ in s.conv_layers],
        conv_stride=[st for _, _, st in s.conv_layers], conv_bias=False,
        num_conv_pos_embeddings=s.conv_pos_depth, conv_pos_kernel_size=kernel,
        num_conv_pos_embedding_groups=s.conv_pos_groups,
    )  # mask_time_prob keeps HF's default (> 0), so the model has masked_spec_embed


def to_hf(model_state: dict, recipe: Recipe) -> dict:
    return NAMES.to_hf(model_state)


def processor_writer(recipe: Recipe, tokenizer: Optional[str]) -> Callable[[Path], None]:
    from transformers import Wav2Vec2FeatureExtractor

    d = recipe.data.speech
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=d.sample_rate, padding_value=0.0,
                                         do_normalize=d.normalize, return_attention_mask=True)
    return extractor.save_pretrained


# ----------------------------------------------------------------------------- import
def import_problems(config) -> list[str]:
    problems = []
    if config.layer_norm_eps != HF_FIXED_EPS:
        problems.append(f"layer_norm_eps {config.layer_norm_eps} is not {HF_FIXED_EPS}: HF applies it to the feature "
                        "projection and transformer only (conv norms stay 1e-5), ours to every norm")
    if config.conv_bias:
        problems.append("conv_bias=True: our conv feature encoder has no biases")
    problems += gelu_problems(config, "hidden_act", "feat_extract_activation")
    if getattr(config, "feat_extract_norm", "layer") != "layer":
        problems.append(f"feat_extract_norm={config.feat_extract_norm!r}: Data2VecAudioModel and ours only have "
                        "layer-normed conv layers, so the checkpoint is for another architecture")
    if config.add_adapter:
        problems.append("add_adapter=True: the adapter conv layers have no counterpart")
    if config.num_conv_pos_embeddings < 1:
        problems.append(f"num_conv_pos_embeddings={config.num_conv_pos_embeddings}: "
                        "ours needs 1+ positional conv layers")
    if config.conv_pos_kernel_size < 3:
        problems.append(f"conv_pos_kernel_size={config.conv_pos_kernel_size}: our kernel is max(3, width // depth)")
    return problems


def load_overrides(config) -> dict:
    # HF only builds masked_spec_embed when some masking probability is > 0; build it always, so a
    # checkpoint without it shows as a missing key (refused) instead of silently lacking mask_emb.
    return {} if config.mask_time_prob > 0 or config.mask_feature_prob > 0 else {"mask_time_prob": 0.05}


def weight_problems(hf_state: dict, config) -> list[str]:
    return []


def from_hf(hf_state: dict, config) -> dict:
    return NAMES.from_hf(hf_state)


def model_section(config, hf_dir: Path) -> dict:
    depth, kernel = config.num_conv_pos_embeddings, config.conv_pos_kernel_size
    return {
        "modality": "speech", **our_transformer_fields(config),
        "dropout": config.hidden_dropout, "attention_dropout": config.attention_dropout,
        "activation_dropout": config.activation_dropout, "head": "linear",
        "speech": {
            "conv_layers": [list(c) for c in zip(config.conv_dim, config.conv_kernel, config.conv_stride)],
            # HF stores the kernel; kernel x depth is the width that gives it back (width // depth).
            "conv_pos_depth": depth, "conv_pos_width": kernel * depth,
            "conv_pos_groups": config.num_conv_pos_embedding_groups,
            "feature_dropout": config.feat_proj_dropout, "layerdrop": config.layerdrop,
        },
    }


def data_hints(hf_dir: Path, config) -> dict:
    if not (hf_dir / "preprocessor_config.json").is_file():
        return {}
    from transformers import AutoFeatureExtractor

    extractor = AutoFeatureExtractor.from_pretrained(hf_dir)
    return {"speech": {"sample_rate": extractor.sampling_rate, "normalize": bool(extractor.do_normalize)}}
