"""The web chat at /chat, driven in headless Chromium against a real server, offline."""

import shutil
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from server_helpers import SlowModel, running_server, wait_idle  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-quic"]
MAX_LENGTH = 80  # prompt + answer tokens: keeps every answer short on the tiny model
QUESTION = "写一段代码：\n```python\nprint('hi')\n```\n以及公式 $$E=mc^2$$"


@pytest.fixture(scope="module")
def gradio():
    return pytest.importorskip("gradio", reason="the web UI needs gradio (localglm[serve])")


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="the browser test needs playwright (pip install "
                                   "playwright; it drives Debian's chromium)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_webui_builds_and_is_mounted(gradio, tiny):
    with running_server(tiny, webui=True) as (base, _):
        r = httpx.get(f"{base}/", follow_redirects=False)
        assert r.status_code == 307 and r.headers["location"] == "/chat/"
        page = httpx.get(f"{base}/chat/")
        assert page.status_code == 200 and "<html" in page.text
        # POST / is still the api.py protocol, not the web UI.
        r = httpx.post(f"{base}/", json={"prompt": "你好", "max_length": 12}, timeout=30)
        assert r.status_code == 200 and r.json()["status"] == 200


def test_webui_asks_for_the_api_key(gradio, tiny):
    with running_server(tiny, webui=True, api_key="k3y") as (base, _):
        assert httpx.get(f"{base}/chat/config").status_code == 401
        login = httpx.post(f"{base}/chat/login", data={"username": "me", "password": "k3y"})
        assert login.status_code == 200
        wrong = httpx.post(f"{base}/chat/login", data={"username": "me", "password": "no"})
        assert wrong.status_code >= 400


class ChatPage:
    """The chat page's parts, by the element ids the UI gives them."""

    def __init__(self, page, base):
        self.page = page
        self.base = base

    def answers(self) -> list[str]:
        bots = self.page.locator("#localglm-chatbot [data-testid='bot']")
        # one snapshot: counting and then reading each would race a page being cleared
        return bots.all_inner_texts()

    def questions(self) -> int:
        return self.page.locator("#localglm-chatbot [data-testid='user']").count()

    def set_number(self, elem_id: str, value) -> None:
        box = self.page.locator(f"#{elem_id} input[type=number]")
        box.fill(str(value))
        box.press("Enter")

    def send(self, text: str) -> None:
        self.page.locator("#localglm-input textarea").fill(text)
        self.page.click("#localglm-send")

    def served(self) -> int:
        return httpx.get(f"{self.base}/health").json()["served"]

    def wait_answer(self, n: int, served: int, timeout: float = 15) -> str:
        """The n-th answer, once the engine has finished one more job than ``served`` and
        the page shows the same text twice in a row."""
        deadline = time.monotonic() + timeout
        while self.served() <= served:
            assert time.monotonic() < deadline, "the engine did not answer"
            time.sleep(0.05)
        last = None
        while time.monotonic() < deadline:
            answers = self.answers()
            if len(answers) >= n and answers[n - 1] == last:
                return last
            last = answers[n - 1] if len(answers) >= n else None
            time.sleep(0.2)
        raise AssertionError(f"answer {n} did not settle: {self.answers()}")


def test_chat_in_the_browser_streams_stops_regenerates_and_clears(gradio, browser, tiny,
                                                                    tmp_path):
    greedy = {"temperature": 0, "max_length": MAX_LENGTH}
    full, history = tiny.chat(QUESTION, [], **greedy)
    second, _ = tiny.chat("继续", history, **greedy)
    slow = SlowModel(tiny, 0.1)  # slow enough to press Stop mid-answer on a busy machine
    with running_server(slow, webui=True) as (base, _):
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        try:
            drive_chat(page, base, slow, full, second, greedy, tiny, tmp_path)
        finally:
            page.close()  # before the server stops: the page holds a connection open


def drive_chat(page, base, slow, full, second, greedy, tiny, tmp_path):
    """Send, watch it stream, stop, regenerate, a second turn, new chat."""
    from playwright.sync_api import expect  # present: the browser fixture checked

    external = []

    def offline(route):  # the page must need nothing from the internet
        if route.request.url.startswith(base):
            route.continue_()
        else:
            external.append(route.request.url)
            route.abort()

    page.route("**/*", offline)
    page.goto(f"{base}/", wait_until="load")
    assert page.url == f"{base}/chat/"
    page.wait_for_selector("#localglm-input textarea", timeout=30_000)
    chat = ChatPage(page, base)
    page.click("#localglm-settings button, #localglm-settings .label-wrap")
    chat.set_number("localglm-temperature", 0)
    chat.set_number("localglm-max-length", MAX_LENGTH)

    # 1. The answer streams in: it is seen growing before it is complete.
    chat.send(QUESTION)
    seen = set()
    deadline = time.monotonic() + 10
    while len(seen) < 2 and time.monotonic() < deadline:
        answers = chat.answers()
        if answers and answers[0]:
            seen.add(answers[0])
        time.sleep(0.05)
    assert len(seen) >= 2, "no partial answer was seen"
    # Markdown with highlighted code and LaTeX, rendered from local assets.
    # (rendering is asynchronous: expect() waits for it)
    user = page.locator("#localglm-chatbot [data-testid='user']").first
    expect(user.locator("pre code")).to_have_count(1, timeout=10_000)
    expect(user.locator(".katex").first).to_be_visible(timeout=10_000)

    # 2. Stop: the answer stops growing at once and the engine is free.
    page.click("#localglm-stop")
    assert wait_idle(base, timeout=3) < 3
    time.sleep(0.3)
    stopped = chat.answers()[0]
    time.sleep(0.5)
    assert chat.answers()[0] == stopped
    assert len(stopped) < len(full) and full.startswith(stopped.rstrip())
    slow.delay = 0.01  # the rest only needs complete answers

    # 3. Regenerate answers the same question again, to the end this time.
    served = chat.served()
    page.click("#localglm-regen")
    assert chat.wait_answer(1, served) == full
    assert chat.questions() == 1
    page.screenshot(path=str(tmp_path / "webui.png"), full_page=True)
    shutil.copy(tmp_path / "webui.png", "/tmp/webui.png")  # for a human to look at

    # 4. A second turn carries the first as history.
    served = chat.served()
    chat.send("继续")
    assert chat.wait_answer(2, served) == second
    page.screenshot(path=str(tmp_path / "webui-two-turns.png"), full_page=True)

    # 5. New chat forgets everything: the next answer is a first-turn answer.
    page.click("#localglm-clear")
    deadline = time.monotonic() + 5
    while chat.questions() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert chat.questions() == 0 and chat.answers() == []
    served = chat.served()
    chat.send("继续")
    assert chat.wait_answer(1, served) == tiny.chat("继续", [], **greedy)[0]
    assert external == []


