"""Speech (docs/data2vec.md §3.1, docs/data2vec2.md): mono audio at ``data.speech.sample_rate``, cropped to
``data.speech.max_samples``, through a CNN feature encoder (fairseq wav2vec 2.0) to frames; masks are spans
of frames. The modality's pieces behind :data:`SPEC` (:mod:`scaling.modalities`)."""

from __future__ import annotations

import io
from typing import Optional

import numpy as np
import torch

from scaling.config import ModelConfig, Recipe
from scaling.data.collate import SampleProcessor, _check_meta, _meta, _noise_seeds, _payload, _views, _views_batch
from scaling.data.quality import BadSample, short_error
from scaling.masking import block_mask_1d, sample_rng, speech_span_mask
from scaling.modalities import ModalitySpec
from scaling.models.speech import conv_output_length


class SpeechProcessor(SampleProcessor):
    modality = "speech"

    def decode(self, raw: dict) -> np.ndarray:
        cfg = self.data_cfg.speech
        data = _payload(raw, ("flac", "wav"))
        meta = _meta(raw)
        info = audio_header(data, cfg.max_seconds)
        # The rate comes from the header: a stray one is refused before the audio is decoded.
        _check_meta(meta, "sample_rate", info.samplerate)
        if info.samplerate != cfg.sample_rate:
            # Shards are resampled when built (scaling-shards audio); a stray rate is a bad sample.
            raise BadSample("sample_rate", f"{info.samplerate} Hz, not data.speech.sample_rate {cfg.sample_rate}")
        audio = decode_audio(data)
        _check_meta(meta, "num_samples", audio.shape[0])
        return audio

    def items(self, audio: np.ndarray, epoch: int, sample_id: int, label: Optional[int]) -> list[dict]:
        """``audio``: mono float32 at ``data.speech.sample_rate``."""
        cfg = self.data_cfg.speech
        n = int(audio.shape[0])
        if n < cfg.min_samples:  # as fairseq's min_sample_size filter
            raise BadSample("too_short", f"{n} samples < data.speech.min_samples {cfg.min_samples}")
        rng = sample_rng(self.seed, epoch, sample_id)
        if n > cfg.max_samples:
            start = int(rng.integers(0, n - cfg.max_samples + 1))
            audio = audio[start : start + cfg.max_samples]
            n = cfg.max_samples
        audio = np.asarray(audio, dtype=np.float32)
        if cfg.normalize:
            # fairseq: F.layer_norm(wav, wav.shape), eps 1e-5.
            a64 = audio.astype(np.float64)
            audio = ((a64 - a64.mean()) / np.sqrt(a64.var() + 1e-5)).astype(np.float32)
        frames = conv_output_length(n, self.model_cfg.speech.conv_layers)
        if frames <= 0:
            raise BadSample("too_short", f"{n} samples give no frame after the feature encoder")
        extra = {}
        if self.model_cfg.version == 2:  # M views of the clip, exactly int(frames x ratio) masked in each
            m2 = self.masking_cfg.speech_v2
            mask = block_mask_1d(rng, frames, ratio=m2.ratio, adjust=m2.adjust, span=m2.span,
                                 num_clones=self.masking_cfg.clones)
            extra["noise_seed"] = _noise_seeds(rng, self.masking_cfg.clones)
        else:
            mask = speech_span_mask(rng, frames, self.masking_cfg.speech)
        return [{"audio": audio, "mask": mask, "label": label, "id": int(sample_id), **extra}]

    def item_size(self, raw: dict) -> int:
        """Samples of audio the sample's item will hold (after the crop to ``data.speech.max_samples``),
        for batches bounded by padded audio: from its ``json`` ``num_samples`` when present (the decode
        checks that it is right), else by decoding. 0 when it gives no item (too short, or bad)."""
        cfg = self.data_cfg.speech
        try:
            n = _meta(raw).get("num_samples")
            n = int(n) if isinstance(n, int) and n > 0 else int(self.decode(raw).shape[0])
        except BadSample:
            return 0
        return 0 if n < cfg.min_samples else min(n, cfg.max_samples)

    @staticmethod
    def item_length(item: dict) -> int:
        """An item's size in the sense of :meth:`item_size` (speech)."""
        return int(item["audio"].shape[0])

    def inputs(self, items: list[dict]) -> dict[str, torch.Tensor]:
        B = len(items)
        batch: dict[str, torch.Tensor] = {}
        lengths = [it["audio"].shape[0] for it in items]
        S = max(lengths)
        F = conv_output_length(S, self.model_cfg.speech.conv_layers)
        audio = torch.zeros(B, S, dtype=torch.float32)
        pad = torch.ones(B, S, dtype=torch.bool)
        views = _views(items)
        mask = torch.zeros(B, max(views, 1), F, dtype=torch.bool)
        frame_pad = torch.ones(B, F, dtype=torch.bool)
        for i, it in enumerate(items):
            n = lengths[i]
            audio[i, :n] = torch.from_numpy(it["audio"])
            pad[i, :n] = False
            m = torch.from_numpy(it["mask"])
            mask[i, :, : m.shape[-1]] = m
            frame_pad[i, : m.shape[-1]] = False
        mask = mask.flatten(0, 1)
        batch.update(audio_BT=audio, audio_padding_BT=pad, mask_BT=mask)
        if views:
            batch.update(_views_batch(items, mask, frame_pad, views))
        return batch


