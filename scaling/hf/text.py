"""Text <-> HF ``Data2VecTextModel`` (transformers ``models/data2vec/modeling_data2vec_text.py``,
RoBERTa's code) and our sentencepiece model <-> an HF fast tokenizer.

Positions follow fairseq on both sides (real tokens count from pad_id + 1), so HF needs
``max_position_embeddings = max_positions + pad_id + 1`` rows. HF always adds a token-type
embedding (row 0 for single-segment input); we have none: exported as zeros, and on import row 0
is folded into the position embeddings. data2vec has no pooler (``add_pooling_layer=False``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

from scaling.config import Recipe
from scaling.data.build import SPECIAL_PIECES
from scaling.data.collate import BOS_ID, EOS_ID
from scaling.hf.common import NameMap, gelu_problems, hf_transformer_fields, our_transformer_fields

MODEL_TYPE = "data2vec-text"
MODEL_KWARGS = {"add_pooling_layer": False}
SENTENCEPIECE_FILE = "sentencepiece.model"  # not tokenizer.model, the name transformers builds tokenizers from
TOKEN_TYPES = "embeddings.token_type_embeddings.weight"
POSITIONS = "frontend.embed_positions.weight"

NAMES = NameMap([
    ("frontend.embed_tokens.", "embeddings.word_embeddings."),
    (POSITIONS, "embeddings.position_embeddings.weight"),
    ("frontend.layernorm_embedding.", "embeddings.LayerNorm."),
    ("encoder.blocks.{i}.attn.q_proj.", "encoder.layer.{i}.attention.self.query."),
    ("encoder.blocks.{i}.attn.k_proj.", "encoder.layer.{i}.attention.self.key."),
    ("encoder.blocks.{i}.attn.v_proj.", "encoder.layer.{i}.attention.self.value."),
    ("encoder.blocks.{i}.attn.out_proj.", "encoder.layer.{i}.attention.output.dense."),
    ("encoder.blocks.{i}.norm1.", "encoder.layer.{i}.attention.output.LayerNorm."),
    ("encoder.blocks.{i}.fc1.", "encoder.layer.{i}.intermediate.dense."),
    ("encoder.blocks.{i}.fc2.", "encoder.layer.{i}.output.dense."),
    ("encoder.blocks.{i}.norm2.", "encoder.layer.{i}.output.LayerNorm."),
    ("head.", None),  # fairseq regression_head: the pretraining regression head
    ("decoder.", None),  # data2vec 2.0's conv decoder: pretraining only, as the head
])


def tokenizer_path(recipe: Recipe, tokenizer: Optional[str]) -> str:
    return tokenizer if tokenizer is not None else recipe.data.text.tokenizer


# ----------------------------------------------------------------------------- export
def export_problems(recipe: Recipe, tokenizer: Optional[str]) -> list[str]:
    from scaling.data.shards import tokenizer_identity

    path, t = tokenizer_path(recipe, tokenizer), recipe.model.text
    if not path or not Path(path).is_file():
        return [f"text tokenizer {path!r} (data.text.tokenizer) not found: pass tokenizer= the sentencepiece model"]
    ident = tokenizer_identity(path)
    ids = {"<s>": ident["bos_id"], "<pad>": ident["pad_id"], "</s>": ident["eos_id"], "<unk>": ident["unk_id"],
           "<mask>": ident["mask_id"]}
    problems = []
    if ids != SPECIAL_PIECES:
        problems.append(f"tokenizer {path} has special ids {ids}, ours are {SPECIAL_PIECES}")
    if (t.pad_id, t.mask_id) != (ids["<pad>"], ids["<mask>"]):
        problems.append(f"model.text pad_id {t.pad_id} / mask_id {t.mask_id} differ from tokenizer {path}'s "
                        f"<pad> {ids['<pad>']} / <mask> {ids['<mask>']}")
    if ident["vocab_size"] > t.vocab_size:
        problems.append(f"tokenizer {path} has {ident['vocab_size']} pieces, "
                        f"more than model.text.vocab_size {t.vocab_size}")
    return problems


def hf_config(recipe: Recipe):
    from transformers import Data2VecTextConfig

    m, t = recipe.model, recipe.model.text
    return Data2VecTextConfig(
        **hf_transformer_fields(m), vocab_size=t.vocab_size,
        hidden_dropout_prob=m.dropout, attention_probs_dropout_prob=m.attention_dropout,
        max_position_embeddings=t.max_positions + t.pad_id + 1, type_vocab_size=1,
        pad_token_id=t.pad_id, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
    )


def to_hf(model_state: dict, recipe: Recipe) -> dict:
    hf = NAMES.to_hf(model_state)
    hf[TOKEN_TYPES] = torch.zeros(1, recipe.model.dim, dtype=model_state[POSITIONS].dtype)
    return hf


# `tokenizers`' Unigram has no piece types: its Viterbi would take the piece "<s>" (score 0) for the
# typed text "<s>". sentencepiece never matches text against control pieces or the "<unk>" piece
# (unknown characters still become <unk> through unk_id), so those pieces must never win.
_NEVER = -1e9


def fast_tokenizer(sp_path: str, max_length: int):
    """An HF fast tokenizer that encodes like ``[<s>] + sp.encode(text) + [</s>]``, built by transformers'
    own sentencepiece conversion (normaliser, whitespace handling, user-defined ``<mask>``)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, SpmConverter

    proto = SentencePieceExtractor(sp_path).proto
    never = {proto.pieces[0].CONTROL, proto.pieces[0].UNKNOWN}
    vocab = [(p.piece, _NEVER if p.type in never else p.score) for p in proto.pieces]
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    backend.post_processor = processors.TemplateProcessing(  # RoBERTa's layout
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", BOS_ID), ("</s>", EOS_ID)])
    # split_special_tokens: "<s>" typed in the text is text, as for sentencepiece (its <mask> is a
    # user-defined piece that the converted pre-tokenizer isolates, so it still gives id 4).
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        mask_token="<mask>", cls_token="<s>", sep_token="</s>", split_special_tokens=True, model_max_length=max_length)


