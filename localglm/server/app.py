"""The HTTP application: OpenAI-compatible API, the official api.py protocol and the web UI.

``create_app`` builds a FastAPI app around an ``EngineWorker``; all state lives in the app
it returns. Every route that generates goes through the worker's queue, so API and web UI
users are served one at a time, in arrival order.
"""

import asyncio
import base64
import datetime
import hmac
import json
import logging
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat import response_streamer
from ..errors import ContextTooLongError, LocalGLMError
from . import protocol as p
from .engine import (
    EngineWorker,
    Job,
    QueueFullError,
    WorkerClosedError,
    chat_config,
    sampling_config,
)

log = logging.getLogger("localglm.server")

DEFAULT_MAX_BODY = 1 << 20  # 1 MiB: far more text than the 2048-token context holds
APIPY_DEFAULTS = {"max_length": 2048, "top_p": 0.7, "temperature": 0.95}  # official api.py
COMPLETION_DEFAULTS = {"temperature": 1.0, "top_p": 1.0}  # OpenAI's
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
WEBUI_PATH = "/chat"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DROPPED_HEADER = "X-LocalGLM-Dropped-Rounds"  # old rounds left out to fit the context


@dataclass
class Settings:
    worker: EngineWorker
    api_key: str | None
    max_body_bytes: int


def create_app(worker: EngineWorker, api_key: str | None = None,
               cors_origins: list[str] | None = None, max_body_bytes: int = DEFAULT_MAX_BODY,
               webui: bool = True) -> FastAPI:
    """The server's FastAPI app, serving ``worker`` (which the caller starts and closes).

    api_key: require ``Authorization: Bearer KEY`` on every API route (and the key as the
    web UI's password). cors_origins: origins allowed to call the API from a browser page
    (none by default). webui: mount the gradio chat at /chat when gradio is installed;
    ``app.state.webui`` tells whether it was, ``app.state.webui_error`` why not.
    """
    from .. import __version__

    settings = Settings(worker, api_key or None, max_body_bytes)
    app = FastAPI(title="localglm", version=__version__,
                  description="ChatGLM-6B: OpenAI-compatible API and the official api.py "
                  "protocol", docs_url=None, redoc_url=None)
    _add_error_handlers(app)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins),
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"])
    auth = [Depends(_auth_dependency(settings))]
    _add_info_routes(app, settings, auth)
    _add_chat_routes(app, settings, auth)
    _add_completion_route(app, settings, auth)
    _add_embedding_route(app, settings, auth)
    _add_apipy_route(app, settings, auth)
    app.state.webui, app.state.webui_error = False, None
    if webui:
        try:
            from .webui import mount_webui
        except ImportError as e:  # gradio is an optional extra: serve the API without it
            app.state.webui_error = f"the web UI needs gradio ({e})"
        else:
            mount_webui(app, worker, path=WEBUI_PATH, api_key=settings.api_key)
            app.state.webui = True
    _add_root_route(app)
    return app


# -- plumbing -----------------------------------------------------------------------------------
def _error_response(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: p.APIError):
        return _error_response(exc.status, exc.body(), exc.headers)

    async def validation_error(request: Request, exc):
        # The official api.py answered bad requests with FastAPI's 422; the OpenAI API uses 400.
        status = 422 if request.url.path == "/" else 400
        errors = exc.errors() if hasattr(exc, "errors") else []
        return _error_response(status, p.validation_error_body(errors))

    async def engine_error(request: Request, exc: LocalGLMError):
        if isinstance(exc, QueueFullError):
            return _error_response(429, p.error_body(str(exc), "server_busy", None,
                                                     "queue_full"), {"Retry-After": "1"})
        if isinstance(exc, WorkerClosedError):
            return _error_response(503, p.error_body(str(exc), "server_error", None,
                                                     "shutting_down"))
        code = "context_length_exceeded" if isinstance(exc, ContextTooLongError) else None
        return _error_response(400, p.error_body(str(exc), code=code))

    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(exc.status_code, p.error_body(str(exc.detail), kind),
                               getattr(exc, "headers", None))

    async def internal_error(request: Request, exc: Exception):
        log.exception("unexpected error in %s", request.url.path, exc_info=exc)
        return _error_response(500, p.error_body("internal server error", "server_error"))

    app.add_exception_handler(p.APIError, api_error)
    app.add_exception_handler(ValidationError, validation_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(LocalGLMError, engine_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)


def _auth_dependency(settings: Settings):
    async def require_key(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), settings.api_key.encode()):
            raise p.APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                             code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return require_key


