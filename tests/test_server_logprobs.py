"""logprobs / top_logprobs and JSON mode on the HTTP API, against the model's own numbers."""

import json

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from server_helpers import running_server  # noqa: E402

from localglm.json_mode import JSONPrefix  # noqa: E402

N = 6  # answer tokens


@pytest.fixture(scope="module")
def server(tiny):
    with running_server(tiny) as (base, _):
        yield base


def expected(tiny, prompt_ids, k):
    """Greedy tokens of the prompt with the log-softmax of the full (uncached) logits."""
    ids = tiny.generate(prompt_ids, max_new_tokens=N)
    out = []
    for i, tok in enumerate(ids):
        if tok == tiny.config.eos_token_id:
            break
        lp = torch.log_softmax(tiny.logits(prompt_ids + ids[:i])[-1], -1)
        top = torch.topk(lp, k)
        out.append((tok, float(lp[tok]), top.indices.tolist(), top.values.tolist()))
    return out


def test_chat_logprobs_are_the_models_log_probabilities(server, tiny):
    from localglm.server.logprobs import TokenNames

    names = TokenNames(tiny.tokenizer)
    want = expected(tiny, tiny.tokenizer.encode("你好"), 3)
    body = {"messages": [{"role": "user", "content": "你好"}], "temperature": 0,
            "max_tokens": N, "logprobs": True, "top_logprobs": 3}
    r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == len(want) == r.json()["usage"]["completion_tokens"]
    for got, (tok, lp, top_ids, top_lps) in zip(content, want, strict=True):
        assert got["logprob"] == pytest.approx(lp, abs=1e-4)
        assert len(got["top_logprobs"]) == 3
        assert [t["logprob"] for t in got["top_logprobs"]] == pytest.approx(top_lps, abs=1e-4)
        assert got["token"] == names(tok)[0]
        assert [t["token"] for t in got["top_logprobs"]] == [names(i)[0] for i in top_ids]
        assert got["top_logprobs"][0]["token"] == got["token"]  # greedy: the most likely
        assert bytes(got["bytes"]).decode("utf-8", "replace") in (got["token"], "\ufffd")
    # Streamed, the chunks carry the same entries, in order.
    with httpx.stream("POST", f"{server}/v1/chat/completions", json={**body, "stream": True},
                      timeout=60) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines()
                  if line.startswith("data: {")]
    streamed = [e for c in chunks for e in (c["choices"][0]["logprobs"] or {}).get(
        "content") or []]
    assert streamed == content
    # Without logprobs, none are sent.
    r = httpx.post(f"{server}/v1/chat/completions", timeout=60,
                   json={**body, "logprobs": False, "top_logprobs": None})
    assert r.json()["choices"][0]["logprobs"] is None


def test_the_openai_client_reads_them(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(model="x", temperature=0, max_tokens=3, logprobs=True,
                                       top_logprobs=2,
                                       messages=[{"role": "user", "content": "你好"}])
    entries = r.choices[0].logprobs.content
    assert entries and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)


def test_completion_logprobs_in_the_completions_shape(server, tiny):
    ids = tiny.tokenizer.encode("hello")
    want = expected(tiny, ids, 2)
    r = httpx.post(f"{server}/v1/completions", timeout=60, json={
        "prompt": ids, "max_tokens": N, "temperature": 0, "logprobs": 2})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert lp["token_logprobs"] == pytest.approx([w[1] for w in want], abs=1e-4)
    assert all(len(top) <= 2 and tok in top
               for tok, top in zip(lp["tokens"], lp["top_logprobs"], strict=True))
    offsets = [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    assert lp["text_offset"] == offsets
    with httpx.stream("POST", f"{server}/v1/completions", timeout=60, json={
            "prompt": ids, "max_tokens": N, "temperature": 0, "logprobs": 2,
            "stream": True}) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines()
                  if line.startswith("data: {")]
    streamed = [v for c in chunks for v in c["choices"][0]["logprobs"]["token_logprobs"]]
    assert streamed == lp["token_logprobs"]


def test_json_mode_answers_one_json_object(server, tiny):
    question = [{"role": "user", "content": "你好"}]
    plain = tiny.chat("你好", [], temperature=0, max_new_tokens=40)[0]
    assert not JSONPrefix().feed(plain)  # unconstrained, the tiny model writes no JSON
    for options in ({"temperature": 0}, {"temperature": 1.0, "seed": 1},
                    {"temperature": 1.0, "seed": 2, "stream": True}):
        body = {"messages": question, "max_tokens": 40,
                "response_format": {"type": "json_object"}, **options}
        if options.get("stream"):
            with httpx.stream("POST", f"{server}/v1/chat/completions", json=body,
                              timeout=60) as s:
                chunks = [json.loads(line[6:]) for line in s.iter_lines()
                          if line.startswith("data: {")]
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
            finish = chunks[-1]["choices"][0]["finish_reason"]
        else:
            r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            text = r.json()["choices"][0]["message"]["content"]
            finish = r.json()["choices"][0]["finish_reason"]
        if finish == "stop":
            assert isinstance(json.loads(text), dict), text
        else:
            assert finish == "length" and JSONPrefix().feed(text), text
