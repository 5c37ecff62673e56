"""The web chat on a machine someone else hosts: a Hugging Face Space or a notebook (Colab).

``load_model`` picks where the model runs (the GPU when there is one, else int4 on the CPU)
and fetches it with ``localglm pull``. Two ways start the same web chat ``localglm serve``
mounts: ``serve`` runs the whole server (web chat at /chat/, OpenAI API at /v1; what a Space
runs) and ``launch`` uses gradio's own launcher, which can open a public share link from a
notebook. Each browser session keeps its own history (the chat page's per-session state); one
engine worker answers everyone in turn.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..demo import is_demo
from ..errors import LocalGLMError

DEFAULT_MODEL = "THUDM/chatglm-6b-int4"
MODEL_ENV = "LOCALGLM_MODEL"  # which model to serve (default DEFAULT_MODEL)
PRECISION_ENV = "LOCALGLM_PRECISION"  # override the precision placement() picks


def placement(model: str, cuda: bool) -> tuple[str, str]:
    """(device, precision): a GPU at the best precision that fits, else int4 on the CPU.

    The built-in demo is tiny, so on a CPU it runs in float32, the path it was trained in.
    """
    if cuda:
        return "cuda", "auto"
    return "cpu", "float32" if is_demo(model) else "int4"


def fetch(model: str) -> None:
    """Download ``model`` with ``localglm pull`` unless it is the demo or a local directory."""
    if is_demo(model) or Path(model).expanduser().is_dir():
        return
    from ..cli import main as cli

    if cli(["pull", model]) != 0:
        raise LocalGLMError(f"could not download {model}; see the message above")


def load_model(model: str | None = None, precision: str | None = None, pull: bool = True):
    """Load the model to serve: ``model``, else $LOCALGLM_MODEL, else THUDM/chatglm-6b-int4."""
    import torch

    from ..loader import load

    model = model or os.environ.get(MODEL_ENV) or DEFAULT_MODEL
    device, picked = placement(model, torch.cuda.is_available())
    precision = precision or os.environ.get(PRECISION_ENV) or picked
    if pull:
        fetch(model)
    return load(model, precision=precision, device=device)


def serve(llm, host: str = "0.0.0.0", port: int = 7860, api_key: str | None = None) -> None:
    """Serve ``llm`` with the whole localglm server until stopped (Ctrl-C, SIGTERM)."""
    import uvicorn

    from . import EngineWorker, create_app

    worker = EngineWorker(llm).start()
    try:
        app = create_app(worker, api_key=api_key)
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        worker.close()


@dataclass
class WebChat:
    """A web chat started by ``launch``: its addresses, and ``close()`` to stop it."""

    local_url: str
    share_url: str | None
    blocks: object
    worker: object

    def close(self) -> None:
        self.blocks.close()
        self.worker.close()


def launch(llm, share: bool = False, host: str = "127.0.0.1", port: int | None = None) -> WebChat:
    """Start the web chat in the background with gradio's launcher.

    share=True also opens a public https://*.gradio.live link (needs the internet).
    """
    from . import EngineWorker
    from .webui import CSS, build_webui

    worker = EngineWorker(llm).start()
    blocks = build_webui(worker)
    try:
        _, local_url, share_url = blocks.launch(
            share=share, server_name=host, server_port=port, prevent_thread_lock=True,
            quiet=True, css=CSS, footer_links=[], ssr_mode=False, mcp_server=False,
            enable_monitoring=False)
    except BaseException:
        worker.close()
        raise
    return WebChat(local_url, share_url, blocks, worker)
