"""The HTTP API against a real server (uvicorn in a thread) around the tiny model."""

import base64
import concurrent.futures
import datetime
import json
import struct
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from server_helpers import SlowModel, running_server, wait_idle  # noqa: E402

GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def server(tiny):
    with running_server(tiny, queue_size=16) as (base, worker):
        yield base


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def expected_chat(model, query, history=(), max_tokens=16):
    return model.chat(query, list(history), temperature=0, max_new_tokens=max_tokens)[0]


def stream_chat(base, body, headers=None, timeout=60):
    """POST a streaming chat request; (joined content, finish_reason, parsed events)."""
    events = []
    with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True},
                      headers=headers, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                   if c["choices"])
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    return text, finish[-1], chunks


def assert_error(r, status, param=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


# -- info -----------------------------------------------------------------------------------
def test_health_and_models(server, client):
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["model"] == "chatglm-6b-tiny"
    assert [m.id for m in client.models.list().data] == ["chatglm-6b-tiny"]
    assert client.models.retrieve("chatglm-6b-tiny").owned_by == "localglm"
    assert_error(httpx.get(f"{server}/v1/models/gpt-4"), 404, "model")
    assert_error(httpx.get(f"{server}/no/such/route"), 404)


def test_root_without_webui_describes_the_api(server):
    r = httpx.get(f"{server}/")
    assert r.status_code == 200 and "endpoints" in r.json()


# -- OpenAI chat ----------------------------------------------------------------------------
def test_openai_client_chat_equals_model_chat(server, client, tiny):
    want = expected_chat(tiny, "你好", max_tokens=12)
    r = client.chat.completions.create(model="anything", messages=[
        {"role": "user", "content": "你好"}], max_tokens=12, **GREEDY)
    assert r.choices[0].message.content == want
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.model == "chatglm-6b-tiny"
    assert r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens == len(tiny.tokenizer.encode("你好"))
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12

    stream = client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "你好"}], max_tokens=12, stream=True,
        stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_chat_stops_at_eos_with_finish_reason_stop(server, tiny):
    # Without max_tokens the answer runs until <eop> or the context is full.
    steps = list(tiny.chat_stream("hello", [], temperature=0, max_length=tiny.max_context))
    step = steps[-1]
    r = httpx.post(f"{server}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hello"}], **GREEDY})
    assert r.status_code == 200
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == step.response
    assert choice["finish_reason"] == step.finish_reason


def test_roles_map_to_chatglm_history(server, tiny):
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"},
        {"role": "user", "content": [{"type": "text", "text": "介绍一下"}]},
    ]
    want = expected_chat(tiny, "介绍一下", [("You are helpful.\n你好", "你好！")], 10)
    r = httpx.post(f"{server}/v1/chat/completions", timeout=60, json={
        "messages": messages, "max_tokens": 10, **GREEDY})
    assert r.json()["choices"][0]["message"]["content"] == want
    # A system message with no history goes in front of the query itself.
    want = expected_chat(tiny, "Be brief.\n你好", max_tokens=8)
    r = httpx.post(f"{server}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "你好"}],
        "max_tokens": 8, **GREEDY})
    assert r.json()["choices"][0]["message"]["content"] == want


def test_stop_strings_and_seed(server, tiny):
    full = expected_chat(tiny, "你好", max_tokens=12)
    stop = full[3:5]
    r = httpx.post(f"{server}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "你好"}], "max_tokens": 12, "stop": stop,
        **GREEDY}).json()
    assert r["choices"][0]["message"]["content"] == full[:full.index(stop)].strip()
    assert r["choices"][0]["finish_reason"] == "stop"
    body = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 8,
            "temperature": 1.0, "seed": 7}
    a, b = (httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60).json()
            for _ in range(2))
    assert a["choices"][0]["message"] == b["choices"][0]["message"]


