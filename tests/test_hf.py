"""HF transformers adapters (scaling/hf): an export loads into transformers' own Data2Vec*Model and
computes what ours computes on every layer; an import gives our tensors back; what cannot be
represented is refused with its reason; the processor files reproduce our preprocessing."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from transformers import AutoConfig, AutoFeatureExtractor, AutoImageProcessor, AutoModel, AutoTokenizer

from scaling.config import TextDataConfig, load_recipe, recipe_from_dict
from scaling.data.build import train_tokenizer
from scaling.modalities import build_processor
from scaling.hf import export_pretrained, import_pretrained
from scaling.models import build_model
from scaling.models.speech import conv_output_length

HF_CLASS = {"speech": "Data2VecAudioModel", "vision": "Data2VecVisionModel", "text": "Data2VecTextModel"}
# ModelConfig fields that no HF config field holds (docs/hf-transformers.md): they come back as defaults.
# init_from says where a run's weights come from, not what the model is.
# An import gives a v1 model section (version, v2: the defaults): HF's classes hold an encoder, not a 2.0 student.
NOT_CARRIED = {"speech": {"init_from", "version", "v2"}, "vision": {"activation_dropout", "init_from", "version", "v2"},
               "text": {"activation_dropout", "init_from", "version", "v2"}}
TOL = 1e-4
MASK_ID = 4  # <mask> in SPECIAL_PIECES and model.text.mask_id of both text recipes
RECIPES = Path(__file__).resolve().parents[1] / "recipes"

WORDS = ("the quick brown fox jumps over a lazy dog while data vectors of speech vision and text models train "
         "every layer norm attention head").split()


def corpus(seed: int, with_brackets: bool) -> list[str]:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(400)]
    lines += ["Hello, World! 123 4.5 (x) [y] a-b c_d", "Ünïcödé café naïve résumé"]
    if with_brackets:
        lines += ["<b>bold</b> a < b > c e/f", "</p> <i>x</i>"]
    return lines


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> str:
    return train_tokenizer(corpus(0, with_brackets=True), str(tmp_path_factory.mktemp("spm") / "sp"), 200)


def perturb(make, seed: int) -> torch.nn.Module:
    """``make()``'s model (seeded init) with every parameter moved off its init (LayerNorm 1/0, zero
    tables and tokens, layer scale), so a wrong or missing mapping cannot hide behind a constant."""
    torch.manual_seed(seed)
    model = make()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def sample_batch(recipe, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    m = recipe.model
    if m.modality == "speech":
        return {"audio_BT": torch.randn(2, 8000, generator=g)}  # unpadded: equal lengths
    if m.modality == "vision":
        s = m.vision.image_size
        return {"image_BCHW": torch.randn(2, m.vision.channels, s, s, generator=g)}
    tokens = torch.full((2, 12), m.text.pad_id)
    for row, n in enumerate((12, 7)):  # the second row is padded
        tokens[row, :n] = torch.randint(m.text.mask_id + 1, min(m.text.vocab_size, 1000), (n,), generator=g)
        tokens[row, 0], tokens[row, n - 1] = 0, 2
    return {"tokens_BT": tokens}


def our_layers(model, batch: dict) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Every block's output at encoder positions (vision: patches, then our head.norm of the last)
    and the padding mask. Unmasked: the teacher's input, as scaling/probe.py runs the encoder. With a
    ``mask_BT`` in the batch: the student's input, masked with our mask embedding / mask token."""
    masked = "mask_BT" in batch
    if model.modality == "speech":
        T = conv_output_length(batch["audio_BT"].shape[-1], model.frontend.conv_layers)
    elif model.modality == "vision":
        T = model.encoder.num_patches
    else:
        T = batch["tokens_BT"].shape[1]
        inputs = batch["tokens_BT"].masked_fill(batch["mask_BT"], MASK_ID) if masked else batch["tokens_BT"]
        batch = {**batch, "input_tokens_BT": inputs, "padding_mask_BT": batch["tokens_BT"].eq(model.frontend.pad_id)}
    B = next(iter(batch.values())).shape[0]
    with torch.no_grad():
        fo = model.frontend({"mask_BT": torch.zeros(B, T, dtype=torch.bool), **batch})
        x = fo.student_x if masked else fo.teacher_x
        token = {"mask_embedding_D": model.frontend.mask_token} if masked and model.modality == "vision" else {}
        eo = model.encoder(x, padding_mask_BT=fo.padding_mask_BT, mask_BT=fo.mask_BT if masked else None,
                           num_taps=len(model.encoder.blocks), tap="block", **token)
        layers = list(eo.taps) + ([model.head.norm(eo.x_BTD)] if model.modality == "vision" else [])
    return layers, fo.padding_mask_BT


