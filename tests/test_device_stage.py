"""The input path's device side (scaling/data/device.py): the image stage against the workers' old
float pipeline, per-sample flips under any batch split, pinned memory on CUDA, and the synthetic
source made on the device. No GPU needed: a loader built for ``device="cuda"`` hands out the CUDA
format on any machine, and ``to_device(batch, "cpu")`` runs the same stage on the CPU."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from scaling.config import SpeechMaskConfig, TextMaskConfig
from scaling.data import build_loader
from scaling.data.collate import RAW_IMAGE_KEYS
from scaling.data.device import speech_span_masks, text_span_masks, to_device
from scaling.data.loader import _TAG_SYNTH
from scaling.data.quality import STAT_NAMES
from scaling.masking import sample_rng, speech_span_mask, text_span_mask
from test_data import make_cfgs, one_epoch_items

SEED = 5


def cfgs(modality: str, **data_kw):
    d, m, k = make_cfgs(modality, **data_kw)
    d.vision.augment, d.vision.crop_scale = True, [0.3, 1.0]  # ImageNet mean/std: a real normalisation
    return d, m, k


def make(c, *, mb, rank=0, world_size=1, **kw):
    d, m, k = c
    return build_loader(d, m, k, seed=SEED, rank=rank, world_size=world_size, micro_batch_size=mb, **kw)


def by_sample(batches, keys):
    return {int(sid): {k: b[k][i] for k in keys} for b in batches for i, sid in enumerate(b["sample_id_B"])}


# ----------------------------------------------------------------------------- the image stage
def old_worker_image(source, d, m, g: int) -> torch.Tensor:
    """The float image the workers made before the device stage, written out independently: the
    synthetic uint8 image, then Compose([RandomResizedCrop, RandomHorizontalFlip]) under the torch
    seed drawn from the sample's RNG, then ToDtype(scale=True) and Normalize."""
    from torchvision.transforms import v2

    size = m.vision.image_size
    image, _ = source.spec.synthetic_sample(source, sample_rng(SEED, g, _TAG_SYNTH))
    geometric = v2.Compose([v2.RandomResizedCrop((size, size), scale=tuple(d.vision.crop_scale),
                                                 interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                            v2.RandomHorizontalFlip()])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(sample_rng(SEED, 0, g).integers(0, 2**63 - 1)))
        image = geometric(image)
    return v2.Normalize(d.vision.mean, d.vision.std)(v2.ToDtype(torch.float32, scale=True)(image))


def test_device_stage_equals_the_workers_float_images():
    c = cfgs("vision")
    d, m, _ = c
    L_raw, L_cpu = make(c, mb=6, device="cuda"), make(c, mb=6)  # on a CPU device the workers finish images
    raw, finished = [next(L_raw) for _ in range(2)], [next(L_cpu) for _ in range(2)]
    for r, f in zip(raw, finished):
        assert set(RAW_IMAGE_KEYS) <= r.keys() and "image_BCHW" not in r
        assert r["image_uint8_BCHW"].dtype == torch.uint8 and r["hflip_B"].dtype == torch.bool
        out = to_device(r, "cpu")
        assert out.keys() == f.keys() and not set(RAW_IMAGE_KEYS) & out.keys()
        assert out["image_BCHW"].dtype == torch.float32
        for key in f:
            assert torch.allclose(out[key], f[key], rtol=0, atol=1e-6), key
        for i, g in enumerate(r["sample_id_B"].tolist()):
            assert torch.allclose(out["image_BCHW"][i], old_worker_image(L_raw.source, d, m, g), rtol=0, atol=1e-6)
    flips = torch.cat([r["hflip_B"] for r in raw])
    assert flips.any() and not flips.all()  # both branches of the flip were compared


def test_device_stage_switch_and_plain_copies():
    d, m, k = c = cfgs("vision")
    d.device_stage = False
    b = next(make(c, mb=2, device="cuda"))
    assert "image_BCHW" in b and not set(RAW_IMAGE_KEYS) & b.keys()
    for modality in ("speech", "text"):  # only copied: the same batch back
        b = next(make(cfgs(modality), mb=2, device="cuda"))
        out = to_device(b, "cpu")
        assert out.keys() == b.keys() and all(torch.equal(out[key], b[key]) for key in b)


