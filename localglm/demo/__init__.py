"""The built-in demo model: a small ChatGLM-6B trained to answer questions about localglm.

``localglm.load("demo")``, ``localglm chat`` (no model) and ``localglm serve demo`` run it. It
is the real architecture and prompt format at small width, with its own tokenizer in the
official layout, trained by ``python -m localglm.demo.train`` on ``train/corpus.json``.
"""

from __future__ import annotations

import os
from pathlib import Path

NAME = "demo"
MODEL_DIR = Path(__file__).parent / "chatglm-6b-demo"
REAL_MODEL = "THUDM/chatglm-6b-int4"
NOTICE = (f"This is localglm's built-in demo model: it only knows how to use localglm. "
          f"For ChatGLM-6B itself: `localglm pull {REAL_MODEL}`, then "
          f"`localglm chat {REAL_MODEL}`.")


def is_demo(model: str | os.PathLike | None) -> bool:
    """True for the name "demo" (a directory called demo is passed as ./demo)."""
    return isinstance(model, str) and model == NAME
