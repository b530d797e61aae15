"""Sample processing (decode, crop/augment, normalise, mask) and batch making: the shared part.

A *raw* sample is a webdataset dict of bytes (``__key__``, ``__url__``, ``flac``/``png``/``ids``...)
or, for the synthetic source, an already-decoded sample. A modality's :class:`SampleProcessor`
(``scaling/modalities/<modality>.py``; :func:`scaling.modalities.build_processor` picks it) decodes one
raw sample and turns it into zero or more *items* (text documents longer than a block give several),
each a dict of numpy arrays / tensors with its mask already drawn; :meth:`SampleProcessor.collate`
pads and stacks items into a batch: the modality's keys, then the labels and sample ids.

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

import json
from typing import Optional

import numpy as np
import torch

from scaling.config import DataConfig, MaskingConfig, ModelConfig
from scaling.data.quality import BadSample

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
        label = int(v.decode().strip() if isinstance(v, (bytes, bytearray)) else v)
    except (UnicodeDecodeError, ValueError, TypeError, OverflowError):
        raise BadSample("bad_label", f"cls member {bytes(v)[:20]!r} is not an integer") from None
    # Batches hold labels as int64 with -1 for "no label": a negative or bigger one would be misread
    # or overflow torch.tensor in collate.
    if not 0 <= label < 2**63:
        raise BadSample("bad_label", f"cls member {label} is not in [0, 2^63)")
    return label


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
    except (UnicodeDecodeError, ValueError, RecursionError) as exn:  # RecursionError: "[[[[..." nested too deep
        raise BadSample("metadata_mismatch", f"json member is not JSON: {str(exn)[:200]}") from None
    if not isinstance(meta, dict):
        raise BadSample("metadata_mismatch", "json member is not an object")
    return meta


def _check_meta(meta: dict, field: str, actual: int) -> None:
    want = meta.get(field)
    try:
        ok = want is None or int(want) == actual
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(1e400)
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
    """Decodes and masks samples of one modality; builds batches of them. A modality subclasses it
    (``scaling/modalities``) with :meth:`decode`, :meth:`items` and :meth:`inputs`."""

    modality = ""

    def __init__(self, data_cfg: DataConfig, model_cfg: ModelConfig, masking_cfg: MaskingConfig, seed: int, *,
                 device_stage: bool = False):
        """``device_stage`` (vision): items and batches of uint8 images plus flip flags, finished by
        :func:`scaling.data.device.to_device` (module docstring); False gives finished float images."""
        self.data_cfg = data_cfg
        self.device_stage = bool(device_stage)
        self.model_cfg = model_cfg
        self.masking_cfg = masking_cfg
        self.seed = int(seed)

    def from_raw(self, raw: dict, epoch: int, sample_id: int) -> list[dict]:
        """Items of one webdataset sample. Raises :class:`BadSample` (with its kind) on input that
        cannot be used; the loader skips and counts it."""
        label = _label(raw)
        return self.items(self.decode(raw), epoch, sample_id, label)

    def decode(self, raw: dict):
        """The sample's payload as :meth:`items` takes it; :class:`BadSample` when it cannot be used."""
        raise NotImplementedError

    def items(self, decoded, epoch: int, sample_id: int, label: Optional[int]) -> list[dict]:
        """The items of one decoded sample (the synthetic source calls this directly)."""
        raise NotImplementedError

    def inputs(self, items: list[dict]) -> dict[str, torch.Tensor]:
        """The modality's keys of a batch of ``items`` (inputs, padding, masks, the 2.0 views)."""
        raise NotImplementedError

    def item_size(self, raw: dict) -> int:
        raise ValueError(f"batches bounded by audio samples are for speech, not {self.modality}")

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.inputs(items)
        if any(it["label"] is not None for it in items):
            batch["label_B"] = torch.tensor([-1 if it["label"] is None else it["label"] for it in items], dtype=torch.int64)
        batch["sample_id_B"] = torch.tensor([it["id"] for it in items], dtype=torch.int64)
        return batch
