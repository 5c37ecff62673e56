"""The training forward: official prefix-LM mask and 2-D positions, loss on the answers only.

It runs the model's own ``forward`` (so training sees exactly the inference computation) with
two changes that only matter for autograd: a stateless cache that attends over the current
keys/values (plus the P-Tuning prefix) instead of writing into preallocated storage, and,
optionally, each block recomputed in the backward pass (gradient checkpointing).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..generate import Batch
from ..model import ChatGLMModel
from .data import Encoded


class TrainingCache:
    """Duck-typed ``KVCache`` for one full-sequence forward: stores nothing.

    ``update`` returns the prefix keys/values (if any) followed by this call's, built with
    ``torch.cat``, so the graph holds no in-place writes and a checkpointed block recomputes
    the same tensors. Only a forward that starts at token 0 is supported.
    """

    def __init__(self, dtype: torch.dtype, prefix: torch.Tensor | None = None):
        self.dtype = dtype
        self.prefix = prefix  # (layers, 2, B, nh, P, hd) or None
        self.prefix_len = 0 if prefix is None else prefix.shape[4]

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """k, v (B, nh, T, hd) -> keys, values (B, nh, P + T, hd)."""
        if start != self.prefix_len:
            raise RuntimeError("TrainingCache only runs full sequences from the first token")
        if self.prefix is None:
            return k, v
        pk = self.prefix[layer, 0].to(k.device, k.dtype)
        pv = self.prefix[layer, 1].to(v.device, v.dtype)
        return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)


def _checkpointed(fn, *args):
    return checkpoint(fn, *args, use_reentrant=False)


@contextmanager
def gradient_checkpointing(model: ChatGLMModel, enabled: bool = True):
    """Recompute each block in the backward pass instead of keeping its activations.

    Memory then holds one block's activations plus each block's input, at the cost of a second
    forward. The blocks' ``forward`` is swapped per instance and restored afterwards.
    """
    layers = list(model.transformer.layers) if enabled else []
    for layer in layers:
        layer.forward = functools.partial(_checkpointed, layer.forward)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # back to the class's forward


@dataclass
class TrainBatch:
    """Left-padded sequences and, for each loss position, the token it must predict."""

    batch: Batch
    rows: torch.Tensor  # (N,) row of each loss position
    cols: torch.Tensor  # (N,) padded index of each loss position
    targets: torch.Tensor  # (N,) token to predict there

    @property
    def n_tokens(self) -> int:
        return int(self.targets.numel())


def collate(examples: list[Encoded], cfg, device) -> TrainBatch:
    """Pad like generation does; the logit at token i predicts token i + 1 of the answer.

    Loss positions run from ``<sop>`` (predicting the first answer token) to the last answer
    token (predicting ``<eop>``); the prompt carries no loss.
    """
    batch = Batch([e.ids for e in examples], cfg, device)
    rows, cols, targets = [], [], []
    for r, (e, pad) in enumerate(zip(examples, batch.pad, strict=True)):
        n = len(e.ids) - 1 - e.context  # answer tokens + <eop>
        rows += [r] * n
        cols += range(pad + e.context, pad + len(e.ids) - 1)
        targets += e.ids[e.context + 1:]
    as_long = functools.partial(torch.tensor, dtype=torch.long, device=device)
    return TrainBatch(batch, as_long(rows), as_long(cols), as_long(targets))


def loss_sum(model: ChatGLMModel, tb: TrainBatch, dtype: torch.dtype,
             checkpointing: bool = False, prefix_dropout: float = 0.0) -> torch.Tensor:
    """Summed cross-entropy over the batch's loss positions (float32 scalar).

    Only the loss positions go through the vocabulary projection, which keeps the logits of a
    130k-token vocabulary small. ``prefix_dropout`` is the official P-Tuning v2 dropout (0.1)
    on the prefix keys/values during training.
    """
    b = tb.batch
    prefix_len = model.config.pre_seq_len or 0
    prefix = model.prefix_kv(b.ids.shape[0], dtype) if prefix_len else None
    if prefix is not None and prefix_dropout and model.training:
        prefix = F.dropout(prefix, prefix_dropout, training=True)
    cache = TrainingCache(dtype, prefix)
    layout = b.layout(0, b.width, prefix_len)
    with gradient_checkpointing(model, checkpointing):
        h = model(b.ids, b.pos, cache, layout, return_hidden=True)  # (B, T, hidden)
    picked = h[tb.rows.to(h.device), tb.cols.to(h.device)]  # (N, hidden)
    logits = model.lm_head(picked)  # (N, V) float32
    return F.cross_entropy(logits, tb.targets.to(logits.device), reduction="sum")


@torch.no_grad()
def mean_loss(model: ChatGLMModel, examples: list[Encoded], dtype: torch.dtype,
              batch_size: int = 1) -> float:
    """Token-weighted mean loss over ``examples`` (evaluation: no dropout, no gradients)."""
    was_training = model.training
    model.eval()
    device = model.transformer.word_embeddings.weight.device
    total, count = 0.0, 0
    try:
        for i in range(0, len(examples), batch_size):
            tb = collate(examples[i:i + batch_size], model.config, device)
            total += float(loss_sum(model, tb, dtype))
            count += tb.n_tokens
    finally:
        model.train(was_training)
    return total / max(count, 1)
