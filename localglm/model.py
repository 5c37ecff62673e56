"""ChatGLM-6B (v1) as plain PyTorch modules: GLM blocks, 2-D rotary positions, prefix-LM attention.

Parameter names follow the official checkpoint (``transformer.layers.N.attention.query_key_value``
...), so loading needs no key mapping. No I/O happens here.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_attention
from .cache import KVCache
from .config import ModelConfig

OFFICIAL_ALPHA_LAYERS = 28


@dataclass
class AttentionLayout:
    """Where each query may look, for one forward call.

    Keys live in cache slots ``[0, kv_len)``; slot ``s`` holds prefix key ``s`` when
    ``s < prefix_len`` and token ``s - prefix_len`` otherwise. Query ``t`` of this call is token
    ``start + t``. Token ``j`` is visible to token ``i`` when ``j >= pad[b]`` and
    (``j < context[b]`` or ``j <= i``): the context (everything before ``<sop>``) is attended
    bidirectionally, the rest causally (the official prefix-LM mask).

    Rows of a continuous batch differ in length: ``lengths[b]`` is row b's token count after
    this call, its queries are its last tokens, and ``start``/``kv_len`` describe the longest.
    """

    start: int  # index of this call's first token
    kv_len: int  # cache slots in use after this call (prefix included)
    prefix_len: int = 0  # P-Tuning v2 prefix slots at the front of the cache
    context: list[int] | None = None  # per row: index of <sop> (None: no row has padding/info)
    pad: list[int] | None = None  # per row: left-padding length (None: no padding)
    lengths: list[int] | None = None  # per row: tokens after this call (None: all reach kv_len)

    def slot(self, q_len: int) -> int | list[int]:
        """Cache slot of this call's first query: one for all rows, or one per row."""
        if self.lengths is None:
            return self.prefix_len + self.start
        return [self.prefix_len + n - q_len for n in self.lengths]

    def split_at(self, batch_size: int) -> int | None:
        """For an unpadded single row: number of leading queries that need no mask at all.

        Those are the context queries (they see exactly the context keys, which are all in
        the cache by then); the rest (from ``<sop>`` on) see a causal window.
        """
        if batch_size != 1 or self.pad is not None or self.lengths is not None:
            return None
        ctx = self.context[0] if self.context else self.start
        return max(0, ctx - self.start)

    def decode_ranges(self, batch_size: int) -> tuple[list[int], list[int]]:
        """For one query per row (its last token): the token slots [lo, hi) each row sees,
        besides the prefix slots: everything from the end of its padding to itself."""
        pad = self.pad or [0] * batch_size
        ends = self.lengths or [self.kv_len - self.prefix_len] * batch_size
        return ([self.prefix_len + p for p in pad], [self.prefix_len + n for n in ends])

    def mask(self, q_len: int, device) -> torch.Tensor | None:
        """Boolean mask (True = may attend), shape (B, 1, q_len, kv_len), or None if all-visible."""
        if self.pad is None and self.context is None and self.lengths is None:
            return None
        b = len(next(x for x in (self.pad, self.context, self.lengths) if x is not None))
        j = torch.arange(self.kv_len - self.prefix_len, device=device)[None, :]  # (1, k)
        rows = []
        for r in range(b):
            start = self.start if self.lengths is None else self.lengths[r] - q_len
            i = torch.arange(start, start + q_len, device=device)[:, None]  # (q, 1)
            ctx = self.context[r] if self.context else self.start
            pad = self.pad[r] if self.pad else 0
            ok = (j >= pad) & ((j < ctx) | (j <= i))  # (q, k)
            # Padded queries see nothing; let them see themselves so softmax stays finite
            # (their outputs are never used: no real token can see them).
            ok |= (i < pad) & (j == i)
            rows.append(ok)
        m = torch.stack(rows)[:, None]  # (B, 1, q, k)
        if self.prefix_len:
            m = F.pad(m, (self.prefix_len, 0), value=True)
        return m


def rotary_inv_freq(dim: int) -> torch.Tensor:
    """Official rotary frequencies: computed in float32 then rounded to float16. On the CPU
    whatever the default device (a small table; the module's ``to`` moves it)."""
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    return inv.half().float()


class RotaryTable(nn.Module):
    """cos/sin tables for one rotary half of a head, in float32, cast on use."""

    def __init__(self, dim: int, max_len: int):
        super().__init__()
        self.dim = dim
        self.register_buffer("inv_freq", rotary_inv_freq(dim), persistent=False)
        self._build(max_len)

    def _build(self, n: int):
        t = torch.arange(n, dtype=torch.float32, device=self.inv_freq.device)
        freqs = torch.outer(t, self.inv_freq)  # (n, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (n, dim)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pos (B, T) -> float32 cos, sin of shape (B, T, dim)."""
        need = int(pos.max()) + 1
        if need > self.cos.shape[0]:
            self._build(max(need, 2 * self.cos.shape[0]))
        return self.cos[pos], self.sin[pos]