def _json_body(model: type[BaseModel], settings: Settings):
    """``Annotated[model, Depends(...)]`` reading the body ourselves: size limit, strict
    UTF-8, then the model's strict validation."""
    async def parse(request: Request):
        raw = await _read_body(request, settings.max_body_bytes)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise p.APIError(400, f"the request body is not valid UTF-8 (byte {e.start})",
                             code="invalid_encoding") from None
        if not text.strip():
            raise p.APIError(400, "the request body is empty; send a JSON object",
                             code="invalid_json")
        return model.model_validate_json(text)
    return Annotated[model, Depends(parse)]


async def _read_body(request: Request, limit: int) -> bytes:
    too_large = p.APIError(413, f"the request body is larger than {limit} bytes",
                           code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > 64 * limit:
        raise too_large  # not worth reading to the end; the connection is closed instead
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > 64 * limit:
            raise too_large
    # An oversized body is read to its end (and dropped) so that the client, still sending,
    # receives the 413 instead of a broken connection.
    if size > limit:
        raise too_large
    return b"".join(chunks)


async def _collect(job, request: Request, gather=None):
    """``await gather(job)`` (default: the job's last step); the job is cancelled if the
    client goes away meanwhile."""
    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancel()

    watcher = asyncio.create_task(watch())
    try:
        last = await (gather or Job.result)(job)
    finally:
        watcher.cancel()
        job.cancel()
    if last is None:
        raise p.APIError(503, "the request was cancelled", "server_error", code="cancelled")
    return last


def _sse(data: BaseModel | dict | str) -> str:
    if isinstance(data, BaseModel):
        data = data.model_dump_json(exclude_none=False)
    elif isinstance(data, dict):
        data = json.dumps(data, ensure_ascii=False)
    return f"data: {data}\n\n"


def _stream_error(exc: Exception) -> dict:
    if isinstance(exc, LocalGLMError):
        return p.error_body(str(exc), "server_error")
    log.error("generation failed", exc_info=exc)
    return p.error_body("internal server error", "server_error")


def _check_max_tokens(max_tokens: int | None, worker: EngineWorker) -> None:
    if max_tokens is not None and max_tokens >= worker.max_context:
        raise p.APIError(400, f"max_tokens is {max_tokens}, but this model's context holds "
                         f"{worker.max_context} tokens (prompt included)", param="max_tokens",
                         code="context_length_exceeded")


def _usage(stats) -> p.Usage:
    prompt, completion = (stats.prompt_tokens, stats.generation_tokens) if stats else (0, 0)
    return p.Usage(prompt_tokens=prompt, completion_tokens=completion,
                   total_tokens=prompt + completion)


# -- routes -------------------------------------------------------------------------------------
def _add_info_routes(app: FastAPI, settings: Settings, auth) -> None:
    worker = settings.worker

    @app.get("/health", tags=["info"])
    async def health():
        """Liveness and queue state (no API key needed: it reveals no conversation)."""
        return {"status": "ok", "model": worker.model_name, **worker.status()}

    def card() -> p.ModelCard:
        return p.ModelCard(id=worker.model_name, created=worker.created)

    @app.get("/v1/models", dependencies=auth, tags=["openai"])
    async def models() -> p.ModelList:
        return p.ModelList(data=[card()])

    @app.get("/v1/models/{model_id:path}", dependencies=auth, tags=["openai"])
    async def model(model_id: str) -> p.ModelCard:
        if model_id != worker.model_name:
            raise p.APIError(404, f"the model '{model_id}' does not exist; this server has "
                             f"'{worker.model_name}'", param="model", code="model_not_found")
        return card()


def _add_chat_routes(app: FastAPI, settings: Settings, auth) -> None:
    worker = settings.worker

    @app.post("/v1/chat/completions", dependencies=auth, tags=["openai"])
    async def chat_completions(
            request: Request,
            body: _json_body(p.ChatCompletionRequest, settings)):
        """OpenAI chat completions, streamed as server-sent events with ``stream: true``."""
        query, history = body.to_chat()
        max_tokens = body.max_new_tokens()
        _check_max_tokens(max_tokens, worker)
        gen = chat_config(max_tokens, body.temperature, body.top_p, max_length=worker.max_context,
                          stop=body.stop_list(), seed=body.seed, top_k=body.top_k,
                          repetition_penalty=body.repetition_penalty)
        fitted = await run_in_threadpool(worker.check_chat, query, history, gen)
        # Old rounds left out to fit the context are reported in a header.
        dropped = {DROPPED_HEADER: str(fitted.dropped)}
        job = worker.chat(query, history, gen)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_chat_events(job, worker.model_name, usage),
                                     media_type="text/event-stream",
                                     headers={**SSE_HEADERS, **dropped})
        step = await _collect(job, request)
        reply = p.ChatCompletion(
            id=p.new_id("chatcmpl"), created=p.now(), model=worker.model_name,
            choices=[p.ChatChoice(message=p.ChatResponseMessage(content=step.response),
                                  finish_reason=step.finish_reason)],
            usage=_usage(step.stats))
        return JSONResponse(reply.model_dump(), headers=dropped)


