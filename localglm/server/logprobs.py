"""Per-token log-probabilities of the generation in the OpenAI response shapes."""

from __future__ import annotations

from ..generate import TokenLogprob
from ..json_mode import token_texts
from . import protocol as p


class TokenNames:
    """The text OpenAI clients see for a token id: its text, or ``bytes:\\xNN`` for a byte
    piece, or the piece itself for a control token."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.texts = token_texts(tokenizer)

    def __call__(self, token: int) -> tuple[str, list[int]]:
        text = self.texts[token] if token < len(self.texts) else None
        if text is not None:
            return text, list(text.encode("utf-8"))
        piece = self.tokenizer._id_to_piece(token)
        if self.tokenizer._is_byte(token):  # "<0xE4>": one byte of a multi-byte character
            byte = int(piece[3:-1], 16)
            return f"bytes:\\x{byte:02x}", [byte]
        return piece, list(piece.encode("utf-8"))


def chat_logprobs(entries: list[TokenLogprob], names: TokenNames) -> p.ChatLogprobs:
    """``choices[].logprobs`` of a chat completion (or of one streamed chunk)."""
    content = []
    for e in entries:
        token, raw = names(e.token)
        top = [p.TopLogprob(token=t, logprob=lp, bytes=b)
               for t, b, lp in ((*names(i), lp) for i, lp in e.top)]
        content.append(p.TokenLogprob(token=token, logprob=e.logprob, bytes=raw,
                                      top_logprobs=top))
    return p.ChatLogprobs(content=content)


def completion_logprobs(entries: list[TokenLogprob], names: TokenNames,
                        offset: int = 0) -> p.CompletionLogprobs:
    """``choices[].logprobs`` of a text completion; ``offset``: where the first token's text
    starts in the returned text."""
    tokens, offsets = [], []
    for e in entries:
        offsets.append(offset)
        tokens.append(names(e.token)[0])
        offset += len(tokens[-1])
    top = [{names(i)[0]: lp for i, lp in e.top} for e in entries]
    return p.CompletionLogprobs(tokens=tokens, token_logprobs=[e.logprob for e in entries],
                                top_logprobs=top, text_offset=offsets)
