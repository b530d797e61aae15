"""Per-modality sample processing (decode, crop/augment, normalise, mask) and batch making.

A *raw* sample is a webdataset dict of bytes (``__key__``, ``__url__``, ``flac``/``png``/``ids``...)
or, for the synthetic source, an already-decoded sample. :class:`SampleProcessor` turns one raw
sample into zero or more *items* (text documents longer than a block give several), each a dict
of numpy arrays / tensors with its mask already drawn; :meth:`SampleProcessor.collate` pads and
stacks items into a batch.

Every random choice of a sample (speech crop, vision augmentation, every mask) comes from
``sample_rng(seed, epoch, sample_id[, block])``: it depends only on the sample, never on its batch
neighbours, its rank or the micro-batch size.

Vision with ``device_stage`` (the loader's choice for CUDA devices, ``data.device_stage``): an item
holds the uint8 crop and its flip flag instead of the float image, and a batch holds
``image_uint8_BCHW``, ``hflip_B`` and the normalisation as ``pixel_mean_BC`` / ``pixel_std_BC``
instead of ``image_BCHW``; :func:`scaling.data.device.to_device` turns that into the same
``image_BCHW`` on the device. The crop and resize already work on uint8 (torchvision resizes a
uint8 image to uint8), so only the flip, the float conversion and the normalisation move, and the
result does not change: they are exact per-pixel operations the device repeats in the same order.
"""

from __future__ import annotations

import io
import json
from typing import Optional

import numpy as np
import torch

from scaling.config import DataConfig, MaskingConfig, ModelConfig
from scaling.data.quality import BadSample
from scaling.data.shards import quiet_tv_io
from scaling.masking import (block_mask_1d, inverse_block_mask_2d, random_mask, sample_rng, speech_span_mask,
                             text_span_mask, vision_block_mask)

__all__ = ["SampleProcessor", "BOS_ID", "EOS_ID", "UNK_ID", "RAW_IMAGE_KEYS"]

# fairseq/RoBERTa special ids (pad and <mask> come from ModelConfig.text).
BOS_ID = 0
EOS_ID = 2
UNK_ID = 3

# What a vision batch holds instead of image_BCHW when the device stage finishes it (module docstring).
RAW_IMAGE_KEYS = ("image_uint8_BCHW", "hflip_B", "pixel_mean_BC", "pixel_std_BC")


def _label(raw: dict) -> Optional[int]:
    v = raw.get("cls")
    if v is None:
        return None
    try:
        return int(v.decode().strip() if isinstance(v, (bytes, bytearray)) else v)
    except (UnicodeDecodeError, ValueError):
        raise BadSample("bad_label", f"cls member {bytes(v)[:20]!r} is not an integer") from None


def _payload(raw: dict, exts: tuple[str, ...]) -> bytes:
    for ext in exts:
        if ext in raw:
            if not raw[ext]:
                raise BadSample("empty", f"{ext} member has zero bytes")
            return raw[ext]
    members = sorted(k for k in raw if not k.startswith("__"))
    raise BadSample("missing_field", f"no {'/'.join(exts)} member (members: {members})")


def _meta(raw: dict) -> dict:
    if "json" not in raw:
        return {}
    try:
        meta = json.loads(raw["json"])
    except (UnicodeDecodeError, ValueError) as exn:
        raise BadSample("metadata_mismatch", f"json member is not JSON: {exn}") from None
    if not isinstance(meta, dict):
        raise BadSample("metadata_mismatch", "json member is not an object")
    return meta


def _check_meta(meta: dict, field: str, actual: int) -> None:
    want = meta.get(field)
    try:
        ok = want is None or int(want) == actual
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise BadSample("metadata_mismatch", f"json {field} {want!r} != {actual} decoded")


