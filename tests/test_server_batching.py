"""The server answering several requests together in one continuous batch."""

import concurrent.futures
import json
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from server_helpers import running_server, wait_idle  # noqa: E402

QUERIES = [f"第{i}个问题：请讲一个故事" for i in range(8)]


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


def test_eight_concurrent_streams_run_together_and_equal_their_solo_answers(tiny):
    want = [tiny.chat(q, [], temperature=0, max_new_tokens=48)[0] for q in QUERIES]
    body = {"max_tokens": 48, "temperature": 0}
    with running_server(tiny, parallel=8) as (base, worker):
        assert httpx.get(f"{base}/health").json()["parallel"] == 8
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            runs = list(pool.map(lambda q: timed_stream(
                base, {**body, "messages": [{"role": "user", "content": q}]}), QUERIES))
        wait_idle(base)
    assert [text for text, *_ in runs] == want
    assert {finish for _, finish, *_ in runs} <= {"stop", "length"}
    # They ran together: every stream had started before the first one ended.
    assert max(first for *_, first, _ in runs) < min(last for *_, last in runs)