def hf_layers(hf, batch: dict) -> list[torch.Tensor]:
    mask = batch.get("mask_BT")
    with torch.no_grad():
        if "audio_BT" in batch:
            padding = batch.get("audio_padding_BT")
            out = hf(batch["audio_BT"], attention_mask=None if padding is None else (~padding).long(),
                     mask_time_indices=mask, output_hidden_states=True)
        elif "image_BCHW" in batch:
            out = hf(batch["image_BCHW"], bool_masked_pos=mask, output_hidden_states=True)
            return [h[:, 1:] for h in out.hidden_states[1:]] + [out.last_hidden_state[:, 1:]]  # CLS dropped, as ours
        else:
            tokens = batch["tokens_BT"] if mask is None else batch["tokens_BT"].masked_fill(mask, MASK_ID)
            out = hf(tokens, attention_mask=batch["tokens_BT"].ne(hf.config.pad_token_id).long(),
                     output_hidden_states=True)
    return list(out.hidden_states[1:])


def random_mask(recipe, batch: dict) -> torch.Tensor:
    """A third of the encoder positions (text: of the real tokens between <s> and </s>)."""
    m = recipe.model
    g = torch.Generator().manual_seed(7)
    if m.modality == "speech":
        T = conv_output_length(batch["audio_BT"].shape[-1], m.speech.conv_layers)
        return torch.rand(batch["audio_BT"].shape[0], T, generator=g) < 1 / 3
    if m.modality == "vision":
        patches = (m.vision.image_size // m.vision.patch_size) ** 2
        return torch.rand(batch["image_BCHW"].shape[0], patches, generator=g) < 1 / 3
    tokens = batch["tokens_BT"]
    return (torch.rand(tokens.shape, generator=g) < 1 / 3) & ~torch.isin(tokens, torch.tensor([0, 2, m.text.pad_id]))


def layer_diffs(ours: list, theirs: list, padding_BT) -> list[float]:
    assert len(ours) == len(theirs)
    keep = slice(None) if padding_BT is None else ~padding_BT
    return [(a[keep] - b[keep]).abs().max().item() for a, b in zip(ours, theirs)]


# ----------------------------------------------------------------------------- export, both sizes
@pytest.fixture(scope="module", params=[(m, s) for m in ("speech", "vision", "text") for s in ("tiny", "base")],
                ids=lambda p: "-".join(p))
def exported(request, sp_model, tmp_path_factory):
    modality, size = request.param
    recipe = load_recipe(RECIPES / modality / f"{size}.yaml", require_data=False)
    model = perturb(lambda: build_model(recipe.model), seed=1)
    out = export_pretrained(recipe, model.state_dict(), tmp_path_factory.mktemp(f"{modality}-{size}"),
                            tokenizer=sp_model if modality == "text" else None)
    return recipe, model, out


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_export_loads_into_hf_and_matches_every_layer(exported, masked):
    """Unmasked: what a user of the HF model gets. Masked (HF's mask_time_indices / bool_masked_pos /
    <mask> ids): our mask embedding and mask token are HF's."""
    recipe, model, out = exported
    hf, info = AutoModel.from_pretrained(out, output_loading_info=True)
    assert type(hf).__name__ == HF_CLASS[recipe.model.modality]
    # data2vec has no pooler: a plain AutoModel load of a text export adds a fresh one, nothing else.
    assert info["unexpected_keys"] == set() and all(k.startswith("pooler.") for k in info["missing_keys"])
    batch = sample_batch(recipe)
    if masked:
        batch["mask_BT"] = random_mask(recipe, batch)
        assert batch["mask_BT"].any()
    ours, padding = our_layers(model, batch)
    diffs = layer_diffs(ours, hf_layers(hf.eval(), batch), padding)
    print(f"{recipe.model.modality} depth {recipe.model.depth} {'masked' if masked else 'unmasked'}: "
          f"max |ours - HF| per layer {diffs}")
    assert max(diffs) <= TOL, diffs
    assert len(diffs) == recipe.model.depth + (recipe.model.modality == "vision")


def test_import_gives_back_the_exported_tensors_and_recipe(exported):
    recipe, model, out = exported
    section, tensors, hints = import_pretrained(out)
    state = model.state_dict()
    kept = {k for k in state if not k.startswith("head.") or k.startswith("head.norm.")}
    assert tensors.keys() == kept
    assert all(torch.equal(tensors[k], state[k]) for k in kept)

    modality = recipe.model.modality
    original = dataclasses.asdict(recipe.model)
    others = {"speech", "vision", "text"} - {modality}
    assert set(section) == set(original) - others - NOT_CARRIED[modality]
    assert section == {k: original[k] for k in section}
    rebuilt = build_model(recipe_from_dict({**dataclasses.asdict(recipe), "model": section}, require_data=False).model)
    assert set(rebuilt.load_state_dict(tensors, strict=False).missing_keys) == set(state) - kept

    d = recipe.data
    C = recipe.model.vision.channels
    assert hints == {
        "speech": {"speech": {"sample_rate": d.speech.sample_rate, "normalize": d.speech.normalize}},
        "vision": {"vision": {"mean": d.vision.mean[:C], "std": d.vision.std[:C]}},
        # blocks no longer than the model's positions (the import's recipe must validate)
        "text": {"text": {"block_size": min(TextDataConfig().block_size, recipe.model.text.max_positions),
                          "tokenizer": str(out / "sentencepiece.model")}},
    }[modality]


# ----------------------------------------------------------------------------- speech padding
def clip_diff(xs: list, i: int, ys: list, j: int, frames) -> float:
    """Max |x - y| over all layers, between clip i of one run and clip j of another, first frames."""
    return max((x[i, :frames] - y[j, :frames]).abs().max().item() for x, y in zip(xs, ys))


def test_speech_padding_hf_depends_on_it_ours_does_not(tmp_path):
    """HF zeroes padded frames before the first positional conv layer only: with 2+ layers the first
    layer's output at padded frames leaks into a clip's last frames. Ours zeroes them before every
    layer. Equal: any unpadded clip (alone, or the longest of a batch), and padded clips with 1 layer."""
    g = torch.Generator().manual_seed(0)
    short, long = torch.randn(6000, generator=g), torch.randn(9600, generator=g)
    padded = {"audio_BT": torch.stack([torch.cat([short, torch.zeros(3600)]), long]),
              "audio_padding_BT": torch.arange(9600)[None, :] >= torch.tensor([[6000], [9600]])}
    alone = {"audio_BT": short[None]}
    for depth in (2, 1):
        recipe = load_recipe(RECIPES / "speech" / "tiny.yaml", [f"model.speech.conv_pos_depth={depth}"])
        model = perturb(lambda: build_model(recipe.model), seed=2)
        hf = AutoModel.from_pretrained(export_pretrained(recipe, model.state_dict(), tmp_path / str(depth))).eval()
        ours_padded, padding = our_layers(model, padded)
        ours_alone, _ = our_layers(model, alone)
        hf_padded, hf_alone = hf_layers(hf, padded), hf_layers(hf, alone)
        n = int((~padding[0]).sum())  # the short clip's frames

        ours_shift = clip_diff(ours_padded, 0, ours_alone, 0, n)
        hf_vs_ours = {"alone": clip_diff(hf_alone, 0, ours_alone, 0, n),
                      "longest": clip_diff(hf_padded, 1, ours_padded, 1, None),
                      "padded": clip_diff(hf_padded, 0, ours_padded, 0, n)}
        print(f"pos-conv depth {depth}: ours padded vs alone {ours_shift:.1e}; max |HF - ours| {hf_vs_ours}")
        assert ours_shift <= 1e-5
        assert hf_vs_ours["alone"] <= TOL and hf_vs_ours["longest"] <= TOL
        if depth == 1:
            assert hf_vs_ours["padded"] <= TOL
        else:
            assert hf_vs_ours["padded"] > 1e-2  # HF's output for the clip depends on the batch's padding


# ----------------------------------------------------------------------------- from HF
def hf_config(modality: str, **overrides):
    """Small HF configs written from transformers' own defaults, not from our adapters."""
    from transformers import Data2VecAudioConfig, Data2VecTextConfig, Data2VecVisionConfig

    common = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64)
    if modality == "speech":
        return Data2VecAudioConfig(**{**dict(common, conv_dim=[16, 16], conv_kernel=[10, 3], conv_stride=[5, 2],
                                             num_conv_pos_embeddings=2, conv_pos_kernel_size=5,
                                             num_conv_pos_embedding_groups=4), **overrides})
    if modality == "vision":
        return Data2VecVisionConfig(**{**dict(common, image_size=16, patch_size=4, num_channels=1, use_mask_token=True,
                                              use_shared_relative_position_bias=True, use_mean_pooling=False),
                                       **overrides})
    return Data2VecTextConfig(**{**dict(common, vocab_size=300, max_position_embeddings=20, type_vocab_size=1),
                                 **overrides})


