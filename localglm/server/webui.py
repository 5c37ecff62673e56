"""The web chat at /chat: a gradio Blocks app mounted on the server's FastAPI app.

It asks the same ``EngineWorker`` as the API for every answer, so browser users queue with API
clients and never touch the model directly. Everything it loads is served by this server
(gradio's bundled fonts, Markdown, code highlighting and KaTeX), so it works offline.
"""

from __future__ import annotations

import asyncio
import hmac
import os

# Must be set before gradio is imported: no usage analytics or version checks over the network.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

if int(gr.__version__.split(".")[0]) < 6:  # the Blocks and mount options used below
    raise ImportError(f"gradio>=6 is needed, this is gradio {gr.__version__}")

from ..errors import LocalGLMError  # noqa: E402
from .engine import EngineWorker, chat_config  # noqa: E402

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


class ChatSession:
    """The web UI's event handlers: each answer is one job on the engine worker."""

    def __init__(self, worker: EngineWorker):
        self.worker = worker

    async def answer(self, query: str, pairs, max_length, top_p, temperature):
        """Stream one answer: yields (chatbot messages, history state, input box value)."""
        pairs = [tuple(p) for p in pairs or []]
        gen = chat_config(None, float(temperature), float(top_p), max_length=int(max_length))
        try:
            fitted = await asyncio.to_thread(self.worker.check_chat, query, pairs, gen)
            job = self.worker.chat(query, pairs, gen)
        except LocalGLMError as e:
            raise gr.Error(str(e)) from None
        if fitted.dropped:
            gr.Info(f"The {fitted.dropped} oldest round(s) did not fit the context and were "
                    "left out of this prompt.")
        current = pairs + [(query, "")]
        yield to_messages(current), current, ""
        try:
            async for step in job:
                current = pairs + [(query, step.response)]
                yield to_messages(current), current, gr.skip()
        except LocalGLMError as e:
            raise gr.Error(str(e)) from None
        finally:
            job.cancel()  # Stop (or a closed tab) cancels this task: free the worker at once

    async def send(self, message: str, pairs, max_length, top_p, temperature):
        message = (message or "").strip()
        if not message:
            yield gr.skip(), gr.skip(), gr.skip()
            return
        async for out in self.answer(message, pairs, max_length, top_p, temperature):
            yield out

    async def regenerate(self, pairs, max_length, top_p, temperature):
        if not pairs:
            yield gr.skip(), gr.skip(), gr.skip()
            return
        query, pairs = pairs[-1][0], pairs[:-1]
        async for out in self.answer(query, pairs, max_length, top_p, temperature):
            yield out

    @staticmethod
    def clear():
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
        events = [
            box.submit(session.send, [box, pairs, *options], **common),
            send.click(session.send, [box, pairs, *options], **common),
            regen.click(session.regenerate, [pairs, *options], **common),
        ]
        stop.click(None, cancels=events, api_visibility="private")
        clear.click(session.clear, None, outputs, cancels=events, api_visibility="private")
        # The chatbot's own trash button must forget the history too, not just the display.
        chatbot.clear(session.clear, None, outputs, cancels=events, api_visibility="private")
    return demo


def mount_webui(app, worker: EngineWorker, path: str = "/chat", api_key: str | None = None):
    """Mount the chat page on ``app`` at ``path``; with an API key, the key is its password."""
    auth = None
    if api_key:
        def auth(_user: str, password: str) -> bool:
            return hmac.compare_digest(password.encode(), api_key.encode())
    return gr.mount_gradio_app(
        app, build_webui(worker), path=path, footer_links=[], run_history=False, auth=auth,
        auth_message="Sign in with any user name and the server's API key as the password.",
        css=CSS, ssr_mode=False, mcp_server=False, enable_monitoring=False)