# -- completions and embeddings -------------------------------------------------------------
def test_completions_equal_stream_generate(server, client, tiny):
    ids = tiny.tokenizer.encode("hello world")
    want = "".join(s.text for s in tiny.stream_generate(ids, max_new_tokens=8))
    r = client.completions.create(model="x", prompt="hello world", max_tokens=8, temperature=0)
    assert r.choices[0].text == want
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 8
    streamed = client.completions.create(model="x", prompt="hello world", max_tokens=8,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want
    r = client.completions.create(model="x", prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].text == want
    r = client.completions.create(model="x", prompt="hello world", max_tokens=8,
                                  temperature=0, echo=True)
    assert r.choices[0].text == tiny.tokenizer.decode(ids) + want


def test_embeddings_are_normalised_mean_pooled_hidden_states(server, client, tiny):
    hidden = tiny.embed(tiny.tokenizer.encode("你好"))
    want = hidden.mean(0) / hidden.mean(0).norm()
    r = client.embeddings.create(model="x", input=["你好", "hello"])  # base64 by default
    assert len(r.data) == 2 and len(r.data[0].embedding) == tiny.config.hidden_size
    assert r.data[0].embedding == pytest.approx(want.tolist(), abs=1e-5)
    assert abs(sum(x * x for x in r.data[1].embedding) - 1) < 1e-4
    raw = httpx.post(f"{server}/v1/embeddings", json={"input": "你好"}).json()
    assert raw["data"][0]["embedding"] == pytest.approx(want.tolist(), abs=1e-5)
    b64 = httpx.post(f"{server}/v1/embeddings", json={
        "input": "你好", "encoding_format": "base64"}).json()["data"][0]["embedding"]
    decoded = struct.unpack(f"<{tiny.config.hidden_size}f", base64.b64decode(b64))
    assert decoded == pytest.approx(want.tolist(), abs=1e-5)
    assert raw["usage"]["prompt_tokens"] == len(tiny.tokenizer.encode("你好"))


# -- the official api.py protocol -----------------------------------------------------------
def test_apipy_protocol(server, tiny):
    history = [["你好", "你好！"]]
    want, want_history = tiny.chat("介绍一下", [tuple(h) for h in history], temperature=0,
                                   max_length=40)
    r = httpx.post(f"{server}/", timeout=60, json={
        "prompt": "介绍一下", "history": history, "max_length": 40, "top_p": 0.7,
        "temperature": 0})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"response", "history", "status", "time"}
    assert body["status"] == 200
    assert body["response"] == want
    assert body["history"] == [list(h) for h in want_history]
    datetime.datetime.strptime(body["time"], "%Y-%m-%d %H:%M:%S")
    # null options mean the official defaults, like the official server
    r = httpx.post(f"{server}/", timeout=60, json={
        "prompt": "你好", "history": None, "max_length": 30, "top_p": None,
        "temperature": None})
    assert r.status_code == 200 and r.json()["history"][0][0] == "你好"


def test_apipy_validation(server):
    err = assert_error(httpx.post(f"{server}/", json={"history": []}), 422, "prompt")
    assert "prompt" in err["message"] and "required" in err["message"]
    assert_error(httpx.post(f"{server}/", json={"prompt": 5}), 422, "prompt")
    assert_error(httpx.post(f"{server}/", json={"prompt": "x", "history": [["a"]]}), 422)
    assert_error(httpx.post(f"{server}/", content=b"not json"), 422)


# -- bad input ------------------------------------------------------------------------------
def _chat(**kw):
    return json.dumps({"messages": [{"role": "user", "content": "hi"}], **kw}).encode()


