"""ChatGLM-6B tokenizer, a from-scratch port of the official ``ChatGLMTokenizer``.

The official tokenizer is a SentencePiece model (``ice_text.model``) wrapped twice:
``SPTokenizer`` maps newlines, tabs and runs of spaces to dedicated pieces, and transformers'
``PreTrainedTokenizer`` splits special tokens out of raw text and cleans up spaces when
decoding. The model was trained on exactly those ids, so every quirk of both layers is
reproduced here (tests/data/chatglm-6b-tiny/golden/README.md lists them).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from .errors import ModelFormatError

VOCAB_FILE = "ice_text.model"
CONFIG_FILE = "tokenizer_config.json"

_MAX_BLANK = 80  # longest run of spaces with its own <|blank_N|> piece
# transformers splits the tokenizer's bos/eos/mask/pad/unk tokens out of raw text; [gMASK] is
# not among them, so a literal "[gMASK]" typed by a user stays ordinary text.
_SPLIT_TOKENS = ("<sop>", "<eop>", "[MASK]", "<pad>", "<unk>")
_SPLIT_RE = re.compile("(" + "|".join(map(re.escape, _SPLIT_TOKENS)) + ")")
_REQUIRED_PIECES = ("<n>", "[MASK]", "[gMASK]", "<sop>", "<eop>", "<pad>")
# SPTokenizer.postprocess, in its order.
_MARKERS = [("<n>", "\n"), ("<|tab|>", "\t")]
_MARKERS += [(f"<|blank_{n}|>", " " * n) for n in range(2, _MAX_BLANK + 1)]
# transformers' PreTrainedTokenizer.clean_up_tokenization (on by default), in its order.
_CLEANUP = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)
_LFS_MAGIC = b"version https://git-lfs"


def _preprocess(text: str) -> str:
    """SPTokenizer._preprocess: newline, tab and space runs become user-defined pieces."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    # Longest first, as the official loop does: 81 spaces -> <|blank_80|> + " ".
    for n in range(_MAX_BLANK, 1, -1):
        text = text.replace(" " * n, f"<|blank_{n}|>")
    return text


def _postprocess(text: str) -> str:
    """SPTokenizer.postprocess: expand <n>, <|tab|> and <|blank_N|> back to whitespace."""
    for marker, plain in _MARKERS:
        text = text.replace(marker, plain)
    return text


def _clean_up(text: str) -> str:
    """transformers' clean_up_tokenization: " ." -> "." and friends."""
    for old, new in _CLEANUP:
        text = text.replace(old, new)
    return text


def _split_special(text: str) -> list[str]:
    """transformers' special-token split: chunks, with whitespace next to a special stripped."""
    chunks = _SPLIT_RE.split(text)  # odd indices hold the special tokens
    for i in range(1, len(chunks), 2):
        chunks[i - 1] = chunks[i - 1].rstrip()
        chunks[i + 1] = chunks[i + 1].lstrip()
    return [c for c in chunks if c]


