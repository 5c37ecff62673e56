"""The server's single owner of the model: one worker thread fed by a bounded FIFO queue.

The model holds one KV cache, so generations run one at a time. Every request (API or web UI)
becomes a ``Job`` that waits its turn in the queue; the worker runs jobs in arrival order and
streams their steps back, so two users' tokens never interleave. Requesters consume a job
from async code (``async for``) or from a thread (``for``); either can ``cancel()`` it, and
the worker stops that generation before its next token and moves on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .. import chat as chatfmt
from ..engine import CHAT_DEFAULTS, LocalGLM, make_generation_config
from ..errors import LocalGLMError
from ..generate import GenerationConfig

log = logging.getLogger("localglm.server")

_DONE = object()


class QueueFullError(LocalGLMError):
    """Every queue slot is taken; the client should retry later."""


class WorkerClosedError(LocalGLMError):
    """The worker is shutting down and takes no new jobs."""


class Job:
    """One request's generation: created by ``EngineWorker.submit``, run by the worker thread.

    Iterate it (``for`` or ``async for``) to receive the steps the worker produces; an error
    raised by the generation is re-raised to the consumer. Iteration ends early, without an
    error, once the job is cancelled.
    """

    def __init__(self, start: Callable[[], Iterator], worker: EngineWorker):
        self._start = start
        self._worker = worker
        self._cond = threading.Condition()
        self._items: collections.deque = collections.deque()
        self._finished = False
        self._error: BaseException | None = None
        self._cancel = threading.Event()
        # The async consumer's loop and wake-up event, set when it starts iterating.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self.submitted_at = time.monotonic()
        self.started_at: float | None = None

    # -- requester side ----------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop this job: dropped from the queue if waiting, stopped before its next step if
        running. Safe to call from any thread, any number of times."""
        if self._cancel.is_set():
            return
        self._cancel.set()
        self._worker._forget(self)
        self._finish()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __iter__(self) -> Iterator:
        try:
            while True:
                with self._cond:
                    while not self._items and not self._finished:
                        self._cond.wait()
                    item = self._items.popleft() if self._items else _DONE
                if item is _DONE:
                    self._raise_error()
                    return
                yield item
        finally:
            self.cancel()  # a consumer that stops early gives the slot back

    async def __aiter__(self):
        with self._cond:
            self._loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
        try:
            while True:
                with self._cond:
                    items = list(self._items)
                    self._items.clear()
                    finished = self._finished
                    self._wake.clear()
                for item in items:
                    yield item
                if finished:
                    self._raise_error()
                    return
                await self._wake.wait()
        finally:
            # Also reached when the consumer's task is cancelled (client disconnect).
            self.cancel()

    async def result(self):
        """The last step (the complete answer); ``None`` if the job was cancelled first."""
        last = None
        async for item in self:
            last = item
        return last

    def _raise_error(self) -> None:
        if self._error is not None and not self.cancelled:
            raise self._error

    # -- worker side -------------------------------------------------------------------------
    def _put(self, item) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()
        self._notify_loop()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._finish()

    def _finish(self) -> None:
        with self._cond:
            self._finished = True
            self._cond.notify_all()
        self._notify_loop()

    def _notify_loop(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening
                self._cancel.set()


class EngineWorker:
    """Runs every generation on one thread, in arrival order, with a bounded waiting queue.

    ``queue_size`` is the number of jobs that may wait while one runs; one more is refused
    with ``QueueFullError``. Start the thread with ``start()`` (or use it as a context manager).
    """

    def __init__(self, model: LocalGLM, queue_size: int = 16, model_name: str | None = None):
        if queue_size < 1:
            raise LocalGLMError("the queue size must be at least 1")
        self.model = model
        self.queue_size = queue_size
        self.model_name = model_name or Path(str(model.path)).name or "chatglm-6b"
        self.created = int(time.time())
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._pending: collections.deque[Job] = collections.deque()
        self._current: Job | None = None
        self._closing = False
        self._thread: threading.Thread | None = None
        self.served = 0

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> EngineWorker:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="localglm-engine",
                                                daemon=True)
                self._thread.start()
        return self

    def close(self, timeout: float | None = 10.0) -> None:
        """Cancel the waiting and running jobs and stop the thread."""
        with self._lock:
            self._closing = True
            jobs = list(self._pending) + ([self._current] if self._current else [])
            self._ready.notify_all()
        for job in jobs:
            job.cancel()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> EngineWorker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- queue -------------------------------------------------------------------------------
    def submit(self, start: Callable[[], Iterator]) -> Job:
        """Queue ``start`` (called on the worker thread; returns the step iterator)."""
        job = Job(start, self)
        with self._lock:
            if self._closing:
                raise WorkerClosedError("the server is shutting down")
            if len(self._pending) >= self.queue_size:
                raise QueueFullError(
                    f"the server is busy: {len(self._pending)} request(s) are already waiting "
                    f"(queue size {self.queue_size}); retry shortly")
            self._pending.append(job)
            self._ready.notify()
        return job

    def status(self) -> dict:
        with self._lock:
            return {"running": self._current is not None, "waiting": len(self._pending),
                    "queue_size": self.queue_size, "served": self.served}

    def ahead_of(self, job: Job) -> int | None:
        """How many jobs run or wait before ``job``; None once it has started (or left)."""
        with self._lock:
            if job not in self._pending:
                return None
            return self._pending.index(job) + (self._current is not None)

    def _forget(self, job: Job) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._pending.remove(job)  # frees its slot at once

    def _next_job(self) -> Job | None:
        with self._lock:
            while not self._pending and not self._closing:
                self._ready.wait()
            if self._closing:
                return None
            self._current = self._pending.popleft()
            return self._current

    def _run(self) -> None:
        while (job := self._next_job()) is not None:
            try:
                self._run_job(job)
            finally:
                with self._lock:
                    self._current = None
                    self.served += 1

    def _run_job(self, job: Job) -> None:
        if job.cancelled:
            return
        job.started_at = time.monotonic()
        steps = None
        try:
            steps = job._start()
            for item in steps:
                if job.cancelled:  # checked between tokens: a stop costs one token at most
                    break
                job._put(item)
        except Exception as e:  # delivered to the requester, the worker keeps serving
            if not isinstance(e, LocalGLMError):
                log.exception("generation failed")
            job._fail(e)
        finally:
            if steps is not None and hasattr(steps, "close"):
                steps.close()  # runs the generator's cleanup, releasing the model's lock
            job._finish()

    # -- what the server asks of the model ---------------------------------------------------
    @property
    def max_context(self) -> int:
        return self.model.max_context

    def chat(self, query: str, history: chatfmt.History, gen: GenerationConfig,
             fitted: chatfmt.FittedPrompt | None = None) -> Job:
        """A job streaming ``ChatStep``s of one chat round (``fitted``: ``check_chat``'s
        result, so that the prompt is fitted once)."""
        return self.submit(lambda: self.model.chat_stream(query, history, gen, fitted=fitted))

    def complete(self, ids: list[int], gen: GenerationConfig) -> Job:
        """A job streaming ``GenerationResponse``s for a raw prompt."""
        return self.submit(lambda: self.model.stream_generate(ids, gen))

    def embed(self, inputs: list[list[int]]) -> Job:
        """A job yielding one normalised mean-pooled embedding (list of floats) per input."""
        def run():
            for ids in inputs:
                hidden = self.model.embed(ids)
                yield torch.nn.functional.normalize(hidden.mean(dim=0), dim=0).tolist()
        return self.submit(run)

    def check_chat(self, query: str, history: chatfmt.History,
                   gen: GenerationConfig) -> chatfmt.FittedPrompt:
        """Fit the prompt as ``LocalGLM.chat_stream`` will, so that a query too long for the
        context is refused before the request waits in the queue."""
        return self.model.fit_chat(query, history, gen)


def chat_config(max_new_tokens: int | None = None, temperature: float | None = None,
                top_p: float | None = None, **kwargs) -> GenerationConfig:
    """Generation options of a chat request, with the official chat defaults for what is
    unset; temperature 0 (or top_p 0) means greedy."""
    return sampling_config(CHAT_DEFAULTS, max_new_tokens, temperature, top_p, **kwargs)


def sampling_config(defaults: dict, max_new_tokens: int | None, temperature: float | None,
                    top_p: float | None, **kwargs) -> GenerationConfig:
    temperature = defaults.get("temperature", 1.0) if temperature is None else temperature
    top_p = defaults.get("top_p", 1.0) if top_p is None else top_p
    greedy = temperature == 0 or top_p == 0
    options = {k: v for k, v in kwargs.items() if v is not None}
    return make_generation_config(
        defaults, max_new_tokens=max_new_tokens, do_sample=not greedy,
        temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p, **options)

