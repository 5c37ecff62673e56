"""The web chat at /chat: a gradio Blocks app mounted on the server's FastAPI app.

It asks the same ``EngineWorker`` as the API for every answer, so browser users queue with API
clients and never touch the model directly. Everything it loads is served by this server
(gradio's bundled fonts, Markdown, code highlighting and KaTeX), so it works offline.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import secrets
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode

# Must be set before gradio is imported: no usage analytics or version checks over the network.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

if int(gr.__version__.split(".")[0]) < 6:  # the Blocks and mount options used below
    raise ImportError(f"gradio>=6 is needed, this is gradio {gr.__version__}")

from starlette.datastructures import Headers  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402
from starlette.routing import Mount  # noqa: E402

from ..errors import LocalGLMError  # noqa: E402
from .engine import EngineWorker, Job, chat_config  # noqa: E402

LATEX = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "$", "right": "$", "display": False},
    {"left": "\\(", "right": "\\)", "display": False},
    {"left": "\\[", "right": "\\]", "display": True},
]
CSS = """
#localglm-chatbot { flex-grow: 1; }
footer { display: none !important; }
"""


def to_messages(pairs) -> list[dict]:
    """History rounds [(query, response), ...] as the chatbot's role/content messages."""
    out = []
    for query, response in pairs:
        out.append({"role": "user", "content": query})
        out.append({"role": "assistant", "content": response})
    return out


WAITING = "⏳ waiting for {n} earlier request(s)…"
QUEUE_POLL = 0.25  # seconds between updates of the waiting message
SUPERSEDE_TIMEOUT = 10.0  # longest wait for a replaced answer to stop


@dataclass
class Answer:
    """The answer a browser session is streaming: New chat and Regenerate stop it first."""

    query: str
    pairs: list  # the history it was asked with
    job: Job | None = None
    superseded: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)


class ChatSession:
    """The web UI's event handlers: each answer is one job on the engine worker.

    New chat and Regenerate first stop the session's streaming answers and wait until their
    handlers have ended, so that no late update of an old answer can land after theirs (on
    screen or in the history state).
    """

    def __init__(self, worker: EngineWorker):
        self.worker = worker
        self.running: dict[str, list[Answer]] = {}  # session hash -> its streaming answers

    async def answer(self, query: str, pairs, max_length, top_p, temperature,
                     session: str):
        """Stream one answer: yields (chatbot messages, history state, input box value)."""
        pairs = [tuple(p) for p in pairs or []]
        gen = chat_config(None, float(temperature), float(top_p), max_length=int(max_length))
        me = Answer(query, pairs)
        self.running.setdefault(session, []).append(me)
        try:
            async for out in self._stream(me, gen):
                if me.superseded:
                    break
                yield out
            if me.superseded:
                # Replaced: gradio repeats an event's last update when it completes, so the
                # last one must change nothing, or the old answer would come back.
                yield gr.skip(), gr.skip(), gr.skip()
        finally:
            if me.job is not None:
                me.job.cancel()  # Stop (or a closed tab) cancels this task: free the worker
            answers = self.running.get(session, [])
            if me in answers:
                answers.remove(me)
            if not answers:
                self.running.pop(session, None)
            me.done.set()

    async def _stream(self, me: Answer, gen):
        query, pairs = me.query, me.pairs
        try:
            fitted = await asyncio.to_thread(self.worker.check_chat, query, pairs, gen)
            me.job = job = self.worker.chat(query, pairs, gen, fitted)
        except LocalGLMError as e:
            raise gr.Error(str(e)) from None
        if fitted.dropped:
            gr.Info(f"The {fitted.dropped} oldest round(s) did not fit the context and were "
                    "left out of this prompt.")
        current = pairs + [(query, "")]
        box = ""  # the input box is emptied by the first update only
        shown = None
        while (ahead := self.worker.ahead_of(job)) and not job.cancelled:
            if ahead != shown:  # the history state keeps the empty answer, not this text
                shown = ahead
                yield to_messages(pairs + [(query, WAITING.format(n=ahead))]), current, box
                box = gr.skip()
            await asyncio.sleep(QUEUE_POLL)
        yield to_messages(current), current, box
        try:
            async for step in job:
                current = pairs + [(query, step.response)]
                yield to_messages(current), current, gr.skip()
        except LocalGLMError as e:
            raise gr.Error(str(e)) from None

    async def supersede(self, session: str) -> Answer | None:
        """Stop the session's streaming answers and wait until their handlers have ended;
        the latest of them, if any."""
        answers = list(self.running.get(session, []))
        for old in answers:
            old.superseded = True
            if old.job is not None:
                old.job.cancel()
        for old in answers:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(old.done.wait(), SUPERSEDE_TIMEOUT)
        return answers[-1] if answers else None

    async def send(self, message: str, pairs, max_length, top_p, temperature,
                   request: gr.Request):
        message = (message or "").strip()
        if not message:
            yield gr.skip(), gr.skip(), gr.skip()
            return
        async for out in self.answer(message, pairs, max_length, top_p, temperature,
                                     request.session_hash):
            yield out

    async def regenerate(self, pairs, max_length, top_p, temperature, request: gr.Request):
        old = await self.supersede(request.session_hash)
        if old is not None:  # pressed mid-answer: ask that answer's question again
            query, pairs = old.query, old.pairs
        elif pairs:
            query, pairs = pairs[-1][0], pairs[:-1]
        else:
            yield gr.skip(), gr.skip(), gr.skip()
            return
        async for out in self.answer(query, pairs, max_length, top_p, temperature,
                                     request.session_hash):
            yield out

    async def clear(self, request: gr.Request):
        await self.supersede(request.session_hash)
        return [], [], ""


