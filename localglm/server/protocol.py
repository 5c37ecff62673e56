"""Request and response bodies of the server: the OpenAI API and the official api.py protocol.

Requests are validated strictly (no "0.5" for a float, no unknown roles) with the ranges
declared on each field; unknown fields are ignored so that newer clients keep working. The
application turns every ``ValidationError`` into an OpenAI-style error body.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_serializer,
)

# Hard caps that do not depend on the model; the model's context is checked per request.
MAX_TOKENS_CAP = 1 << 20
MAX_STOP = 4  # OpenAI allows up to 4 stop sequences
MAX_EMBED_INPUTS = 256
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1  # what torch.Generator.manual_seed accepts
MAX_TOP_LOGPROBS = 20  # OpenAI's limits: 20 alternatives for chat, 5 for completions
MAX_COMPLETION_LOGPROBS = 5


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


MIN_TEMPERATURE = 1e-3  # below this, sampling is greedy in all but name (and overflows)


def _tiny_is_greedy(t: float) -> float:
    return 0.0 if t < MIN_TEMPERATURE else t


Temperature = Annotated[float, Field(ge=0, le=2), AfterValidator(_tiny_is_greedy)]
TopP = Annotated[float, Field(ge=0, le=1)]
MaxTokens = Annotated[int, Field(ge=1, le=MAX_TOKENS_CAP)]
Seed = Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)]
Stop = str | Annotated[list[Annotated[str, Field(max_length=256)]], Field(max_length=MAX_STOP)]
Penalty = Annotated[float, Field(ge=-2, le=2)]


def _integral(value):
    """102.0 -> 102: the official api.py (FastAPI in lax mode) accepted integral floats."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# An int that also accepts an integral float (102.0), for the official api.py protocol.
LaxInt = Annotated[int, BeforeValidator(_integral)]

# Options of the OpenAI API this server does not implement: a request that sets one (to
# anything but its "off" value) is refused with a 400 naming it, never silently ignored.
UNSUPPORTED = {
    "tools": "tool calling", "tool_choice": "tool calling", "functions": "function calling",
    "function_call": "function calling", "parallel_tool_calls": "tool calling",
    "logit_bias": "logit_bias", "audio": "audio output", "prediction": "predicted outputs",
    "web_search_options": "web search", "suffix": "suffix (fill-in-the-middle)",
}


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
    # Only 0 (off) is supported: the engine has repetition_penalty instead.
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    # Extensions understood by localglm.
    top_k: Annotated[int, Field(ge=0, le=1 << 20)] | None = None
    repetition_penalty: Annotated[float, Field(ge=0.01, le=10)] | None = None
    # Declared so that clients (and the OpenAPI schema) see them; refused when set.
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    logit_bias: dict[str, Any] | None = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def check_supported(self) -> None:
        """Refuse (400) an OpenAI option that this server would otherwise have to ignore."""
        for name, what in UNSUPPORTED.items():
            value = getattr(self, name, None)
            if value not in (None, [], {}, False) and not (name == "tool_choice"
                                                          and value == "none"):
                raise APIError(400, f"'{name}' is not supported: this server has no {what}; "
                               "leave it out of the request", param=name,
                               code="unsupported_parameter")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"'{name}' is not supported (only 0); use "
                               "'repetition_penalty' (> 1 discourages repeats) instead",
                               param=name, code="unsupported_parameter")


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


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: MaxTokens | None = None  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        if self.response_format and self.response_format.type == "json_schema":
            raise APIError(400, "response_format 'json_schema' is not supported; use "
                           "{\"type\": \"json_object\"} (any JSON object) or describe the "
                           "schema in the prompt", param="response_format.type",
                           code="unsupported_parameter")

    def json_mode(self) -> bool:
        return bool(self.response_format and self.response_format.type == "json_object")

    def logprobs_count(self) -> int | None:
        """How many alternatives to report per token; None: no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None

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
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1, le=1)] | None = None  # one choice per request


class EmbeddingRequest(_Request):
    model: str | None = None
    input: (str | Annotated[list[str], Field(min_length=1, max_length=MAX_EMBED_INPUTS)]
            | Annotated[list[int], Field(min_length=1)]
            | Annotated[list[list[int]], Field(min_length=1, max_length=MAX_EMBED_INPUTS)])
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None

    def texts_or_ids(self) -> list[str] | list[list[int]]:
        """The inputs as a list; empty strings are refused like OpenAI does (400)."""
        inputs = self.input if isinstance(self.input, list) else [self.input]
        if inputs and isinstance(inputs[0], int):
            inputs = [inputs]
        for i, x in enumerate(inputs):
            if isinstance(x, str) and not x:
                param = "input" if isinstance(self.input, str) else f"input[{i}]"
                raise APIError(400, f"'{param}' is an empty string; there is nothing to embed",
                               param=param)
        return inputs


class ApiPyRequest(_Request):
    """The official ChatGLM-6B api.py request; null means "the official default"."""

    prompt: str
    history: list[tuple[str, str]] | None = None
    max_length: Annotated[LaxInt, Field(ge=1, le=MAX_TOKENS_CAP)] | None = None
    top_p: TopP | None = None
    temperature: Temperature | None = None


# -- responses --------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None  # UTF-8 bytes of the token's text


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


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
    logprobs: ChatLogprobs | None = None


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
    logprobs: CompletionLogprobs | None = None


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


class Health(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: str
    model: str
    running: int  # answers being generated now (at most ``parallel``)
    waiting: int
    queue_size: int
    parallel: int
    served: int
    replica: str | None = None  # with Ray Serve replicas: which one answered


class ApiPyResponse(BaseModel):
    response: str
    # [[query, response], ...] (tuples are described as old-style "items" arrays otherwise)
    history: list[Annotated[list[str], Field(min_length=2, max_length=2)]]
    status: int = 200
    time: str  # "%Y-%m-%d %H:%M:%S", like the official api.py


# -- errors -----------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """The body of every error answer, as the OpenAI API sends it."""

    error: ErrorDetail


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
        elif "[" in str(part) or part in ("str", "int", "float", "bool", "function-after",
                                          "function-before", "constrained-str", "constrained-int"):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