def test_flips_and_crops_are_per_sample_under_any_split():
    """The same sample gets the same uint8 crop and flip as 8 batches of 2, 2 batches of 8, and 2
    ranks x 2 workers x batches of 2."""
    c = cfgs("vision")
    keys = ("image_uint8_BCHW", "hflip_B")
    ref = by_sample(one_epoch_items(make(c, mb=2, device="cuda", synthetic_epoch_size=16)), keys)
    assert len(ref) == 16 and 0 < sum(int(v["hflip_B"]) for v in ref.values()) < 16
    big = by_sample(one_epoch_items(make(c, mb=8, device="cuda", synthetic_epoch_size=16)), keys)
    c[0].num_workers = 2
    split = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pin_memory.*")  # no accelerator here: pinning is skipped
        for rank in (0, 1):
            split.update(by_sample(one_epoch_items(make(c, mb=2, rank=rank, world_size=2, device="cuda",
                                                  synthetic_epoch_size=16)), keys))
    for other in (big, split):
        assert other.keys() == ref.keys()
        for sid, v in ref.items():
            assert all(torch.equal(other[sid][k], v[k]) for k in keys), sid


def test_pin_memory_is_requested_for_cuda_only():
    d, m, k = c = cfgs("vision", num_workers=2)
    cuda, cpu = make(c, mb=2, device="cuda"), make(c, mb=2, device=torch.device("cpu"))
    assert cuda.pin_memory and cuda._dataloader().pin_memory is True
    assert not cpu.pin_memory and cpu._dataloader().pin_memory is False
    assert make(c, mb=2)._dataloader().pin_memory is False  # the default device is the CPU
    d.synthetic_on_device = True  # made on the device: nothing to pin, no workers
    L = make(c, mb=2, device="cuda")
    assert not L.pin_memory and L.num_workers == 0


# ----------------------------------------------------------------------------- vectorised span masks
def close(reference_rows: np.ndarray) -> float:
    """How far two means of masked fractions over as many independent rows may be apart: 5 standard
    errors of their difference (rows are independent; positions inside a row are not)."""
    per_row = reference_rows.mean(axis=1)
    return 5 * np.sqrt(2) * per_row.std() / np.sqrt(len(per_row)) + 1e-6


def test_speech_span_masks_follow_the_per_sample_rule():
    cfg = SpeechMaskConfig()
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    rows = 3000
    for T in (1, 12, 60, 499):
        width = T + 3
        got = speech_span_masks(gen, [T] * rows, width, cfg, torch.device("cpu"))
        assert got.shape == (rows, width) and not got[:, T:].any()
        want = np.stack([speech_span_mask(rng, T, cfg) for _ in range(rows)])
        assert got[:, :T].float().mean().item() == pytest.approx(want.mean(), abs=close(want)), T
        # the distribution of masked counts per row, not only its mean
        assert got[:, :T].sum(1).float().std().item() == pytest.approx(want.sum(1).std(), rel=0.1, abs=0.3), T


@pytest.mark.parametrize("keep,rand", [(0.0, 0.0), (0.1, 0.1)])
def test_text_span_masks_follow_the_per_sample_rule(keep, rand):
    cfg = TextMaskConfig(leave_unmasked_prob=keep, random_token_prob=rand)
    mask_id, vocab, rows, T = 4, 200, 3000, 40
    gen = torch.Generator().manual_seed(1)
    rng = np.random.default_rng(1)
    lengths = torch.tensor([T if i % 2 else 9 for i in range(rows)])
    tokens = torch.randint(mask_id + 1, vocab, (rows, T), generator=gen)
    tokens[:, 0], tokens[torch.arange(rows), lengths - 1] = 0, 2
    tokens[torch.arange(T)[None, :] >= lengths[:, None]] = 1
    mask, inputs = text_span_masks(gen, tokens, lengths, cfg, mask_id=mask_id, vocab_size=vocab,
                                   num_special=mask_id + 1)
    for n in (9, T):
        sel = lengths == n
        m_rows, x_rows, t_rows = mask[sel][:, :n], inputs[sel][:, :n], tokens[sel][:, :n]
        assert not mask[sel][:, n:].any() and not m_rows[:, [0, n - 1]].any()  # BOS, EOS, padding never
        ref = [text_span_mask(rng, t.numpy(), cfg, maskable=np.r_[False, np.ones(n - 2, bool), False],
                              mask_id=mask_id, vocab_size=vocab, num_special=mask_id + 1) for t in t_rows]
        ref_mask = np.stack([r[0] for r in ref])
        ref_inputs = np.stack([r[1] for r in ref])
        assert m_rows.float().mean().item() == pytest.approx(ref_mask.mean(), abs=close(ref_mask[:, 1:-1])), n
        assert torch.equal(x_rows[~m_rows], t_rows[~m_rows])  # unmasked positions keep their token
        shares = [(x_rows[m_rows] == mask_id).float().mean().item(),
                  (x_rows[m_rows] == t_rows[m_rows]).float().mean().item()]
        ref_shares = [(ref_inputs[ref_mask] == mask_id).mean(),
                      (ref_inputs[ref_mask] == t_rows.numpy()[ref_mask]).mean()]
        assert shares == pytest.approx(ref_shares, abs=0.02), n


