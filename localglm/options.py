"""Generation options: one dataclass, the range of every field, and the official chat defaults.

Nothing here imports PyTorch, so the command line builds its flags and ``--help`` from these
definitions instantly. Every caller (Python API, CLI, server) validates through
``GenerationConfig``; ``check_option`` lets a caller word the error with its own names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from .errors import LocalGLMError

# Official model.chat defaults.
CHAT_DEFAULTS = {"max_length": 2048, "max_new_tokens": None, "do_sample": True, "top_p": 0.7,
                 "temperature": 0.95}
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed accepts


def _whole(low: int, high: int | None = None, note: str = ""):
    """Rule for an int field: an int in [low, high]."""
    want = f"a whole number >= {low}" if high is None else f"a whole number in [{low}, {high}]"

    def check(value) -> str | None:
        ok = (isinstance(value, int) and not isinstance(value, bool) and value >= low
              and (high is None or value <= high))
        return None if ok else f"must be {want}{note}"
    return check


def _real(low: float, high: float | None = None, low_open: bool = False, note: str = ""):
    """Rule for a float field: a finite number in [low, high] (or (low, high])."""
    if high is not None:
        want = f"a number in {'(' if low_open else '['}{low:g}, {high:g}]"
    else:
        want = f"a number {'>' if low_open else '>='} {low:g}"

    def check(value) -> str | None:
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value) and (value > low if low_open else value >= low)
              and (high is None or value <= high))
        return None if ok else f"must be {want}{note}"
    return check


def _opt(default, help: str, check=None, **kw):
    return field(default=default, metadata={"help": help, "check": check}, **kw)


@dataclass
class GenerationConfig:
    """How to pick tokens and when to stop. Field help texts become the CLI flags' help."""

    max_new_tokens: int | None = _opt(256, "generate at most this many tokens", _whole(1))
    max_length: int | None = _opt(
        None, "prompt + answer tokens at most (the official max_length)", _whole(1))
    do_sample: bool = _opt(False, "sample instead of always taking the most likely token")
    temperature: float = _opt(1.0, "sampling temperature; 0 means greedy (no sampling)",
                              _real(0, note=" (0 = greedy)"))
    top_p: float = _opt(1.0, "nucleus sampling: keep the top tokens holding this much mass",
                        _real(0, 1, low_open=True))
    top_k: int = _opt(0, "keep only the k most likely tokens (0 = off)",
                      _whole(0, note=" (0 = off)"))
    repetition_penalty: float = _opt(
        1.0, "values > 1 discourage tokens already in the prompt or answer",
        _real(0, low_open=True))
    seed: int | None = _opt(None, "random seed, for reproducible sampling", _whole(*SEED_RANGE))
    stop: list[str] = field(default_factory=list, metadata={"help": "stop strings"})
    logprobs: int | None = _opt(
        None, "report each new token's log-probability and this many top alternatives",
        _whole(0))
    json_object: bool = _opt(False, "constrain the output to one JSON object")

    def __post_init__(self):
        for f in fields(self):
            problem = check_option(f.name, getattr(self, f.name))
            if problem:
                raise LocalGLMError(f"{f.name} {problem}, not {getattr(self, f.name)!r}")
        if (not isinstance(self.stop, (list, tuple))
                or not all(isinstance(s, str) for s in self.stop)):
            raise LocalGLMError("stop must be a list of strings")
        self.stop = list(self.stop)

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def budget(self, prompt_len: int) -> int:
        """Number of new tokens allowed for a prompt of ``prompt_len`` tokens."""
        n = self.max_new_tokens if self.max_new_tokens is not None else 1 << 30
        if self.max_length is not None:
            n = min(n, self.max_length - prompt_len)
        return max(n, 0)


_CHECKS = {f.name: f.metadata.get("check") for f in fields(GenerationConfig)}
_OPTIONAL = {"max_new_tokens", "max_length", "seed", "logprobs"}  # None: no limit / not asked


def check_option(name: str, value) -> str | None:
    """What is wrong with ``value`` for the generation option ``name`` ("must be ..."), or None.

    ``None`` is accepted where the field allows it (no limit, no seed).
    """
    check = _CHECKS.get(name)
    if check is None or (value is None and name in _OPTIONAL):
        return None
    return check(value)