BAD_REQUESTS = [
    ("invalid json", "/v1/chat/completions", b'{"messages": [', 400, None),
    ("not an object", "/v1/chat/completions", b"[]", 400, None),
    ("empty body", "/v1/chat/completions", b"", 400, None),
    ("invalid utf-8", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, None),
    ("wrong type", "/v1/chat/completions", _chat(temperature="hot"), 400, "temperature"),
    ("string number", "/v1/chat/completions", _chat(max_tokens="8"), 400, "max_tokens"),
    ("messages not a list", "/v1/chat/completions", b'{"messages": "hi"}', 400, "messages"),
    ("unknown role", "/v1/chat/completions",
     b'{"messages": [{"role": "wizard", "content": "hi"}]}', 400, "messages[0].role"),
    ("tool role", "/v1/chat/completions",
     b'{"messages": [{"role": "tool", "content": "hi"}]}', 400, "messages[0].role"),
    ("no messages", "/v1/chat/completions", b'{"messages": []}', 400, "messages"),
    ("missing messages", "/v1/chat/completions", b'{"model": "x"}', 400, "messages"),
    ("empty message", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "  "}]}', 400, "messages[0].content"),
    ("ends with assistant", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
     400, "messages[1].role"),
    ("negative max_tokens", "/v1/chat/completions", _chat(max_tokens=-1), 400, "max_tokens"),
    ("zero max_tokens", "/v1/chat/completions", _chat(max_tokens=0), 400, "max_tokens"),
    ("huge max_tokens", "/v1/chat/completions", _chat(max_tokens=10**12), 400, "max_tokens"),
    ("max_tokens over context", "/v1/chat/completions", _chat(max_tokens=5000), 400,
     "max_tokens"),
    ("temperature too high", "/v1/chat/completions", _chat(temperature=3), 400, "temperature"),
    ("negative temperature", "/v1/chat/completions", _chat(temperature=-0.5), 400,
     "temperature"),
    ("nan temperature", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, None),
    ("top_p too high", "/v1/chat/completions", _chat(top_p=1.5), 400, "top_p"),
    ("n > 1", "/v1/chat/completions", _chat(n=2), 400, "n"),
    ("too many stops", "/v1/chat/completions", _chat(stop=list("abcde")), 400, "stop"),
    ("image part", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}',
     400, None),
    ("prompt too long", "/v1/chat/completions",
     json.dumps({"messages": [{"role": "user", "content": "你好 " * 400}]}).encode(), 400,
     None),
    ("completion prompt too long", "/v1/completions",
     json.dumps({"prompt": "hello " * 400}).encode(), 400, None),
    ("completion bad token id", "/v1/completions", b'{"prompt": [1, 99999999]}', 400,
     "prompt"),
    ("completion two prompts", "/v1/completions", b'{"prompt": ["a", "b"]}', 400, "prompt"),
    ("embedding empty list", "/v1/embeddings", b'{"input": []}', 400, "input"),
    ("embedding wrong dims", "/v1/embeddings", b'{"input": "a", "dimensions": 3}', 400,
     "dimensions"),
    ("oversized body", "/v1/chat/completions",
     _chat(user="x" * (1 << 20)), 413, None),
    ("embedding empty string", "/v1/embeddings", b'{"input": ""}', 400, "input"),
    ("embedding empty string in a list", "/v1/embeddings", b'{"input": ["a", ""]}', 400,
     "input[1]"),
    ("tools", "/v1/chat/completions", _chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {}}}]), 400, "tools"),
    ("tool_choice", "/v1/chat/completions", _chat(tool_choice="required"), 400,
     "tool_choice"),
    ("functions", "/v1/chat/completions", _chat(functions=[{"name": "f"}]), 400,
     "functions"),
    ("logit_bias", "/v1/chat/completions", _chat(logit_bias={"5": 10}), 400, "logit_bias"),
    ("presence_penalty", "/v1/chat/completions", _chat(presence_penalty=0.5), 400,
     "presence_penalty"),
    ("json_schema", "/v1/chat/completions", _chat(response_format={
        "type": "json_schema", "json_schema": {"name": "x"}}), 400, "response_format.type"),
    ("unknown response_format", "/v1/chat/completions", _chat(response_format={
        "type": "yaml"}), 400, "response_format.type"),
    ("top_logprobs without logprobs", "/v1/chat/completions", _chat(top_logprobs=2), 400,
     "top_logprobs"),
    ("too many top_logprobs", "/v1/chat/completions", _chat(logprobs=True, top_logprobs=21),
     400, "top_logprobs"),
    ("completion suffix", "/v1/completions", b'{"prompt": "a", "suffix": "b"}', 400,
     "suffix"),
    ("completion logprobs > 5", "/v1/completions", b'{"prompt": "a", "logprobs": 6}', 400,
     "logprobs"),
    ("completion echo with logprobs", "/v1/completions",
     b'{"prompt": "a", "logprobs": 1, "echo": true}', 400, "logprobs"),
    ("tiny repetition_penalty", "/v1/completions",
     b'{"prompt": "a", "repetition_penalty": 5e-324}', 400, "repetition_penalty"),
    ("api.py fractional max_length", "/", b'{"prompt": "a", "max_length": 102.5}', 422,
     "max_length"),
]


