"""JSON mode: constrain generation so that the answer is one JSON object.

``JSONPrefix`` is an incremental checker of the JSON grammar (RFC 8259) that says whether a
text can still be the beginning of a JSON object; ``JSONObjectProcessor`` is a logits
processor that, at every step, allows only the tokens that keep the answer such a prefix
(and <eop> only once the object is complete).
"""

from __future__ import annotations

import torch

from .tokenizer import _postprocess

_WS = " \t\n\r"
_ESCAPES = '"\\/bfnrtu'
_HEX = "0123456789abcdefABCDEF"
_LITERALS = {"t": "rue", "f": "alse", "n": "ull"}
# Number states that may end the number (the rest need more characters).
_NUMBER_ENDS = {"zero", "int", "frac", "exp"}
CANDIDATES = 64  # the most likely tokens checked per step before the rest of the vocabulary

# A parser state is a tuple (mode, stack, extra): immutable, so trying a token on a copy
# costs nothing. stack: the open containers, "{" or "["; extra: the sub-state of strings
# (is-key flag), escapes, numbers and literals.
State = tuple


class JSONPrefix:
    """Feed characters; ``state`` is None once the text can no longer become a JSON object."""

    START: State = ("top", (), None)

    def __init__(self):
        self.state: State | None = self.START

    def feed(self, text: str) -> bool:
        self.state = advance(self.state, text)
        return self.state is not None

    @property
    def complete(self) -> bool:
        return self.state is not None and self.state[0] == "done"


def advance(state: State | None, text: str) -> State | None:
    """The state after ``text``, or None if it breaks the grammar."""
    for ch in text:
        if state is None:
            return None
        state = _step(state, ch)
    return state


def _value_done(stack: tuple) -> State:
    if not stack:
        return ("done", stack, None)
    return ("obj_next" if stack[-1] == "{" else "arr_next", stack, None)


def _start_value(stack: tuple, ch: str) -> State | None:
    if ch == "{":
        return ("obj_first", stack + ("{",), None)
    if ch == "[":
        return ("arr_first", stack + ("[",), None)
    if ch == '"':
        return ("string", stack, False)
    if ch == "-":
        return ("number", stack, "minus")
    if ch == "0":
        return ("number", stack, "zero")
    if ch.isdigit() and ch.isascii():
        return ("number", stack, "int")
    if ch in _LITERALS:
        return ("literal", stack, _LITERALS[ch])
    return None


def _step(state: State, ch: str) -> State | None:  # noqa: C901 - one branch per grammar state
    mode, stack, extra = state
    if mode == "string":
        if ch == '"':
            return ("colon", stack, None) if extra else _value_done(stack)
        if ch == "\\":
            return ("escape", stack, extra)
        return None if ord(ch) < 0x20 else state
    if mode == "escape":
        if ch not in _ESCAPES:
            return None
        return ("unicode", stack, (extra, 4)) if ch == "u" else ("string", stack, extra)
    if mode == "unicode":
        if ch not in _HEX:
            return None
        is_key, left = extra
        return ("string", stack, is_key) if left == 1 else ("unicode", stack, (is_key, left - 1))
    if mode == "number":
        nxt = _number_step(extra, ch)
        if nxt is not None:
            return ("number", stack, nxt)
        if extra not in _NUMBER_ENDS:
            return None
        return _step(_value_done(stack), ch)  # the number ended: ch belongs to what follows
    if mode == "literal":
        if ch != extra[0]:
            return None
        return ("literal", stack, extra[1:]) if len(extra) > 1 else _value_done(stack)
    if ch in _WS:
        return None if mode == "done" else state
    if mode == "top":
        return ("obj_first", ("{",), None) if ch == "{" else None
    if mode in ("obj_first", "obj_key"):
        if ch == '"':
            return ("string", stack, True)
        if ch == "}" and mode == "obj_first":
            return _value_done(stack[:-1])
        return None
    if mode == "colon":
        return ("value", stack, None) if ch == ":" else None
    if mode == "value":
        return _start_value(stack, ch)
    if mode == "arr_first":
        return _value_done(stack[:-1]) if ch == "]" else _start_value(stack, ch)
    if mode in ("obj_next", "arr_next"):
        close = "}" if mode == "obj_next" else "]"
        if ch == close:
            return _value_done(stack[:-1])
        if ch == ",":
            return ("obj_key" if mode == "obj_next" else "value", stack, None)
        return None
    return None  # "done": nothing may follow the object


