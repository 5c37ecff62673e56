"""The official multi-turn prompt, response clean-up and the history budget."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ContextTooLongError
from .streamer import TextStreamer

History = list[tuple[str, str]]  # [(query, response), ...], oldest first

PLACEHOLDER, TRAINED = "[[训练时间]]", "2023年"  # the official chat replaces one by the other
_PUNCT = ((",", "，"), ("!", "！"), (":", "："), (";", "；"), (r"\?", "？"))
_CJK = r"[\u4e00-\u9fff]"
# What process_response may still change at the end of a growing answer: half-width
# punctuation (full-width once a CJK character follows) and whitespace (str.strip's, which
# all lies below U+3001).
_CHANGEABLE = ",!:;?" + "".join(c for c in map(chr, range(0x3001)) if c.isspace())


def build_prompt(query: str, history: History | None = None) -> str:
    """Official ChatGLM-6B chat prompt: the bare query when there is no history."""
    if not history:
        return query
    prompt = "".join(
        f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history))
    return prompt + f"[Round {len(history)}]\n问：{query}\n答："


def process_response(text: str) -> str:
    """Official post-processing: strip, date placeholder, full-width punctuation next to CJK."""
    text = text.strip().replace(PLACEHOLDER, TRAINED)
    for half, full in _PUNCT:
        text = re.sub(rf"({_CJK}){half}", rf"\1{full}", text)
        text = re.sub(rf"{half}({_CJK})", rf"{full}\1", text)
    return text


def response_streamer() -> TextStreamer:
    """A streamer for successive ``process_response`` outputs of one growing answer."""
    return TextStreamer(hold=[PLACEHOLDER], hold_chars=_CHANGEABLE)


def normalize_history(history) -> History:
    """Accept [[q, r], ...] (JSON) or [(q, r), ...]; reject anything else clearly."""
    if history is None:
        return []
    out = []
    for i, item in enumerate(history):
        if (not isinstance(item, (list, tuple)) or len(item) != 2
                or not all(isinstance(s, str) for s in item)):
            raise ValueError(f"history[{i}] must be a [query, response] pair of strings")
        out.append((item[0], item[1]))
    return out


def tokens(n: int) -> str:
    """'1 token', '2 tokens'."""
    return f"{n} token" + ("" if n == 1 else "s")


@dataclass
class FittedPrompt:
    ids: list[int]  # token ids of the prompt to run
    history: History  # the rounds kept in it
    dropped: int  # oldest rounds left out to fit the budget


def fit_prompt(tokenizer, query: str, history: History, budget: int,
               reserve: int) -> FittedPrompt:
    """Drop the oldest rounds until prompt + ``reserve`` new tokens fit in ``budget`` tokens.

    The current query is never dropped; if it alone does not fit, that is an error. Prompt
    length only shrinks as rounds are dropped, so the fewest rounds to drop is found by
    bisection: a long conversation costs O(log rounds) tokenizations, not O(rounds).
    """

    def encode(dropped: int) -> list[int]:
        return tokenizer.encode(build_prompt(query, history[dropped:]))

    ids = encode(0)
    if len(ids) + reserve <= budget:
        return FittedPrompt(ids, list(history), 0)
    alone = encode(len(history))
    if len(alone) + reserve > budget:
        raise ContextTooLongError(
            f"the message is {tokens(len(alone))}; with {tokens(reserve)} kept for the answer "
            f"it does not fit the context budget of {tokens(budget)}. Shorten the message"
            + (" or allow a shorter answer." if reserve > 1 else "."),
            prompt_tokens=len(alone), reserved=reserve, budget=budget)
    lo, hi, best = 1, len(history), alone  # invariant: dropping `hi` rounds fits
    while lo < hi:
        mid = (lo + hi) // 2
        ids = encode(mid)
        if len(ids) + reserve <= budget:
            hi, best = mid, ids
        else:
            lo = mid + 1
    if hi != len(history) and best is alone:
        best = encode(hi)
    return FittedPrompt(best, list(history[hi:]), hi)