@pytest.mark.parametrize("path,body,status,param", [b[1:] for b in BAD_REQUESTS],
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_openai_error_and_server_keeps_serving(server, path, body, status,
                                                              param):
    r = httpx.post(f"{server}{path}", content=body, timeout=30,
                   headers={"Content-Type": "application/json"})
    err = assert_error(r, status, param)
    if "too long" in err["message"] or "context" in err["message"]:
        assert "tokens" in err["message"]
    ok = httpx.post(f"{server}/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200


def test_prompt_longer_than_context_says_so(server):
    r = httpx.post(f"{server}/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "你好 " * 400}]}, timeout=30)
    err = assert_error(r, 400)
    assert err["code"] == "context_length_exceeded"
    assert "256" in err["message"]


# -- behaviour under load -------------------------------------------------------------------
def test_concurrent_streams_are_complete_and_never_interleave(server, tiny):
    queries = [f"第{i}个问题" for i in range(8)]
    want = {q: expected_chat(tiny, q, max_tokens=16) for q in queries}

    def run(q):
        return stream_chat(server, {"messages": [{"role": "user", "content": q}],
                                    "max_tokens": 16, **GREEDY})[0]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = dict(zip(queries, pool.map(run, queries), strict=True))
    assert got == want


@pytest.fixture(scope="module")
def slow_server(tiny):
    """One request waits at most; answers take 50 ms a token, long enough to interrupt."""
    with running_server(SlowModel(tiny, 0.05), queue_size=1) as (base, worker):
        yield base


LONG = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 200, **GREEDY}


def first_token(lines) -> str:
    """Read a stream's lines up to its first generated text (the role chunk comes before the
    job has even started). Keep ``lines`` referenced: dropping it closes the response."""
    for line in lines:
        if line.startswith("data: {"):
            delta = json.loads(line[6:])["choices"][0]["delta"]
            if delta.get("content"):
                return delta["content"]
    raise AssertionError("the stream ended without text")


def test_disconnect_mid_stream_stops_the_generation(slow_server):
    base = slow_server
    served = httpx.get(f"{base}/health").json()["served"]
    with httpx.stream("POST", f"{base}/v1/chat/completions", json={**LONG, "stream": True},
                      timeout=30) as r:
        lines = r.iter_lines()
        first_token(lines)
        assert httpx.get(f"{base}/health").json()["running"]
    # Closed after its first chunk (the whole answer would take 10 s): it must stop now.
    assert wait_idle(base, timeout=2) < 2
    assert httpx.get(f"{base}/health").json()["served"] == served + 1
    t0 = time.monotonic()
    r = httpx.post(f"{base}/v1/chat/completions", timeout=30, json={**LONG, "max_tokens": 4})
    assert r.status_code == 200 and time.monotonic() - t0 < 2


def test_disconnect_of_a_waiting_request_frees_its_slot(slow_server):
    base = slow_server
    with httpx.stream("POST", f"{base}/v1/chat/completions", json={**LONG, "stream": True},
                      timeout=30) as r:
        lines = r.iter_lines()
        first_token(lines)
        # A non-streaming request that gives up while waiting in the queue...
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/chat/completions", json=LONG, timeout=0.5)
        time.sleep(0.2)
        # ...does not keep its place: the single waiting slot is free again.
        assert httpx.get(f"{base}/health").json()["waiting"] == 0
    wait_idle(base, timeout=2)


def test_queue_full_answers_429(slow_server):
    base = slow_server
    stream = {**LONG, "stream": True}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=stream, timeout=30) as a:
        lines = a.iter_lines()
        first_token(lines)
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=stream,
                          timeout=30) as b:
            assert b.status_code == 200  # accepted: it waits its turn
            assert httpx.get(f"{base}/health").json()["waiting"] == 1
            r = httpx.post(f"{base}/v1/chat/completions", json=LONG, timeout=30)
            err = assert_error(r, 429)
            assert err["code"] == "queue_full" and r.headers["retry-after"]
            assert_error(httpx.post(f"{base}/", json={"prompt": "x"}), 429)
            assert_error(httpx.post(f"{base}/v1/completions", json={"prompt": "x"}), 429)
            assert httpx.get(f"{base}/health").json()["running"]  # a is still being answered
    wait_idle(base, timeout=2)
    r = httpx.post(f"{base}/v1/chat/completions", json={**LONG, "max_tokens": 2}, timeout=30)
    assert r.status_code == 200


