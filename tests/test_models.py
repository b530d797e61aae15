"""Model tests: each compares the model against an independent, straightforward computation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scaling.config import ModelConfig, SpeechModelConfig, TextModelConfig, VisionModelConfig
from scaling.models import Data2Vec, build_model
from scaling.models.blocks import Attention, PostLNBlock, PreLNBlock
from scaling.models.speech import FeatureExtractor, SpeechEncoder, conv_output_length
from scaling.models.text import make_positions
from scaling.models.vision import relative_position_index

torch.set_num_threads(1)

CONV = [[16, 10, 5], [16, 3, 2], [16, 2, 2]]  # total stride 20


def cfg_for(modality: str, **kw) -> ModelConfig:
    speech = dict(conv_layers=CONV, conv_pos_depth=2, conv_pos_width=8, conv_pos_groups=4, layerdrop=0.0)
    speech.update(kw.pop("speech", {}))
    base = dict(
        modality=modality, dim=32, depth=3, heads=4, ffn_dim=64, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0,
        head={"speech": "linear", "vision": "norm_linear", "text": "mlp"}[modality],
        speech=SpeechModelConfig(**speech),
        vision=VisionModelConfig(image_size=12, patch_size=4, drop_path=0.0, layer_scale_init=0.1),
        text=TextModelConfig(vocab_size=40, max_positions=16, pad_id=1, mask_id=4),
    )
    base.update(kw)
    return ModelConfig(**base)


def frames(num_samples: int) -> int:
    return conv_output_length(num_samples, CONV)


# ----------------------------------------------------------------------------- speech geometry
def test_conv_output_length_matches_cnn():
    fe = FeatureExtractor(CONV, 1e-5)
    for n in [30, 34, 35, 39, 40, 57, 400, 401, 419, 420, 1234]:
        out = fe(torch.randn(1, n)).shape[-1]
        assert conv_output_length(n, CONV) == out, n
    lengths = torch.tensor([400, 401, 419, 420, 1234])
    got = conv_output_length(lengths, CONV)
    assert isinstance(got, torch.Tensor)
    assert got.tolist() == [conv_output_length(int(n), CONV) for n in lengths]
    # the wav2vec 2.0 default stack: 20 ms frames, 400-sample receptive field (docs/data2vec.md §3.2)
    default = SpeechModelConfig().conv_layers
    assert conv_output_length(400, default) == 1
    assert conv_output_length(16000, default) == 49


# ----------------------------------------------------------------------------- vision geometry
def test_relative_position_index_bruteforce():
    h, w = 3, 4
    n = h * w
    idx = relative_position_index(h, w)
    assert idx.shape == (n + 1, n + 1)
    rows = (2 * h - 1) * (2 * w - 1) + 3
    expect = torch.empty(n + 1, n + 1, dtype=torch.long)
    for i in range(n + 1):
        for j in range(n + 1):
            if i == 0 and j == 0:
                expect[i, j] = rows - 1  # cls-to-cls
            elif i == 0:
                expect[i, j] = rows - 3  # cls-to-token
            elif j == 0:
                expect[i, j] = rows - 2  # token-to-cls
            else:
                yi, xi = divmod(i - 1, w)
                yj, xj = divmod(j - 1, w)
                expect[i, j] = (yi - yj + h - 1) * (2 * w - 1) + (xi - xj + w - 1)
    assert torch.equal(idx, expect)
    assert int(idx.max()) == rows - 1
    # every patch-pair row of the table is used
    assert set(idx[1:, 1:].flatten().tolist()) == set(range(rows - 3))


def test_shared_rel_pos_bias_lookup():
    model = build_model(cfg_for("vision"))
    rpb = model.encoder.rel_pos_bias
    h = w = 3
    assert rpb.relative_position_bias_table.shape == ((2 * h - 1) * (2 * w - 1) + 3, 4)
    with torch.no_grad():
        rpb.relative_position_bias_table.normal_()
    bias = rpb()
    idx = relative_position_index(h, w)
    table = rpb.relative_position_bias_table
    for head in range(4):
        for i in range(0, h * w + 1, 3):
            for j in range(h * w + 1):
                assert bias[head, i, j] == table[idx[i, j], head]


# ----------------------------------------------------------------------------- attention and blocks
def manual_attention(attn: Attention, x, bias=None, pad=None):
    B, T, D = x.shape
    H = attn.heads
    q = attn.q_proj(x).view(B, T, H, -1).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, H, -1).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, H, -1).transpose(1, 2)
    s = q @ k.transpose(-1, -2) / math.sqrt(D // H)
    if bias is not None:
        s = s + bias
    if pad is not None:
        s = s.masked_fill(pad[:, None, None, :], float("-inf"))
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D)
    return attn.out_proj(o)


def test_attention_bias_and_padding_match_manual():
    torch.manual_seed(0)
    attn = Attention(32, 4, k_bias=False).eval()
    assert attn.k_proj.bias is None and attn.q_proj.bias is not None
    x = torch.randn(2, 7, 32)
    bias = torch.randn(4, 7, 7)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    for b, p in [(None, None), (bias, None), (None, pad), (bias, pad)]:
        torch.testing.assert_close(attn(x, attn_bias=b, key_padding_mask=p), manual_attention(attn, x, b, p))


def test_postln_ffn_and_block_taps_by_hand():
    torch.manual_seed(0)
    blk = PostLNBlock(32, 4, 64).eval()
    x = torch.randn(2, 5, 32)
    out, ffn = blk(x, tap="ffn")
    out2, tap_block = blk(x, tap="block")
    x1 = F.layer_norm(x + manual_attention(blk.attn, x), (32,), blk.norm1.weight, blk.norm1.bias, 1e-5)
    ffn_ref = F.linear(F.gelu(F.linear(x1, blk.fc1.weight, blk.fc1.bias)), blk.fc2.weight, blk.fc2.bias)
    out_ref = F.layer_norm(x1 + ffn_ref, (32,), blk.norm2.weight, blk.norm2.bias, 1e-5)
    torch.testing.assert_close(ffn, ffn_ref)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(tap_block, out_ref)
    torch.testing.assert_close(out2, out)


def test_preln_block_by_hand():
    torch.manual_seed(0)
    blk = PreLNBlock(32, 4, 64, layer_scale_init=0.5).eval()
    with torch.no_grad():
        blk.gamma_1.normal_()
        blk.gamma_2.normal_()
    x = torch.randn(2, 5, 32)
    bias = torch.randn(4, 5, 5)
    out, tap = blk(x, attn_bias=bias, tap="block")
    _, ffn = blk(x, attn_bias=bias, tap="ffn")
    h = x + blk.gamma_1 * manual_attention(blk.attn, blk.norm1(x), bias)
    m = blk.fc2(F.gelu(blk.fc1(blk.norm2(h))))
    ref = h + blk.gamma_2 * m
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(tap, ref)
    torch.testing.assert_close(ffn, m)


def test_drop_path_train_only():
    blk = PreLNBlock(32, 4, 64, drop_path=0.999, layer_scale_init=0.1)
    x = torch.randn(64, 3, 32)
    blk.train()
    torch.manual_seed(0)
    out, _ = blk(x)
    # almost every sample has both branches dropped: output == input for those samples
    same = (out - x).abs().amax(dim=(1, 2)) == 0
    assert same.float().mean() > 0.9
    blk.eval()
    out, _ = blk(x)
    assert not torch.equal(out, x)


# ----------------------------------------------------------------------------- taps
@pytest.mark.parametrize("modality", ["speech", "text", "vision"])
def test_num_taps_and_block_tap(modality):
    torch.manual_seed(0)
    model = build_model(cfg_for(modality)).eval()
    batch = make_batch(modality)
    fo = model.frontend(batch)
    enc = model.encoder
    out0 = enc(fo.teacher_x, padding_mask_BT=fo.padding_mask_BT, num_taps=0)
    assert out0.taps == []
    for k in (1, 3):
        o = enc(fo.teacher_x, padding_mask_BT=fo.padding_mask_BT, num_taps=k, tap="block")
        assert len(o.taps) == k
        assert all(t.shape == o.x_BTD.shape for t in o.taps)
        torch.testing.assert_close(o.taps[-1], o.x_BTD)
        torch.testing.assert_close(o.x_BTD, out0.x_BTD)
    # ffn taps are the last K blocks' FFN outputs, in layer order: the last block's, by hand
    o = enc(fo.teacher_x, padding_mask_BT=fo.padding_mask_BT, num_taps=2, tap="ffn")
    captured = []
    h = enc.blocks[-1].register_forward_hook(lambda m, a, r: captured.append(r[1]))
    enc(fo.teacher_x, padding_mask_BT=fo.padding_mask_BT, num_taps=0)
    h.remove()
    ref = captured[0][:, 1:] if modality == "vision" else captured[0]
    torch.testing.assert_close(o.taps[1], ref)
    assert not torch.allclose(o.taps[0], o.taps[1])
    with pytest.raises(ValueError):
        enc(fo.teacher_x, padding_mask_BT=fo.padding_mask_BT, num_taps=4)


# ----------------------------------------------------------------------------- batches
def make_batch(modality: str, B: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if modality == "speech":
        S = 420
        F_ = frames(S)
        audio = torch.randn(B, S, generator=g)
        pad = torch.zeros(B, S, dtype=torch.bool)
        pad[1, 300:] = True
        audio = audio.masked_fill(pad, 0.0)
        mask = torch.zeros(B, F_, dtype=torch.bool)
        mask[:, 2:6] = True
        mask[0, 12:15] = True
        return {"audio_BT": audio, "audio_padding_BT": pad, "mask_BT": mask}
    if modality == "vision":
        mask = torch.zeros(B, 9, dtype=torch.bool)
        mask[0, [0, 1, 4]] = True
        mask[1, [4, 5, 7, 8]] = True
        return {"image_BCHW": torch.randn(B, 3, 12, 12, generator=g), "mask_BT": mask}
    T = 10
    tokens = torch.randint(5, 40, (B, T), generator=g)
    tokens[:, 0] = 0
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, 7:] = True
    tokens = tokens.masked_fill(pad, 1)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, [2, 3, 8]] = True
    mask[1, [1, 4]] = True
    inputs = tokens.masked_fill(mask, 4)
    return {"tokens_BT": tokens, "input_tokens_BT": inputs, "padding_mask_BT": pad, "mask_BT": mask}


# ----------------------------------------------------------------------------- padding invariance
def test_speech_encoder_padding_invariance():
    torch.manual_seed(0)
    enc = SpeechEncoder(cfg_for("speech")).eval()
    x = torch.randn(2, 12, 32)
    pad = torch.zeros(2, 12, dtype=torch.bool)
    pad[1, 8:] = True
    both = enc(x, padding_mask_BT=pad, num_taps=2)
    alone = enc(x[1:, :8], num_taps=2)
    torch.testing.assert_close(both.x_BTD[1, :8], alone.x_BTD[0])
    for a, b in zip(both.taps, alone.taps):
        torch.testing.assert_close(a[1, :8], b[0])


def test_text_padding_invariance():
    torch.manual_seed(0)
    model = build_model(cfg_for("text")).eval()
    batch = make_batch("text")
    fo = model.frontend(batch)
    out = model.encoder(fo.student_x, padding_mask_BT=fo.padding_mask_BT, num_taps=3)
    n = 7  # sample 1 has 7 real tokens
    alone = {k: v[1:, :n] for k, v in batch.items()}
    fo1 = model.frontend(alone)
    assert not fo1.padding_mask_BT.any()
    out1 = model.encoder(fo1.student_x, padding_mask_BT=fo1.padding_mask_BT, num_taps=3)
    torch.testing.assert_close(out.x_BTD[1, :n], out1.x_BTD[0])
    for a, b in zip(out.taps, out1.taps):
        torch.testing.assert_close(a[1, :n], b[0])
    torch.testing.assert_close(fo.teacher_x[1, :n], fo1.teacher_x[0])


def test_text_positions_fairseq_offset():
    pad = torch.tensor([[False, False, False, True, True], [False] * 5])
    assert make_positions(pad, 1).tolist() == [[2, 3, 4, 1, 1], [2, 3, 4, 5, 6]]
    model = build_model(cfg_for("text"))
    assert model.frontend.embed_positions.weight.shape[0] == 16 + 1 + 1
    batch = make_batch("text")
    batch = {k: v.repeat(1, 2)[:, :17] for k, v in batch.items()}
    with pytest.raises(ValueError):
        model(batch)


@pytest.mark.parametrize("pos_depth", [1, 2, 3])
def test_speech_short_utterance_in_padded_batch(pos_depth):
    """A short utterance inside a padded batch vs the same utterance alone.

    The CNN's valid frames only see valid samples, so the projected features agree exactly at
    valid frames whatever the padding holds. Padded frames are zeroed before every pos-conv layer,
    so at valid frames each layer sees exactly the zeros the lone sample gets from the conv's own
    zero padding, and everything downstream agrees too, for any pos-conv depth (fairseq zeroes
    only before the first layer, which makes deeper pos convs padding-dependent)."""
    torch.manual_seed(0)
    model = build_model(cfg_for("speech", speech={"conv_pos_depth": pos_depth})).eval()
    S, n = 420, 300
    audio = torch.randn(2, S)
    pad = torch.zeros(2, S, dtype=torch.bool)
    pad[1, n:] = True  # padding holds random noise on purpose
    Fb, Fn = frames(S), frames(n)
    mask = torch.zeros(2, Fb, dtype=torch.bool)
    mask[1, 3:7] = True
    fo = model.frontend({"audio_BT": audio, "audio_padding_BT": pad, "mask_BT": mask})
    fo1 = model.frontend({"audio_BT": audio[1:, :n], "audio_padding_BT": pad[1:, :n], "mask_BT": mask[1:, :Fn]})
    assert fo.padding_mask_BT[1].tolist() == [False] * Fn + [True] * (Fb - Fn)
    assert not fo.padding_mask_BT[0].any()
    torch.testing.assert_close(fo.local_features_BTD[1, :Fn], fo1.local_features_BTD[0])
    torch.testing.assert_close(fo.teacher_x[1, :Fn], fo1.teacher_x[0])
    torch.testing.assert_close(fo.student_x[1, :Fn], fo1.student_x[0])
    for x, x1 in [(fo.student_x, fo1.student_x), (fo.teacher_x, fo1.teacher_x)]:
        o = model.encoder(x, padding_mask_BT=fo.padding_mask_BT, num_taps=2)
        o1 = model.encoder(x1, padding_mask_BT=fo1.padding_mask_BT, num_taps=2)
        torch.testing.assert_close(o.x_BTD[1, :Fn], o1.x_BTD[0])
        for a, b in zip(o.taps, o1.taps):
            torch.testing.assert_close(a[1, :Fn], b[0])


# ----------------------------------------------------------------------------- teacher input
def test_text_teacher_input_unmasked_and_student_differs_only_at_mask():
    torch.manual_seed(0)
    model = build_model(cfg_for("text")).train()  # dropout is 0 in the tiny config
    batch = make_batch("text")
    fo = model.frontend(batch)
    assert not fo.teacher_x.requires_grad and fo.student_x.requires_grad
    other = dict(batch, mask_BT=torch.zeros_like(batch["mask_BT"]), input_tokens_BT=batch["tokens_BT"])
    fo2 = model.frontend(other)
    assert torch.equal(fo.teacher_x, fo2.teacher_x)
    torch.testing.assert_close(fo2.student_x, fo2.teacher_x)  # unmasked student == teacher
    differs = (fo.student_x - fo.teacher_x).abs().amax(-1) > 0
    assert torch.equal(differs, batch["mask_BT"])
    # the teacher sees the real ids (not the mostly-pad target_tokens of fairseq #4881)
    fe = model.frontend
    pos = make_positions(batch["padding_mask_BT"], 1)
    ref = fe.layernorm_embedding(fe.embed_tokens(batch["tokens_BT"]) + fe.embed_positions(pos))
    ref = ref.masked_fill(batch["padding_mask_BT"][..., None], 0.0)
    torch.testing.assert_close(fo.teacher_x, ref)


def test_speech_teacher_input_unmasked_and_student_masked():
    torch.manual_seed(0)
    model = build_model(cfg_for("speech")).train()
    batch = make_batch("speech")
    fo = model.frontend(batch)
    assert not fo.teacher_x.requires_grad and fo.student_x.requires_grad
    fo2 = model.frontend(dict(batch, mask_BT=torch.zeros_like(batch["mask_BT"])))
    assert torch.equal(fo.teacher_x, fo2.teacher_x)
    torch.testing.assert_close(fo2.student_x, fo2.teacher_x)  # no mask, no feature dropout
    assert not torch.allclose(fo.student_x, fo.teacher_x)
    # Without the pos conv, the student input is mask_emb exactly at masked frames and the teacher
    # input elsewhere (padded frames zero in both).
    class Zero(nn.Module):
        def forward(self, x, padding_mask_BT=None):
            return torch.zeros_like(x)

    model.frontend.pos_conv = Zero()
    fo = model.frontend(batch)
    m, p = fo.mask_BT, fo.padding_mask_BT
    torch.testing.assert_close(fo.student_x[m], model.frontend.mask_emb.expand(int(m.sum()), -1))
    torch.testing.assert_close(fo.student_x[~m], fo.teacher_x[~m])
    assert fo.teacher_x[p].abs().sum() == 0
    torch.testing.assert_close(fo.teacher_x[~p], fo.local_features_BTD[~p])


def student_mask_embedding(model) -> dict:
    """What Data2Vec.forward passes a v1 vision encoder besides the mask: the student's mask token."""
    return {"mask_embedding_D": model.frontend.mask_token} if model.modality == "vision" else {}