def save_hf(config, path, seed: int = 3, edit=None):
    """A perturbed HF model saved by transformers; text: token-type rows past 0 zeroed (single segment)."""
    kwargs = {"add_pooling_layer": False} if config.model_type == "data2vec-text" else {}
    model = perturb(lambda: AutoModel.from_config(config, **kwargs), seed)
    if config.model_type == "data2vec-text":
        with torch.no_grad():
            model.embeddings.token_type_embeddings.weight[1:] = 0
    if edit is not None:
        with torch.no_grad():
            edit(model)
    model.save_pretrained(path)
    return model


def recipe_with(section: dict, data_hints: dict | None = None):
    """The modality's tiny recipe with an imported model section and, as scaling-convert from-hf merges
    them, the import's data hints."""
    base = dataclasses.asdict(load_recipe(RECIPES / section["modality"] / "tiny.yaml"))
    for name, values in (data_hints or {}).items():
        base["data"][name] = {**base["data"][name], **values}
    return recipe_from_dict({**base, "model": section})


def our_model_from(hf_dir):
    section, tensors, hints = import_pretrained(hf_dir)
    recipe = recipe_with(section, hints)
    model = build_model(recipe.model)
    missing = model.load_state_dict(tensors, strict=False).missing_keys
    assert all(k.startswith("head.") and not k.startswith("head.norm.") for k in missing), missing
    return recipe, model.eval()


