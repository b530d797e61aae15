"""Text (docs/data2vec.md §3.2, docs/data2vec2.md): sentencepiece ids in blocks ``[BOS] + chunk + [EOS]`` of
at most ``data.text.block_size``; v1 masks spans with BERT's <mask> / keep / random replacement, 2.0 drops
random tokens. The modality's pieces behind :data:`SPEC` (:mod:`scaling.modalities`)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from scaling.config import ModelConfig, Recipe
from scaling.data.collate import (BOS_ID, EOS_ID, SampleProcessor, _check_meta, _meta, _noise_seeds, _payload, _views,
                                  _views_batch)
from scaling.data.quality import BadSample
from scaling.masking import random_mask, sample_rng, text_span_mask
from scaling.modalities import ModalitySpec


class TextProcessor(SampleProcessor):
    modality = "text"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        bs = self.data_cfg.text.block_size
        if bs < 3:
            raise ValueError(f"data.text.block_size must be >= 3 (BOS + token + EOS), got {bs}")
        if bs > self.model_cfg.text.max_positions:
            raise ValueError(
                f"data.text.block_size ({bs}) exceeds model.text.max_positions ({self.model_cfg.text.max_positions})"
            )

    def decode(self, raw: dict) -> np.ndarray:
        data = _payload(raw, ("ids",))
        if len(data) % 4:
            raise BadSample("decode_error", f"ids member has {len(data)} bytes, not a multiple of 4 (int32)")
        ids = np.frombuffer(data, dtype="<i4").astype(np.int64)
        _check_meta(_meta(raw), "num_tokens", ids.shape[0])
        vocab = self.model_cfg.text.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            raise BadSample("bad_tokens", f"token ids in [{ids.min()}, {ids.max()}], outside [0, {vocab})")
        return ids

    def items(self, ids: np.ndarray, epoch: int, sample_id: int, label: Optional[int]) -> list[dict]:
        """One document (ids without BOS/EOS) -> blocks ``[BOS] + chunk + [EOS]`` of <= block_size. v1: the
        student's input ids with the masked spans replaced; 2.0: M views of the block whose masked tokens the
        student drops."""
        tc = self.model_cfg.text
        ids = np.asarray(ids, dtype=np.int64)
        content = self.data_cfg.text.block_size - 2
        items = []
        specials = np.array([BOS_ID, EOS_ID, tc.pad_id], dtype=np.int64)
        for b, start in enumerate(range(0, ids.shape[0], content)):
            tokens = np.concatenate([[BOS_ID], ids[start : start + content], [EOS_ID]]).astype(np.int64)
            rng = sample_rng(self.seed, epoch, sample_id, b)
            maskable = ~np.isin(tokens, specials)
            if self.model_cfg.version == 2:
                mask = random_mask(rng, maskable, ratio=self.masking_cfg.text_v2_ratio, num_clones=self.masking_cfg.clones)
                extra = {"noise_seed": _noise_seeds(rng, self.masking_cfg.clones)}
            else:
                mask, inputs = text_span_mask(rng, tokens, self.masking_cfg.text, maskable=maskable, mask_id=tc.mask_id,
                                              vocab_size=tc.vocab_size, num_special=tc.mask_id + 1)
                extra = {"input": inputs}
            # Blocks of one document get distinct ids: (doc id << 16) | block.
            items.append({"tokens": tokens, "mask": mask, "label": label, "id": (int(sample_id) << 16) | b, **extra})
        return items

    def inputs(self, items: list[dict]) -> dict[str, torch.Tensor]:
        B = len(items)
        T = max(it["tokens"].shape[0] for it in items)
        pad_id = self.model_cfg.text.pad_id
        tokens = torch.full((B, T), pad_id, dtype=torch.int64)
        padm = torch.ones(B, T, dtype=torch.bool)
        views = _views(items)
        mask = torch.zeros(B, max(views, 1), T, dtype=torch.bool)
        for i, it in enumerate(items):
            n = it["tokens"].shape[0]
            tokens[i, :n] = torch.from_numpy(it["tokens"])
            padm[i, :n] = False
            mask[i, :, :n] = torch.from_numpy(it["mask"])
        mask = mask.flatten(0, 1)
        batch = {"tokens_BT": tokens}
        if views:
            batch.update(padding_mask_BT=padm, mask_BT=mask, **_views_batch(items, mask, padm, views))
        else:  # v1: the student's input ids
            inputs = torch.full((B, T), pad_id, dtype=torch.int64)
            for i, it in enumerate(items):
                inputs[i, : it["input"].shape[0]] = torch.from_numpy(it["input"])
            batch.update(input_tokens_BT=inputs, padding_mask_BT=padm, mask_BT=mask)
        return batch


# ----------------------------------------------------------------------------- synthetic samples
def synthetic_sample(source, rng: np.random.Generator) -> tuple[np.ndarray, None]:
    """A document from a sparse random Markov chain over the vocabulary (drawn once per source); no label."""
    from scaling.data.loader import _TAG_MARKOV

    tc = source.model_cfg.text
    if source.cache.get("markov") is None:
        mrng = sample_rng(source.seed, _TAG_MARKOV)
        first = tc.mask_id + 1
        if tc.vocab_size - first < 2:
            raise ValueError(f"model.text.vocab_size ({tc.vocab_size}) leaves no room for synthetic tokens")
        n_states = min(tc.vocab_size - first, 256)
        states = mrng.choice(np.arange(first, tc.vocab_size), n_states, replace=False)
        K = min(4, n_states)
        succ = np.stack([mrng.choice(n_states, K, replace=False) for _ in range(n_states)])
        probs = mrng.dirichlet(np.full(K, 0.5), size=n_states)
        source.cache["markov"] = (states, succ, np.cumsum(probs, axis=1))
    states, succ, cum = source.cache["markov"]
    content = source.data_cfg.text.block_size - 2
    # One block per document, so every synthetic sample is one item: a rank split by sample index
    # then gives every world size the same global batches (engines are tested against one process).
    length = int(rng.integers(min(8, content), content + 1))
    out = np.empty(length, dtype=np.int64)
    s = int(rng.integers(len(states)))
    u = rng.random(length)
    for i in range(length):
        out[i] = states[s]
        j = min(int(np.searchsorted(cum[s], u[i])), cum.shape[1] - 1)
        s = int(succ[s, j])
    return out, None


def device_item(source, g: int) -> dict:
    """The CPU source's document length (its first draw); one block per document, id (g << 16) | 0."""
    from scaling.data.loader import _TAG_SYNTH

    content = source.data_cfg.text.block_size - 2
    return {"id": int(g) << 16,
            "length": int(sample_rng(source.seed, g, _TAG_SYNTH).integers(min(8, content), content + 1)) + 2}