# ----------------------------------------------------------------------------- decoding
# What soundfile raises on bytes libsndfile cannot open or decode (LibsndfileError is a RuntimeError).
_SF_ERRORS = (RuntimeError, ValueError, TypeError, EOFError, OSError)


def audio_header(src, max_seconds: float, *, limit_name: str = "data.speech.max_seconds"):
    """soundfile's ``info`` of encoded audio (bytes, or a file's path): the header only.
    :class:`BadSample` ``decode_error`` when libsndfile does not open it, ``empty`` for zero frames and
    ``too_large`` for more than ``max_seconds`` (``data.speech.max_seconds``): decoding allocates what
    the header declares, so a small file can ask for gigabytes. ``limit_name``: what the message calls
    ``max_seconds``."""
    import soundfile as sf

    try:
        info = sf.info(src if isinstance(src, str) else io.BytesIO(src))
    except _SF_ERRORS as exn:
        raise BadSample("decode_error", f"cannot decode audio: {short_error(exn)}") from None
    if info.samplerate <= 0 or info.channels <= 0:
        raise BadSample("decode_error", f"cannot decode audio: its header says {info.samplerate} Hz, "
                        f"{info.channels} channels")
    if info.frames <= 0:
        raise BadSample("empty", "audio has zero frames")
    seconds = info.frames / info.samplerate
    if seconds > max_seconds:
        raise BadSample("too_large", f"{seconds:.1f} s of audio ({info.frames} frames at {info.samplerate} Hz) > "
                        f"{limit_name} {max_seconds:g}")
    return info


def decode_audio(src) -> np.ndarray:
    """Encoded audio (bytes, or a file's path) -> mono float32 (channels averaged), or
    :class:`BadSample`: ``decode_error`` (truncated or garbage), ``empty`` (zero frames), ``non_finite``
    (NaN or inf). The rate is not changed; check the header first (:func:`audio_header`)."""
    import soundfile as sf

    try:
        audio, _ = sf.read(src if isinstance(src, str) else io.BytesIO(src), dtype="float32", always_2d=True)
    except _SF_ERRORS as exn:
        raise BadSample("decode_error", f"cannot decode audio: {short_error(exn)}") from None
    if audio.shape[0] == 0:
        raise BadSample("empty", "audio has zero frames")
    audio = audio.mean(axis=1) if audio.shape[1] > 1 else audio[:, 0]
    if not np.isfinite(audio).all():
        raise BadSample("non_finite", "audio holds NaN or inf")
    return np.ascontiguousarray(audio, dtype=np.float32)


# ----------------------------------------------------------------------------- synthetic samples
def synthetic_length(data_cfg, rng: np.random.Generator) -> int:
    """The clip length: the first draw of the sample's RNG (so a batch bounded by audio needs no audio)."""
    dc = data_cfg.speech
    return int(rng.integers(dc.min_samples, max(dc.min_samples, dc.max_samples) + 1))


