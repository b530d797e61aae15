"""Transformer building blocks shared by the three modalities.

- ``Attention``: multi-head self-attention on ``F.scaled_dot_product_attention`` with separate
  q/k/v/out Linear layers (so an HF export is a rename, docs/data2vec.md §5), an optional k bias
  (BEiT has none, docs/data2vec.md §3.3), an optional additive float bias (BEiT relative positions)
  and a key padding mask.
- ``PostLNBlock``: wav2vec 2.0 / fairseq / RoBERTa post-LN layer (speech and text,
  docs/data2vec.md §3.2, §3.4).
- ``PreLNBlock``: BEiT pre-LN layer with layer scale and drop path (vision v1, docs/data2vec.md §3.3).

Every block's ``forward`` returns ``(x, tap)``. ``tap="ffn"`` gives the feed-forward output before
dropout and the final residual add (and, post-LN, before the final LayerNorm); ``tap="block"`` gives
the block output (docs/data2vec.md §1.2).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TAPS = ("ffn", "block")


def check_tap(tap: str) -> None:
    if tap not in TAPS:
        raise ValueError(f"tap must be one of {TAPS}, got {tap!r}")


class Attention(nn.Module):
    """Self-attention: ``out_proj(SDPA(q_proj(x), k_proj(x), v_proj(x)))``.

    ``attn_bias``: additive float bias broadcastable to [B, H, T, T] (e.g. [H, T, T]).
    ``key_padding_mask``: bool [B, T], True = padding; padded keys get no attention weight.
    """

    def __init__(self, dim: int, heads: int, *, attention_dropout: float = 0.0, bias: bool = True,
                 k_bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads ({heads}) must divide dim ({dim})")
        self.dim = dim
        self.heads = heads
        self.head_dim = dim // heads
        self.attention_dropout = attention_dropout
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias and k_bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=True)

    def _mask(self, q: Tensor, attn_bias: Optional[Tensor], key_padding_mask: Optional[Tensor]):
        # A 4-D mask: SDPA's fused CPU kernel takes [B or 1, H, T, T]; a 3-D [H, T, T] one sends it to the
        # generic math path (ViT relative-position bias, 8 x 6 heads x 197 x 64 on a 2-core CPU: forward
        # 4.2 ms against 13.2 ms under no_grad, 5.7 against 12.4 with grad; same result).
        bias = None
        if attn_bias is not None:
            bias = attn_bias.to(q.dtype)
            bias = bias.unsqueeze(0) if bias.dim() == 3 else bias
        if key_padding_mask is None:
            return bias
        keep = ~key_padding_mask[:, None, None, :]  # [B,1,1,T], True = take part (SDPA convention)
        if bias is None:
            return keep
        return torch.where(keep, bias, torch.full((), float("-inf"), dtype=q.dtype, device=q.device))

    def forward(self, x: Tensor, *, attn_bias: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None) -> Tensor:
        B, T, D = x.shape
        H, hd = self.heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, H, hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, H, hd).transpose(1, 2)
        # Default SDPA scale 1/sqrt(head_dim) = fairseq's and BEiT's q scaling.
        out = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=self._mask(q, attn_bias, key_padding_mask),
            dropout_p=self.attention_dropout if self.training else 0.0,
        )
        return self.out_proj(out.transpose(1, 2).reshape(B, T, D))


class PostLNBlock(nn.Module):
    """wav2vec 2.0 ``TransformerSentenceEncoderLayer`` / fairseq ``TransformerEncoderLayer``
    with ``normalize_before=False`` (docs/data2vec.md §1.2, §3.2, §3.4)::

        x = norm1(x + drop(attn(x)))
        ffn = fc2(drop_act(gelu(fc1(x))))      # the "ffn" tap
        x = norm2(x + drop(ffn))               # the "block" tap
    """

    def __init__(self, dim: int, heads: int, ffn_dim: int, *, dropout: float = 0.0,
                 attention_dropout: float = 0.0, activation_dropout: float = 0.0, eps: float = 1e-5):
        super().__init__()
        self.attn = Attention(dim, heads, attention_dropout=attention_dropout)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.act_dropout = nn.Dropout(activation_dropout)

    def forward(self, x: Tensor, *, key_padding_mask: Optional[Tensor] = None,
                attn_bias: Optional[Tensor] = None, tap: str = "ffn") -> tuple[Tensor, Tensor]:
        x = self.norm1(x + self.dropout(self.attn(x, attn_bias=attn_bias, key_padding_mask=key_padding_mask)))
        ffn = self.fc2(self.act_dropout(F.gelu(self.fc1(x))))
        x = self.norm2(x + self.dropout(ffn))
        return x, (ffn if tap == "ffn" else x)


class DropPath(nn.Module):
    """Stochastic depth per sample (timm ``drop_path``): zero a sample's branch with probability p,
    scale the kept ones by 1/(1-p). Identity in eval mode or when p == 0. ``p`` is fixed at
    construction.

    Under ``torch.compile`` (``engine.compile``, one compiled graph shared by every block) a Python
    float read in ``forward`` is a constant of the graph, guarded by value: the BEiT drop-path rates
    rising linearly over 12 blocks would trace 12 graphs per mode and hit dynamo's recompile limit
    (with fullgraph, an error). The compiled path therefore reads the keep probability from a
    non-persistent buffer (a graph input: not in the state dict, moved by ``.to``, copied by the
    engines with the other buffers; a module cast to bf16, as DeepSpeed's bf16 student, rounds it to
    bf16) and branches on the bool ``active`` only. The eager path is the float one, unchanged; the
    two draw different random numbers anyway (inductor has its own RNG).
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)
        self.active = self.p > 0.0
        self.register_buffer("keep_prob", torch.tensor(1.0 - self.p), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or not self.active:  # training first: the teacher (eval) guards on it alone
            return x
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        if torch.compiler.is_compiling():
            keep_t = self.keep_prob.to(x.dtype)
            mask = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep_t.expand(shape))
            return x * mask / keep_t
        keep = 1.0 - self.p
        mask = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class PreLNBlock(nn.Module):
    """BEiT block (data2vec v1 vision, docs/data2vec.md §3.3)::

        x = x + drop_path(gamma_1 * attn(norm1(x), rel_bias))
        m = fc2(drop(gelu(fc1(norm2(x)))))          # the "ffn" tap (before layer scale)
        x = x + drop_path(gamma_2 * drop(m))         # the "block" tap

    q and v have biases, k has none; ``gamma_*`` are initialised to ``layer_scale_init``
    (no layer scale when it is 0 or less).
    """

    def __init__(self, dim: int, heads: int, ffn_dim: int, *, dropout: float = 0.0,
                 attention_dropout: float = 0.0, drop_path: float = 0.0, layer_scale_init: float = 0.0,
                 eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, attention_dropout=attention_dropout, k_bias=False)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)
        if layer_scale_init > 0:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: Tensor, *, key_padding_mask: Optional[Tensor] = None,
                attn_bias: Optional[Tensor] = None, tap: str = "block") -> tuple[Tensor, Tensor]:
        a = self.dropout(self.attn(self.norm1(x), attn_bias=attn_bias, key_padding_mask=key_padding_mask))
        if self.gamma_1 is not None:
            a = self.gamma_1 * a
        x = x + self.drop_path(a)
        m = self.fc2(self.dropout(F.gelu(self.fc1(self.norm2(x)))))
        y = self.dropout(m)
        if self.gamma_2 is not None:
            y = self.gamma_2 * y
        x = x + self.drop_path(y)
        return x, (m if tap == "ffn" else x)