def kept_positions(mask_RT: torch.Tensor, padding_mask_RT: Optional[torch.Tensor] = None):
    """``(keep_index_RK, keep_padding_RK)``: each row's positions that are neither masked nor padding,
    ascending, in ``[R, K]`` int64 with K the largest count of any row. data2vec 2.0 image views keep an
    exact count, so K is every row's and ``keep_padding_RK`` is None; rows of text blocks of different
    lengths keep different counts, and ``keep_padding_RK`` (bool, True = pad slot) marks the slots past a
    row's own count (their index is 0; the encoder and the decoder skip them)."""
    drop_RT = mask_RT if padding_mask_RT is None else mask_RT | padding_mask_RT
    kept_R = (~drop_RT).sum(1)
    K = int(kept_R.max()) if kept_R.numel() else 0
    # A stable sort puts the kept (False) positions first, in their original order.
    index_RK = torch.sort(drop_RT.to(torch.uint8), dim=1, stable=True).indices[:, :K]
    if padding_mask_RT is None:
        if kept_R.numel() and bool((kept_R != K).any()):
            raise ValueError(f"data2vec 2.0 image views must keep equal numbers of patches, got "
                             f"{sorted(set(kept_R.tolist()))}")
        return index_RK.contiguous(), None
    pad_RK = torch.arange(K)[None, :] >= kept_R[:, None]
    return index_RK.masked_fill(pad_RK, 0).contiguous(), pad_RK


def _noise_seeds(rng: np.random.Generator, views: int) -> np.ndarray:
    """Keys of the decoder's noise at the masked positions (data2vec 2.0): one per view, from the sample's
    own stream."""
    return rng.integers(0, 2**31, size=views, dtype=np.int64)


def _views(items: list[dict]) -> int:
    """M when the items carry data2vec 2.0 masks ([M, T] per item), else 0."""
    return items[0]["mask"].shape[0] if items[0]["mask"].ndim == 2 else 0


def _views_batch(items: list[dict], mask_RT: torch.Tensor, padding_BT: Optional[torch.Tensor], views: int) -> dict:
    """The data2vec 2.0 keys of a batch: each view's kept positions (and, for padded sequences, the pad
    slots) and the keys of its decoder noise."""
    padding_RT = None if padding_BT is None else padding_BT.repeat_interleave(views, dim=0)
    keep, keep_pad = kept_positions(mask_RT, padding_RT)
    out = {"keep_index_RK": keep, "noise_seed_R": torch.from_numpy(np.concatenate([it["noise_seed"] for it in items]))}
    return out if keep_pad is None else {**out, "keep_padding_RK": keep_pad}