def build_webui(worker: EngineWorker) -> gr.Blocks:
    """The chat page: conversation, input, Send/Stop/Regenerate/New chat, sampling controls."""
    session = ChatSession(worker)
    context = worker.max_context
    with gr.Blocks(title=f"localglm · {worker.model_name}", fill_height=True) as demo:
        gr.Markdown(f"### localglm · {worker.model_name}")
        chatbot = gr.Chatbot(elem_id="localglm-chatbot", label="Chat", show_label=False,
                             latex_delimiters=LATEX, buttons=["copy"], feedback_options=None,
                             placeholder="Ask anything. Answers stream in as they are written.",
                             scale=1)
        pairs = gr.State([])  # the history given to the model, [(query, response), ...]
        with gr.Row():
            box = gr.Textbox(elem_id="localglm-input", show_label=False, scale=8, lines=1,
                             max_lines=8, placeholder="Type a message and press Enter")
            send = gr.Button("Send", variant="primary", elem_id="localglm-send", scale=1)
        with gr.Row():
            stop = gr.Button("Stop", elem_id="localglm-stop")
            regen = gr.Button("Regenerate", elem_id="localglm-regen")
            clear = gr.Button("New chat", elem_id="localglm-clear")
        with gr.Accordion("Generation settings", open=False, elem_id="localglm-settings"):
            max_length = gr.Slider(1, context, value=min(2048, context), step=1,
                                   label="Maximum length (prompt + answer tokens)",
                                   elem_id="localglm-max-length")
            top_p = gr.Slider(0.01, 1.0, value=0.7, step=0.01, label="Top P",
                              elem_id="localglm-top-p")
            temperature = gr.Slider(0.0, 2.0, value=0.95, step=0.01,
                                    label="Temperature (0 = greedy)",
                                    elem_id="localglm-temperature")
        options = [max_length, top_p, temperature]
        outputs = [chatbot, pairs, box]
        # No gradio-side limit: the engine worker's queue is the one queue for everyone.
        common = {"outputs": outputs, "concurrency_limit": None, "api_visibility": "private",
                  "show_progress": "hidden"}
        sends = [box.submit(session.send, [box, pairs, *options], **common),
                 send.click(session.send, [box, pairs, *options], **common)]
        # Regenerate and New chat stop the streaming answer on the server and wait until its
        # handler has ended before they answer, so that none of its updates can land after
        # theirs. (The page's own `cancels=` races with their updates and can leave a bare
        # "Error" badge.) Regenerate may be pressed again while it streams ("multiple").
        regenerate = regen.click(session.regenerate, [pairs, *options], trigger_mode="multiple",
                                 **common)
        events = [*sends, regenerate]
        stop.click(None, cancels=events, api_visibility="private")
        clear.click(session.clear, None, outputs, api_visibility="private",
                    show_progress="hidden")
        # The chatbot's own trash button must forget the history too, not just the display.
        chatbot.clear(session.clear, None, outputs, api_visibility="private",
                      show_progress="hidden")
    return demo