async def _chat_events(job, model_name: str, include_usage: bool) -> AsyncIterator[str]:
    cid, created = p.new_id("chatcmpl"), p.now()

    def chunk(delta: p.ChatDelta, finish: str | None = None) -> str:
        return _sse(p.ChatCompletionChunk(id=cid, created=created, model=model_name, choices=[
            p.ChatChunkChoice(delta=delta, finish_reason=finish)]))

    text, last = response_streamer(), None
    try:
        yield chunk(p.ChatDelta(role="assistant", content=""))
        async for last in job:
            piece = text.push(last.response, final=last.finish_reason is not None)
            if piece:
                yield chunk(p.ChatDelta(content=piece))
    except Exception as e:  # the status line has gone out: the error becomes an event
        yield _sse(_stream_error(e))
        return
    finally:
        job.cancel()  # the client went away (or we are done): free the worker
    if last is None:
        return
    yield chunk(p.ChatDelta(), last.finish_reason or "stop")
    if include_usage:
        yield _sse(p.ChatCompletionChunk(id=cid, created=created, model=model_name, choices=[],
                                         usage=_usage(last.stats)))
    yield "data: [DONE]\n\n"


def _prompt_ids(worker: EngineWorker, prompt, param: str = "prompt") -> tuple[list[int], str]:
    """(token ids, text) of one prompt given as text, token ids, or a list of one of them."""
    tokenizer, vocab = worker.model.tokenizer, worker.model.config.vocab_size
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise p.APIError(400, "this server takes one prompt per request", param=param)
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer.encode(prompt), prompt
    if not prompt or any(not 0 <= t < vocab for t in prompt):
        raise p.APIError(400, f"token ids must be a non-empty list of ids in [0, {vocab})",
                         param=param)
    return list(prompt), tokenizer.decode(prompt)


def _add_completion_route(app: FastAPI, settings: Settings, auth) -> None:
    worker = settings.worker

    @app.post("/v1/completions", dependencies=auth, tags=["openai"])
    async def completions(
            request: Request,
            body: _json_body(p.CompletionRequest, settings)):
        """Raw text completion: the prompt is encoded as is (ending in [gMASK] <sop>)."""
        ids, text = await run_in_threadpool(_prompt_ids, worker, body.prompt)
        _check_max_tokens(body.max_tokens, worker)
        room = worker.max_context - len(ids)
        max_tokens = body.max_tokens or min(COMPLETION_MAX_TOKENS, room)
        if room < 1 or max_tokens > room:
            raise ContextTooLongError(
                f"the prompt has {len(ids)} tokens; with max_tokens={max_tokens} it does not "
                f"fit this model's context of {worker.max_context} tokens")
        gen = sampling_config(COMPLETION_DEFAULTS, max_tokens, body.temperature, body.top_p,
                              stop=body.stop_list(), seed=body.seed, top_k=body.top_k,
                              repetition_penalty=body.repetition_penalty)
        job = worker.complete(ids, gen)
        echo = text if body.echo else ""
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_completion_events(job, worker.model_name, echo, usage),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        steps = []

        async def gather(job):  # every delta, not only the last step
            async for step in job:
                steps.append(step)
            return steps[-1] if steps else None

        last = await _collect(job, request, gather)
        return p.Completion(
            id=p.new_id("cmpl"), created=p.now(), model=worker.model_name,
            choices=[p.CompletionChoice(text=echo + "".join(s.text for s in steps),
                                        finish_reason=last.finish_reason)],
            usage=_usage(last))


