"""Quality measurements: perplexity of a text, and agreement with a reference model."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class EvalResult:
    tokens: int  # predicted tokens
    nll: float  # mean negative log-likelihood (nats/token)
    kl: float | None = None  # mean KL(reference || model) per token
    top1_agreement: float | None = None  # fraction of tokens with the same argmax
    max_logit_diff: float | None = None  # largest |logit difference| seen

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


def windows(tokenizer, text: str, window: int) -> list[list[int]]:
    """The text's tokens cut into windows, each as an answer: [gMASK] <sop> + tokens.

    ChatGLM predicts text causally after <sop>, so each window scores as the model's own
    continuation of an empty context.
    """
    ids = tokenizer.encode(text, add_special_tokens=False)
    head = [tokenizer.gmask_id, tokenizer.bos_id]
    step = window - len(head)
    return [head + ids[i:i + step] for i in range(0, len(ids), step) if ids[i:i + step]]


def evaluate(model, text: str, window: int = 512, reference=None, progress=None) -> EvalResult:
    """Perplexity of ``model`` on ``text`` (and its agreement with ``reference`` if given)."""
    nll_sum, n = 0.0, 0
    kl_sum, agree, max_diff = 0.0, 0, 0.0
    chunks = windows(model.tokenizer, text, window)
    for ids in (progress(chunks) if progress else chunks):
        logits = model.logits(ids)[1:-1]  # (T-2, V): predictions from <sop> on
        target = torch.tensor(ids[2:])
        nll_sum += F.cross_entropy(logits, target, reduction="sum").item()
        n += len(target)
        if reference is not None:
            ref = reference.logits(ids)[1:-1]
            logp, logq = ref.log_softmax(-1), logits.log_softmax(-1)
            kl_sum += (logp.exp() * (logp - logq)).sum().item()
            agree += (ref.argmax(-1) == logits.argmax(-1)).sum().item()
            max_diff = max(max_diff, (ref - logits).abs().max().item())
    if n == 0:
        raise ValueError("the text has no tokens to score")
    res = EvalResult(n, nll_sum / n)
    if reference is not None:
        res.kl, res.top1_agreement, res.max_logit_diff = kl_sum / n, agree / n, max_diff
    return res