class SampleProcessor:
    """Decodes and masks samples of one modality; builds batches of them."""

    def __init__(self, data_cfg: DataConfig, model_cfg: ModelConfig, masking_cfg: MaskingConfig, seed: int, *,
                 device_stage: bool = False):
        """``device_stage`` (vision): items and batches of uint8 images plus flip flags, finished by
        :func:`scaling.data.device.to_device` (module docstring); False gives finished float images."""
        self.data_cfg = data_cfg
        self.device_stage = bool(device_stage)
        self.model_cfg = model_cfg
        self.masking_cfg = masking_cfg
        self.seed = int(seed)
        self.modality = model_cfg.modality
        if self.modality == "vision":
            self._build_vision()
        elif self.modality == "text":
            bs = data_cfg.text.block_size
            if bs < 3:
                raise ValueError(f"data.text.block_size must be >= 3 (BOS + token + EOS), got {bs}")
            if bs > model_cfg.text.max_positions:
                raise ValueError(
                    f"data.text.block_size ({bs}) exceeds model.text.max_positions ({model_cfg.text.max_positions})"
                )
        elif self.modality == "speech":
            from scaling.models.speech import conv_output_length

            self._conv_out = conv_output_length
        else:
            raise ValueError(f"unknown modality {self.modality!r}")

    # ------------------------------------------------------------------ dispatch
    def from_raw(self, raw: dict, epoch: int, sample_id: int) -> list[dict]:
        """Items of one webdataset sample. Raises :class:`BadSample` (with its kind) on input that
        cannot be used; the loader skips and counts it."""
        label = _label(raw)
        if self.modality == "speech":
            return self.speech_items(self._decode_audio(raw), epoch, sample_id, label)
        if self.modality == "vision":
            image = self._decode_image(raw)
            return self.vision_items(image, epoch, sample_id, label)
        ids = self._decode_ids(raw)
        return self.text_items(ids, epoch, sample_id, label)

    # ------------------------------------------------------------------ speech
    def _decode_audio(self, raw: dict) -> np.ndarray:
        import soundfile as sf

        data = _payload(raw, ("flac", "wav"))
        try:
            audio, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as exn:
            raise BadSample("decode_error", f"audio does not decode: {exn}") from None
        if audio.shape[0] == 0:
            raise BadSample("empty", "audio has zero frames")
        meta = _meta(raw)
        _check_meta(meta, "num_samples", audio.shape[0])
        _check_meta(meta, "sample_rate", sr)
        if sr != self.data_cfg.speech.sample_rate:
            # Shards are resampled when built (scaling-shards audio); a stray rate is a bad sample.
            raise BadSample("sample_rate", f"{sr} Hz, not data.speech.sample_rate {self.data_cfg.speech.sample_rate}")
        audio = audio.mean(axis=1) if audio.shape[1] > 1 else audio[:, 0]
        if not np.isfinite(audio).all():
            raise BadSample("non_finite", "audio holds NaN or inf")
        return np.ascontiguousarray(audio, dtype=np.float32)

    def speech_items(self, audio: np.ndarray, epoch: int, sample_id: int, label: Optional[int]) -> list[dict]:
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
        frames = self._conv_out(n, self.model_cfg.speech.conv_layers)
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
        if self.modality != "speech":
            raise ValueError(f"batches bounded by audio samples are for speech, not {self.modality}")
        cfg = self.data_cfg.speech
        try:
            n = _meta(raw).get("num_samples")
            n = int(n) if isinstance(n, int) and n > 0 else int(self._decode_audio(raw).shape[0])
        except BadSample:
            return 0
        return 0 if n < cfg.min_samples else min(n, cfg.max_samples)

    @staticmethod
    def item_length(item: dict) -> int:
        """An item's size in the sense of :meth:`item_size` (speech)."""
        return int(item["audio"].shape[0])

    # ------------------------------------------------------------------ vision
    def _build_vision(self):
        from torchvision.io import ImageReadMode
        from torchvision.transforms import v2

        vc, dc = self.model_cfg.vision, self.data_cfg.vision
        C = vc.channels
        modes = {1: ImageReadMode.GRAY, 3: ImageReadMode.RGB, 4: ImageReadMode.RGB_ALPHA}
        if C not in modes:
            raise ValueError(f"model.vision.channels must be 1, 3 or 4, got {C}")
        if len(dc.mean) < C or len(dc.std) < C:
            raise ValueError(f"data.vision.mean/std need at least {C} entries (model.vision.channels)")
        self._read_mode = modes[C]
        size = vc.image_size
        self._size = size
        if dc.augment:
            self._geometric = v2.RandomResizedCrop(
                (size, size), scale=tuple(dc.crop_scale), interpolation=v2.InterpolationMode.BICUBIC, antialias=True
            )
        else:
            self._geometric = v2.Resize((size, size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        # v2.RandomHorizontalFlip's rule, drawn here so the flag can travel with a uint8 image: it
        # flips when torch.rand(1) < p, drawn right after the crop's draws (as Compose([crop, flip]) did).
        self._flip_p = 0.5 if dc.augment else 0.0
        self._to_float = v2.Compose(
            [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(dc.mean[:C]), list(dc.std[:C]))]
        )
        self._mean_C = torch.tensor(list(dc.mean[:C]), dtype=torch.float32)
        self._std_C = torch.tensor(list(dc.std[:C]), dtype=torch.float32)
        self._grid = (size // vc.patch_size, size // vc.patch_size)

    def _decode_image(self, raw: dict) -> torch.Tensor:
        from torchvision.io import decode_image

        data = torch.from_numpy(np.frombuffer(_payload(raw, ("png", "jpg", "jpeg", "webp")), dtype=np.uint8).copy())
        try:
            with quiet_tv_io():
                image = decode_image(data, mode=self._read_mode)
        except (RuntimeError, ValueError) as exn:  # torchvision's codecs raise RuntimeError on bad bytes
            raise BadSample("decode_error", f"image does not decode: {str(exn).splitlines()[0]}") from None
        if image.shape[-1] == 0 or image.shape[-2] == 0:
            raise BadSample("empty", f"image of size {tuple(image.shape)}")
        return image

    def vision_items(self, image: torch.Tensor, epoch: int, sample_id: int, label: Optional[int]) -> list[dict]:
        """``image``: uint8 ``[C,H,W]`` with the model's channel count."""
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != self.model_cfg.vision.channels:
            raise ValueError(f"expected a uint8 [{self.model_cfg.vision.channels},H,W] image, got {image.dtype} {tuple(image.shape)}")
        rng = sample_rng(self.seed, epoch, sample_id)
        torch_seed = int(rng.integers(0, 2**63 - 1))
        flip = False
        if self.data_cfg.vision.augment or tuple(image.shape[1:]) != (self._size, self._size):
            # The augmentation draws from torch's global RNG: fork it and seed it per sample so
            # the result depends on this sample only (and the caller's RNG stream is untouched).
            with torch.random.fork_rng(devices=[]):
                # The CPU generator only: torch.manual_seed also seeds CUDA, whose lazy-init bookkeeping
                # (a stack trace per call on CUDA builds) cost half of a small image's processing.
                torch.default_generator.manual_seed(torch_seed)
                image = self._geometric(image)  # uint8 in, uint8 out
                flip = self._flip_p > 0 and bool(torch.rand(1) < self._flip_p)
        extra = {}
        if self.model_cfg.version == 2:  # M views of the sample, each keeping the same number of patches
            m2 = self.masking_cfg.vision_v2
            mask = inverse_block_mask_2d(rng, self._grid, ratio=m2.ratio, adjust=m2.adjust, block=m2.block,
                                         num_clones=self.masking_cfg.clones)
            extra["noise_seed"] = _noise_seeds(rng, self.masking_cfg.clones)
        else:
            mask = vision_block_mask(rng, self._grid, self.masking_cfg.vision)
        if self.device_stage:
            return [{"image_uint8": image.contiguous(), "hflip": flip, "mask": mask, "label": label,
                     "id": int(sample_id), **extra}]
        if flip:
            image = image.flip(-1)  # what v2.RandomHorizontalFlip does to an image tensor
        pixels = self._to_float(image).contiguous()
        return [{"image": pixels, "mask": mask, "label": label, "id": int(sample_id), **extra}]

    # ------------------------------------------------------------------ text
    def _decode_ids(self, raw: dict) -> np.ndarray:
        data = _payload(raw, ("ids",))
        if len(data) % 4:
            raise BadSample("decode_error", f"ids member has {len(data)} bytes, not a multiple of 4 (int32)")
        ids = np.frombuffer(data, dtype="<i4").astype(np.int64)
        _check_meta(_meta(raw), "num_tokens", ids.shape[0])
        vocab = self.model_cfg.text.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            raise BadSample("bad_tokens", f"token ids in [{ids.min()}, {ids.max()}], outside [0, {vocab})")
        return ids

    def text_items(self, ids: np.ndarray, epoch: int, sample_id: int, label: Optional[int]) -> list[dict]:
        """One document (ids without BOS/EOS) -> blocks ``[BOS] + chunk + [EOS]`` of <= block_size."""
        tc = self.model_cfg.text
        ids = np.asarray(ids, dtype=np.int64)
        content = self.data_cfg.text.block_size - 2
        items = []
        specials = np.array([BOS_ID, EOS_ID, tc.pad_id], dtype=np.int64)
        for b, start in enumerate(range(0, ids.shape[0], content)):
            tokens = np.concatenate([[BOS_ID], ids[start : start + content], [EOS_ID]]).astype(np.int64)
            rng = sample_rng(self.seed, epoch, sample_id, b)
            mask, inputs = text_span_mask(
                rng,
                tokens,
                self.masking_cfg.text,
                maskable=~np.isin(tokens, specials),
                mask_id=tc.mask_id,
                vocab_size=tc.vocab_size,
                num_special=tc.mask_id + 1,
            )
            extra = {}
            if self.model_cfg.version == 2:  # M views of the block, the masked tokens dropped from the student
                mask = random_mask(rng, ~np.isin(tokens, specials), ratio=self.masking_cfg.text_v2_ratio,
                                   num_clones=self.masking_cfg.clones)
                extra["noise_seed"] = _noise_seeds(rng, self.masking_cfg.clones)
            # Blocks of one document get distinct ids: (doc id << 16) | block.
            items.append({"tokens": tokens, "input": inputs, "mask": mask, "label": label,
                          "id": (int(sample_id) << 16) | b, **extra})
        return items

    # ------------------------------------------------------------------ batches
    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        B = len(items)
        batch: dict[str, torch.Tensor] = {}
        if self.modality == "speech":
            lengths = [it["audio"].shape[0] for it in items]
            S = max(lengths)
            F = self._conv_out(S, self.model_cfg.speech.conv_layers)
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
        elif self.modality == "vision":
            if "image_uint8" in items[0]:
                batch["image_uint8_BCHW"] = torch.stack([it["image_uint8"] for it in items])
                batch["hflip_B"] = torch.tensor([it["hflip"] for it in items], dtype=torch.bool)
                # Per row, so that every tensor of a batch is indexed by row (a caller may select rows).
                batch["pixel_mean_BC"] = self._mean_C.repeat(B, 1)
                batch["pixel_std_BC"] = self._std_C.repeat(B, 1)
            else:
                batch["image_BCHW"] = torch.stack([it["image"] for it in items])
            mask = torch.stack([torch.from_numpy(it["mask"]) for it in items])
            views = _views(items)
            if views:  # data2vec 2.0: [B, M, T] -> M consecutive rows per sample, and the kept patches
                mask = mask.flatten(0, 1)
                batch.update(_views_batch(items, mask, None, views))
            batch["mask_BT"] = mask
        else:
            T = max(it["tokens"].shape[0] for it in items)
            pad_id = self.model_cfg.text.pad_id
            tokens = torch.full((B, T), pad_id, dtype=torch.int64)
            inputs = torch.full((B, T), pad_id, dtype=torch.int64)
            padm = torch.ones(B, T, dtype=torch.bool)
            views = _views(items)
            mask = torch.zeros(B, max(views, 1), T, dtype=torch.bool)
            for i, it in enumerate(items):
                n = it["tokens"].shape[0]
                tokens[i, :n] = torch.from_numpy(it["tokens"])
                inputs[i, :n] = torch.from_numpy(it["input"])
                padm[i, :n] = False
                mask[i, :, :n] = torch.from_numpy(it["mask"])
            mask = mask.flatten(0, 1)
            batch.update(tokens_BT=tokens, input_tokens_BT=inputs, padding_mask_BT=padm, mask_BT=mask)
            if views:
                batch.update(_views_batch(items, mask, padm, views))
        if any(it["label"] is not None for it in items):
            batch["label_B"] = torch.tensor([-1 if it["label"] is None else it["label"] for it in items], dtype=torch.int64)
        batch["sample_id_B"] = torch.tensor([it["id"] for it in items], dtype=torch.int64)
        return batch
