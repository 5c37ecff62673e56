"""The server answering several requests together in one continuous batch."""

import concurrent.futures
import json
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from server_helpers import running_server, wait_idle  # noqa: E402

# Eight prompts whose greedy answers on the tiny model run to the 48-token limit (asserted below):
# a stream that ended at <eop> after a few tokens could end before the eighth one joined.
QUERIES = [f"第{i}个问题：请讲一个故事" for i in (3, 6, 7, 9, 10, 14, 16, 18)]


def timed_stream(base, body):
    """(text, finish_reason, time of the first text, time of the last text) of one stream."""
    text, finish, first, last = "", None, None, None
    with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True},
                      timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line[6:])["choices"][0]
            if choice["delta"].get("content"):
                now = time.monotonic()
                first, last = first or now, now
                text += choice["delta"]["content"]
            finish = choice["finish_reason"] or finish
    return text, finish, first, last


def gate_first_step(monkeypatch, count: int) -> None:
    """Hold the batch's first step until ``count`` requests are queued or running, so that a
    slow client thread cannot make the overlap check below depend on arrival times."""
    from localglm.batch import ContinuousBatch

    step, released = ContinuousBatch.step, threading.Event()

    def gated(self):
        deadline = time.monotonic() + 30
        while not released.is_set() and time.monotonic() < deadline:
            with self._mutex:
                if len(self.rows) + len(self._waiting) >= count:
                    released.set()
                    break
            time.sleep(0.005)
        step(self)

    monkeypatch.setattr(ContinuousBatch, "step", gated)


def test_eight_concurrent_streams_run_together_and_equal_their_solo_answers(tiny, monkeypatch):
    want = [tiny.chat(q, [], temperature=0, max_new_tokens=48)[0] for q in QUERIES]
    body = {"max_tokens": 48, "temperature": 0}
    gate_first_step(monkeypatch, len(QUERIES))
    with running_server(tiny, parallel=8) as (base, worker):
        assert httpx.get(f"{base}/health").json()["parallel"] == 8
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            runs = list(pool.map(lambda q: timed_stream(
                base, {**body, "messages": [{"role": "user", "content": q}]}), QUERIES))
        wait_idle(base)
    assert [text for text, *_ in runs] == want
    assert [finish for _, finish, *_ in runs] == ["length"] * len(QUERIES)
    # They ran together: every stream had started before the first one ended.
    assert max(first for *_, first, _ in runs) < min(last for *_, last in runs)