# -- safety ---------------------------------------------------------------------------------
def test_api_key_is_required_on_every_api_route(tiny):
    openai = pytest.importorskip("openai")
    with running_server(tiny, api_key="s3cret") as (base, _):
        routes = [("GET", "/v1/models", None),
                  ("POST", "/v1/chat/completions", {"messages": [
                      {"role": "user", "content": "hi"}], "max_tokens": 2}),
                  ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}),
                  ("POST", "/v1/embeddings", {"input": "hi"}),
                  ("POST", "/", {"prompt": "hi", "max_length": 12})]
        for method, path, body in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                r = httpx.request(method, base + path, json=body, headers=headers, timeout=30)
                err = assert_error(r, 401)
                assert err["code"] == "invalid_api_key"
            r = httpx.request(method, base + path, json=body, timeout=30,
                              headers={"Authorization": "Bearer s3cret"})
            assert r.status_code == 200, (path, r.text)
        assert httpx.get(f"{base}/health").status_code == 200  # liveness stays open
        good = openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model="x", max_tokens=2, messages=[
            {"role": "user", "content": "hi"}]).choices[0].message.content is not None
        bad = openai.OpenAI(base_url=f"{base}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_cors_is_off_unless_asked_for(server, tiny):
    headers = {"Origin": "http://example.com", "Access-Control-Request-Method": "POST"}
    r = httpx.options(f"{server}/v1/chat/completions", headers=headers)
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(f"{server}/v1/models", headers={"Origin": "http://example.com"})
    assert "access-control-allow-origin" not in r.headers
    with running_server(tiny, cors_origins=["http://example.com"]) as (base, _):
        r = httpx.options(f"{base}/v1/chat/completions", headers=headers)
        assert r.headers["access-control-allow-origin"] == "http://example.com"
        r = httpx.options(f"{base}/v1/chat/completions",
                          headers={**headers, "Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers


class BrokenModel:
    """The model, except that a chat breaks after its first step (as an out-of-memory would)."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def chat_stream(self, *args, **kwargs):
        steps = self._model.chat_stream(*args, **kwargs)
        try:
            yield next(steps)
            raise RuntimeError("out of memory")
        finally:
            steps.close()


def test_a_failing_generation_is_an_error_and_the_server_keeps_serving(tiny):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    with running_server(BrokenModel(tiny)) as (base, _):
        err = assert_error(httpx.post(f"{base}/v1/chat/completions", json=body, timeout=30),
                           500)
        assert err["type"] == "server_error" and "memory" not in err["message"]
        with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True},
                          timeout=30) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines()
                      if line.startswith("data: {")]
        assert events[-1]["error"]["type"] == "server_error"
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                       timeout=30)
        assert r.status_code == 200


def test_dropped_rounds_are_reported_in_a_header(server):
    history = [{"role": r, "content": "很长的一段话" * 12}
               for _ in range(6) for r in ("user", "assistant")]
    body = {"messages": history + [{"role": "user", "content": "你好"}], "temperature": 0,
            "max_tokens": 4}
    r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert int(r.headers["X-LocalGLM-Dropped-Rounds"]) > 0
    r = httpx.post(f"{server}/", json={"prompt": "你好", "history": []}, timeout=60)
    assert r.headers["X-LocalGLM-Dropped-Rounds"] == "0"
    assert set(r.json()) == {"response", "history", "status", "time"}


def test_unsupported_options_are_refused_by_name(server):
    r = httpx.post(f"{server}/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": "f"}}]}, timeout=30)
    err = assert_error(r, 400, "tools")
    assert err["code"] == "unsupported_parameter" and "not supported" in err["message"]
    # Their "off" values are fine: clients send them by default.
    r = httpx.post(f"{server}/v1/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "tools": [],
        "tool_choice": "none", "presence_penalty": 0, "frequency_penalty": 0,
        "logit_bias": {}, "response_format": {"type": "text"}, "logprobs": False})
    assert r.status_code == 200, r.text


def test_apipy_accepts_an_integral_float_max_length(server, tiny):
    want = tiny.chat("你好", [], temperature=0, max_length=30)[0]
    r = httpx.post(f"{server}/", json={"prompt": "你好", "history": [], "max_length": 30.0,
                                       "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["response"] == want


def test_a_byte_order_mark_before_the_body_is_accepted(server, tiny):
    body = b"\xef\xbb\xbf" + _chat(max_tokens=4, temperature=0)
    r = httpx.post(f"{server}/v1/chat/completions", content=body, timeout=60,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == expected_chat(tiny, "hi",
                                                                         max_tokens=4)


def test_the_prompt_is_fitted_once_per_request(server, monkeypatch):
    import localglm.chat

    calls = []
    fit = localglm.chat.fit_prompt

    def counting(*args, **kwargs):
        calls.append(args[1])
        return fit(*args, **kwargs)

    monkeypatch.setattr(localglm.chat, "fit_prompt", counting)
    history = [{"role": r, "content": "很长的一段话" * 12}
               for _ in range(6) for r in ("user", "assistant")]
    body = {"messages": history + [{"role": "user", "content": "你好"}], "temperature": 0,
            "max_tokens": 4}
    r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200 and int(r.headers["X-LocalGLM-Dropped-Rounds"]) > 0
    assert calls == ["你好"]
    calls.clear()
    r = httpx.post(f"{server}/", json={"prompt": "你好", "max_length": 30}, timeout=60)
    assert r.status_code == 200 and calls == ["你好"]


def test_a_prompt_that_does_not_fit_names_the_api_fields(server):
    long = "你好 " * 400
    r = httpx.post(f"{server}/v1/chat/completions", json={
        "messages": [{"role": "user", "content": long}], "max_tokens": 8}, timeout=30)
    err = assert_error(r, 400, "messages")
    assert err["code"] == "context_length_exceeded"
    assert "max_tokens=8" in err["message"] and "max_new_tokens" not in err["message"]
    assert "256" in err["message"]
    r = httpx.post(f"{server}/", json={"prompt": long, "max_length": 100}, timeout=30)
    err = assert_error(r, 400, "prompt")
    assert "max_length=100" in err["message"] and "max_new_tokens" not in err["message"]


def test_a_vanishing_temperature_is_greedy_not_an_overflow(server, tiny):
    r = httpx.post(f"{server}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        "temperature": 1e-300})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == expected_chat(tiny, "hi",
                                                                         max_tokens=4)
