"""Request and response bodies of the server: the OpenAI API and the official api.py protocol.

Requests are validated strictly (no "0.5" for a float, no unknown roles) with the ranges
declared on each field; unknown fields are ignored so that newer clients keep working. The
application turns every ``ValidationError`` into an OpenAI-style error body.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer

# Hard caps that do not depend on the model; the model's context is checked per request.
MAX_TOKENS_CAP = 1 << 20
MAX_STOP = 4  # OpenAI allows up to 4 stop sequences
MAX_EMBED_INPUTS = 256
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1  # what torch.Generator.manual_seed accepts


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(ge=0, le=1)]
MaxTokens = Annotated[int, Field(ge=1, le=MAX_TOKENS_CAP)]
Seed = Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)]
Stop = str | Annotated[list[Annotated[str, Field(max_length=256)]], Field(max_length=MAX_STOP)]
Penalty = Annotated[float, Field(ge=-2, le=2)]


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    """Options shared by chat and text completions."""

    model: str | None = None  # any name is accepted: there is one model
    temperature: Temperature | None = None
    top_p: TopP | None = None
    max_tokens: MaxTokens | None = None
    stop: Stop | None = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=1)] = 1  # one choice per request
    user: str | None = None
    # Accepted for compatibility and ignored (the engine has repetition_penalty instead).
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    # Extensions understood by localglm.
    top_k: Annotated[int, Field(ge=0, le=1 << 20)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] | None = None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    """One message; content is a string or a list of text parts."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: MaxTokens | None = None  # the newer name of max_tokens

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def to_chat(self) -> tuple[str, list[tuple[str, str]]]:
        """(query, history) in ChatGLM's terms.

        User/assistant turns pair up into history rounds (consecutive messages of one role are
        joined); system messages are prepended to the first user query; the last message must
        be the user's non-empty question.
        """
        system = "\n".join(m.text() for m in self.messages if m.role in ("system", "developer"))
        turns: list[list[str]] = []  # [role, text]
        for m in self.messages:
            if m.role in ("system", "developer"):
                continue
            if turns and turns[-1][0] == m.role:
                turns[-1][1] += "\n" + m.text()
            else:
                turns.append([m.role, m.text()])
        last = len(self.messages) - 1
        if not turns or turns[-1][0] != "user":
            raise APIError(400, "the last message must be the user's (the question to answer)",
                           param=f"messages[{last}].role")
        if not turns[-1][1].strip():
            raise APIError(400, "the last user message is empty",
                           param=f"messages[{last}].content")
        if turns[0][0] == "assistant":  # an opening greeting: a round with an empty question
            turns.insert(0, ["user", ""])
        history = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2)]
        query = turns[-1][1]
        if system:
            if history:
                history[0] = (f"{system}\n{history[0][0]}", history[0][1])
            else:
                query = f"{system}\n{query}"
        return query, history


class CompletionRequest(_Sampling):
    # One prompt: text, or token ids. A list holding exactly one of them is accepted too.
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False


class EmbeddingRequest(_Request):
    model: str | None = None
    input: (str | Annotated[list[str], Field(min_length=1, max_length=MAX_EMBED_INPUTS)]
            | Annotated[list[int], Field(min_length=1)]
            | Annotated[list[list[int]], Field(min_length=1, max_length=MAX_EMBED_INPUTS)])
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None


class ApiPyRequest(_Request):
    """The official ChatGLM-6B api.py request; null means "the official default"."""

    prompt: str
    history: list[tuple[str, str]] | None = None
    max_length: Annotated[int, Field(ge=1, le=MAX_TOKENS_CAP)] | None = None
    top_p: TopP | None = None
    temperature: Temperature | None = None


# -- responses --------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _drop_unset(self) -> dict:  # OpenAI sends {"content": "..."}, not "role": null
        return {k: v for k, v in (("role", self.role), ("content", self.content))
                if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "localglm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ApiPyResponse(BaseModel):
    response: str
    history: list[tuple[str, str]]
    status: int = 200
    time: str  # "%Y-%m-%d %H:%M:%S", like the official api.py


# -- errors -----------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_error_body(exc: ValidationError | list[dict]) -> dict:
    """One readable message for pydantic errors, naming the first offending field."""
    errors = exc.errors() if isinstance(exc, ValidationError) else list(exc)
    messages, params = [], []
    for err in errors[:5]:
        param = _loc_to_param(err.get("loc", ()))
        params.append(param)
        if err.get("type") == "json_invalid":
            messages.append(f"the request body is not valid JSON: {err.get('msg')}")
        elif err.get("type") == "missing":
            messages.append(f"'{param}' is required")
        elif param:
            messages.append(f"'{param}': {err.get('msg')}")
        else:
            messages.append(str(err.get("msg")))
    if len(errors) > 5:
        messages.append(f"and {len(errors) - 5} more error(s)")
    code = errors[0].get("type") if errors else None
    return error_body("; ".join(messages) or "invalid request", param=params[0] or None
                      if params else None, code=code)


def _loc_to_param(loc) -> str:
    # FastAPI prefixes "body"; pydantic adds the member type tried for unions ("str",
    # "list[str]"...), which only confuses a reader, so both are left out.
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in str(part) or part in ("str", "int", "float", "bool", "function-after"):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
