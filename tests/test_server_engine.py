"""The server's engine worker: FIFO order, no interleaving, cancellation, errors."""

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from localglm.errors import ContextTooLongError, LocalGLMError
from localglm.server.engine import (
    EngineWorker,
    QueueFullError,
    chat_config,
    sampling_config,
)


def fake_model():
    return SimpleNamespace(path="/models/chatglm-6b-test", max_context=64)


class Gate:
    """A step source that blocks until released: makes "job A is running" deterministic."""

    def __init__(self):
        self.started = threading.Event()
        self.release = threading.Event()
        self.closed = threading.Event()

    def steps(self, n=3, pause=0.0):
        self.started.set()
        try:
            for i in range(n):
                assert self.release.wait(10)
                time.sleep(pause)
                yield i
        finally:
            self.closed.set()


@pytest.fixture
def worker():
    with EngineWorker(fake_model(), queue_size=2) as w:
        yield w


def test_jobs_run_in_arrival_order_without_interleaving(worker):
    log, lock = [], threading.Lock()

    def steps(name):
        for i in range(5):
            with lock:
                log.append(name)
            time.sleep(0.001)
            yield f"{name}{i}"

    worker.queue_size = 16
    jobs = [worker.submit(lambda name=name: steps(name)) for name in "abcdefgh"]
    results = [list(job) for job in jobs]
    assert results == [[f"{n}{i}" for i in range(5)] for n in "abcdefgh"]
    # Each job's steps are contiguous and the jobs ran in submission order.
    assert log == [n for n in "abcdefgh" for _ in range(5)]
    assert worker.status()["served"] == 8


def test_full_queue_refuses_and_cancelled_waiting_job_frees_its_slot(worker):
    gate = Gate()
    running = worker.submit(gate.steps)
    assert gate.started.wait(5)
    waiting = [worker.submit(lambda: iter([1])) for _ in range(2)]
    with pytest.raises(QueueFullError, match="busy"):
        worker.submit(lambda: iter([1]))
    waiting[0].cancel()
    assert worker.status()["waiting"] == 1
    late = worker.submit(lambda: iter(["late"]))
    gate.release.set()
    assert list(running) == [0, 1, 2]
    assert list(waiting[0]) == []  # cancelled before it ran: ends without an error
    assert list(waiting[1]) == [1]
    assert list(late) == ["late"]


def test_cancel_stops_a_running_job_between_steps_and_closes_it(worker):
    produced = []

    def endless():
        i = 0
        try:
            while True:
                produced.append(i)
                yield i
                i += 1
                time.sleep(0.005)
        finally:
            produced.append("closed")

    job = worker.submit(endless)
    for item in job:
        if item == 3:
            break  # leaving the loop cancels the job
    nxt = worker.submit(lambda: iter(["next"]))
    assert list(nxt) == ["next"]
    assert produced[-1] == "closed" and len(produced) < 10


def test_errors_reach_the_requester_and_the_worker_keeps_serving(worker):
    def failing():
        yield 1
        raise ContextTooLongError("too long")

    job = worker.submit(failing)
    got = []
    with pytest.raises(ContextTooLongError):
        for item in job:
            got.append(item)
    assert got == [1]

    def crashing():
        raise RuntimeError("bug")
        yield

    with pytest.raises(RuntimeError):
        list(worker.submit(crashing))
    assert list(worker.submit(lambda: iter("ok"))) == ["o", "k"]


def test_async_consumers_and_cancellation_of_their_task(worker):
    gate = Gate()

    async def main():
        job = worker.submit(gate.steps)
        gate.release.set()
        assert [x async for x in job] == [0, 1, 2]

        slow = Gate()
        job = worker.submit(lambda: slow.steps(1000, pause=0.01))

        async def consume():
            async for _ in job:
                pass

        task = asyncio.create_task(consume())
        slow.release.set()
        await asyncio.sleep(0.05)
        task.cancel()  # what a client disconnect does to a streaming response
        with pytest.raises(asyncio.CancelledError):
            await task
        assert job.cancelled
        assert await asyncio.to_thread(slow.closed.wait, 5)
        assert await worker.submit(lambda: iter([1, 2])).result() == 2

    asyncio.run(main())