def hf_batch(modality: str) -> dict:
    if modality == "speech":
        return {"audio_BT": torch.randn(2, 400, generator=torch.Generator().manual_seed(0))}
    if modality == "vision":
        return {"image_BCHW": torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))}
    tokens = torch.tensor([[0, 7, 9, 11, 250, 2], [0, 5, 6, 2, 1, 1]])
    return {"tokens_BT": tokens}


@pytest.mark.parametrize("modality", ["speech", "vision", "text"])
def test_from_hf_then_to_hf_is_identity(modality, tmp_path, sp_model):
    from safetensors.torch import load_file

    config = hf_config(modality)

    def no_token_types(model):  # what an export writes: a non-zero row 0 would be folded into positions
        if modality == "text":
            model.embeddings.token_type_embeddings.weight.zero_()

    save_hf(config, tmp_path / "hf", edit=no_token_types)
    recipe, model = our_model_from(tmp_path / "hf")
    out = export_pretrained(recipe, model.state_dict(), tmp_path / "back",
                            tokenizer=sp_model if modality == "text" else None)
    original, back = load_file(tmp_path / "hf" / "model.safetensors"), load_file(out / "model.safetensors")
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)
    meta = {"transformers_version", "architectures", "dtype", "_name_or_path"}
    before, after = AutoConfig.from_pretrained(tmp_path / "hf").to_dict(), AutoConfig.from_pretrained(out).to_dict()
    assert {k: v for k, v in before.items() if k not in meta} == {k: v for k, v in after.items() if k not in meta}


