"""The tied word embedding / output head of ChatGLM-6B held as int8 (one scale per row).

The head is the largest single matrix (130528 x 4096) and is read in full for every decoded
token; in bf16 it is 1 GiB, a quarter of an int4 model's bytes per token. Held as int8 it is
read by the same CPU kernel as the block linears, and the embedding lookup dequantizes only
the rows it needs. Per-row int8 (THUDM's recipe) changes a 4096-wide dot product by ~1 %
relative (benchmarks/bench_linear.py), far less than int4 would.
"""

from __future__ import annotations

import torch

from .formats import dequantize_int8, quantize_int8_official
from .linear import QuantizedLinear

EMBEDDING_NAME = "transformer.word_embeddings.weight"
HEAD_BITS = 8
_CHUNK_ROWS = 8192  # rows quantized at a time: bounds the float32 copy made while loading


class QuantizedEmbedding(QuantizedLinear):
    """nn.Embedding-compatible lookup plus `project` (the tied output head)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *,
                 device: torch.device | str | None = None) -> None:
        super().__init__(embedding_dim, num_embeddings, HEAD_BITS, 0, bias=False,
                         fmt="official", device=device)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...) -> float32 rows (..., embedding_dim)."""
        flat = ids.reshape(-1)
        rows = dequantize_int8(self.weight[flat], self.weight_scale[flat])  # (n, H)
        return rows.view(*ids.shape, self.embedding_dim)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Logits: x (..., H) @ weight.T, through the layer's kernels."""
        return QuantizedLinear.forward(self, x)


def quantize_embedding(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """THUDM's int8 recipe applied in chunks of rows: (int8 [V, H], fp16 scale [V])."""
    qs, ss = [], []
    for r in range(0, w.shape[0], _CHUNK_ROWS):
        q, s = quantize_int8_official(w[r:r + _CHUNK_ROWS])
        qs.append(q)
        ss.append(s)
    return torch.cat(qs), torch.cat(ss)


def use_quantized_head(model: torch.nn.Module) -> None:
    """Swap the model's (meta) word embedding for an empty QuantizedEmbedding of its size."""
    emb = model.transformer.word_embeddings
    model.transformer.word_embeddings = QuantizedEmbedding(
        emb.num_embeddings, emb.embedding_dim, device=emb.weight.device)
