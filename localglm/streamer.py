"""Show a growing text as it is written, without ever having to take back what was shown.

One streamer serves every place that streams text: stop strings while generating, the chat
response in the terminal and over HTTP. Each call gets the whole text so far and returns the
new part that is safe to show. Held back is only what later text may still change:

- the end of the text that could be the start of a ``stop`` string or a ``hold`` string (a
  placeholder that post-processing replaces once it is complete);
- trailing ``hold_chars`` (characters that post-processing strips or rewrites depending on
  what follows them).

A ``stop`` string ends the text at its first occurrence.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

log = logging.getLogger("localglm")


class TextStreamer:
    """Turns successive versions of a growing text into append-only pieces.

    ``push(text)`` returns what may be shown now; ``push(text, final=True)`` returns the rest.
    The pieces always add up to a prefix of the text, and, once final, to the whole text (cut
    at the first stop string, if any).
    """

    def __init__(self, stop: Iterable[str] = (), hold: Iterable[str] = (),
                 hold_chars: str = ""):
        self.stop = [s for s in stop if s]
        self.hold = [s for s in hold if s] + self.stop
        self.hold_chars = frozenset(hold_chars)
        self.shown = ""  # everything returned so far
        self.stopped = False  # a stop string was found; later calls return ""

    def push(self, text: str, final: bool = False) -> str:
        """The part of ``text`` not shown yet that is safe to show (all of it when final)."""
        if self.stopped:
            return ""
        cut = self._find_stop(text)
        if cut is not None:
            text, final, self.stopped = text[:cut], True, True
        end = len(text) if final else self.stable_end(text)
        if not text.startswith(self.shown):
            # Cannot happen when the holds cover every later change; never show text twice.
            log.warning("streamed text changed after it was shown: %r -> %r", self.shown, text)
            return ""
        if end <= len(self.shown):
            return ""
        piece, self.shown = text[len(self.shown):end], text[:end]
        return piece

    def stable_end(self, text: str) -> int:
        """Length of the prefix of ``text`` that later text can no longer change."""
        end, previous = len(text), -1
        while end != previous:  # e.g. "好 [[训" -> hold "[[训", then the space before it
            previous = end
            while end and text[end - 1] in self.hold_chars:
                end -= 1
            end -= self._partial_hold(text, end)
        return end

    def _partial_hold(self, text: str, end: int) -> int:
        """Length of the longest proper prefix of a hold string that ``text[:end]`` ends with."""
        best = 0
        for s in self.hold:
            for n in range(min(len(s) - 1, end), best, -1):
                if text.startswith(s[:n], end - n):
                    best = n
                    break
        return best

    def _find_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else None
