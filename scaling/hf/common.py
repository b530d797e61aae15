"""What the three HF adapters share: the name-map rule, the config fields every HF data2vec config
has, and the refusal message.

A name map is a list of ``(ours, hf)`` key prefixes; ``{i}`` stands for a block index. Every key
of a state dict must start with exactly one rule's prefix; the rest of the key (``weight``,
``bias``, ``conv.weight``...) is carried over unchanged. ``hf=None`` marks our parameters that have
no HF counterpart (the regression head): dropped in an export, absent from an import.
"""

from __future__ import annotations

import re
from typing import Optional

from torch import Tensor

Rule = tuple[str, Optional[str]]


def _prefix_pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)"))


class NameMap:
    """Renames state-dict keys between our names and HF's, in both directions."""

    def __init__(self, rules: list[Rule]):
        self.rules = rules
        self._ours = [(_prefix_pattern(o), h) for o, h in rules]
        self._hf = [(_prefix_pattern(h), o) for o, h in rules if h is not None]

    @staticmethod
    def _rename(key: str, table, side: str) -> Optional[str]:
        hits = [(m, dst) for pattern, dst in table if (m := pattern.match(key))]
        if not hits:
            raise ValueError(f"{side} key {key!r} has no counterpart in the name map")
        assert len(hits) == 1, f"{key!r} matches {len(hits)} name-map rules"
        m, dst = hits[0]
        if dst is None:
            return None
        index = m.groupdict().get("i")
        return (dst if index is None else dst.replace("{i}", index)) + key[m.end():]

    def to_hf(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        renamed = {k: (self._rename(k, self._ours, "our"), v) for k, v in state.items()}
        return {name: v for name, v in renamed.values() if name is not None}

    def from_hf(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return {self._rename(k, self._hf, "HF"): v for k, v in state.items()}


def hf_transformer_fields(m) -> dict:
    """The fields of every HF data2vec config that our ``ModelConfig`` (``m``) sets the same way."""
    return dict(hidden_size=m.dim, num_hidden_layers=m.depth, num_attention_heads=m.heads,
                intermediate_size=m.ffn_dim, hidden_act="gelu", layer_norm_eps=m.layer_norm_eps)


def our_transformer_fields(config) -> dict:
    """The ``model:`` section fields that every HF data2vec config gives the same way."""
    return dict(dim=config.hidden_size, depth=config.num_hidden_layers, heads=config.num_attention_heads,
                ffn_dim=config.intermediate_size, layer_norm_eps=config.layer_norm_eps)


def gelu_problems(config, *fields: str) -> list[str]:
    return [f"{f}={getattr(config, f)!r}: our model uses exact GELU" for f in fields if getattr(config, f) != "gelu"]


def refuse(problems: list[str], what: str) -> None:
    """One ValueError naming every problem found (each says what and why), or nothing."""
    if problems:
        raise ValueError(f"cannot {what}: " + "; ".join(problems))