def rotary_2d(rotary: RotaryTable, position_ids: torch.Tensor, dtype):
    """The tables ``apply_rotary_2d`` takes for 2-D positions (B, 2, T): cos and a signed sin,
    each (B, T, 1, 1, hd) in ``dtype``. The first half of a head turns by the positions, the
    second by the block positions; the sin carries rotate_half's minus sign (a quarter of each
    half), so that a rotation is two products and a sum whatever the number of halves."""
    c1, s1 = rotary(position_ids[:, 0])
    c2, s2 = rotary(position_ids[:, 1])
    cos, sin = torch.cat((c1, c2), dim=-1), torch.cat((s1, s2), dim=-1)  # (B, T, hd)
    sign = torch.tensor([-1.0, 1.0], device=sin.device)[:, None]  # per quarter of a half
    sin = (sin.unflatten(-1, (2, 2, -1)) * sign).flatten(-3)
    return cos.to(dtype)[:, :, None, None], sin.to(dtype)[:, :, None, None]


def apply_rotary_2d(x: torch.Tensor, rope) -> torch.Tensor:
    """x (..., hd) with rope from ``rotary_2d``: each half of the last dimension rotated by
    its own positions (official rotate_half per half: (a, b) -> (a cos - b sin, b cos + a
    sin)). The same products and sums as rotating each half apart, so the same values."""
    cos, sin = rope
    swapped = x.unflatten(-1, (2, 2, -1)).flip(-2).flatten(-3)  # (a, b) -> (b, a) per half
    return x * cos + swapped * sin


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x, rope, cache: KVCache, layout: AttentionLayout, prefix=None):
        b, t, _ = x.shape
        qkv = self.query_key_value(x).view(b, t, self.num_heads, 3, self.head_dim)
        # Rows of query_key_value are interleaved per head: [q_h, k_h, v_h] for each head h.
        q, k = apply_rotary_2d(qkv[:, :, :, :2], rope).unbind(3)  # each (B, T, nh, hd)
        v = qkv[:, :, :, 2]
        slot = layout.slot(t)
        keys, values = cache.update(self.layer_id, slot, k.transpose(1, 2), v.transpose(1, 2))
        q = q.transpose(1, 2)  # (B, nh, T, hd)
        # Official code scales by 1/(sqrt(hd)*(l+1)) then multiplies back by (l+1) in float32:
        # mathematically plain 1/sqrt(hd), which SDPA applies.
        split = layout.split_at(b)
        if t == 1 and cpu_attention.usable(q, keys):  # a decode step over a bf16 cache
            lo, hi = layout.decode_ranges(b)
            out = cpu_attention.decode_attention(q, keys, values, layout.prefix_len, lo, hi)
        elif split is None:
            mask = layout.mask(t, x.device)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        else:
            # Context queries see exactly the context keys (no mask needed); the queries from
            # <sop> on see a causal window, which is small.
            parts = []
            if split > 0:
                n_ctx = slot + split
                parts.append(F.scaled_dot_product_attention(
                    q[:, :, :split], keys[:, :, :n_ctx], values[:, :, :n_ctx]))
            if split < t:
                tail = t - split
                if tail == 1:
                    mask = None  # the last token sees every key
                else:
                    i = torch.arange(tail, device=x.device)[:, None]
                    j = torch.arange(keys.shape[2], device=x.device)[None, :]
                    mask = j <= (keys.shape[2] - tail + i)  # (tail, kv)
                parts.append(F.scaled_dot_product_attention(
                    q[:, :, split:], keys, values, attn_mask=mask))
            out = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
        out = out.transpose(1, 2).reshape(b, t, -1)  # (B, T, h)
        return self.dense(out)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# Inference runs the MLP on a long prompt this many tokens at a time (rows are independent):
# its 4x-wide intermediates then take a few MiB instead of ~100 MiB for 1000 tokens.
MLP_CHUNK_TOKENS = 256


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(cfg.inner_hidden_size, cfg.hidden_size)

    def forward(self, x):
        t = x.shape[1]
        if t <= MLP_CHUNK_TOKENS or torch.is_grad_enabled():
            return self.dense_4h_to_h(gelu_tanh(self.dense_h_to_4h(x)))
        return torch.cat([self.dense_4h_to_h(gelu_tanh(self.dense_h_to_4h(part)))
                          for part in x.split(MLP_CHUNK_TOKENS, dim=1)], dim=1)


class GLMBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.attention = SelfAttention(cfg, layer_id)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.mlp = MLP(cfg)
        # The official code never passes num_layers to its blocks, so every block uses the
        # default of 28 layers whatever the config says (the same for the real 28-layer model).
        self.alpha = math.sqrt(2 * OFFICIAL_ALPHA_LAYERS)

    def forward(self, x, rope, cache, layout):
        # DeepNorm-style residual: the *normalised* input is scaled and added back.
        h = self.input_layernorm(x)
        x = h * self.alpha + self.attention(h, rope, cache, layout)
        h = self.post_attention_layernorm(x)
        return h * self.alpha + self.mlp(h)