def open_chat(page, base) -> ChatPage:
    page.goto(f"{base}/chat/", wait_until="load")
    page.wait_for_selector("#localglm-input textarea", timeout=30_000)
    chat = ChatPage(page, base)
    page.click("#localglm-settings button, #localglm-settings .label-wrap")
    chat.set_number("localglm-temperature", 0)
    chat.set_number("localglm-max-length", MAX_LENGTH)
    return chat


def wait_partial(chat: ChatPage, n: int = 1, timeout: float = 10) -> str:
    """The n-th answer once some of its text (not the waiting note) is on screen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answers = chat.answers()
        if len(answers) >= n and answers[n - 1].strip() and "⏳" not in answers[n - 1]:
            return answers[n - 1]
        time.sleep(0.03)
    raise AssertionError(f"no partial answer {n}: {chat.answers()}")


def no_error_shown(page) -> bool:
    return page.get_by_text("Error", exact=True).count() == 0


def test_new_chat_and_regenerate_mid_stream_reset_the_conversation(gradio, browser, tiny):
    slow = SlowModel(tiny, 0.1)
    with running_server(slow, webui=True) as (base, _):
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        try:
            chat = open_chat(page, base)
            # New chat (the button, then the chatbot's trash icon) while an answer streams,
            # several times: the screen empties at once and stays empty, the old round never
            # comes back with the next message, and the engine is free.
            for i in range(6):
                chat.send(f"第{i}个问题")
                wait_partial(chat)
                assert chat.questions() == 1, "an old round came back with the message"
                if i % 2:
                    page.locator("#localglm-chatbot button[aria-label='Clear']").click()
                else:
                    page.click("#localglm-clear")
                deadline = time.monotonic() + 10
                while chat.questions() and time.monotonic() < deadline:
                    time.sleep(0.03)
                assert chat.questions() == 0 and chat.answers() == [], f"try {i}"
                assert wait_idle(base, timeout=3) < 3
                time.sleep(0.6)  # a late update of the old answer would land by now
                assert chat.questions() == 0 and chat.answers() == [], f"try {i}"
                assert no_error_shown(page), f"try {i}"

            # Regenerate while an answer streams: the old answer stops (one more job, not
            # two), and the answer starts again and only grows to the whole (greedy) answer.
            # The whole answer as the server gives it (its batch may round differently from a
            # solo run at a near-tie): the first, uninterrupted answer.
            before = chat.served()
            chat.send("你好")
            full = chat.wait_answer(1, before, timeout=60)
            page.click("#localglm-clear")
            wait_idle(base, timeout=10)
            for _ in range(3):
                chat.send("你好")
                first = wait_partial(chat)
                while len(chat.answers()[0]) <= len(first) + 2:
                    time.sleep(0.03)
                served = chat.served()
                seen = [chat.answers()]
                page.click("#localglm-regen")
                deadline = time.monotonic() + 30
                while chat.served() < served + 2 and time.monotonic() < deadline:
                    seen.append(chat.answers())
                    time.sleep(0.03)
                seen.append(chat.answers())
                texts = [a[0] for a in seen if len(a) == 1 and "⏳" not in a[0]]
                assert all(len(a) <= 1 for a in seen) and chat.questions() == 1
                restart = next((i for i in range(1, len(texts))
                                if len(texts[i]) < len(texts[i - 1])), None)
                assert restart is not None, texts
                after = texts[restart:]
                assert all(len(a) <= len(b) for a, b in zip(after, after[1:], strict=False)), after
                assert chat.wait_answer(1, served + 1) == full
                assert chat.served() == served + 2  # the stopped answer and the new one
                assert no_error_shown(page)
                page.click("#localglm-clear")
                wait_idle(base)
        finally:
            page.close()


def test_a_queued_message_says_that_it_waits(gradio, browser, tiny):
    slow = SlowModel(tiny, 0.05)
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 200,
            "temperature": 0, "stream": True}
    with running_server(slow, webui=True) as (base, _):
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        try:
            chat = open_chat(page, base)
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body,
                              timeout=30) as r:
                lines = r.iter_lines()
                next(line for line in lines if '"content":"' in line and '""' not in line)
                chat.send("你好")
                deadline = time.monotonic() + 10
                while "⏳" not in "".join(chat.answers()) and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert chat.answers() == ["⏳ waiting for 1 earlier request(s)…"]
            # The API client went away: the browser's answer streams in.
            wait_partial(chat)
            assert "⏳" not in chat.answers()[0]
        finally:
            page.close()
