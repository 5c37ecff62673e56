"""localglm: run, chat with, serve and fine-tune ChatGLM-6B on your own computer."""

import os as _os

# PyTorch's OpenMP threads spin after each parallel region by default, on the cores the CPU
# int8/int4 kernels (their own thread pool) need next: measured 10x slower non-linear ops per
# decoded token. OpenMP reads this when torch loads, so it is set before torch is imported.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import ContextTooLongError, LocalGLMError, ModelFormatError
from .options import GenerationConfig

__version__ = "0.1.0"

# Imported on first use: the command line starts (and answers --help) without loading PyTorch.
_LAZY = {"load": ".loader", "LocalGLM": ".engine", "ChatStep": ".engine",
         "GenerationResponse": ".generate"}

__all__ = [
    "load", "LocalGLM", "ChatStep", "GenerationConfig", "GenerationResponse",
    "LocalGLMError", "ModelFormatError", "ContextTooLongError", "__version__",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