def test_vision_mask_token_replaces_masked_patches():
    torch.manual_seed(0)
    model = build_model(cfg_for("vision")).eval()
    enc = model.encoder
    batch = make_batch("vision")
    img, mask = batch["image_BCHW"], batch["mask_BT"]
    token = model.frontend.mask_token  # the student's, not a parameter of the EMA-updated encoder
    assert not any(n.endswith("mask_token") for n, _ in enc.named_parameters())
    emb = enc.embed(img, mask, token)
    assert emb.shape == (2, 10, 32)
    torch.testing.assert_close(emb[:, 1:][mask], token[0].expand(int(mask.sum()), -1))
    torch.testing.assert_close(emb[:, 0], enc.cls_token[0, 0].expand(2, -1))
    # changing the pixels of masked patches (row-major 4x4 patches of a 3x3 grid) changes nothing
    img2 = img.clone()
    for b in range(2):
        for p in mask[b].nonzero().flatten().tolist():
            r, c = divmod(p, 3)
            img2[b, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = torch.randn(3, 4, 4)
    torch.testing.assert_close(enc.embed(img2, mask, token), emb)
    o1 = enc(img, mask_BT=mask, num_taps=2, tap="block", mask_embedding_D=token)
    o2 = enc(img2, mask_BT=mask, num_taps=2, tap="block", mask_embedding_D=token)
    assert o1.x_BTD.shape == (2, 9, 32)
    torch.testing.assert_close(o1.x_BTD, o2.x_BTD)
    # ...while the unmasked (teacher) view does see them
    assert not torch.allclose(enc(img, num_taps=0).x_BTD, enc(img2, num_taps=0).x_BTD)
    fo = model.frontend(batch)
    assert fo.padding_mask_BT is None and fo.local_features_BTD is None
    assert torch.equal(fo.teacher_x, img) and not fo.teacher_x.requires_grad


def test_vision_init():
    torch.manual_seed(0)
    cfg = cfg_for("vision", dim=64, ffn_dim=256, depth=3)
    enc = build_model(cfg).encoder
    assert torch.all(enc.rel_pos_bias.relative_position_bias_table == 0)
    for i, blk in enumerate(enc.blocks, start=1):
        assert blk.attn.k_proj.bias is None
        assert torch.all(blk.gamma_1 == 0.1) and torch.all(blk.gamma_2 == 0.1)
        # fix_init_weight: std 0.02 / sqrt(2 l) for attn proj and fc2, 0.02 for fc1
        assert abs(blk.fc1.weight.std().item() - 0.02) < 0.002
        assert abs(blk.fc2.weight.std().item() - 0.02 / math.sqrt(2 * i)) < 0.002 / math.sqrt(2 * i)
        assert abs(blk.attn.out_proj.weight.std().item() - 0.02 / math.sqrt(2 * i)) < 0.003 / math.sqrt(2 * i)
    # drop path rises linearly to model.vision.drop_path
    cfg = cfg_for("vision", vision=VisionModelConfig(image_size=12, patch_size=4, drop_path=0.2))
    enc = build_model(cfg).encoder
    assert [round(b.drop_path.p, 6) for b in enc.blocks] == [0.0, 0.1, 0.2]


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("modality", ["speech", "vision", "text"])
def test_forward_backward_all_params_get_grads(modality):
    torch.manual_seed(0)
    model = build_model(cfg_for(modality))
    assert isinstance(model, Data2Vec)
    assert [n for n, _ in model.named_children()] == ["frontend", "encoder", "head"]
    assert isinstance(model.encoder.blocks, nn.ModuleList)
    model.train()
    batch = make_batch(modality)
    out = model(batch)
    mask = batch["mask_BT"]
    assert out.pred_ND.shape == (int(mask.sum()), 32)
    assert torch.equal(out.mask_BT, mask)
    out.pred_ND.pow(2).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        if not name.endswith("k_proj.bias"):  # softmax is shift-invariant: k bias grad is ~0
            assert p.grad.abs().sum() > 0, name
    if modality == "speech":
        assert any(n.startswith("frontend.feature_extractor") for n, _ in model.named_parameters())

    # pred_ND is the head at masked positions, in row-major order of mask.nonzero()
    model.eval()
    with torch.no_grad():
        out = model(batch)
        fo = model.frontend(batch)
        x = model.encoder(fo.student_x, padding_mask_BT=fo.padding_mask_BT, mask_BT=fo.mask_BT,
                          **student_mask_embedding(model)).x_BTD
        b, t = mask.nonzero(as_tuple=True)
        torch.testing.assert_close(out.pred_ND, model.head(x[b, t]))

    # the teacher: a self-contained deepcopy of the encoder on teacher_x, K taps
    teacher = copy.deepcopy(model.encoder).eval()
    student_ids = {id(p) for p in model.parameters()}
    assert not any(id(p) in student_ids for p in teacher.parameters())
    with torch.no_grad():
        to = teacher(out.teacher_x, padding_mask_BT=out.padding_mask_BT, num_taps=2, tap="ffn")
    assert len(to.taps) == 2 and all(t.shape == (*mask.shape, 32) for t in to.taps)


def test_speech_layerdrop_train_only():
    torch.manual_seed(0)
    enc = SpeechEncoder(cfg_for("speech", speech={"layerdrop": 1.0}))
    x = torch.randn(2, 6, 32)
    enc.train()
    o = enc(x, num_taps=2)
    assert o.taps == []
    torch.testing.assert_close(o.x_BTD, enc.layer_norm(x))
    enc.eval()
    assert len(enc(x, num_taps=2).taps) == 2
    # the draws come from the encoder's own seeded RNG: same seed, same blocks on every rank
    a = SpeechEncoder(cfg_for("speech", speech={"layerdrop": 0.5})).train()
    b = copy.deepcopy(a)
    a.set_layerdrop_seed(3)
    b.set_layerdrop_seed(3)
    for _ in range(3):
        torch.testing.assert_close(a(x).x_BTD, b(x).x_BTD)


@pytest.mark.parametrize("modality", ["speech", "vision", "text"])
def test_bf16_autocast_smoke(modality):
    torch.manual_seed(0)
    model = build_model(cfg_for(modality))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(make_batch(modality))
    assert torch.isfinite(out.pred_ND.float()).all()


@pytest.mark.parametrize("modality", ["speech", "vision", "text"])
def test_outputs_expose_their_tensors_to_pytree(modality):
    # FSDP2 hooks the re-gather of a module's parameters for backward on the tensors that
    # tree_flatten finds in the module's output; an opaque output made the resharded root run
    # backward on freed storage (torch 2.11, CUDA). Every tensor of every output must be found.
    import torch.utils._pytree as pytree

    torch.manual_seed(0)
    model = build_model(cfg_for(modality))
    batch = make_batch(modality)
    out = model(batch)
    enc = model.encoder(out.teacher_x, padding_mask_BT=out.padding_mask_BT, num_taps=2)
    for output in (out, model.frontend(batch), enc):
        leaves = [x for x in pytree.tree_leaves(output) if isinstance(x, torch.Tensor)]
        fields = [v for v in vars(output).values() if isinstance(v, torch.Tensor)]
        fields += [t for v in vars(output).values() if isinstance(v, list) for t in v]
        assert fields and {id(t) for t in fields} <= {id(t) for t in leaves}
    assert any(t is out.pred_ND for t in pytree.tree_leaves(out))