@pytest.mark.parametrize("modality, overrides", [
    # HF adds token-type row 0 (random here) to every token; the import folds it into our positions.
    ("text", dict(type_vocab_size=2)),
    # No relative positions at all: our shared table is imported as zeros.
    ("vision", dict(use_shared_relative_position_bias=False)),
    # An HF model without layer scale (lambda) is ours with layer_scale_init 0.
    ("vision", dict(layer_scale_init_value=0.0)),
    ("speech", {}),
], ids=["text-token-types", "vision-no-relpos", "vision-no-layer-scale", "speech"])
def test_imported_model_matches_hf_on_every_layer(modality, overrides, tmp_path):
    hf = save_hf(hf_config(modality, **overrides), tmp_path)
    _, model = our_model_from(tmp_path)
    batch = hf_batch(modality)
    ours, padding = our_layers(model, batch)
    diffs = layer_diffs(ours, hf_layers(hf, batch), padding)
    print(f"imported {modality} {overrides}: max |ours - HF| per layer {diffs}")
    assert max(diffs) <= TOL, diffs


# ----------------------------------------------------------------------------- refusals
def default_ids_tokenizer(tmp_path) -> str:
    """A sentencepiece model with sentencepiece's own ids (<unk>=0 <s>=1 </s>=2, no <pad>)."""
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus(1, with_brackets=False)), vocab_size=60,
                                   model_prefix=str(tmp_path / "plain"), hard_vocab_limit=False, minloglevel=2)
    return str(tmp_path / "plain.model")


@pytest.mark.parametrize("modality, overrides, tokenizer, message", [
    ("speech", ["model.layer_norm_eps=1e-6"], None,
     r"model.layer_norm_eps 1e-06 is not 1e-05: HF's conv-encoder and positional-conv LayerNorms always use 1e-5"),
    ("speech", [], "sp", r"tokenizer= is for text models, this one is speech"),
    ("speech", ["model.version=2"], None, r"data2vec 2.0 speech attends with ALiBi biases"),
    ("vision", ["model.head=linear"], None, r"model.head 'linear' has no final LayerNorm"),
    ("vision", ["model.version=2"], None, r"data2vec 2.0 images use post-LN blocks .* HF's Data2VecVisionLayer is pre-LN"),
    ("text", [], None, r"text tokenizer '' \(data.text.tokenizer\) not found: pass tokenizer="),
    ("text", [], "missing.model", r"text tokenizer '.*missing.model' .* not found: pass tokenizer="),
    ("text", ["model.text.vocab_size=50"], "sp", r"pieces, more than model.text.vocab_size 50"),
    ("text", ["model.text.mask_id=5"], "sp", r"mask_id 5 differ from tokenizer"),
    ("text", [], "plain", r"has special ids .* ours are"),
], ids=["speech-eps", "speech-tokenizer", "speech-v2", "vision-head", "vision-v2", "text-no-tokenizer", "text-missing-tokenizer",
        "text-vocab", "text-mask-id", "text-special-ids"])
