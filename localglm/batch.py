"""Continuous batching: up to ``max_batch`` sequences decode together in one forward pass.

Decoding one token reads every weight once, whatever the batch size, so a few sequences
decoding together cost little more than one. Each sequence has its own row of one shared
``KVCache`` (rows are kept packed: rows [0, d) are the decoding sequences), its own sampling
settings, seed, stop conditions and budget, so its tokens are the ones it would get alone.

A new sequence joins at the next step. ChatGLM-6B attends bidirectionally over the prompt up
to ``<sop>``, so a prompt cannot be prefilled a few tokens at a time; instead a long prompt
runs a few *layers* per step, between the decode steps of the running sequences, which
therefore never wait for a whole prefill.

``ContinuousBatch.step`` does one round of work; a server calls it from its worker thread,
while other threads iterate their ``Sequence``; with no such thread, iterating a sequence
runs the steps itself (``LocalGLM.generate`` on a list of prompts works that way).
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import torch

from .errors import LocalGLMError
from .generate import (
    GenerationConfig,
    PromptInfo,
    TokenPicker,
    new_cache,
    prompt_info,
    step_budget,
)
from .model import AttentionLayout, ChatGLMModel

_scope = threading.local()  # the cancel event of the job this thread is running, if any


@contextlib.contextmanager
def cancelled_by(event: threading.Event):
    """Sequences submitted by this thread inside the block stop when ``event`` is set."""
    old = getattr(_scope, "event", None)
    _scope.event = event
    try:
        yield
    finally:
        _scope.event = old


class Sequence:
    """One prompt's generation in a ``ContinuousBatch``; iterate it for its token ids.

    Stopping the iteration early (or ``cancel()``) takes the sequence out of the batch.
    """

    def __init__(self, batch: ContinuousBatch, prompt: list[int], gen: GenerationConfig):
        self.batch = batch
        self.prompt = prompt
        self.gen = gen
        self.info: PromptInfo = prompt_info(prompt, batch.model.config)
        self.pick = TokenPicker(gen, torch.tensor([prompt]), batch.vocab_limit)
        self.budget = 0  # tokens it may produce, set when it joins
        self.output: list[int] = []  # every token produced so far
        self.length = 0  # its tokens whose keys are in the cache (prefix excluded)
        self.last: int | None = None  # the token to feed at the next decode step
        self.row: int | None = None
        self.stop_event: threading.Event | None = getattr(_scope, "event", None)
        self.cancelled = False
        self.error: BaseException | None = None
        self.finished = False
        self._prefill = None  # (hidden, rope, layout, next layer) while its prompt runs
        self._cond = threading.Condition()
        self._unread: collections.deque[int] = collections.deque()

    def cancel(self) -> None:
        """Leave the batch before the next step; the iteration ends."""
        if not self.finished:
            self.cancelled = True
            self.batch._changed()

    @property
    def stopped(self) -> bool:
        return self.cancelled or (self.stop_event is not None and self.stop_event.is_set())

    def __iter__(self) -> Iterator[int]:
        try:
            while True:
                with self._cond:
                    while not self._unread and not self.finished and self.batch.driven:
                        self._cond.wait()
                    token = self._unread.popleft() if self._unread else None
                    done = token is None and self.finished
                if done:
                    if self.error is not None:
                        raise self.error
                    return
                if token is None:  # no thread steps the batch: do it here
                    self.batch.step()
                    continue
                yield token
        finally:
            self.cancel()

    # -- batch side ------------------------------------------------------------------------
    def _put(self, token: int) -> None:
        self.output.append(token)
        eos = self.batch.model.config.eos_token_id
        with self._cond:
            self._unread.append(token)
            self._cond.notify_all()
        if token == eos or len(self.output) >= self.budget:
            self._finish()

    def _finish(self, error: BaseException | None = None) -> None:
        with self._cond:
            self.error = self.error or error
            self.finished = True
            self._cond.notify_all()


class ContinuousBatch:
    """Runs many sequences of one model together; see the module docstring.

    max_batch: sequences decoding at once (each has a KV-cache row of up to ``max_len``
    tokens). While others decode, a joining prompt runs layer by layer for about
    ``prefill_ratio`` times the last decode step's duration per step (at least one layer), so
    running streams wait at most ~(1 + prefill_ratio) decode steps or one prompt layer;
    ``prefill_tokens`` instead fixes the work per step (prompt tokens × layers / num_layers:
    a 1000-token prompt at 256 runs a quarter of the layers per step).
    lock: taken around every model call (``LocalGLM``'s, shared with its other users).
    """

    def __init__(self, model: ChatGLMModel, dtype: torch.dtype, max_batch: int = 4,
                 max_len: int | None = None, vocab_limit: int | None = None,
                 prefill_tokens: int | None = None, lock=None,
                 on_change: Callable[[], None] | None = None, prefill_ratio: float = 2.0):
        if max_batch < 1:
            raise LocalGLMError(f"the batch size must be at least 1, not {max_batch}")
        self.model = model
        self.dtype = dtype
        self.max_batch = max_batch
        self.max_len = max_len or model.config.max_sequence_length
        self.vocab_limit = vocab_limit
        self.prefill_tokens = prefill_tokens
        self.prefill_ratio = prefill_ratio
        self._decode_s = 0.0  # duration of the last decode step
        self.prefix = model.config.pre_seq_len or 0
        self.device = model.transformer.word_embeddings.weight.device
        self.cache = new_cache(model, max_batch, self.max_len, dtype)
        self.lock = lock or threading.RLock()
        self.on_change = on_change
        self.driven = False  # True while another thread calls step(); see Sequence.__iter__
        self.rows: list[Sequence] = []  # rows[i] uses cache row i; decoding ones first
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._mutex = threading.Lock()

    def submit(self, prompt: list[int], gen: GenerationConfig) -> Sequence:
        """Queue a prompt; it joins the batch at the next step with a free row."""
        if not prompt:
            raise LocalGLMError("every prompt needs at least one token")
        seq = Sequence(self, list(prompt), gen)
        with self._mutex:
            self._waiting.append(seq)
        self._changed()
        return seq

    def has_work(self) -> bool:
        with self._mutex:
            return bool(self.rows or self._waiting)

    def close(self) -> None:
        """End every sequence (their iterations stop) and take no more steps."""
        with self._mutex:
            seqs = self.rows + list(self._waiting)
            self.rows, self._waiting = [], collections.deque()
        for seq in seqs:
            seq._finish()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    # -- one step --------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        """Drop finished rows, admit waiting sequences, run some prefill, decode once."""
        with self.lock:
            self._pack()
            self._admit()
            joining = next((s for s in self.rows if s._prefill is not None), None)
            decoding = [s for s in self.rows if s._prefill is None]
            if joining is not None:
                self._guard([joining], self._prefill_some, joining, bool(decoding))
            if decoding:
                self._guard(decoding, self._decode, decoding)
            self._pack()  # finished rows leave at once

    def run(self) -> None:
        """Step until every sequence has finished."""
        while self.has_work():
            self.step()

    def _guard(self, seqs: list[Sequence], fn, *args) -> None:
        """Run ``fn``; an error ends ``seqs`` (their consumers get it), not the batch."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - delivered to each sequence's consumer
            for seq in seqs:
                seq._finish(e)

    def _pack(self) -> None:
        """Remove finished rows and move the others down so rows stay contiguous."""
        for seq in self.rows:
            if seq.stopped and not seq.finished:
                seq._finish()
        with self._mutex:
            kept = [s for s in self.rows if not s.finished]
            gone = [s for s in self._waiting if s.stopped]
            self._waiting = collections.deque(s for s in self._waiting if not s.stopped)
        for seq in gone:
            seq._finish()
        for j, seq in enumerate(kept):
            if seq.row != j:
                n = len(seq.prompt) if seq._prefill is not None else seq.length
                self.cache.move_row(seq.row, j, self.prefix + n)
                seq.row = j
        self.rows = kept

    def _admit(self) -> None:
        """Give the first waiting sequence a row (one prompt is prefilled at a time)."""
        if len(self.rows) >= self.max_batch or any(s._prefill is not None for s in self.rows):
            return
        with self._mutex:
            seq = self._waiting.popleft() if self._waiting else None
        if seq is None:
            return
        try:
            seq.budget = step_budget(seq.gen, len(seq.prompt), self.max_len)
        except LocalGLMError as e:
            seq._finish(e)
            return
        if seq.budget == 0:
            seq._finish()
            return
        seq.row = len(self.rows)
        self.rows.append(seq)
        try:
            self._start_prefill(seq)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: this request fails
            self.rows.pop()
            seq._prefill, seq.row = None, None
            seq._finish(e)

    def _start_prefill(self, seq: Sequence) -> None:
        n = len(seq.prompt)
        ids = torch.tensor([seq.prompt], dtype=torch.long, device=self.device)  # (1, T)
        pos = torch.tensor([seq.info.positions(0, n)], dtype=torch.long,
                           device=self.device)  # (1, 2, T)
        layout = AttentionLayout(0, self.prefix + n, self.prefix, context=[seq.info.context])
        self.cache.reserve(self.prefix + n + 1)
        if self.prefix:
            self.cache.rows(seq.row, seq.row + 1).load_prefix(
                self.model.prefix_kv(1, self.dtype))
        x, rope = self.model.embed(ids, pos, self.dtype)
        seq._prefill = (x, rope, layout, 0)

    def _prefill_some(self, seq: Sequence, others_running: bool) -> None:
        """Run the joining prompt through some layers (all of them if nobody waits)."""
        x, rope, layout, first = seq._prefill
        layers = len(self.model.transformer.layers)
        n = len(seq.prompt)
        row = self.cache.rows(seq.row, seq.row + 1)
        if not others_running:
            stop = layers
        elif self.prefill_tokens:
            stop = min(layers, first + max(1, layers * self.prefill_tokens // n))
        else:  # layers until this step's prefill has cost prefill_ratio decode steps
            stop, t0 = first, time.perf_counter()
            while stop < layers and (stop == first or time.perf_counter() - t0 <
                                     self.prefill_ratio * self._decode_s):
                x = self.model.blocks(x, rope, row, layout, stop, stop + 1)
                stop += 1
            first = stop
        x = self.model.blocks(x, rope, row, layout, first, stop)
        if stop < layers:
            seq._prefill = (x, rope, layout, stop)
            return
        logits = self.model.head(x, "last")[:, -1]  # (1, V)
        seq._prefill, seq.length = None, n
        self._emit(seq, logits)

    def _decode(self, seqs: list[Sequence]) -> None:
        """Feed every decoding row its last token: one forward pass for all of them."""
        d = len(seqs)
        assert [s.row for s in seqs] == list(range(d)), "decoding rows must come first"
        tokens = torch.tensor([[s.last] for s in seqs], device=self.device)  # (d, 1)
        pos = torch.tensor([s.info.positions(s.length, s.length + 1) for s in seqs],
                           device=self.device)  # (d, 2, 1)
        lengths = [s.length + 1 for s in seqs]
        longest = max(lengths)
        layout = AttentionLayout(longest - 1, self.prefix + longest, self.prefix,
                                 context=[s.info.context for s in seqs], lengths=lengths)
        t0 = time.perf_counter()
        logits = self.model(tokens, pos, self.cache.rows(0, d), layout)[:, -1]  # (d, V)
        for b, seq in enumerate(seqs):
            seq.length += 1
            self._emit(seq, logits[b:b + 1])
        self._decode_s = time.perf_counter() - t0  # tokens are on the CPU: the step is done

    def _emit(self, seq: Sequence, logits: torch.Tensor) -> None:
        token = int(seq.pick(logits)[0])
        seq.last = token
        seq._put(token)


def default_parallel(llm, cap: int = 4, share: float = 0.5) -> int:
    """Sequences to decode together: as many full-context KV caches as fit in ``share`` of the
    model device's free memory, at most ``cap`` and at least 1."""
    from .devices import available_devices, kv_cache_bytes

    device = str(llm.device)
    free = next((d.free_bytes for d in available_devices() if d.name == device or
                 (d.name.startswith(device) and ":" not in device)), 0)
    per_seq = kv_cache_bytes(llm.config, llm.max_context, llm.dtype.itemsize)
    return max(1, min(cap, int(free * share // max(per_seq, 1))))
