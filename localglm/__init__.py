"""localglm: run, chat with, serve and fine-tune ChatGLM-6B on your own computer."""

from .engine import ChatStep, LocalGLM
from .errors import ContextTooLongError, LocalGLMError, ModelFormatError
from .generate import GenerationConfig, GenerationResponse
from .loader import load

__version__ = "0.1.0"

__all__ = [
    "load", "LocalGLM", "ChatStep", "GenerationConfig", "GenerationResponse",
    "LocalGLMError", "ModelFormatError", "ContextTooLongError", "__version__",
]