def test_export_refusals(modality, overrides, tokenizer, message, tmp_path, sp_model):
    recipe = load_recipe(RECIPES / modality / "tiny.yaml", overrides)
    paths = {"sp": sp_model, "plain": default_ids_tokenizer(tmp_path) if tokenizer == "plain" else None,
             "missing.model": str(tmp_path / "missing.model"), None: None}
    state = build_model(recipe.model).state_dict()
    with pytest.raises(ValueError, match=f"^cannot export this {modality} model to HF transformers: .*{message}"):
        export_pretrained(recipe, state, tmp_path / "out", tokenizer=paths[tokenizer])
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_state_of_another_model(tmp_path):
    recipe = load_recipe(RECIPES / "vision" / "tiny.yaml")
    state = build_model(recipe.model).state_dict()
    wider = build_model(load_recipe(RECIPES / "vision" / "tiny.yaml", ["model.ffn_dim=96"]).model).state_dict()
    with pytest.raises(ValueError,
                       match=r"model_state lacks 1 keys that recipe.model has, e.g. \['encoder.cls_token'\]"):
        export_pretrained(recipe, {k: v for k, v in state.items() if k != "encoder.cls_token"}, tmp_path / "a")
    with pytest.raises(ValueError, match=r"our key 'teacher.x' has no counterpart in the name map"):
        export_pretrained(recipe, {**state, "teacher.x": torch.zeros(1)}, tmp_path / "b")
    with pytest.raises(ValueError, match=r"model_state shapes differ .*dense.weight \(96, 64\) != \(128, 64\)"):
        export_pretrained(recipe, wider, tmp_path / "c")
    assert not any(tmp_path.iterdir())


CONFIG_REFUSALS = [
    ("speech", dict(conv_bias=True), r"conv_bias=True: our conv feature encoder has no biases"),
    ("speech", dict(layer_norm_eps=1e-6), r"layer_norm_eps 1e-06 is not 1e-05: HF applies it to the feature"),
    ("speech", dict(feat_extract_activation="relu"), r"feat_extract_activation='relu': our model uses exact GELU"),
    ("speech", dict(hidden_act="gelu_new"), r"hidden_act='gelu_new': our model uses exact GELU"),
    ("speech", dict(feat_extract_norm="group"), r"feat_extract_norm='group': .* only have layer-normed conv layers"),
    ("speech", dict(add_adapter=True), r"add_adapter=True: the adapter conv layers have no counterpart"),
    ("speech", dict(conv_pos_kernel_size=2), r"conv_pos_kernel_size=2: our kernel is max\(3, width // depth\)"),
    ("vision", dict(use_relative_position_bias=True), r"use_relative_position_bias=True: ours has one relative"),
    ("vision", dict(use_absolute_position_embeddings=True), r"use_absolute_position_embeddings=True: ours has no"),
    ("vision", dict(use_mean_pooling=True), r"use_mean_pooling=True: the final LayerNorm \(our head.norm\) is not"),
    ("vision", dict(image_size=[16, 32]), r"image_size=\[16, 32\]: ours is square"),
    ("text", dict(position_embedding_type="relative_key"), r"position_embedding_type='relative_key': ours has"),
    ("text", dict(is_decoder=True), r"is_decoder/add_cross_attention: ours is a bidirectional encoder"),
    ("text", dict(hidden_act="relu"), r"hidden_act='relu': our model uses exact GELU"),
]


@pytest.mark.parametrize("modality, overrides, message", CONFIG_REFUSALS,
                         ids=[f"{m}-{next(iter(o))}" for m, o, _ in CONFIG_REFUSALS])
def test_import_refusals_from_the_config(modality, overrides, message, tmp_path):
    hf_config(modality, **overrides).save_pretrained(tmp_path)  # config.json only: refused before any weight is read
    with pytest.raises(ValueError, match=f"^cannot import {tmp_path}: {message}"):
        import_pretrained(tmp_path)


def set_second_token_type(model):
    model.embeddings.token_type_embeddings.weight[1] = 0.5


