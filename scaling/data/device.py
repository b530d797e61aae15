"""The device side of the input path: the copy of each micro-batch to the training device, the batch
stage that finishes images there, and a synthetic source that makes its batches on the device.

:func:`to_device` is what the trainer calls per micro-batch. Every tensor is copied with
``non_blocking=True``; the loader hands batches out in pinned memory when the device is CUDA
(``build_loader(device=...)``), so the copies are asynchronous and overlap with the previous
step's compute. A vision batch built for a CUDA device (``data.device_stage``) holds uint8 images,
per-sample flip flags and the normalisation (:data:`scaling.data.collate.RAW_IMAGE_KEYS`) instead of
``image_BCHW``; :func:`finish_images` then flips, converts and normalises the whole batch at once
on the device, in the order and with the operations the workers used (torchvision's
``ToDtype(scale=True)`` and ``Normalize``), so the result is the workers' float image to fp32
rounding. The uint8 images are a quarter of the bytes to move through the workers' shared
memory, to pin and to copy, and the workers do no float work. The flip flag is drawn by the
worker from the sample's own seed, right after its crop, exactly as ``RandomHorizontalFlip`` drew
it, so a sample's image does not depend on its batch, its rank or a resume.

Speech and text batches are only copied: their CPU work (decode, crop, mask) is per sample with
Python control flow, and their tensors are small (a 237.5 s speech micro-batch is 15 MB of float
audio, about a millisecond over PCIe), so there is nothing to win on the device.

``data.synthetic_on_device`` (with ``data.train_shards=synthetic``): :class:`DeviceSyntheticSource`
keeps the CPU synthetic stream's structure (global sample indices, epochs, speech clip lengths,
length-bucketed batches, the resume state) and :class:`DeviceBatchMaker` makes each batch in one
go on the device: random content with the CPU source's keys, dtypes and shapes, and masks of the
same kinds (speech and text spans by the same rules, vectorised; vision BEiT blocks from a bank
drawn once with :func:`scaling.masking.vision_block_mask`). A batch is seeded from its first sample
index, so the stream is reproducible and resumes exactly. There are no workers and no copies:
this measures the model's speed, not the data's. On a CPU device it is the same stream made on the
CPU, in the training process.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from scaling.config import DataConfig, MaskingConfig, ModelConfig
from scaling.data.collate import RAW_IMAGE_KEYS
from scaling.data.loader import _SyntheticSource
from scaling.data.quality import DataCounters
from scaling.modalities import build_processor, spec_for

__all__ = ["to_device", "finish_images", "DeviceSyntheticSource", "DeviceBatchMaker", "speech_span_masks",
           "text_span_masks"]

_TAG_DEVICE_BATCH = 0x4456_4243
_TAG_MASK_BANK = 0x4D42_4E4B
# Vision masks of the device source are drawn from this many BEiT masks made once (their drawing is
# a Python loop per sample; a bank keeps it out of the step).
MASK_BANK_SIZE = 512


# ============================================================================= the copy and the stage
def to_device(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """``batch`` on ``device``: every tensor copied with ``non_blocking=True`` (asynchronous from
    pinned memory), and a vision batch of uint8 images finished there by :func:`finish_images`.
    The result has the keys of a finished batch (``image_BCHW``, never the uint8 keys); a tensor
    already on ``device`` is not copied."""
    device = torch.device(device)
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k not in RAW_IMAGE_KEYS}
    if RAW_IMAGE_KEYS[0] in batch:
        image_u8_BCHW, hflip_B, mean_BC, std_BC = (batch[k].to(device, non_blocking=True) for k in RAW_IMAGE_KEYS)
        out = {"image_BCHW": finish_images(image_u8_BCHW, hflip_B, mean_BC, std_BC), **out}
    return out


def finish_images(image_u8_BCHW: torch.Tensor, hflip_B: torch.Tensor, mean_BC: torch.Tensor,
                  std_BC: torch.Tensor) -> torch.Tensor:
    """uint8 crops -> the float images the workers would have made: flip the rows whose flag is
    set, then ``x / 255`` as ``v2.ToDtype(float32, scale=True)`` and ``(x - mean) / std`` as
    ``v2.Normalize``, in that order and in fp32. The flip moves pixels only, so it commutes with the
    per-pixel float work and is done on the uint8 bytes."""
    if image_u8_BCHW.dtype != torch.uint8 or image_u8_BCHW.ndim != 4:
        raise ValueError(f"expected uint8 [B,C,H,W] images, got {image_u8_BCHW.dtype} {tuple(image_u8_BCHW.shape)}")
    # torch.where, not boolean indexing: no device-to-host sync to count the flipped rows.
    image_u8_BCHW = torch.where(hflip_B.view(-1, 1, 1, 1), image_u8_BCHW.flip(-1), image_u8_BCHW)
    x_BCHW = image_u8_BCHW.to(torch.float32).mul_(1.0 / 255)
    return x_BCHW.sub_(mean_BC[:, :, None, None]).div_(std_BC[:, :, None, None])


def host_to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a tensor on ``device``, through pinned memory on CUDA: a copy from
    pageable memory would wait for the device's queued work."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


# ============================================================================= span masks, vectorised
def _random_subsets(gen: torch.Generator, sizes_B: torch.Tensor, choose_B: torch.Tensor, width: int) -> torch.Tensor:
    """bool ``[B, width]``: in row i, ``choose_B[i]`` positions drawn uniformly without replacement
    from ``range(sizes_B[i])`` (numpy's ``rng.choice(n, k, replace=False)``, as a distribution): the
    positions with the k smallest of n uniform keys."""
    B = sizes_B.shape[0]
    device = sizes_B.device
    pos_W = torch.arange(width, device=device)
    keys_BW = torch.rand(B, width, generator=gen, device=device)
    keys_BW = keys_BW.masked_fill(pos_W[None, :] >= sizes_B[:, None], 2.0)  # never among the smallest
    rank_BW = torch.empty(B, width, dtype=torch.long, device=device)
    rank_BW.scatter_(1, keys_BW.argsort(dim=1), pos_W.expand(B, width).contiguous())
    return rank_BW < choose_B[:, None]


def _spans(starts_BW: torch.Tensor, span: int) -> torch.Tensor:
    """Each start masks itself and the ``span - 1`` positions after it (overlaps allowed)."""
    B, W = starts_BW.shape
    out = torch.zeros(B, W + span, dtype=torch.bool, device=starts_BW.device)
    for k in range(span):
        out[:, k : k + W] |= starts_BW
    return out[:, :W]


def speech_span_masks(gen: torch.Generator, frames: list[int], width: int, cfg, device: torch.device) -> torch.Tensor:
    """bool ``[B, width]`` on ``device``: :func:`scaling.masking.speech_span_mask` for every row at
    once (same rule and distribution, another random stream): ``max(min_masks, int(prob * T / length
    + U))`` starts without replacement from ``range(T - length)`` (fairseq's short-row guard
    included), each masking ``length`` frames, clipped to the row's ``T = frames[i]`` real frames."""
    L = int(cfg.length)
    if L < 1:
        raise ValueError(f"speech mask length must be >= 1, got {L}")
    T_B = host_to_device(frames, torch.int64, device)
    u_B = torch.rand(len(frames), generator=gen, device=device)
    num_B = torch.floor(cfg.prob * T_B.to(torch.float64) / float(L) + u_B.to(torch.float64)).long()
    num_B = num_B.clamp_min(int(cfg.min_masks))
    # fairseq: when T - length <= num, starts come from range(num + 1) instead of range(T - length).
    cand_B = torch.where(T_B - L <= num_B, num_B + 1, T_B - L)
    num_B = torch.where(T_B > 0, num_B, torch.zeros_like(num_B))
    # Wide enough for every row's candidates, bounded on the host (reading cand_B would sync the device).
    W = max([width] + [max(T - L, int(cfg.prob * T / L + 1) + 1, int(cfg.min_masks) + 1) for T in frames])
    mask_BW = _spans(_random_subsets(gen, cand_B, num_B, W), L)
    pos_W = torch.arange(W, device=device)
    return (mask_BW & (pos_W[None, :] < T_B[:, None]))[:, :width]


def text_span_masks(gen: torch.Generator, tokens_BT: torch.Tensor, lengths_B: torch.Tensor, cfg, *, mask_id: int,
                    vocab_size: int, num_special: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask_BT, input_tokens_BT)``: :func:`scaling.masking.text_span_mask` for every row at once,
    for rows ``[BOS] + content + [EOS] + padding`` with ``lengths_B`` tokens (BOS and EOS included):
    ``int(prob * n / span + U)`` starts among the ``n`` content positions, spans of ``span`` kept on
    content positions, then ``<mask>`` / unchanged / random ids with the recipe's probabilities."""
    span = int(cfg.span)
    if span < 1:
        raise ValueError(f"text mask span must be >= 1, got {span}")
    B, T = tokens_BT.shape
    device = tokens_BT.device
    n_B = (lengths_B.to(torch.long) - 2).clamp_min(0)  # content tokens: maskable, BOS/EOS/padding are not
    u_B = torch.rand(B, generator=gen, device=device)
    num_B = torch.minimum(n_B, torch.floor(cfg.prob * n_B.to(torch.float64) / span + u_B.to(torch.float64)).long())
    starts_BT = torch.zeros(B, T, dtype=torch.bool, device=device)
    starts_BT[:, 1:] = _random_subsets(gen, n_B, num_B, T - 1)  # content starts after BOS
    pos_T = torch.arange(T, device=device)
    maskable_BT = (pos_T[None, :] >= 1) & (pos_T[None, :] <= n_B[:, None])
    mask_BT = _spans(starts_BT, span) & maskable_BT
    p_keep, p_rand = float(cfg.leave_unmasked_prob), float(cfg.random_token_prob)
    keep_BT = torch.zeros_like(mask_BT)
    rand_BT = torch.zeros_like(mask_BT)
    if p_keep + p_rand > 0:
        either_BT = mask_BT & (torch.rand(B, T, generator=gen, device=device) < p_keep + p_rand)
        decision_BT = torch.rand(B, T, generator=gen, device=device) < p_keep / (p_keep + p_rand)
        keep_BT, rand_BT = either_BT & decision_BT, either_BT & ~decision_BT
    inputs_BT = torch.where(mask_BT & ~keep_BT & ~rand_BT, torch.full_like(tokens_BT, int(mask_id)), tokens_BT)
    if p_rand > 0:
        random_BT = torch.randint(num_special, vocab_size, (B, T), generator=gen, device=device)
        inputs_BT = torch.where(rand_BT, random_BT, inputs_BT)
    return mask_BT, inputs_BT


# ============================================================================= the synthetic device source
class DeviceSyntheticSource(_SyntheticSource):
    """The CPU synthetic stream (:class:`scaling.data.loader._SyntheticSource`: indices, epochs,
    windows, speech lengths) whose items are only descriptions (index, length) for
    :class:`DeviceBatchMaker` to make on the device."""

    def describe(self) -> str:
        return f"synthetic_device:{self.epoch_size}"

    def items(self, proc, g: int, epoch: int, counters: DataCounters, count: bool) -> list[dict]:
        item = self.spec.device_item(self, g)
        if count:
            counters.add_good(epoch, 1)
        return [item]


class DeviceBatchMaker:
    """Makes the batches of :class:`DeviceSyntheticSource` on ``device`` (the loader's ``proc``)."""

    def __init__(self, data_cfg: DataConfig, model_cfg: ModelConfig, masking_cfg: MaskingConfig, seed: int,
                 device: torch.device | str):
        build_processor(data_cfg, model_cfg, masking_cfg, seed)  # the same config checks as the CPU source's
        self.data_cfg, self.model_cfg, self.masking_cfg = data_cfg, model_cfg, masking_cfg
        self.modality = model_cfg.modality
        self.spec = spec_for(model_cfg.modality)
        self.seed = int(seed)
        self.device = torch.device(device)
        self.gen: Optional[torch.Generator] = None  # made at the first batch: building the loader touches no device
        self.cache: dict = {}  # what a modality draws once per source (vision: its bank of block masks)

    @staticmethod
    def item_length(item: dict) -> int:
        return int(item["length"])

    def _seed(self, items: list[dict]) -> None:
        """Each batch from its own seed: its first sample index (unique in a slot's stream) and size."""
        state = np.random.SeedSequence([self.seed, _TAG_DEVICE_BATCH, items[0]["id"], len(items)]).generate_state(2)
        if self.gen is None:
            self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed((int(state[0]) << 31 | int(state[1])) & (2**63 - 1))

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        self._seed(items)
        ids_B = host_to_device([it["id"] for it in items], torch.int64, self.device)
        return self.spec.device_batch(self, items, ids_B)