class ChatGLMTokenizer:
    """Text <-> ids exactly as THUDM/chatglm-6b's ``ChatGLMTokenizer`` (transformers 4.30).

    ``num_image_tokens`` shifts every SentencePiece id up by that many (ids below it are the
    image tokens of early checkpoints); the released chatglm-6b uses 0.
    """

    def __init__(self, vocab_file: str | Path, num_image_tokens: int = 0):
        self.vocab_file = Path(vocab_file)
        self.num_image_tokens = int(num_image_tokens)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.vocab_file))
        except (OSError, RuntimeError) as e:
            raise ModelFormatError(
                f"{self.vocab_file} is not a readable SentencePiece model ({e}); "
                "download ice_text.model again") from e
        missing = [p for p in _REQUIRED_PIECES if self._sp.piece_to_id(p) == self._sp.unk_id()]
        if missing:
            raise ModelFormatError(
                f"{self.vocab_file} is not a ChatGLM-6B tokenizer (no {', '.join(missing)} "
                "piece); use the ice_text.model of THUDM/chatglm-6b")
        #: number of ids the tokenizer can produce (image ids + SentencePiece pieces)
        self.vocab_size = self.num_image_tokens + self._sp.vocab_size()
        self.bos_id = self._piece_to_id("<sop>")
        self.eos_id = self._piece_to_id("<eop>")
        self.mask_id = self._piece_to_id("[MASK]")
        self.gmask_id = self._piece_to_id("[gMASK]")
        self.pad_id = self._piece_to_id("<pad>")
        self.unk_id = self._piece_to_id("<unk>")

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ChatGLMTokenizer:
        """Load ``ice_text.model`` and ``tokenizer_config.json`` from a model directory."""
        model_dir = Path(model_dir)
        vocab, config = model_dir / VOCAB_FILE, model_dir / CONFIG_FILE
        if not model_dir.is_dir():
            raise ModelFormatError(f"model directory {model_dir} does not exist")
        for path in (vocab, config):
            if not path.is_file():
                raise ModelFormatError(
                    f"{path} is missing; download the complete model directory "
                    "(e.g. from THUDM/chatglm-6b), tokenizer files included")
        with open(vocab, "rb") as f:
            if f.read(len(_LFS_MAGIC)) == _LFS_MAGIC:
                raise ModelFormatError(
                    f"{vocab} is a Git LFS pointer, not the model file; run `git lfs pull` "
                    f"in {model_dir} (or download the file directly)")
        try:
            settings = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFormatError(
                f"{config} is not valid JSON ({e}); download it again") from e
        if not isinstance(settings, dict):
            raise ModelFormatError(f"{config} is not a JSON object; download it again")
        # The official class defaults to 20000 (early checkpoints had image tokens) when the
        # config does not say; the released chatglm-6b config says 0.
        num_image_tokens = settings.get("num_image_tokens", 20000)
        if type(num_image_tokens) is not int or num_image_tokens < 0:
            raise ModelFormatError(
                f"{config}: num_image_tokens must be a non-negative integer; "
                "download tokenizer_config.json again")
        return cls(vocab, num_image_tokens=num_image_tokens)

    # -- ids <-> pieces ---------------------------------------------------------------------

    def _piece_to_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece) + self.num_image_tokens

    def _id_to_piece(self, token_id: int) -> str:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the tokenizer's vocabulary "
                             f"(0..{self.vocab_size - 1})")
        if token_id < self.num_image_tokens:
            return f"<image_{token_id}>"  # what the official tokenizer names them
        return self._sp.id_to_piece(token_id - self.num_image_tokens)

    def _is_byte(self, token_id: int) -> bool:
        return token_id >= self.num_image_tokens and self._sp.is_byte(
            token_id - self.num_image_tokens)

    # -- public API -------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[str]:
        """Pieces of ``text`` (no [gMASK]/<sop>), after transformers' special-token split."""
        pieces: list[str] = []
        for chunk in _split_special(text):
            if chunk in _SPLIT_TOKENS:
                pieces.append(chunk)
            else:  # every chunk gets its own dummy-prefix "▁", as in the official code
                pieces.extend(self._sp.encode(_preprocess(chunk), out_type=str))
        return pieces

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ChatGLM prompts end with ``[gMASK], <sop>`` (the default)."""
        ids = [self._piece_to_id(p) for p in self.tokenize(text)]
        if add_special_tokens:
            ids += [self.gmask_id, self.bos_id]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``: pads dropped, control tokens invisible, invalid UTF-8 -> U+FFFD."""
        pieces = [self._id_to_piece(i) for i in map(int, ids) if i != self.pad_id]
        if not pieces:
            return ""
        return _clean_up(_postprocess(self._sp.decode_pieces(pieces)))

    def batch_encode(self, texts: list[str]) -> tuple[list[list[int]], list[int]]:
        """Encode ``texts`` and left-pad them with ``pad_id`` to one length.

        Returns ``(padded_ids, pad_lengths)``; ``pad_lengths[i]`` pads precede row ``i``.
        """
        rows = [self.encode(t) for t in texts]
        width = max((len(r) for r in rows), default=0)
        pads = [width - len(r) for r in rows]
        return [[self.pad_id] * n + r for n, r in zip(pads, rows, strict=True)], pads


# -- streaming ------------------------------------------------------------------------------

def _proper_prefixes(words: Iterable[str]) -> frozenset[str]:
    return frozenset(w[:k] for w in words for k in range(1, len(w)))


# Text that may still turn into a marker (<|blank_1 + 2|>) or a clean-up pattern (" n" + "'t").
_MARKER_PREFIXES = _proper_prefixes(m for m, _ in _MARKERS)
_CLEANUP_PREFIXES = _proper_prefixes(p for p, _ in _CLEANUP)
_MARKER_LONGEST = max(map(len, _MARKER_PREFIXES))
_CLEANUP_LONGEST = max(map(len, _CLEANUP_PREFIXES))
_COMMIT_AT = 8  # window length (ids) at which the decoder tries to settle older ids