@pytest.mark.parametrize("modality, overrides, edit, message", [
    ("text", dict(type_vocab_size=2), set_second_token_type,
     r"token_type_embeddings rows 1..1 are non-zero \(segment embeddings have no counterpart\)"),
    ("vision", dict(use_mask_token=False), None, r"the checkpoint lacks embeddings.mask_token"),
    ("speech", dict(mask_time_prob=0.0), None, r"the checkpoint lacks masked_spec_embed"),
], ids=["text-segments", "vision-no-mask-token", "speech-no-mask-embedding"])
def test_import_refusals_from_the_weights(modality, overrides, edit, message, tmp_path):
    save_hf(hf_config(modality, **overrides), tmp_path, edit=edit)
    with pytest.raises(ValueError, match=f"^cannot import {tmp_path}: {message}"):
        import_pretrained(tmp_path)


def test_import_refuses_what_is_not_a_data2vec_directory(tmp_path):
    from transformers import BertConfig

    with pytest.raises(ValueError, match=r"has no config.json: not an HF model directory"):
        import_pretrained(tmp_path)
    BertConfig(hidden_size=32, num_attention_heads=4).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model_type 'bert' is not one of \['data2vec-audio', 'data2vec-text', "
                                         r"'data2vec-vision'\]"):
        import_pretrained(tmp_path)


# ----------------------------------------------------------------------------- processors
def check_feature_extractor(recipe, out):
    d = recipe.data.speech
    fe = AutoFeatureExtractor.from_pretrained(out)
    assert type(fe).__name__ == "Wav2Vec2FeatureExtractor"
    assert (fe.sampling_rate, fe.do_normalize, fe.return_attention_mask, fe.padding_value) == \
        (d.sample_rate, d.normalize, True, 0.0)
    ours = build_processor(recipe.data, recipe.model, recipe.masking, seed=0)
    rng = np.random.default_rng(0)
    n = d.min_samples  # no crop

    def both(audio):
        return ours.items(audio, 0, 0, None)[0]["audio"], fe(audio, sampling_rate=d.sample_rate).input_values[0]

    def eps_added(x, y):  # y = (x - mean) / sqrt(var + eps)  =>  eps = var / var(y) - var
        var = x.astype(np.float64).var()
        return var / y.astype(np.float64).var() - var

    quiet = (1e-3 * rng.standard_normal(n) + 0.01).astype(np.float32)  # var 1e-6: eps shows
    ours_y, hf_y = both(quiet)
    assert eps_added(quiet, ours_y) == pytest.approx(1e-5, rel=1e-2)  # fairseq F.layer_norm eps
    assert eps_added(quiet, hf_y) == pytest.approx(1e-7, rel=1e-2)  # Wav2Vec2FeatureExtractor
    loud = (0.1 * rng.standard_normal(n)).astype(np.float32)  # var 1e-2, speech-like
    ours_y, hf_y = both(loud)
    relative = np.abs(ours_y - hf_y).max() / np.abs(hf_y).max()
    print(f"speech normalisation: max relative |ours - HF| {relative:.2e} at variance 1e-2")
    var = loud.astype(np.float64).var()
    assert relative == pytest.approx(1 - np.sqrt((var + 1e-7) / (var + 1e-5)), rel=1e-2)  # one scale factor