def _number_step(sub: str, ch: str) -> str | None:
    digit = ch.isascii() and ch.isdigit()
    if sub == "minus":
        return "zero" if ch == "0" else "int" if digit else None
    if sub in ("zero", "int"):
        if digit and sub == "int":
            return "int"
        return "dot" if ch == "." else "e" if ch in "eE" else None
    if sub in ("dot", "frac"):
        if digit:
            return "frac"
        return "e" if sub == "frac" and ch in "eE" else None
    if sub == "e":
        return "esign" if ch in "+-" else "exp" if digit else None
    if sub in ("esign", "exp"):
        return "exp" if digit else None
    return None


def token_texts(tokenizer) -> list[str | None]:
    """The text each token id adds in the middle of an answer; None for ids that add no
    plain text (control pieces, image ids, bytes of multi-byte characters). Cached on the
    tokenizer."""
    cached = getattr(tokenizer, "_localglm_token_texts", None)
    if cached is not None:
        return cached
    sp, shift = tokenizer._sp, tokenizer.num_image_tokens
    special = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.mask_id, tokenizer.gmask_id,
               tokenizer.pad_id, tokenizer.unk_id}
    texts: list[str | None] = [None] * tokenizer.vocab_size
    for i in range(shift, tokenizer.vocab_size):
        j = i - shift
        if i in special or sp.is_control(j) or sp.is_unknown(j):
            continue
        piece = sp.id_to_piece(j)
        if sp.is_byte(j):  # "<0x41>": plain text only when the byte is a whole character
            byte = int(piece[3:-1], 16)
            texts[i] = chr(byte) if byte < 0x80 else None
            continue
        texts[i] = _postprocess(piece.replace("\u2581", " ")) or None
    tokenizer._localglm_token_texts = texts
    return texts


class JSONObjectProcessor:
    """Logits processor (row 0) that keeps the answer a prefix of one JSON object.

    At each step the ``CANDIDATES`` most likely tokens are checked; if none fits, the rest of
    the vocabulary is searched in order of likelihood. Every other token is masked, and
    <eop> is allowed only (and then forced) once the object is complete.
    """

    def __init__(self, tokenizer, prompt_len: int):
        self.texts = token_texts(tokenizer)
        self.eos = tokenizer.eos_id
        self.prompt_len = prompt_len
        self.seen = 0  # answer tokens already fed to the parser
        self.state: State | None = JSONPrefix.START

    def __call__(self, scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        answer = ids[0, self.prompt_len:].tolist()
        for tok in answer[self.seen:]:
            text = self.texts[tok] if tok < len(self.texts) else None
            self.state = advance(self.state, text or "")
        self.seen = len(answer)
        allowed = self._allowed(scores[0])
        out = torch.full_like(scores, float("-inf"))
        out[0, allowed] = scores[0, allowed]
        return out

    def _allowed(self, row: torch.Tensor) -> list[int]:
        if self.state is None or self.state[0] == "done":
            return [self.eos]  # complete (or, defensively, broken): end the answer
        order = torch.argsort(row, descending=True).tolist()
        allowed = [t for t in order[:CANDIDATES] if self._fits(t)]
        if not allowed:
            allowed = next(([t] for t in order[CANDIDATES:] if self._fits(t)), [self.eos])
        return allowed

    def _fits(self, tok: int) -> bool:
        text = self.texts[tok] if tok < len(self.texts) else None
        if not text or (text.isspace() and self.state[0] != "string"):
            return False  # whitespace between tokens adds nothing and could repeat forever
        return advance(self.state, text) is not None