class PrefixEncoder(nn.Module):
    """P-Tuning v2: learned past keys/values for every layer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        width = cfg.num_layers * 2 * cfg.hidden_size
        self.embedding = nn.Embedding(cfg.pre_seq_len, width)
        if cfg.prefix_projection:
            hidden = cfg.prefix_hidden_size or cfg.hidden_size
            self.embedding = nn.Embedding(cfg.pre_seq_len, cfg.hidden_size)
            self.trans = nn.Sequential(
                nn.Linear(cfg.hidden_size, hidden), nn.Tanh(), nn.Linear(hidden, width))
        else:
            self.trans = None

    def forward(self, idx):
        x = self.embedding(idx)
        return self.trans(x) if self.trans is not None else x


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(GLMBlock(cfg, i) for i in range(cfg.num_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.prefix_encoder = PrefixEncoder(cfg) if cfg.pre_seq_len else None


class ChatGLMModel(nn.Module):
    """ChatGLM-6B: ``forward`` runs the blocks and returns logits at the requested positions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.transformer = Transformer(cfg)
        rot = cfg.head_dim // 2  # 2-D: each half of a head has its own rotary table
        self.rotary = RotaryTable(rot, cfg.max_sequence_length)

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 logits (..., V) from final hidden states (the head is tied to the
        embedding; a quantized embedding brings its own ``project``)."""
        emb = self.transformer.word_embeddings
        if hasattr(emb, "project"):
            return emb.project(x).float()
        w = emb.weight
        return F.linear(x.to(w.device, w.dtype), w).float()

    def prefix_kv(self, batch_size: int, dtype) -> torch.Tensor:
        """P-Tuning prefix as (layers, 2, B, nh, P, hd) keys/values, no rotary applied."""
        cfg = self.config
        enc = self.transformer.prefix_encoder
        idx = torch.arange(cfg.pre_seq_len, device=enc.embedding.weight.device)
        kv = enc(idx).to(dtype)  # (P, layers*2*h)
        kv = kv.view(cfg.pre_seq_len, cfg.num_layers, 2, cfg.num_attention_heads, cfg.head_dim)
        kv = kv.permute(1, 2, 3, 0, 4)  # (layers, 2, nh, P, hd)
        return kv[:, :, None].expand(-1, -1, batch_size, -1, -1, -1)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        position_ids: torch.Tensor,  # (B, 2, T)
        cache: KVCache,
        layout: AttentionLayout,
        logits_at: str | torch.Tensor | None = "last",  # "last", "all", index tensor, or None
        return_hidden: bool = False,
    ):
        x, rope = self.embed(input_ids, position_ids, cache.dtype)
        x = self.blocks(x, rope, cache, layout)
        return self.head(x, logits_at, return_hidden)

    # forward in three parts, so that a long prompt's layers can be run a few at a time
    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor, dtype):
        """Token embeddings (B, T, h) in ``dtype`` and the rotary tables of the 2-D positions."""
        x = self.transformer.word_embeddings(input_ids).to(dtype)  # (B, T, h)
        return x, rotary_2d(self.rotary, position_ids, x.dtype)

    def blocks(self, x, rope, cache: KVCache, layout: AttentionLayout, start: int = 0,
               stop: int | None = None) -> torch.Tensor:
        """Run blocks [start, stop) on hidden states ``x`` (B, T, h)."""
        for layer in self.transformer.layers[start:stop]:
            x = x.to(layer.input_layernorm.weight.device)
            if rope[0].device != x.device:
                rope = tuple(r.to(x.device) for r in rope)
            x = layer(x, rope, cache, layout)
        return x

    def head(self, x: torch.Tensor, logits_at: str | torch.Tensor | None = "last",
             return_hidden: bool = False):
        """Final layer norm, then logits at ``logits_at`` (or the hidden states)."""
        x = x.to(self.transformer.final_layernorm.weight.device)
        x = self.transformer.final_layernorm(x)
        if return_hidden:
            return x
        if logits_at is None:
            return None
        if isinstance(logits_at, str):
            x = x[:, -1:] if logits_at == "last" else x
        else:
            x = x[:, logits_at]
        return self.lm_head(x)  # (B, t, V)


def skeleton(cfg: ModelConfig) -> ChatGLMModel:
    """The module tree of ``cfg`` on the meta device, for a loader to fill: no memory, and no
    initialiser runs (nn.Embedding's ``normal_`` on meta would load PyTorch's Python meta
    kernels, ~70 MiB of resident memory for the rest of the process)."""
    with _embeddings_uninitialised(), torch.device("meta"):
        return ChatGLMModel(cfg)


@contextlib.contextmanager
def _embeddings_uninitialised():
    reset = nn.Embedding.reset_parameters
    nn.Embedding.reset_parameters = lambda self: None
    try:
        yield
    finally:
        nn.Embedding.reset_parameters = reset