# ----------------------------------------------------------------------------- the synthetic source on the device
@pytest.mark.parametrize("modality,audio", [("vision", 0), ("speech", 0), ("speech", 24000), ("text", 0)])
def test_synthetic_on_device_has_the_cpu_streams_layout(modality, audio):
    d, m, k = c = cfgs(modality)
    kw = dict(mb=4 if not audio else 0, max_batch_audio_samples=audio, synthetic_epoch_size=40)
    L_cpu = make(c, **kw)
    cpu = [next(L_cpu) for _ in range(5)]
    d.synthetic_on_device = True
    L = make(c, **kw)
    dev = [next(L) for _ in range(5)]
    for a, b in zip(cpu, dev):
        assert a.keys() == b.keys()
        for key in a:
            assert (a[key].shape, a[key].dtype) == (b[key].shape, b[key].dtype), key
        assert torch.equal(a["sample_id_B"], b["sample_id_B"])
        for key in ("audio_padding_BT", "padding_mask_BT"):  # same lengths, so the same padding
            if key in a:
                assert torch.equal(a[key], b[key])
        pad = b.get("audio_padding_BT", b.get("padding_mask_BT"))
        if modality == "text":
            assert (b["tokens_BT"][pad] == m.text.pad_id).all()
            assert (b["input_tokens_BT"][b["mask_BT"]] == m.text.mask_id).all()
        if modality == "speech":
            assert (b["audio_BT"][pad] == 0).all()
    masked = [torch.cat([x["mask_BT"].float().flatten() for x in s]).mean().item() for s in (cpu, dev)]
    assert masked[1] == pytest.approx(masked[0], abs=0.1)

    # reproducible for a seed, other for another; resumes exactly; the loader's interface
    again = make(c, **kw)
    assert all(torch.equal(x[key], y[key]) for x, y in zip(dev, (next(again) for _ in range(5))) for key in x)
    other = next(build_loader(d, m, k, seed=SEED + 1, rank=0, world_size=1, micro_batch_size=kw["mb"],
                              max_batch_audio_samples=audio, synthetic_epoch_size=40))
    content = {"vision": "image_BCHW", "speech": "audio_BT", "text": "tokens_BT"}[modality]
    assert other[content].shape != dev[0][content].shape or not torch.equal(other[content], dev[0][content])
    resumed = make(c, **kw)
    head = make(c, **kw)
    next(head), next(head)
    state = head.state_dict()
    assert resumed.same_layout(state)
    resumed.load_job_state([state])
    for want in dev[2:]:
        got = next(resumed)
        assert all(torch.equal(got[key], want[key]) for key in want)
    totals = dict(zip(STAT_NAMES, resumed.stats().tolist()))
    assert totals["read"] == totals["good"] == sum(x["sample_id_B"].numel() for x in dev)
    resumed.check_bad_fraction(totals)
    assert resumed.state_dict()["source"].startswith("synthetic_device:")
    with pytest.raises(ValueError, match="source"):  # a CPU synthetic run does not resume on this one
        d.synthetic_on_device = False
        make(c, **kw).load_state_dict(state)
    resumed.close()


def test_synthetic_on_device_needs_the_synthetic_source(tmp_path):
    d, m, k = c = cfgs("text")
    d.synthetic_on_device, d.train_shards = True, str(tmp_path / "train-000000.tar")
    with pytest.raises(ValueError, match="data.synthetic_on_device.*data.train_shards=synthetic"):
        make(c, mb=2)


def test_synthetic_on_device_epochs_end_a_finite_pass():
    d, m, k = c = cfgs("vision")
    d.synthetic_on_device = True
    batches = list(make(c, mb=3, epochs=1, synthetic_epoch_size=10))
    assert [b["sample_id_B"].numel() for b in batches] == [3, 3, 3, 1]
    assert sorted(torch.cat([b["sample_id_B"] for b in batches]).tolist()) == list(range(10))
