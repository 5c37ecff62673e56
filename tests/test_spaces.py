"""spaces/app.py, launched as a Space would run it, on the demo model; two visitors at once."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("gradio", reason="the web chat needs gradio (localglm[serve])")

from server_helpers import free_port  # noqa: E402

ROOT = Path(__file__).parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-quic"]
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def space():
    """``python spaces/app.py`` with the Space's variables, on a loopback port."""
    port = free_port()
    env = {**os.environ, "LOCALGLM_MODEL": "demo", "GRADIO_SERVER_NAME": "127.0.0.1",
           "GRADIO_SERVER_PORT": str(port), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("LOCALGLM_API_KEY", None)
    env.pop("LOCALGLM_PRECISION", None)
    proc = subprocess.Popen([sys.executable, "spaces/app.py"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the Space app did not start"
        time.sleep(0.2)
    try:
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def demo_model():
    import localglm

    return localglm.load("demo", precision="float32", device="cpu")


def test_space_serves_the_web_chat_and_streams(space):
    base, _ = space
    r = httpx.get(f"{base}/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/chat/"
    assert httpx.get(f"{base}/chat/").status_code == 200
    with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "How do I save a chat?"}],
            "stream": True, **GREEDY}) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert len(events) > 3 and events[-1] == "data: [DONE]"


def test_space_picks_float32_on_cpu_for_the_demo():
    from localglm.server.hosted import placement

    assert placement("demo", cuda=False) == ("cpu", "float32")
    assert placement("THUDM/chatglm-6b-int4", cuda=False) == ("cpu", "int4")
    assert placement("THUDM/chatglm-6b-int4", cuda=True) == ("cuda", "auto")


def served_count(base: str) -> int:
    return httpx.get(f"{base}/health").json()["served"]


def plain(text: str) -> str:
    """Text as the chat page shows it: Markdown code marks gone, whitespace collapsed."""
    return " ".join(text.replace("`", "").split())


class Visitor:
    """One browser context on the Space's chat page."""

    def __init__(self, browser, base):
        self.context = browser.new_context(viewport={"width": 1000, "height": 800})
        self.page = self.context.new_page()
        self.page.goto(f"{base}/", wait_until="load")
        self.page.wait_for_selector("#localglm-input textarea", timeout=30_000)
        self.page.click("#localglm-settings button, #localglm-settings .label-wrap")
        box = self.page.locator("#localglm-temperature input[type=number]")
        box.fill("0")
        box.press("Enter")

    def messages(self, role: str) -> list[str]:
        items = self.page.locator(f"#localglm-chatbot [data-testid='{role}']")
        # one snapshot: counting and then reading each would race a page being cleared
        return [plain(t) for t in items.all_inner_texts()]

    def send(self, text: str) -> None:
        self.page.locator("#localglm-input textarea").fill(text)
        self.page.click("#localglm-send")

    def wait_for(self, questions: list[str], answers: list[str], timeout: float = 60) -> None:
        want = ([plain(q) for q in questions], [plain(a) for a in answers])
        deadline = time.monotonic() + timeout
        while (self.messages("user"), self.messages("bot")) != want:
            assert time.monotonic() < deadline, (self.messages("user"), self.messages("bot"))
            time.sleep(0.1)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_two_visitors_keep_separate_histories(space, browser, demo_model):
    base, _ = space
    qa1, qa2, qb1 = "你好", "How do I start a server?", "How do I fine-tune the model?"
    a1, history = demo_model.chat(qa1, [], **GREEDY)
    a2, _ = demo_model.chat(qa2, history, **GREEDY)
    b1, _ = demo_model.chat(qb1, [], **GREEDY)
    assert len({a1, a2, b1}) == 3
    alice, bob = Visitor(browser, base), Visitor(browser, base)
    try:
        alice.send(qa1)
        bob.send(qb1)  # both asked at once: the worker answers them in turn
        alice.wait_for([qa1], [a1])
        bob.wait_for([qb1], [b1])
        alice.send(qa2)
        alice.wait_for([qa1, qa2], [a1, a2])
        assert bob.messages("user") == [plain(qb1)]
        # Regenerate answers the visitor's own last question, not the other visitor's.
        served = served_count(base)
        bob.page.click("#localglm-regen")
        deadline = time.monotonic() + 30
        while served_count(base) == served:
            assert time.monotonic() < deadline, "Regenerate asked nothing"
            time.sleep(0.1)
        bob.wait_for([qb1], [b1])
        # New chat forgets one conversation only.
        alice.page.click("#localglm-clear")
        alice.wait_for([], [])
        bob.wait_for([qb1], [b1])
        assert "localglm finetune" in bob.messages("bot")[0]
    finally:
        alice.context.close()
        bob.context.close()
