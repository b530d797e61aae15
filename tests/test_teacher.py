"""EMA teacher: decay schedule, closed-form EMA after N updates, and no copy of shared parameters."""

import math

import pytest
import torch

from scaling.config import EMAConfig, load_recipe
from scaling.models import build_model
from scaling.teacher import EMATeacher, ema_decay, ema_pairs


def test_decay_schedule_is_linear_then_constant():
    cfg = EMAConfig(decay=0.999, end_decay=0.9999, anneal_steps=30000)
    assert ema_decay(cfg, 0) == pytest.approx(0.999)
    assert ema_decay(cfg, 15000) == pytest.approx(0.99945)
    assert ema_decay(cfg, 29999) == pytest.approx(0.999 + 0.0009 * 29999 / 30000)
    assert ema_decay(cfg, 30000) == ema_decay(cfg, 10**7) == 0.9999
    assert ema_decay(EMAConfig(decay=0.9998, end_decay=0.9998, anneal_steps=0), 5) == 0.9998


@pytest.mark.parametrize("modality", ["speech", "vision", "text"])
def test_teacher_after_n_updates_is_closed_form_ema(recipe_path, modality):
    torch.manual_seed(0)
    student = build_model(load_recipe(recipe_path(modality)).model)
    teacher = EMATeacher(student.encoder)
    cfg = EMAConfig(decay=0.5, end_decay=0.9, anneal_steps=4)
    names = [n for n, _ in student.encoder.named_parameters()]
    history = [{n: p.detach().clone() for n, p in student.encoder.named_parameters()}]  # theta_0
    decays = []
    for step in range(6):
        with torch.no_grad():
            for p in student.encoder.parameters():
                p.add_(torch.randn_like(p))
        history.append({n: p.detach().clone() for n, p in student.encoder.named_parameters()})
        decays.append(ema_decay(cfg, step))
        EMATeacher.update(*ema_pairs(teacher.encoder, student.encoder), decays[-1])
    # Closed form: T_N = prod(tau) * theta_0 + sum_t (1 - tau_t) * prod_{s>t} tau_s * theta_t
    teacher_params = dict(teacher.encoder.named_parameters())
    for n in names:
        expected = math.prod(decays) * history[0][n]
        for t, tau in enumerate(decays):
            expected = expected + (1 - tau) * math.prod(decays[t + 1:]) * history[t + 1][n]
        torch.testing.assert_close(teacher_params[n], expected, rtol=1e-5, atol=1e-6)


def test_decay_one_freezes_the_teacher(recipe_path):
    student = build_model(load_recipe(recipe_path("text")).model)
    teacher = EMATeacher(student.encoder)
    before = {n: p.clone() for n, p in teacher.encoder.named_parameters()}
    with torch.no_grad():
        for p in student.encoder.parameters():
            p.add_(1.0)
    EMATeacher.update(*ema_pairs(teacher.encoder, student.encoder), 1.0)
    assert all(torch.equal(before[n], p) for n, p in teacher.encoder.named_parameters())


@pytest.mark.parametrize("modality, shared", [
    ("speech", ["frontend."]),  # CNN, projection, mask embedding, positional conv (docs/data2vec.md §2.2)
    ("text", ["frontend."]),  # token and position embeddings, embedding LayerNorm
    # [DV] shares nothing: the teacher owns patch embed, cls, rel-pos bias, blocks. The frontend holds the
    # student's mask token only, which the teacher never uses and so has no copy of.
    ("vision", ["frontend.mask_token"]),
])
def test_shared_parameters_have_no_copy_in_the_teacher(recipe_path, modality, shared):
    student = build_model(load_recipe(recipe_path(modality)).model)
    teacher = EMATeacher(student.encoder)
    teacher_keys = set(teacher.state_dict())
    student_keys = set(student.state_dict())
    assert teacher_keys == {f"encoder.{k}" for k in student.encoder.state_dict()}
    frontend_params = sum(p.numel() for p in student.frontend.parameters())
    assert (frontend_params > 0) == bool(shared)
    assert all(f"frontend.{n}".startswith(tuple(shared)) for n, _ in student.frontend.named_parameters())
    assert not any(k.endswith("mask_token") or k.endswith("mask_emb") for k in teacher_keys)
    teacher_params = sum(p.numel() for p in teacher.parameters())
    assert teacher_params == sum(p.numel() for p in student.encoder.parameters())
    assert all(not k.startswith(("frontend.", "head.")) for k in teacher_keys)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training and not teacher.train().training
    assert student_keys >= {f"frontend.{k}" for k in student.frontend.state_dict()}
