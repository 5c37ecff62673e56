"""Errors caused by user input; the CLI prints them as one line instead of a traceback."""


class LocalGLMError(Exception):
    """A problem the user can fix (bad path, broken download, bad option)."""


class ModelFormatError(LocalGLMError):
    """A model directory or checkpoint that cannot be read as ChatGLM-6B."""


class ContextTooLongError(LocalGLMError):
    """A prompt that does not fit the model's context budget.

    Where known, ``prompt_tokens`` (the message alone), ``reserved`` (tokens kept for the
    answer) and ``budget`` (the context budget) let a caller word the error in its own terms.
    """

    def __init__(self, message: str, prompt_tokens: int | None = None,
                 reserved: int | None = None, budget: int | None = None):
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.reserved = reserved
        self.budget = budget
