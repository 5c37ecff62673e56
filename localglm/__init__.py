"""localglm: run, chat with, serve and fine-tune ChatGLM-6B on your own computer."""

import os as _os

# PyTorch's OpenMP threads spin after each parallel region by default, on the cores the CPU
# int8/int4 kernels (their own thread pool) need next: measured 10x slower non-linear ops per
# decoded token. OpenMP reads this when torch loads, so it is set before torch is imported.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .engine import ChatStep, LocalGLM
from .errors import ContextTooLongError, LocalGLMError, ModelFormatError
from .generate import GenerationConfig, GenerationResponse
from .loader import load

__version__ = "0.1.0"

__all__ = [
    "load", "LocalGLM", "ChatStep", "GenerationConfig", "GenerationResponse",
    "LocalGLMError", "ModelFormatError", "ContextTooLongError", "__version__",
]