def check_image_processor(recipe, out):
    from PIL import Image

    v, C = recipe.model.vision, recipe.model.vision.channels
    eval_data = dataclasses.replace(recipe.data, vision=dataclasses.replace(recipe.data.vision, augment=False))
    ours = build_processor(eval_data, recipe.model, recipe.masking, seed=0)
    processor = AutoImageProcessor.from_pretrained(out)
    pil_processor = AutoImageProcessor.from_pretrained(out, backend="pil")
    assert type(processor).__name__ == "BeitImageProcessor"
    g = torch.Generator().manual_seed(0)
    diffs = {}
    for name, shape in (("at size", (v.image_size, v.image_size)), ("resized", (v.image_size + 13, v.image_size - 5))):
        image = torch.randint(0, 256, (C, *shape), dtype=torch.uint8, generator=g)
        pil = Image.fromarray(image[0].numpy() if C == 1 else image.permute(1, 2, 0).numpy())
        expected = ours.items(image, 0, 0, None)[0]["image"]
        for backend, p in (("torchvision", processor), ("pil", pil_processor)):
            got = p(pil, return_tensors="pt").pixel_values[0]
            assert got.shape == expected.shape
            diffs[name, backend] = (got - expected).abs().max().item()
    print(f"image processor max |ours - HF|: {diffs}")
    assert diffs["at size", "torchvision"] <= 1e-6 and diffs["at size", "pil"] <= 1e-6
    assert diffs["resized", "torchvision"] <= 1e-6  # the same torchvision bicubic, antialiased, on uint8
    assert diffs["resized", "pil"] > 1e-2  # PIL's bicubic is another resampler


SPECIAL_IDS = {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 4}
UNSEEN_TEXT = [
    "漢字 and 字字字 in a row", "emoji 😀😀 x 😀🚀", "rare symbols ∮ ⊕ ☃ §¶ ‰ and µ",
    "  leading, trailing  and   multiple spaces  ", "new\nlines\n\nand\ttabs\t\there", "\r\n\n", "", " ",
    "full-width ｔｈｅ ＡＢＣ and the ligature ﬁ", "a <mask> token and <mask>glued <mask>",
    "typed <s> and </s> and <pad> and <unk> are text", "zero\u200bwidth, nbsp\u00a0and ideographic\u3000space",
    "Ünïcödé café naïve", "▁already▁escaped", "漢<s>😀",
]


def check_tokenizer(out, sp_model):
    tok = AutoTokenizer.from_pretrained(out)
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    assert tok.is_fast
    assert {name: getattr(tok, f"{name}_token_id") for name in SPECIAL_IDS} == SPECIAL_IDS
    # sentencepiece emits one <unk> for a run of unknown characters; the fast tokenizer must too
    assert sp.encode("字字字😀") == [sp.piece_to_id("▁"), 3]
    for text in UNSEEN_TEXT + corpus(5, with_brackets=True)[:50]:
        assert tok(text)["input_ids"] == [0] + sp.encode(text) + [2], repr(text)
    batch = tok(["the fox", "a lazy dog jumps over"], padding=True)
    short = len(sp.encode("the fox")) + 2
    assert batch["input_ids"][0][short:] == [1] * (len(batch["input_ids"][1]) - short)
    assert batch["attention_mask"][0] == [1] * short + [0] * (len(batch["input_ids"][1]) - short)
    assert (out / "sentencepiece.model").read_bytes() == Path(sp_model).read_bytes()  # for continued pretraining


def test_exported_processor_reproduces_our_preprocessing(exported, sp_model):
    recipe, _, out = exported
    modality = recipe.model.modality
    if modality == "speech":
        check_feature_extractor(recipe, out)
    elif modality == "vision":
        check_image_processor(recipe, out)
    else:
        check_tokenizer(out, sp_model)


def test_tokenizer_typed_specials_need_their_characters_in_the_vocabulary(tmp_path):
    """The one known difference: the fast tokenizer's Unigram has no piece types, so the typed text
    "<s>" becomes the control piece when its characters are unknown to the model (sentencepiece
    never emits a control piece for text). With "<", "s", ">" in the vocabulary both agree
    (check_tokenizer)."""
    from scaling.hf.text import fast_tokenizer

    path = train_tokenizer(corpus(1, with_brackets=False), str(tmp_path / "sp"), 120)
    sp, tok = spm.SentencePieceProcessor(model_file=path), fast_tokenizer(path, 64)
    assert sp.piece_to_id("<") == sp.unk_id()
    text = "the <s> fox"
    assert 0 not in sp.encode(text) and 0 in tok(text, add_special_tokens=False)["input_ids"]
