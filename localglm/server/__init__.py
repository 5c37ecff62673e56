"""``localglm serve``: the OpenAI-compatible API, the official api.py protocol and a web chat,
all fed by one engine worker that owns the model.

Needs the ``serve`` extra (``pip install localglm[serve]``): FastAPI and uvicorn for the API,
gradio for the web UI.
"""

from .engine import EngineWorker, Job, QueueFullError

__all__ = ["EngineWorker", "Job", "QueueFullError", "create_app"]


def create_app(*args, **kwargs):
    """See ``localglm.server.app.create_app`` (imported lazily: FastAPI is optional)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)
