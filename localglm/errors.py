"""Errors caused by user input; the CLI prints them as one line instead of a traceback."""


class LocalGLMError(Exception):
    """A problem the user can fix (bad path, broken download, bad option)."""


class ModelFormatError(LocalGLMError):
    """A model directory or checkpoint that cannot be read as ChatGLM-6B."""


class ContextTooLongError(LocalGLMError):
    """A prompt that does not fit the model's context budget."""