def synthetic_sample(source, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """2 or 3 tones and a little noise; the label is the number of tones less 2."""
    dc = source.data_cfg.speech
    sr = dc.sample_rate
    n = synthetic_length(source.data_cfg, rng)
    k = int(rng.integers(2, 4))
    t = np.arange(n, dtype=np.float64) / sr
    freqs = rng.uniform(80.0, min(4000.0, 0.45 * sr), size=k)
    amps = rng.uniform(0.1, 0.5, size=k)
    phases = rng.uniform(0.0, 2 * np.pi, size=k)
    audio = (amps[:, None] * np.sin(2 * np.pi * freqs[:, None] * t[None, :] + phases[:, None])).sum(0)
    audio += 0.01 * rng.standard_normal(n)
    return audio.astype(np.float32), k - 2  # label: 2 or 3 tones


def device_item(source, g: int) -> dict:
    """``data.synthetic_on_device``: the CPU source's clip length, cropped as it crops."""
    return {"id": int(g), "length": source.item_size(None, g)}


def device_batch(maker, items: list[dict], ids_B: torch.Tensor) -> dict[str, torch.Tensor]:
    from scaling.data.device import host_to_device, speech_span_masks

    B, dev, gen = len(items), maker.device, maker.gen
    lengths = [int(it["length"]) for it in items]
    lengths_B = host_to_device(lengths, torch.int64, dev)
    conv = maker.model_cfg.speech.conv_layers
    S = max(lengths)
    F = conv_output_length(S, conv)
    padding_BT = torch.arange(S, device=dev)[None, :] >= lengths_B[:, None]
    audio_BT = torch.randn(B, S, generator=gen, device=dev).masked_fill_(padding_BT, 0.0)
    frames = [conv_output_length(n, conv) for n in lengths]
    mask_BT = speech_span_masks(gen, frames, F, maker.masking_cfg.speech, dev)
    label_B = torch.randint(0, 2, (B,), generator=gen, device=dev)  # the CPU source's 2 or 3 tones, less 2
    return {"audio_BT": audio_BT, "audio_padding_BT": padding_BT, "mask_BT": mask_BT, "label_B": label_B,
            "sample_id_B": ids_B}


# ----------------------------------------------------------------------------- models
def build_v1(cfg: ModelConfig):
    from scaling.models.blocks import init_bert_params
    from scaling.models.speech import SpeechEncoder, SpeechFrontend

    # fairseq final_proj is a plain nn.Linear (PyTorch default init); the mlp/norm_linear variants get BERT
    # init like the text head.
    return SpeechFrontend(cfg), SpeechEncoder(cfg), (None if cfg.head == "linear" else init_bert_params)


def build_v2(cfg: ModelConfig):
    from scaling.models.decoders import Decoder1d
    from scaling.models.speech2 import SpeechEncoder2, SpeechFrontend2

    return SpeechFrontend2(cfg), SpeechEncoder2(cfg), Decoder1d(cfg)


def demo_data(out_dir) -> tuple[list[str], dict]:
    from scaling.data.demo_sets import build_speech_demo

    info = build_speech_demo(out_dir)
    return [f"data.train_shards={info['train_shards']}"], info


# ----------------------------------------------------------------------------- cost models
def positions(recipe: Recipe, audio_samples: Optional[int] = None) -> int:
    """Frames of a clip of ``audio_samples`` (default the longest crop)."""
    return conv_output_length(audio_samples or recipe.data.speech.max_samples, recipe.model.speech.conv_layers)


def frontend_flops(cfg: ModelConfig, T: int, audio_samples: Optional[int]) -> float:
    """The CNN on the clip and the projection of its T frames."""
    from scaling.flops import _cnn_flops

    assert audio_samples is not None, "speech needs the audio lengths"
    return _cnn_flops(cfg, audio_samples) + 2.0 * T * cfg.speech.conv_layers[-1][0] * cfg.dim


def positional_conv_flops(cfg: ModelConfig, T: int) -> float:
    from scaling.flops import _pos_conv_flops

    return _pos_conv_flops(cfg, T)


def row_lengths(cfg: ModelConfig, batch: dict) -> tuple[list[int], list[int]]:
    """Frames of each row's real audio, and the audio samples."""
    rows = int(batch["audio_BT"].shape[0])
    pad = batch.get("audio_padding_BT")
    audio = [int(batch["audio_BT"].shape[-1])] * rows if pad is None else (~pad).sum(-1).tolist()
    return [conv_output_length(a, cfg.speech.conv_layers) for a in audio], audio


def frontend_bytes(recipe: Recipe, batch: int, positions: int, a: int) -> int:
    """Invert the CNN to the audio samples that give ``positions`` frames, then its activations, the
    projection, the positional convs and the teacher's input."""
    m = recipe.model
    D = m.dim
    layers = m.speech.conv_layers
    samples = positions
    for _, k, s in reversed(layers):
        samples = (samples - 1) * s + k
    total, frames = a * samples, samples
    for ch, k, s in layers:
        frames = (frames - k) // s + 1
        total += ch * frames * (4 + 2 * a)
    channels = layers[-1][0]
    total += positions * (2 * a * channels + a * D)  # projection LayerNorm and Linear inputs
    total += positions * m.speech.conv_pos_depth * (8 + a) * D  # positional convs
    total += positions * 2 * a * D  # teacher input, encoder input LayerNorm
    return batch * total


SPEC = ModalitySpec(
    name="speech", processor=SpeechProcessor, build_v1=build_v1, build_v2=build_v2, hf_adapter="scaling.hf.speech",
    synthetic_sample=synthetic_sample, device_item=device_item, device_batch=device_batch, demo_data=demo_data,
    positions=positions, cls_positions=0, decoder_kernel_dims=1, frontend_flops=frontend_flops, teacher_embeds=False,
    positional_conv_flops=positional_conv_flops, row_lengths=row_lengths, frontend_bytes=frontend_bytes,
    block_extra_bytes=lambda m, a: 0,
)
