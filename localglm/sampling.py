"""Pure logits processors and samplers: (B, V) float tensors in, token ids out."""

from __future__ import annotations

from collections.abc import Callable

import torch

Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, ids_so_far) -> logits


def replace_invalid(logits: torch.Tensor, fallback_id: int = 5) -> torch.Tensor:
    """The official guard: if any score is NaN/Inf, zero all of them and favour ``fallback_id``.

    The official InvalidScoreLogitsProcessor hard-codes id 5 (the bare "▁" piece).
    """
    bad = ~torch.isfinite(logits).all(dim=-1)  # (B,)
    if not bad.any():
        return logits
    logits = logits.clone()
    logits[bad] = 0.0
    logits[bad, fallback_id] = 5e4
    return logits


def repetition_penalty(logits: torch.Tensor, ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on every id already present in ``ids`` (B, T)."""
    if penalty == 1.0 or ids.numel() == 0:
        return logits
    score = torch.gather(logits, 1, ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(1, ids, score)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of top tokens whose probability reaches ``p`` (always >= 1 token)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum - sorted_logits.softmax(-1) >= p  # mass before this token already reaches p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


# Candidates taken before sorting in `sample_top_p`; the exact full sort runs only when they
# hold less than top_p of the probability mass.
TOP_P_CANDIDATES = 256


def nucleus_candidates(logits: torch.Tensor, p: float, candidates: int = TOP_P_CANDIDATES
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The top-p nucleus of every row found among its ``candidates`` most likely tokens:
    (ids (B, k), unnormalised probabilities (B, k), zero outside the nucleus), or None when
    some row's candidates hold less than ``p`` of the mass.

    The nucleus is a prefix of the tokens sorted by probability, so when the candidates already
    hold ``p`` of the mass it lies among them and only they need sorting (torch.topk returns
    them sorted): the same tokens, with probabilities proportional to the same softmax, as
    `top_p_filter` over all V. Ties at the nucleus edge may be broken differently, as between
    any two sorts.
    """
    k = min(candidates, logits.shape[-1])
    probs = logits.float().softmax(-1)  # (B, V)
    top, idx = torch.topk(probs, k, dim=-1)  # (B, k), sorted descending
    cum = top.cumsum(-1)
    if bool((cum[:, -1] < p).any()):
        return None
    keep = (cum - top) < p  # mass before this token has not yet reached p
    return idx, top * keep


def sample_top_p(logits: torch.Tensor, p: float, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """(B, V) logits -> (B,) ids drawn from the top-p distribution of `top_p_filter`, sorting
    only a few candidates when they hold the nucleus (`nucleus_candidates`)."""
    found = None if p >= 1.0 else nucleus_candidates(logits, p)
    if found is None:
        probs = top_p_filter(logits, p).softmax(-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    idx, weights = found
    pick = torch.multinomial(weights, 1, generator=generator)  # (B, 1) index into idx
    return idx.gather(-1, pick).squeeze(-1)


def make_sampler(
    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
    generator: torch.Generator | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """(B, V) logits -> (B,) ids. Temperature 0 is argmax (greedy)."""
    if temperature <= 0:
        return lambda logits: logits.argmax(dim=-1)

    def sample(logits: torch.Tensor) -> torch.Tensor:
        logits = apply_temperature(logits, temperature)
        logits = top_k_filter(logits, top_k)
        return sample_top_p(logits, top_p, generator)

    return sample