def _cut_partial(text: str, prefixes: frozenset[str], longest: int) -> str:
    """Drop trailing text that later text could complete into a pattern.

    Repeats because what remains may end with a partial pattern too ("a  " -> "a").
    """
    while text:
        for k in range(min(longest, len(text)), 0, -1):
            if text[-k:] in prefixes:
                text = text[:-k]
                break
        else:
            break
    return text


class StreamDecoder:
    """Incremental detokenizer for streaming: never emits a broken multi-byte character.

    Everything ``add`` and ``flush`` return, concatenated, equals ``tokenizer.decode`` of all
    ids added. Text that later ids could still change is held back: U+FFFD of an incomplete
    UTF-8 byte sequence, a partial <|blank_N|> marker, and trailing spaces (clean-up turns
    " ." into "."). Only a short window of recent ids is decoded per call.
    """

    def __init__(self, tokenizer: ChatGLMTokenizer):
        self.tokenizer = tokenizer
        self._window: list[int] = []  # ids not yet settled into final text
        self._window_emitted = 0  # chars of the window's text already returned
        self._backlog = ""  # settled text not yet returned
        self._chunks: list[str] = []
        # SentencePiece drops the "▁" of leading pieces until some text appears. Once settled
        # text exists, a window must decode as if preceded by text: prefix it with an anchor
        # piece (one plain character that starts no pattern) and cut the anchor off again.
        # A piece missing from the vocabulary decodes to itself, so "\x01" works as a last resort.
        self._anchored = False
        sp = tokenizer._sp
        self._anchor = next((p for p in ("x", "a", "0") if sp.piece_to_id(p) != sp.unk_id()),
                            "\x01")

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._chunks)

    def add(self, token_id: int) -> str:
        """Feed one generated id; return the text that became final (may be "")."""
        token_id = int(token_id)
        if token_id == self.tokenizer.pad_id:
            return ""  # decode drops pads wherever they are
        self.tokenizer._id_to_piece(token_id)  # reject out-of-range ids now, not later
        self._window.append(token_id)
        if len(self._window) >= _COMMIT_AT:
            self._settle()
        return self._emit(self._stable(self._raw(self._window)))

    def flush(self) -> str:
        """Return everything held back; call once, when generation ends."""
        return self._emit(_clean_up(_postprocess(self._raw(self._window))))

    def _emit(self, window_text: str) -> str:
        out = self._backlog + window_text[self._window_emitted:]
        self._backlog = ""
        self._window_emitted = max(self._window_emitted, len(window_text))
        if out:
            self._chunks.append(out)
        return out

    def _raw(self, ids: list[int]) -> str:
        """SentencePiece text of window ids, decoded in the context of the settled text."""
        pieces = [self.tokenizer._id_to_piece(i) for i in ids]
        if not self._anchored:
            return self.tokenizer._sp.decode_pieces(pieces)
        return self.tokenizer._sp.decode_pieces([self._anchor, *pieces])[1:]

    @staticmethod
    def _stable(raw: str) -> str:
        """The part of a window's final text that no later id can change."""
        raw = raw.rstrip("\ufffd")  # an incomplete UTF-8 sequence may still complete
        raw = _cut_partial(raw, _MARKER_PREFIXES, _MARKER_LONGEST)
        text = _cut_partial(_postprocess(raw), _CLEANUP_PREFIXES, _CLEANUP_LONGEST)
        return _clean_up(text)

    def _settle(self) -> None:
        """Move the window's head into final text at a split no later id can reach across.

        decode(ids) == decode(ids[:b]) + decode(ids[b:]) when no byte run spans b and the
        head's text ends with nothing a later piece could extend into a pattern.
        """
        w, tok = self._window, self.tokenizer
        for b in range(len(w) - 1, max(0, len(w) - 5), -1):
            if tok._is_byte(w[b - 1]) and tok._is_byte(w[b]):
                continue
            raw = self._raw(w[:b])
            if _cut_partial(raw, _MARKER_PREFIXES, _MARKER_LONGEST) != raw:
                continue
            post = _postprocess(raw)
            if _cut_partial(post, _CLEANUP_PREFIXES, _CLEANUP_LONGEST) != post:
                continue
            head = _clean_up(post)
            if self._window_emitted >= len(head):
                self._window_emitted -= len(head)
            else:
                self._backlog += head[self._window_emitted:]
                self._window_emitted = 0
            self._window = w[b:]
            self._anchored = self._anchored or bool(head)
            return