def mount_webui(app, worker: EngineWorker, path: str = "/chat", api_key: str | None = None):
    """Mount the chat page on ``app`` at ``path``; with an API key, the key is its password
    (any user name, even an empty one) and ``Authorization: Bearer KEY`` opens its routes
    as it opens the API's."""
    auth = None
    if api_key:
        def auth(_user: str, password: str) -> bool:
            return hmac.compare_digest(password.encode(), api_key.encode())
    gr.mount_gradio_app(
        app, build_webui(worker), path=path, footer_links=[], run_history=False, auth=auth,
        auth_message="Sign in with any user name and the server's API key as the password.",
        css=CSS, ssr_mode=False, mcp_server=False, enable_monitoring=False)
    mounted = next(r.app for r in app.routes if isinstance(r, Mount) and r.path == path)
    app.add_middleware(WebUIGate, path=path, api_key=api_key, gradio_app=mounted)
    return app


class WebUIGate:
    """ASGI middleware in front of the mounted chat's routes.

    gradio's login form refuses an empty user name, which the page then ignores; the user
    name means nothing here, so an empty one is replaced. With an API key, a request that
    carries ``Authorization: Bearer KEY`` is let in as a signed-in user (the API's policy),
    and a wrong key is refused with the API's 401.
    """

    USER = "user"

    def __init__(self, app, path: str, api_key: str | None, gradio_app):
        self.app = app
        self.prefix = path.rstrip("/") + "/"
        self.api_key = api_key
        self.gradio_app = gradio_app
        self._token: str | None = None  # gradio session token of Bearer-key requests

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not (scope["path"] + "/").startswith(self.prefix):
            return await self.app(scope, receive, send)
        if scope["method"] == "POST" and scope["path"].rstrip("/") == self.prefix + "login":
            receive = await self._fill_user_name(scope, receive)
        auth = Headers(scope=scope).get("authorization")
        if self.api_key and auth:
            scheme, _, key = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    key.strip().encode(), self.api_key.encode()):
                body = {"error": {"message": "wrong API key: send 'Authorization: Bearer KEY'",
                                  "type": "invalid_request_error", "param": None,
                                  "code": "invalid_api_key"}}
                return await JSONResponse(body, 401, {"WWW-Authenticate": "Bearer"})(
                    scope, receive, send)
            scope = self._signed_in(scope)
        return await self.app(scope, receive, send)

    def _signed_in(self, scope) -> dict:
        """``scope`` with the cookie of a gradio session opened for the API key."""
        gradio_app = self.gradio_app
        if self._token is None:
            self._token = secrets.token_urlsafe(16)
            gradio_app.tokens[self._token] = "api-key"
        cookie = f"access-token-{gradio_app.cookie_id}={self._token}"
        headers = [(k, v) for k, v in scope["headers"] if k != b"cookie"]
        headers.append((b"cookie", cookie.encode()))
        return {**scope, "headers": headers}

    async def _fill_user_name(self, scope, receive):
        """A ``receive`` replaying the login form with an empty user name filled in."""
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return receive
            body += message.get("body", b"")
            more = message.get("more_body", False)
        form = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        if any(k == "username" and not v.strip() for k, v in form) or not any(
                k == "username" for k, _ in form):
            form = [(k, v) for k, v in form if k != "username"] + [("username", self.USER)]
            body = urlencode(form).encode("ascii")
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
            scope["headers"] = headers + [(b"content-length", str(len(body)).encode())]
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return replay