def test_close_cancels_everything_and_refuses_new_jobs():
    worker = EngineWorker(fake_model(), queue_size=4).start()
    gate = Gate()
    running = worker.submit(gate.steps)
    waiting = worker.submit(lambda: iter([1]))
    assert gate.started.wait(5)
    worker.close(timeout=0.2)
    gate.release.set()
    assert list(running) == [] and list(waiting) == []
    with pytest.raises(LocalGLMError, match="shutting down"):
        worker.submit(lambda: iter([1]))


def test_model_name_and_queue_size():
    assert EngineWorker(fake_model()).model_name == "chatglm-6b-test"
    with pytest.raises(LocalGLMError):
        EngineWorker(fake_model(), queue_size=0)


def test_worker_chat_equals_model_chat(tiny):
    with EngineWorker(tiny) as w:
        gen = chat_config(12, 0, None)
        steps = list(w.chat("你好", [], gen))
    want, history = tiny.chat("你好", [], temperature=0, max_new_tokens=12)
    assert steps[-1].response == want and steps[-1].history == history
    assert steps[-1].finish_reason == "length"


def test_check_chat_refuses_what_chat_stream_would(tiny):
    with EngineWorker(tiny) as w:
        gen = chat_config(None, 0, None, max_length=tiny.max_context)
        assert w.check_chat("你好", [("a", "b")], gen).dropped == 0
        with pytest.raises(ContextTooLongError):
            w.check_chat("你好 " * 400, [], gen)
        with pytest.raises(ContextTooLongError):
            w.check_chat("你好", [], chat_config(tiny.max_context, 0, None))


def test_generation_options():
    g = chat_config(None, None, None)
    assert (g.do_sample, g.temperature, g.top_p, g.max_length) == (True, 0.95, 0.7, 2048)
    g = chat_config(5, 0, 0.5, stop=["x"], seed=None)
    assert g.greedy and g.max_new_tokens == 5 and g.stop == ["x"] and g.seed is None
    assert chat_config(None, 0.8, 0).greedy  # top_p 0 keeps only the best token: greedy
    g = sampling_config({"temperature": 1.0, "top_p": 1.0}, 16, None, None)
    assert (g.do_sample, g.temperature, g.top_p, g.max_new_tokens) == (True, 1.0, 1.0, 16)


def test_parallel_jobs_decode_together_and_a_cancelled_one_frees_its_slot(tiny):
    from localglm.engine import make_generation_config

    ids = [tiny.tokenizer.encode(q) for q in ("你好", "hello", "晚上好")]
    long, short = make_generation_config(max_new_tokens=200), make_generation_config(
        max_new_tokens=6)
    want_b = [s.text for s in tiny.stream_generate(ids[1], long)]
    want_c = [s.text for s in tiny.stream_generate(ids[2], short)]
    with EngineWorker(tiny, queue_size=4, parallel=2) as w:
        a, b = w.complete(ids[0], long), w.complete(ids[1], long)
        c = w.complete(ids[2], short)
        steps_a, steps_b = iter(a), iter(b)  # (dropping an iterator cancels its job)
        next(steps_a)
        first_b = next(steps_b)
        assert w.status()["running"] == 2 and w.status()["waiting"] == 1
        a.cancel()
        assert [s.text for s in c] == want_c  # took a's row while b kept decoding
        assert not b._finished
        assert [first_b.text] + [s.text for s in steps_b] == want_b
        deadline = time.monotonic() + 5
        while (w.batch.rows or w.status()["running"]) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert w.batch.rows == [] and w.status()["running"] == 0


def test_parallel_worker_keeps_fifo_order_beyond_its_slots():
    with EngineWorker(fake_model(), queue_size=4, parallel=2) as w:
        gates = [Gate() for _ in range(3)]
        jobs = [w.submit(g.steps) for g in gates]
        assert gates[0].started.wait(5) and gates[1].started.wait(5)
        assert not gates[2].started.wait(0.2)  # only two run at once
        assert w.status() == {"running": 2, "waiting": 1, "queue_size": 4, "parallel": 2,
                              "served": 0}
        gates[0].release.set()
        assert list(jobs[0]) == [0, 1, 2]
        assert gates[2].started.wait(5)
        for g in gates[1:]:
            g.release.set()
        assert [list(j) for j in jobs[1:]] == [[0, 1, 2], [0, 1, 2]]
    with pytest.raises(LocalGLMError, match="parallel"):
        EngineWorker(fake_model(), parallel=0)
