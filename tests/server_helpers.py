"""Run the real server (uvicorn on a free loopback port, in a thread) for the server tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(model, queue_size: int = 16, webui: bool = False, parallel: int = 1,
                   **app_kwargs):
    """Yield (base_url, worker) for a real server around ``model``; stops it afterwards."""
    import uvicorn

    from localglm.server import EngineWorker, create_app

    worker = EngineWorker(model, queue_size=queue_size, parallel=parallel).start()
    app = create_app(worker, webui=webui, **app_kwargs)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield base, worker
    finally:
        worker.close()
        server.should_exit = True
        thread.join(10)


def wait_idle(base: str, timeout: float = 5.0, **client_kwargs) -> float:
    """Seconds until /health says nothing runs or waits; raises after ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        state = httpx.get(f"{base}/health", **client_kwargs).json()
        if not state["running"] and not state["waiting"]:
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"the server is still busy after {timeout} s: {state}")


class SlowModel:
    """The model with a pause after each generated step, so that a stream lasts long enough to
    be interrupted (the tiny model answers 200 tokens in about a second)."""

    def __init__(self, model, delay: float = 0.05):
        self._model = model
        self.delay = delay

    def __getattr__(self, name):
        return getattr(self._model, name)

    def _slow(self, steps):
        try:
            for step in steps:
                time.sleep(self.delay)
                yield step
        finally:
            steps.close()

    def chat_stream(self, *args, **kwargs):
        return self._slow(self._model.chat_stream(*args, **kwargs))

    def stream_generate(self, *args, **kwargs):
        return self._slow(self._model.stream_generate(*args, **kwargs))


class CappedModel:
    """The model, answering at most ``max_new_tokens`` tokens whatever a request asks, so
    that a fuzzer's requests stay fast."""

    def __init__(self, model, max_new_tokens: int = 4):
        self._model = model
        self.max_new_tokens = max_new_tokens

    def __getattr__(self, name):
        return getattr(self._model, name)

    def _cap(self, gen):
        import dataclasses

        cap = min(gen.max_new_tokens or self.max_new_tokens, self.max_new_tokens)
        return dataclasses.replace(gen, max_new_tokens=cap)

    def chat_stream(self, query, history=None, gen=None, **kwargs):
        return self._model.chat_stream(query, history, self._cap(gen), **kwargs)

    def stream_generate(self, ids, gen=None, **kwargs):
        return self._model.stream_generate(ids, self._cap(gen), **kwargs)
