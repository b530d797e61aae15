"""The per-modality spec (scaling/modalities): the registry, every modality's pieces working together from
its own synthetic sample through its processor into the v1 and 2.0 students, and v1's one masking step."""

from __future__ import annotations

import os

import pytest
import torch

from scaling.config import load_recipe
from scaling.data.loader import _TAG_SYNTH, _SyntheticSource
from scaling.flops import batch_counts
from scaling.masking import sample_rng
from scaling.modalities import all_specs, build_processor, spec_for
from scaling.models import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODALITIES = ["speech", "vision", "text"]


def _recipe(modality: str, version: int):
    name = "tiny.yaml" if version == 1 else "v2-tiny.yaml"
    return load_recipe(os.path.join(REPO, "recipes", modality, name), ["tracking.enabled=false"])


def _batch(recipe, n: int = 3):
    """A batch of the modality's own synthetic samples, through its processor."""
    proc = build_processor(recipe.data, recipe.model, recipe.masking, seed=1)
    source = _SyntheticSource(recipe.data, recipe.model, 1, 64)
    items = []
    for g in range(n):
        decoded, label = spec_for(recipe.model.modality).synthetic_sample(source, sample_rng(1, g, _TAG_SYNTH))
        items += proc.items(decoded, 0, g, label)
    return proc.collate(items)


def test_registry_names_every_modality_and_refuses_others():
    assert sorted(all_specs()) == sorted(MODALITIES)
    for m in MODALITIES:
        assert spec_for(m).name == m and spec_for(m).processor.modality == m
    with pytest.raises(ValueError, match=r"unknown model.modality 'audio'; expected one of \['speech', 'text', 'vision'\]"):
        spec_for("audio")


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("modality", MODALITIES)
def test_synthetic_sample_processor_and_student_fit_together(modality, version):
    torch.manual_seed(0)
    recipe = _recipe(modality, version)
    batch = _batch(recipe)
    model = build_model(recipe.model).eval()
    with torch.no_grad():
        out = model(batch)
    masked = int(batch["mask_BT"].sum())
    assert out.pred_ND.shape == (masked, recipe.model.dim)
    assert torch.isfinite(out.pred_ND).all()
    rows, positions, flops = batch_counts(recipe.model, batch)
    assert rows == batch["sample_id_B"].shape[0] and flops > 0
    if version == 1:  # positions: the encoder's real ones, counted independently from the batch
        if modality == "speech":
            from scaling.models.speech import conv_output_length

            real = [conv_output_length(int(n), recipe.model.speech.conv_layers)
                    for n in (~batch["audio_padding_BT"]).sum(-1)]
        elif modality == "text":
            real = (~batch["padding_mask_BT"]).sum(-1).tolist()
        else:
            real = [batch["mask_BT"].shape[1] + 1] * rows  # patches and CLS
        assert positions == sum(real)


@pytest.mark.parametrize("modality", MODALITIES)
def test_v1_masking_step(modality):
    """Images: the encoder substitutes the student's frontend.mask_token at the masked patches, so the token
    moves the student's predictions and never the teacher's input; speech and text frontends mask their own
    output and their encoders refuse a mask embedding."""
    torch.manual_seed(0)
    recipe = _recipe(modality, 1)
    batch = _batch(recipe)
    model = build_model(recipe.model).eval()
    fo = model.frontend(batch)
    if modality != "vision":
        assert fo.mask_embedding_D is None
        with pytest.raises(AssertionError, match="frontend masks its output"):
            model.encoder(fo.student_x, padding_mask_BT=fo.padding_mask_BT, mask_BT=fo.mask_BT,
                          mask_embedding_D=torch.zeros(recipe.model.dim))
        return
    assert fo.mask_embedding_D is model.frontend.mask_token
    assert "mask_token" not in dict(model.encoder.named_parameters())  # not a teacher (EMA) parameter
    with torch.no_grad():
        before = model(batch)
        model.frontend.mask_token.add_(1.0)
        after = model(batch)
    assert not torch.allclose(before.pred_ND, after.pred_ND)
    assert torch.equal(before.teacher_x, after.teacher_x)
