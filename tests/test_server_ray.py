"""Ray Serve scale-out: two replicas of the tiny model behind Ray's proxy, on this machine."""

import concurrent.futures
import json

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from server_helpers import free_port  # noqa: E402

QUERIES = [f"第{i}个问题" for i in range(8)]


@pytest.fixture(scope="module")
def ray_server(tiny_dir):
    from localglm.server.ray import deployment

    ray.init(num_cpus=2, object_store_memory=80 * 2**20, include_dashboard=False,
             namespace="localglm-test", log_to_driver=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # 2 running + 2 waiting per replica: 8 requests at once cannot all go to one
        app = deployment(str(tiny_dir), replicas=2, cpus=0.5,
                         load_options={"precision": "float32", "device": "cpu"},
                         worker_options={"parallel": 2, "queue_size": 2},
                         app_options={"webui": False}).bind()
        serve.run(app, name="localglm", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def stream(base, query):
    body = {"messages": [{"role": "user", "content": query}], "max_tokens": 24,
            "temperature": 0, "stream": True}
    text, events = "", []
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        replica = r.headers["x-localglm-replica"]
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    for e in events[:-1]:
        text += json.loads(e)["choices"][0]["delta"].get("content") or ""
    return text, replica


def test_concurrent_streams_are_spread_over_both_replicas(ray_server, tiny):
    want = [tiny.chat(q, [], temperature=0, max_new_tokens=24)[0] for q in QUERIES]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda q: stream(ray_server, q), QUERIES))
    assert [text for text, _ in got] == want
    assert len({replica for _, replica in got}) == 2
    health = httpx.get(f"{ray_server}/health", timeout=30).json()
    assert health["status"] == "ok" and health["replica"] and health["parallel"] == 2
    r = httpx.post(f"{ray_server}/", json={"prompt": "你好", "history": [],
                                           "temperature": 0}, timeout=60)
    assert r.status_code == 200 and r.json()["response"] == tiny.chat(
        "你好", [], temperature=0, max_length=2048)[0]
