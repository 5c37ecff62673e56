"""The server's single owner of the model: one worker thread fed by a bounded FIFO queue.

Every request (API or web UI) becomes a ``Job`` that waits its turn in the queue. Up to
``parallel`` jobs run at once: each runs on a thread of its own (turning tokens into text and
steps), while the worker thread runs the model for all of them, decoding the running answers
in one continuous batch (``localglm.batch``). A new request joins the running batch at the
next step, and a finished or cancelled one leaves it without stopping the others. With
``parallel=1`` requests are answered strictly one after another. Requesters consume a job
from async code (``async for``) or from a thread (``for``); either can ``cancel()`` it.
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
from ..batch import cancelled_by
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
    """One request's generation: created by ``EngineWorker.submit``, run on a thread of its own.

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
    """Runs every generation of the model, up to ``parallel`` at once, in arrival order.

    ``queue_size`` is the number of jobs that may wait while ``parallel`` run; one more is
    refused with ``QueueFullError``. Start the thread with ``start()`` (or use it as a context
    manager). ``replica`` names this worker in ``status()`` (several replicas of one app).
    """

    def __init__(self, model: LocalGLM, queue_size: int = 16, model_name: str | None = None,
                 parallel: int = 1, prefill_tokens: int | None = None,
                 replica: str | None = None):
        if queue_size < 1:
            raise LocalGLMError("the queue size must be at least 1")
        if parallel < 1:
            raise LocalGLMError("the number of parallel sequences must be at least 1")
        self.model = model
        self.queue_size = queue_size
        self.parallel = parallel
        self.prefill_tokens = prefill_tokens
        self.replica = replica
        self.model_name = model_name or Path(str(model.path)).name or "chatglm-6b"
        self.created = int(time.time())
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._pending: collections.deque[Job] = collections.deque()
        self._running: list[Job] = []
        self._closing = False
        self._thread: threading.Thread | None = None
        self._batch = None  # the continuous batch, made when the first answer needs it
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
            jobs = list(self._pending) + self._running
            self._ready.notify_all()
        for job in jobs:
            job.cancel()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._batch is not None:
            self._batch.close()

    def __enter__(self) -> EngineWorker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- queue -------------------------------------------------------------------------------
    def submit(self, start: Callable[[], Iterator]) -> Job:
        """Queue ``start`` (called on the job's thread; returns the step iterator)."""
        job = Job(start, self)
        with self._lock:
            if self._closing:
                raise WorkerClosedError("the server is shutting down")
            # jobs about to take a free slot are not waiting
            free = max(0, self.parallel - len(self._running))
            if len(self._pending) >= self.queue_size + free:
                raise QueueFullError(
                    f"the server is busy: {len(self._pending)} request(s) are already waiting "
                    f"(queue size {self.queue_size}); retry shortly")
            self._pending.append(job)
            self._ready.notify_all()
        return job

    def status(self) -> dict:
        with self._lock:
            state = {"running": len(self._running), "waiting": len(self._pending),
                     "queue_size": self.queue_size, "parallel": self.parallel,
                     "served": self.served}
        if self.replica is not None:
            state["replica"] = self.replica
        return state

    @property
    def batch(self):
        """The continuous batch every answer decodes in (made on first use)."""
        with self._lock:
            if self._batch is None:
                self._batch = self.model.batch(self.parallel, self.prefill_tokens,
                                               on_change=self._wake)
                self._batch.driven = True  # the worker thread steps it
            return self._batch

    def _wake(self) -> None:
        with self._lock:
            self._ready.notify_all()

    def ahead_of(self, job: Job) -> int | None:
        """How many jobs run or wait before ``job``; None once it has started (or left)."""
        with self._lock:
            if job not in self._pending:
                return None
            return self._pending.index(job) + len(self._running)

    def _forget(self, job: Job) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._pending.remove(job)  # frees its slot at once

    def _run(self) -> None:
        """Start waiting jobs while fewer than ``parallel`` run; step the batch meanwhile."""
        while True:
            with self._lock:
                while self._pending and len(self._running) < self.parallel \
                        and not self._closing:
                    job = self._pending.popleft()
                    self._running.append(job)
                    threading.Thread(target=self._run_job, args=(job,), daemon=True,
                                     name="localglm-job").start()
                if self._closing:
                    return
                batch = self._batch
                if batch is None or not batch.has_work():
                    self._ready.wait()
                    continue
            try:
                batch.step()
            except Exception:  # a bug, not a request's error: end its answers, keep serving
                log.exception("batch step failed")
                batch.close()
                with self._lock:
                    self._batch = None

    def _run_job(self, job: Job) -> None:
        steps = None
        try:
            if job.cancelled:
                return
            job.started_at = time.monotonic()
            with cancelled_by(job._cancel):  # its sequences leave the batch when cancelled
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
                steps.close()  # runs the generator's cleanup: its sequence leaves the batch
            job._finish()
            with self._lock:
                self._running.remove(job)
                self.served += 1
                self._ready.notify_all()

    # -- what the server asks of the model ---------------------------------------------------
    @property
    def max_context(self) -> int:
        return self.model.max_context

    def chat(self, query: str, history: chatfmt.History, gen: GenerationConfig,
             fitted: chatfmt.FittedPrompt | None = None) -> Job:
        """A job streaming ``ChatStep``s of one chat round (``fitted``: ``check_chat``'s
        result, so that the prompt is fitted once)."""
        batch = self._batch_for(gen)
        return self.submit(lambda: self.model.chat_stream(query, history, gen, fitted=fitted,
                                                          batch=batch))

    def _batch_for(self, gen: GenerationConfig):
        """The continuous batch, except for answers whose tokens need their own logits
        processing (logprobs, JSON mode): those run alone, still one of ``parallel`` jobs."""
        return None if gen.logprobs is not None or gen.json_object else self.batch

    def complete(self, ids: list[int], gen: GenerationConfig) -> Job:
        """A job streaming ``GenerationResponse``s for a raw prompt."""
        batch = self._batch_for(gen)
        return self.submit(lambda: self.model.stream_generate(ids, gen, batch=batch))

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