def device_batch(maker, items: list[dict], ids_B: torch.Tensor) -> dict[str, torch.Tensor]:
    from scaling.data.device import host_to_device, text_span_masks

    B, dev, gen = len(items), maker.device, maker.gen
    lengths = [int(it["length"]) for it in items]
    lengths_B = host_to_device(lengths, torch.int64, dev)
    tc = maker.model_cfg.text
    T = max(lengths)
    pos_T = torch.arange(T, device=dev)
    tokens_BT = torch.randint(tc.mask_id + 1, tc.vocab_size, (B, T), generator=gen, device=dev)
    tokens_BT[:, 0] = BOS_ID
    tokens_BT = torch.where(pos_T[None, :] == lengths_B[:, None] - 1, EOS_ID, tokens_BT)
    padding_BT = pos_T[None, :] >= lengths_B[:, None]
    tokens_BT = tokens_BT.masked_fill_(padding_BT, tc.pad_id)
    mask_BT, inputs_BT = text_span_masks(gen, tokens_BT, lengths_B, maker.masking_cfg.text, mask_id=tc.mask_id,
                                         vocab_size=tc.vocab_size, num_special=tc.mask_id + 1)
    return {"tokens_BT": tokens_BT, "input_tokens_BT": inputs_BT, "padding_mask_BT": padding_BT,
            "mask_BT": mask_BT, "sample_id_B": ids_B}


# ----------------------------------------------------------------------------- models
def build_v1(cfg: ModelConfig):
    from scaling.models.blocks import init_bert_params
    from scaling.models.text import TextEncoder, TextFrontend

    return TextFrontend(cfg), TextEncoder(cfg), init_bert_params


def build_v2(cfg: ModelConfig):
    from scaling.models.decoders import Decoder1d
    from scaling.models.text2 import TextEncoder2, TextFrontend2

    return TextFrontend2(cfg), TextEncoder2(cfg), Decoder1d(cfg)


def demo_data(out_dir) -> tuple[list[str], dict]:
    from scaling.data.demo_sets import build_text_demo

    info = build_text_demo(out_dir, vocab_size=1000)
    return [f"data.train_shards={info['train_shards']}", f"data.text.tokenizer={info['tokenizer']}",
            f"model.text.vocab_size={info['vocab_size']}"], info


# ----------------------------------------------------------------------------- cost models
def positions(recipe: Recipe, audio_samples: Optional[int] = None) -> int:
    return recipe.data.text.block_size


def row_lengths(cfg: ModelConfig, batch: dict) -> tuple[list[int], None]:
    """Non-pad tokens of each sample row."""
    pad = batch.get("padding_mask_BT")
    rows, T = batch["tokens_BT"].shape
    return ([int(T)] * int(rows) if pad is None else (~pad).sum(-1).tolist()), None


def frontend_bytes(recipe: Recipe, batch: int, positions: int, a: int) -> int:
    """Token and position embeddings, their LayerNorm and dropout."""
    m = recipe.model
    D = m.dim
    return batch * positions * ((4 + 2 * a) * D + (D if m.dropout > 0 else 0))


SPEC = ModalitySpec(
    name="text", processor=TextProcessor, build_v1=build_v1, build_v2=build_v2, hf_adapter="scaling.hf.text",
    synthetic_sample=synthetic_sample, device_item=device_item, device_batch=device_batch, demo_data=demo_data,
    positions=positions, cls_positions=0, decoder_kernel_dims=1, frontend_flops=lambda cfg, T, n=None: 0.0,
    teacher_embeds=False, positional_conv_flops=lambda cfg, T: 0.0, row_lengths=row_lengths,
    frontend_bytes=frontend_bytes, block_extra_bytes=lambda m, a: 0, sample_id_shift=16,
)
