"""Training data: the jsonl formats people already have, turned into chat-format token ids.

Formats, detected per file from its first record:

- ptuning: the official ChatGLM-6B ptuning/main.py columns, ``{"content": ..., "summary": ...}``
  (names set with --prompt-column / --response-column, optional --history-column holding
  ``[[query, response], ...]``);
- alpaca: ``{"instruction", "input", "output"}`` (optional ``history``);
- chat: ``{"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}``; every
  assistant message becomes one example with the earlier rounds as its history.

Each example is the official chat prompt (``build_prompt(query, history)``) and its answer, so a
trained model answers ``model.chat(query, history)`` the way it was taught. A ``.json`` file
holding a list of records is read too (alpaca_data.json is one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..chat import build_prompt
from ..errors import LocalGLMError

IGNORE = -100  # label of positions that carry no loss (the official ptuning value)


class DataError(LocalGLMError):
    """A training file that cannot be read; the message names the file and line."""


@dataclass
class Columns:
    """Column names of the official ptuning format."""

    prompt: str = "content"
    response: str = "summary"
    history: str | None = None


@dataclass
class Example:
    query: str
    answer: str
    history: list[tuple[str, str]] = field(default_factory=list)
    where: str = ""  # "file:line", for messages

    @property
    def prompt(self) -> str:
        return build_prompt(self.query, self.history)


@dataclass
class Limits:
    """Truncation. ``max_source_len``/``max_target_len`` follow the official ptuning/main.py
    (prompt tokens kept: max_source_len - 1; answer tokens kept: max_target_len - 2);
    ``max_seq_len`` caps the whole sequence instead (prompt + [gMASK] <sop> + answer + <eop>)."""

    max_source_len: int | None = None
    max_target_len: int | None = None
    max_seq_len: int | None = None


@dataclass
class Encoded:
    ids: list[int]  # prompt + [gMASK] <sop> + answer + <eop>
    context: int  # index of <sop>: the loss covers the tokens after it
    truncated: bool = False


@dataclass
class Dataset:
    examples: list[Encoded]
    path: str
    fmt: str
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.examples)

    def summary(self) -> str:
        n = len(self.examples)
        tokens = sum(len(e.ids) for e in self.examples)
        note = f"; {self.truncated} truncated to fit the length limits" if self.truncated else ""
        return f"{self.path}: {n} examples ({self.fmt} format, {tokens} tokens){note}"


MAX_SHOWN = 10  # bad lines listed in one error; the rest are counted


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a directory; give a .jsonl file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e})") from None
    except OSError as e:
        raise DataError(f"{path} cannot be read ({e.strerror})") from None


def read_records(path: Path) -> tuple[list[tuple[int, object]], list[tuple[int, str]]]:
    """(line number, parsed JSON) for each non-empty line, and (line number, problem) for each
    line that is not JSON; a .json list gives (index + 1, item)."""
    text = _read_text(path)
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            return list(enumerate(json.loads(text), 1)), []
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    records, bad = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            bad.append((n, f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno})"))
    return records, bad


def detect_format(record, columns: Columns) -> str | None:
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "chat"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if columns.prompt in record and columns.response in record:
        return "ptuning"
    return None


def _text(record: dict, key: str, where: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        what = "missing" if key not in record else f"a {type(value).__name__}, not a string"
        raise DataError(f"{where}: field {key!r} is {what}")
    return value


def _history(record: dict, key: str | None, where: str) -> list[tuple[str, str]]:
    if not key or record.get(key) is None:
        return []
    value = record[key]
    ok = isinstance(value, list) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(s, str) for s in p)
        for p in value)
    if not ok:
        raise DataError(f"{where}: field {key!r} must be a list of [query, response] pairs")
    return [(q, r) for q, r in value]


def _ptuning(record: dict, where: str, columns: Columns) -> list[Example]:
    return [Example(_text(record, columns.prompt, where), _text(record, columns.response, where),
                    _history(record, columns.history, where), where)]


def _alpaca(record: dict, where: str, columns: Columns) -> list[Example]:
    query = _text(record, "instruction", where)
    extra = _text(record, "input", where, required=False)
    if extra:
        query = f"{query}\n{extra}"
    return [Example(query, _text(record, "output", where),
                    _history(record, "history", where), where)]


def _chat(record: dict, where: str, columns: Columns) -> list[Example]:
    messages = record.get("messages")
    if not isinstance(messages, list):
        raise DataError(f"{where}: 'messages' must be a list of {{role, content}} objects")
    history: list[tuple[str, str]] = []
    out, query, system = [], None, ""
    for i, m in enumerate(messages):
        at = f"{where}: messages[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{at} is not an object with role and content")
        role, content = _text(m, "role", at), _text(m, "content", at)
        if role == "system":
            system = content  # ChatGLM-6B has no system prompt: it opens the first question
        elif role == "user":
            if query is not None:
                raise DataError(f"{at}: two user messages in a row")
            query = f"{system}\n{content}" if system and not history else content
        elif role == "assistant":
            if query is None:
                raise DataError(f"{at}: an assistant message without a user message before it")
            out.append(Example(query, content, list(history), where))
            history.append((query, content))
            query = None
        else:
            raise DataError(f"{at}: unknown role {role!r} (use system, user or assistant)")
    if not out:
        raise DataError(f"{where}: no assistant message to learn from")
    return out


PARSERS = {"ptuning": _ptuning, "alpaca": _alpaca, "chat": _chat}


def read_examples(path, columns: Columns | None = None) -> tuple[list[Example], str]:
    """All examples of a file and its detected format, without a tokenizer (so a broken file
    is found before a model is loaded). Every bad line is reported, as ``FILE:LINE: problem``."""
    path = Path(path)
    columns = columns or Columns()
    records, bad = read_records(path)
    first = next(((n, r) for n, r in records if isinstance(r, dict)), None)
    if first is None:
        if bad or records:
            n = min([n for n, _ in bad] + [n for n, _ in records])
            bad.append((n, f"{path}:{n}: expected a JSON object per line"))
            raise _bad_lines(bad)
        raise DataError(f"{path} holds no examples")
    # The format of the first record that has one: a first record with a typo is reported
    # as that, not as an unknown format.
    fmt = next((f for _, r in records if (f := detect_format(r, columns))), None)
    if fmt is None:
        bad.append((first[0], f"{path}:{first[0]}: unknown format; expected "
                    f"{{{columns.prompt!r}, {columns.response!r}}} (see --prompt-column/"
                    "--response-column), {'instruction', 'input', 'output'} or "
                    "{'messages': [...]}"))
        raise _bad_lines(bad)
    examples = []
    for n, record in records:
        where = f"{path}:{n}"
        try:
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            examples += PARSERS[fmt](record, where, columns)
        except DataError as e:
            bad.append((n, str(e)))
    if bad:
        raise _bad_lines(bad)
    return examples, fmt


def _bad_lines(bad: list[tuple[int, str]]) -> DataError:
    lines = [text for _, text in sorted(bad, key=lambda b: b[0])]
    more = len(lines) - MAX_SHOWN
    return DataError("\n".join(lines[:MAX_SHOWN])
                     + (f"\n(and {more} more bad line{'s' if more > 1 else ''})" if more > 0
                        else ""))


def encode(tokenizer, ex: Example, limits: Limits) -> Encoded:
    """``prompt + [gMASK] <sop> + answer + <eop>``, truncated like the official ptuning."""
    prompt = tokenizer.encode(ex.prompt)[:-2]  # without the trailing [gMASK] <sop>
    answer = tokenizer.encode(ex.answer, add_special_tokens=False)
    n_p, n_a = len(prompt), len(answer)
    if limits.max_source_len:
        prompt = prompt[: max(limits.max_source_len - 1, 0)]
    if limits.max_target_len:
        answer = answer[: max(limits.max_target_len - 2, 0)]
    if limits.max_seq_len:
        room = limits.max_seq_len - 3  # [gMASK] <sop> <eop>
        if room < 2:
            raise DataError(f"max_seq_len {limits.max_seq_len} is too small (at least 5)")
        # Keep at least half the room for the answer when the prompt is long.
        answer = answer[: max(room - len(prompt), room // 2)]
        prompt = prompt[: room - len(answer)]
    ids = prompt + [tokenizer.gmask_id, tokenizer.bos_id] + answer + [tokenizer.eos_id]
    return Encoded(ids, len(prompt) + 1, (len(prompt), len(answer)) != (n_p, n_a))


def encode_examples(examples: list[Example], fmt: str, path, tokenizer,
                    limits: Limits | None = None) -> Dataset:
    """Encode examples read by ``read_examples``; counts the ones that had to be truncated."""
    limits = limits or Limits()
    encoded = [encode(tokenizer, ex, limits) for ex in examples]
    return Dataset(encoded, str(path), fmt, sum(e.truncated for e in encoded))


def load_dataset(path, tokenizer, limits: Limits | None = None,
                 columns: Columns | None = None) -> Dataset:
    """Read and encode a file; counts the examples that had to be truncated."""
    examples, fmt = read_examples(path, columns)
    return encode_examples(examples, fmt, path, tokenizer, limits)