def _add_embedding_route(app: FastAPI, settings: Settings, auth) -> None:
    worker = settings.worker

    @app.post("/v1/embeddings", dependencies=auth, tags=["openai"])
    async def embeddings(
            request: Request,
            body: _json_body(p.EmbeddingRequest, settings)):
        """Normalised mean of the final hidden states of each input."""
        inputs = body.input if isinstance(body.input, list) else [body.input]
        if inputs and isinstance(inputs[0], int):
            inputs = [inputs]
        batch = [await run_in_threadpool(_prompt_ids, worker, [x], "input") for x in inputs]
        for i, (ids, _) in enumerate(batch):
            if len(ids) > worker.max_context:
                raise ContextTooLongError(f"input[{i}] has {len(ids)} tokens; this model's "
                                          f"context holds {worker.max_context}")
        hidden = worker.model.config.hidden_size
        if body.dimensions is not None and body.dimensions != hidden:
            raise p.APIError(400, f"this model's embeddings have {hidden} dimensions",
                             param="dimensions")
        job = worker.embed([ids for ids, _ in batch])
        vectors = []

        async def gather(job):
            async for v in job:
                vectors.append(v)
            return vectors if len(vectors) == len(batch) else None

        await _collect(job, request, gather)
        data = [p.Embedding(index=i, embedding=_encode_vector(v, body.encoding_format))
                for i, v in enumerate(vectors)]
        n = sum(len(ids) for ids, _ in batch)
        return p.EmbeddingList(data=data, model=worker.model_name,
                               usage=p.Usage(prompt_tokens=n, total_tokens=n))


def _encode_vector(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":  # what the openai client asks for by default
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


async def _completion_events(job, model_name: str, echo: str,
                             include_usage: bool) -> AsyncIterator[str]:
    cid, created = p.new_id("cmpl"), p.now()

    def chunk(text: str, finish: str | None = None) -> str:
        return _sse(p.Completion(id=cid, created=created, model=model_name, choices=[
            p.CompletionChoice(text=text, finish_reason=finish)]))

    last = None
    try:
        if echo:
            yield chunk(echo)
        async for last in job:
            if last.text or last.finish_reason:
                yield chunk(last.text, last.finish_reason)
    except Exception as e:  # the status line has gone out: the error becomes an event
        yield _sse(_stream_error(e))
        return
    finally:
        job.cancel()
    if last is None:
        return
    if include_usage:
        yield _sse(p.Completion(id=cid, created=created, model=model_name, choices=[],
                                usage=_usage(last)))
    yield "data: [DONE]\n\n"


def _add_apipy_route(app: FastAPI, settings: Settings, auth) -> None:
    worker = settings.worker

    @app.post("/", dependencies=auth, tags=["api.py"])
    async def api_py(request: Request,
                     body: _json_body(p.ApiPyRequest, settings)):
        """The official ChatGLM-6B api.py protocol (temperature 0 means greedy here)."""
        d = APIPY_DEFAULTS
        # The official server treats 0 and null alike ("or default"), except that we honour
        # an explicit temperature 0 as greedy, the one reading that is reproducible.
        gen = chat_config(None, d["temperature"] if body.temperature is None else
                          body.temperature, body.top_p or d["top_p"],
                          max_length=body.max_length or d["max_length"])
        history = [tuple(h) for h in body.history or []]
        fitted = await run_in_threadpool(worker.check_chat, body.prompt, history, gen)
        step = await _collect(worker.chat(body.prompt, history, gen), request)
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        reply = p.ApiPyResponse(response=step.response, history=step.history, time=stamp)
        return JSONResponse(reply.model_dump(), headers={DROPPED_HEADER: str(fitted.dropped)})


def _add_root_route(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def root():
        if app.state.webui:
            return RedirectResponse(WEBUI_PATH + "/", status_code=307)
        return {"message": "localglm server", "endpoints": [
            "POST / (api.py)", "GET /v1/models", "POST /v1/chat/completions",
            "POST /v1/completions", "POST /v1/embeddings", "GET /health"],
            "webui": app.state.webui_error}
