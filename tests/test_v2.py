"""data2vec 2.0 (images; text where noted): multi-mask with one teacher pass, a student encoder on the visible patches only,
the 2-D conv decoder, the loss against a straightforward computation, and sharded runs against the
single-process run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dist_harness import REPO, assert_same_run, run_single, spawn



def _recipe(*overrides, modality="vision"):
    from scaling.config import load_recipe

    return load_recipe(REPO / f"recipes/{modality}/v2-tiny.yaml", ["train.precision=fp32", *overrides])


def _batch(recipe, samples: int, seed: int = 0):
    """A collated batch from the recipe's own data path (synthetic images, masks from the workers)."""
    from scaling.data import build_loader

    r = recipe
    loader = build_loader(r.data, r.model, r.masking, seed=seed, rank=0, world_size=1, micro_batch_size=samples)
    return next(iter(loader))


def test_masks_are_drawn_per_view_on_the_workers_with_equal_kept_counts():
    r = _recipe()
    batch = _batch(r, 6)
    M, T = r.masking.clones, (28 // 4) ** 2
    assert batch["mask_BT"].shape == (6 * M, T)
    kept = int(T * (1 - r.masking.vision_v2.ratio))  # exactly int(L (1 - R)) patches kept per view
    assert batch["keep_index_RK"].shape == (6 * M, kept)
    # the kept index lists exactly the unmasked positions of each view, ascending
    for row in range(6 * M):
        assert torch.equal(batch["keep_index_RK"][row], (~batch["mask_BT"][row]).nonzero().squeeze(1))
    views = batch["mask_BT"].view(6, M, T)
    assert all(not torch.equal(views[i, 0], views[i, 1]) for i in range(6))  # the views of a sample differ


def test_text_masks_drop_a_fixed_share_of_each_blocks_tokens():
    r = _recipe(modality="text")
    batch = _batch(r, 6)
    M, (B, T) = r.masking.clones, batch["tokens_BT"].shape
    mask, pad = batch["mask_BT"].view(B, M, T), batch["padding_mask_BT"]
    special = (batch["tokens_BT"] == 0) | (batch["tokens_BT"] == 2) | pad  # BOS, EOS, padding: never masked
    for i in range(B):
        n = int((~special[i]).sum())
        assert (mask[i].sum(1) == int(n * r.masking.text_v2_ratio)).all()
        assert not (mask[i] & special[i]).any()
    index, keep_pad = batch["keep_index_RK"], batch["keep_padding_RK"]
    for row in range(B * M):  # the kept index lists the real, unmasked tokens, then pad slots
        kept = (~batch["mask_BT"][row] & ~pad[row // M]).nonzero().squeeze(1)
        assert torch.equal(index[row][~keep_pad[row]], kept) and int((~keep_pad[row]).sum()) == kept.numel()


def test_speech_masks_mask_a_fixed_share_of_each_clips_real_frames_in_spans():
    from scaling.models.speech import conv_output_length

    r = _recipe(modality="speech")
    batch = _batch(r, 6)
    M, B = r.masking.clones, batch["audio_BT"].shape[0]
    frames = conv_output_length((~batch["audio_padding_BT"]).sum(1), r.model.speech.conv_layers)
    mask = batch["mask_BT"].view(B, M, -1)
    assert len(set(frames.tolist())) > 1  # clips of different lengths: padded frames exist
    for i in range(B):
        n = int(frames[i])
        assert (mask[i].sum(1) == int(n * r.masking.speech_v2.ratio)).all()  # exactly int(T x R) per view
        assert not mask[i, :, n:].any()  # never a padded frame
        runs = (mask[i, :, 1:n] & ~mask[i, :, : n - 1]).sum() + mask[i, :, 0].sum()
        assert mask[i].sum() / runs > 2.0  # spans, not single frames


@pytest.mark.parametrize("modality", ["vision", "speech", "text"])
def test_student_encoder_sees_only_the_visible_positions_and_the_decoder_every_one(modality):
    from scaling.models import build_model

    r = _recipe(modality=modality)
    model = build_model(r.model)
    batch = _batch(r, 3)
    lengths = []
    hook = model.encoder.blocks[0].register_forward_hook(lambda m, args, out: lengths.append(out[0].shape))
    decoded = []
    dhook = model.decoder.register_forward_hook(lambda m, args, out: decoded.append(out.shape))
    out = model(batch)
    hook.remove()
    dhook.remove()
    R, K = batch["keep_index_RK"].shape
    cls = 1 if modality == "vision" else 0
    assert lengths == [torch.Size([R, K + cls, r.model.dim])]  # visible positions (+ CLS), for all R views
    if modality != "vision":  # K is the longest row's visible count; shorter rows have pad slots
        assert K == int((~batch["keep_padding_RK"]).sum(1).max()) and batch["keep_padding_RK"].any()
    assert decoded == [torch.Size([R, batch["mask_BT"].shape[1], r.model.dim])]
    assert out.pred_ND.shape == (int(batch["mask_BT"].sum()), r.model.dim)
    assert (out.cls_pred_BD is not None) == (modality == "vision")


@pytest.mark.parametrize("modality", ["vision", "speech", "text"])
def test_teacher_runs_once_per_step_whatever_the_number_of_views(tmp_path, modality):
    from scaling.pretrain import run
    from scaling.teacher import EMATeacher

    for clones in (1, 4):
        calls = []
        original = EMATeacher.forward

        def counted(self, x, **kw):
            calls.append(x.shape[0])
            return original(self, x, **kw)

        EMATeacher.forward = counted
        try:
            run(_recipe(f"masking.clones={clones}", "train.max_steps=2", "train.global_batch_size=8",
                        "train.micro_batch_size=8", "tracking.enabled=false", "checkpoint.resume=never",
                        f"checkpoint.dir={tmp_path}/c{clones}", modality=modality))
        finally:
            EMATeacher.forward = original
        assert calls == [8, 8], (clones, calls)  # one pass of the 8 unique images per step


def _straightforward_loss(model, teacher, batch, r):
    """The data2vec 2.0 image loss written out with plain loops over views: IN per tap, average, LN; the
    view's sample's targets at its masked patches; L2 summed over D times 1/sqrt(D); the CLS term."""
    M = r.masking.clones
    B = batch["image_BCHW"].shape[0]
    with torch.no_grad():
        taps = teacher(batch["image_BCHW"], padding_mask_BT=None, num_taps=r.objective.top_k, tap="ffn").taps
        y = sum(F.instance_norm(t.transpose(1, 2)).transpose(1, 2) for t in taps) / len(taps)
        y = F.layer_norm(y, y.shape[-1:])
    out = model(batch)
    D = y.shape[-1]
    total, preds, start = 0.0, out.pred_ND, 0
    for row in range(B * M):
        masked = batch["mask_BT"][row].nonzero().squeeze(1)
        target = y[row // M, masked]
        pred = preds[start:start + masked.numel()]
        start += masked.numel()
        total = total + ((pred - target) ** 2).sum() / math.sqrt(D)
        cls = ((out.cls_pred_BD[row] - y[row // M].mean(0)) ** 2).sum() / math.sqrt(D)
        total = total + r.model.v2.cls_loss * masked.numel() * cls
    return total


def test_loss_equals_a_straightforward_computation():
    from scaling.objective import make_targets, regression_loss
    from scaling.models import build_model
    from scaling.teacher import EMATeacher
    from scaling.trainer import cls_loss_sum, host_stage, target_rows

    r = _recipe("model.v2.cls_loss=0.5")  # a CLS weight large enough to matter
    torch.manual_seed(0)
    model = build_model(r.model)
    teacher = EMATeacher(model.encoder)
    for p in teacher.parameters():  # a teacher that differs from the student
        p.data.add_(torch.randn_like(p) * 0.02)
    batch = host_stage(_batch(r, 4), torch.device("cpu"))

    expected = _straightforward_loss(model, teacher, batch, r)
    out = model(batch)  # the decoder's noise is keyed by the batch's noise seeds: the same numbers
    taps = teacher(out.teacher_x, padding_mask_BT=None, num_taps=r.objective.top_k, tap="ffn").taps
    y = make_targets(taps, r.objective)
    n = batch["mask_index_N"].numel()
    got = regression_loss(out.pred_ND, target_rows(y, batch["mask_index_N"], r.masking.clones), r.objective)
    got = got + cls_loss_sum(out.cls_pred_BD, y, n, r.objective, r.model.v2.cls_loss)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("modality", ["speech", "text"])
def test_sequence_loss_equals_a_straightforward_computation(modality):
    """Speech and text, with padded clips / blocks: instance norm of each tap over the sample's real positions
    only (biased variance, eps 1e-5), the average of the K taps, each view's masked positions against its
    sample's targets, L2 summed over D times the recipe's scale (speech 1/sqrt(D), text 1)."""
    from scaling.objective import make_targets, regression_loss
    from scaling.models import build_model
    from scaling.teacher import EMATeacher
    from scaling.trainer import host_stage, target_rows

    r = _recipe(modality=modality)
    assert r.objective.layer_norm == "instance" and r.objective.post_norm == "none"
    torch.manual_seed(0)
    model = build_model(r.model)
    teacher = EMATeacher(model.encoder)
    for p in teacher.parameters():
        p.data.add_(torch.randn_like(p) * 0.02)
    batch = host_stage(_batch(r, 4), torch.device("cpu"))
    out = model(batch)
    pad = out.padding_mask_BT
    assert pad is not None and pad.any()  # the case that matters: padded rows
    taps = teacher(out.teacher_x, padding_mask_BT=pad, num_taps=r.objective.top_k, tap="ffn").taps

    M, D = r.masking.clones, out.pred_ND.shape[-1]
    scale = 1.0 / math.sqrt(D) if r.objective.loss_scale is None else r.objective.loss_scale
    expected, start = 0.0, 0
    for row in range(out.mask_BT.shape[0]):
        i = row // M
        real = (~pad[i]).nonzero().squeeze(1)
        y = 0.0
        for t in taps:
            x = t[i, real].double()
            y = y + (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)
        y = y / len(taps)
        masked = out.mask_BT[row].nonzero().squeeze(1)
        assert bool((masked < real.numel()).all())  # never a padded position
        pred = out.pred_ND[start:start + masked.numel()].double()
        start += masked.numel()
        expected = expected + ((pred - y[masked]) ** 2).sum() * scale
    got = regression_loss(out.pred_ND, target_rows(make_targets(taps, r.objective, pad), batch["mask_index_N"], M),
                          r.objective)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)


def test_v2_recipes_load_for_every_size():
    from scaling.config import load_recipe
    from scaling.models import build_model

    for size, (depth, prenet, K, M) in {"base": (10, 2, 10, 16), "large": (24, 0, 18, 16),
                                        "huge": (32, 0, 24, 16)}.items():
        r = load_recipe(REPO / f"recipes/vision/v2-{size}.yaml", ["data.train_shards=synthetic"])
        assert (r.model.depth, r.model.v2.prenet_depth, r.objective.top_k, r.masking.clones) == (depth, prenet, K, M)
    with torch.device("meta"):
        model = build_model(load_recipe(REPO / "recipes/vision/v2-base.yaml", ["data.train_shards=synthetic"]).model)
    encoder = sum(p.numel() for p in model.encoder.parameters())
    assert 85e6 < encoder < 87e6, encoder  # ViT-B/16: 86M, as the published model


def test_multi_mask_needs_version_2():
    from scaling.config import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=r"'masking.clones' \(multi-mask\) needs model.version 2"):
        load_recipe(REPO / "recipes/vision/tiny.yaml", ["masking.clones=4"])


# ----------------------------------------------------------------------------- sharded runs
def _overrides(tmp, name, extra):
    return ["train.max_steps=3", "train.global_batch_size=8", "train.micro_batch_size=4", "tracking.enabled=false",
            "checkpoint.every_steps=100", "checkpoint.resume=never", f"checkpoint.dir={tmp}/{name}", *extra]


ENGINE_SETS = {"fsdp": ["engine.name=fsdp"], "ddp": ["engine.name=ddp"],
               **{f"zero{z}": ["engine.name=deepspeed", f"engine.zero_stage={z}"] for z in (1, 2, 3)}}


@pytest.mark.parametrize("modality, engine", [(m, e) for m in ("vision", "speech", "text") for e in ENGINE_SETS])
def test_sharded_v2_matches_single_process(tmp_path, modality, engine):
    from dist_harness import run_recipe

    name = f"{modality}/v2-tiny"
    ref = run_single(name, _overrides(tmp_path, "single", ["train.precision=fp32"]))
    ranks = spawn(run_recipe, name, _overrides(tmp_path, "sharded", [*ENGINE_SETS[engine], "train.precision=fp32"]))
    assert_same_run(ref, ranks)


def test_a_sharded_v2_checkpoint_consolidates_to_the_single_process_weights(tmp_path):
    """FSDP checkpoint (DCP) -> one safetensors file whose student and teacher equal the one-process run's."""
    from safetensors.torch import load_file

    from dist_harness import run_recipe
    from scaling.checkpoint.consolidate import consolidate

    over = ["train.max_steps=2", "checkpoint.every_steps=2", "train.precision=fp32", "train.global_batch_size=8",
            "train.micro_batch_size=4", "tracking.enabled=false", "checkpoint.resume=never"]
    ref = run_single("vision/v2-tiny", over + [f"checkpoint.dir={tmp_path}/single"])
    spawn(run_recipe, "vision/v2-tiny", over + ["engine.name=fsdp", f"checkpoint.dir={tmp_path}/fsdp"])
    consolidate(tmp_path / "fsdp", tmp_path / "both.safetensors", part="both")
    tensors = load_file(tmp_path / "both.safetensors")
    assert any(k.startswith("student.decoder.") for k in tensors) and any(k.startswith("teacher.") for k in tensors)
    assert set(tensors) == set(ref["state"])
    for k, v in tensors.items():
        torch.testing.assert_close(v, ref["state"][k], rtol=1e-4, atol=1e-5, msg=k)


def test_text_v2_encoder_maps_onto_hf_data2vec_text_exactly():
    """The 2.0 text encoder is v1's post-LN stack under v1's names: the HF adapter drops the decoder and
    Data2VecTextModel computes our encoder's output on the unmasked tokens."""
    from transformers import AutoModel

    from scaling.hf import text as adapter
    from scaling.models import build_model

    r = _recipe(modality="text")
    model = build_model(r.model).eval()
    hf = AutoModel.from_config(adapter.hf_config(r), **adapter.MODEL_KWARGS).eval()
    hf.load_state_dict(adapter.to_hf(model.state_dict(), r), strict=True)
    tokens = torch.randint(5, r.model.text.vocab_size, (2, 20))
    tokens[:, 0], tokens[:, -1], tokens[1, 15:] = 0, 2, r.model.text.pad_id  # BOS, EOS; row 1 padded
    tokens[1, 14] = 2
    pad = tokens == r.model.text.pad_id
    with torch.no_grad():
        fo = model.frontend({"tokens_BT": tokens, "padding_mask_BT": pad, "mask_BT": pad})
        ours = model.encoder(fo.teacher_x, padding_mask_BT=pad).x_BTD
        theirs = hf(input_ids=tokens, attention_mask=(~pad).long()).last_hidden_state
    torch.testing.assert_close(ours[~pad], theirs[~pad], rtol=1e-5, atol=1e-5)