def init_bert_params(module: nn.Module) -> None:
    """fairseq ``init_bert_params``: normal(0, 0.02) for Linear / Embedding weights, zero biases
    and padding rows; LayerNorm weight 1, bias 0."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def collect_taps(num_taps: int, depth: int) -> int:
    """Index of the first block whose tap is returned (the last ``num_taps`` blocks)."""
    if not 0 <= num_taps <= depth:
        raise ValueError(f"num_taps must be in 0..{depth}, got {num_taps}")
    return depth - num_taps


def _mix32(x: Tensor) -> Tensor:
    """An integer hash of 32-bit values held in int64 (no product leaves int64's range)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    return (x >> 16) ^ x


def keyed_normal(seed_R: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Standard normal noise ``[R, *shape]`` that depends only on each row's ``seed_R`` (int64, drawn per
    sample on the data workers) and the element's position: a row gets the same numbers whichever
    micro-batch, rank or batch split it lands in, unlike draws from a generator's running stream. A
    counter-based hash on the device (no generator state, no host sync) and Box-Muller."""
    n = math.prod(shape)
    idx = torch.arange(n, device=seed_R.device, dtype=torch.int64)[None, :] * 2
    row = _mix32(seed_R.to(torch.int64)[:, None] & 0xFFFFFFFF)
    u1 = (_mix32(row ^ (idx & 0xFFFFFFFF)).to(torch.float64) + 0.5) / 2.0**32
    u2 = (_mix32(row ^ ((idx + 1) & 0xFFFFFFFF)).to(torch.float64) + 0.5) / 2.0**32
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return z.to(dtype).view(seed_R.shape[0], *shape)