def processor_writer(recipe: Recipe, tokenizer: Optional[str]) -> Callable[[Path], None]:
    path = tokenizer_path(recipe, tokenizer)
    hf_tokenizer = fast_tokenizer(path, recipe.model.text.max_positions)

    def write(out_dir: Path) -> None:
        hf_tokenizer.save_pretrained(out_dir)
        shutil.copyfile(path, out_dir / SENTENCEPIECE_FILE)  # for continued pretraining (data.text.tokenizer)

    return write


# ----------------------------------------------------------------------------- import
def import_problems(config) -> list[str]:
    problems = []
    kind = getattr(config, "position_embedding_type", "absolute")
    if kind != "absolute":  # transformers 5 ignores the field and would build absolute positions
        problems.append(f"position_embedding_type={kind!r}: ours has absolute learned positions")
    problems += gelu_problems(config, "hidden_act")
    if config.is_decoder or config.add_cross_attention:
        problems.append("is_decoder/add_cross_attention: ours is a bidirectional encoder without cross-attention")
    if config.pad_token_id is None:
        problems.append("pad_token_id is None: positions count from the padding id")
    elif config.max_position_embeddings <= config.pad_token_id + 1:
        problems.append(f"max_position_embeddings {config.max_position_embeddings} leaves no position after "
                        f"pad_token_id {config.pad_token_id} + 1")
    return problems


def load_overrides(config) -> dict:
    return {}


def weight_problems(hf_state: dict, config) -> list[str]:
    rows = hf_state[TOKEN_TYPES].shape[0]
    if hf_state[TOKEN_TYPES][1:].any():
        return [f"token_type_embeddings rows 1..{rows - 1} are non-zero (segment embeddings have no counterpart)"]
    return []


def from_hf(hf_state: dict, config) -> dict:
    hf_state = dict(hf_state)
    token_types = hf_state.pop(TOKEN_TYPES)
    ours = NAMES.from_hf(hf_state)
    # HF adds row 0 to every token; folded into every position row except padding_idx, which only
    # pad tokens use (their outputs are zeroed), so it stays as it is.
    positions = ours[POSITIONS].clone()
    keep = torch.arange(positions.shape[0]) != config.pad_token_id
    positions[keep] += token_types[0]
    ours[POSITIONS] = positions
    return ours


def _sentencepiece(hf_dir: Path) -> Optional[Path]:
    path = hf_dir / SENTENCEPIECE_FILE
    return path if path.is_file() else None


def _max_positions(config) -> int:
    """Our model.text.max_positions of an HF config: fairseq's learned positions start after pad_id."""
    return config.max_position_embeddings - config.pad_token_id - 1


def model_section(config, hf_dir: Path) -> dict:
    text = {"vocab_size": config.vocab_size, "max_positions": _max_positions(config),
            "pad_id": config.pad_token_id}
    sp = _sentencepiece(hf_dir)
    if sp is not None:
        from scaling.data.shards import tokenizer_identity

        mask_id = tokenizer_identity(str(sp))["mask_id"]
        if mask_id is not None:
            text["mask_id"] = mask_id
    return {
        "modality": "text", **our_transformer_fields(config),
        "dropout": config.hidden_dropout_prob, "attention_dropout": config.attention_probs_dropout_prob,
        "head": "mlp", "text": text,
    }


def data_hints(hf_dir: Path, config) -> dict:
    """The tokenizer shipped with the model, and blocks no longer than its positions (a recipe whose
    data.text.block_size exceeds model.text.max_positions is refused)."""
    from scaling.config import TextDataConfig

    text = {"block_size": min(TextDataConfig().block_size, _max_positions(config))}
    sp = _sentencepiece(hf_dir)
    return {"text": text if sp is None else {**text, "tokenizer": str(sp)}}
