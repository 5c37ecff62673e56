"""The HTTP application: OpenAI-compatible API, the official api.py protocol and the web UI.

``create_app`` builds a FastAPI app around an ``EngineWorker``; all state lives in the app
it returns. Every route that generates goes through the worker's queue, so API and web UI
users are served in arrival order (up to the worker's ``parallel`` at once).
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
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import chat as chatfmt
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
from .logprobs import TokenNames, chat_logprobs, completion_logprobs
from .schema import declare_request_bodies, responses

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
                  "protocol", docs_url="/docs", redoc_url=None)
    _add_error_handlers(app)
    # Always present, so that it is the one CORS policy: it grants only cors_origins (any
    # request header, e.g. the OpenAI SDKs' x-stainless-*), and the web chat's gradio app
    # stands its own CORS handling down when its parent app has this middleware.
    app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins or []),
                       allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"],
                       max_age=600)
    auth = [Depends(_auth_dependency(settings))]
    _add_info_routes(app, settings, auth)
    _add_chat_routes(app, settings, auth)
    _add_completion_route(app, settings, auth)
    _add_embedding_route(app, settings, auth)
    _add_apipy_route(app, settings, auth)
    declare_request_bodies(app, {
        "/v1/chat/completions": p.ChatCompletionRequest, "/v1/completions": p.CompletionRequest,
        "/v1/embeddings": p.EmbeddingRequest, "/": p.ApiPyRequest},
        chunks=(p.ChatCompletionChunk, p.Completion))
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
        text = text.removeprefix("\ufeff")  # a byte order mark some editors and tools add
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


def _fit_chat(worker: EngineWorker, query: str, history, gen, field: str):
    """``worker.check_chat``, with the error in the request's own terms: ``field`` is the
    option that sets the answer's room ("max_tokens", or api.py's "max_length")."""
    try:
        return worker.check_chat(query, history, gen)
    except ContextTooLongError:
        n = len(worker.model.tokenizer.encode(chatfmt.build_prompt(query)))
        if field == "max_length":
            budget = min(worker.max_context, gen.max_length or worker.max_context)
            message = (f"the prompt is {n} tokens; it does not fit max_length={budget} "
                       f"(prompt + answer tokens, at most this model's context of "
                       f"{worker.max_context}); shorten it or raise max_length")
            raise p.APIError(400, message, param="prompt",
                             code="context_length_exceeded") from None
        room = (f"max_tokens={gen.max_new_tokens} for the answer" if gen.max_new_tokens
                else "room for an answer")
        raise p.APIError(400, f"the last message is {n} tokens; with {room} it does not fit "
                         f"this model's context of {worker.max_context} tokens; shorten it "
                         "or lower max_tokens", param="messages",
                         code="context_length_exceeded") from None


def _usage(stats) -> p.Usage:
    prompt, completion = (stats.prompt_tokens, stats.generation_tokens) if stats else (0, 0)
    return p.Usage(prompt_tokens=prompt, completion_tokens=completion,
                   total_tokens=prompt + completion)


# -- routes -------------------------------------------------------------------------------------
def _add_info_routes(app: FastAPI, settings: Settings, auth) -> None:
    worker = settings.worker

    @app.get("/health", tags=["info"], response_model=None,
             responses={200: {"model": p.Health, "description": "queue state"}})
    async def health():
        """Liveness and queue state (no API key needed: it reveals no conversation)."""
        return {"status": "ok", "model": worker.model_name, **worker.status()}

    def card() -> p.ModelCard:
        return p.ModelCard(id=worker.model_name, created=worker.created)

    @app.get("/v1/models", dependencies=auth, tags=["openai"], responses=responses(errors=(401,)))
    async def models() -> p.ModelList:
        return p.ModelList(data=[card()])

    @app.get("/v1/models/{model_id:path}", dependencies=auth, tags=["openai"],
             responses=responses(errors=(401, 404)))
    async def model(model_id: str) -> p.ModelCard:
        if model_id != worker.model_name:
            raise p.APIError(404, f"the model '{model_id}' does not exist; this server has "
                             f"'{worker.model_name}'", param="model", code="model_not_found")
        return card()


def _add_chat_routes(app: FastAPI, settings: Settings, auth) -> None:
    worker = settings.worker

    @app.post("/v1/chat/completions", dependencies=auth, tags=["openai"], response_model=None,
              responses=responses(p.ChatCompletion, p.ChatCompletionChunk))
    async def chat_completions(
            request: Request,
            body: _json_body(p.ChatCompletionRequest, settings)):
        """OpenAI chat completions, streamed as server-sent events with ``stream: true``."""
        body.check_supported()
        query, history = body.to_chat()
        max_tokens = body.max_new_tokens()
        _check_max_tokens(max_tokens, worker)
        gen = chat_config(max_tokens, body.temperature, body.top_p, max_length=worker.max_context,
                          stop=body.stop_list(), seed=body.seed, top_k=body.top_k,
                          repetition_penalty=body.repetition_penalty,
                          logprobs=body.logprobs_count(), json_object=body.json_mode())
        fitted = await run_in_threadpool(_fit_chat, worker, query, history, gen, "max_tokens")
        # Old rounds left out to fit the context are reported in a header.
        dropped = {DROPPED_HEADER: str(fitted.dropped)}
        job = worker.chat(query, history, gen, fitted)
        names = TokenNames(worker.model.tokenizer) if gen.logprobs is not None else None
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_chat_events(job, worker.model_name, usage, names),
                                     media_type="text/event-stream",
                                     headers={**SSE_HEADERS, **dropped})
        entries = []

        async def gather(job):  # the last step, and every step's logprobs
            last = None
            async for last in job:
                entries.extend((last.stats.logprobs if last.stats else None) or [])
            return last

        step = await _collect(job, request, gather)
        reply = p.ChatCompletion(
            id=p.new_id("chatcmpl"), created=p.now(), model=worker.model_name,
            choices=[p.ChatChoice(message=p.ChatResponseMessage(content=step.response),
                                  finish_reason=step.finish_reason,
                                  logprobs=chat_logprobs(entries, names) if names else None)],
            usage=_usage(step.stats))
        return JSONResponse(reply.model_dump(), headers=dropped)


async def _chat_events(job, model_name: str, include_usage: bool,
                       names: TokenNames | None) -> AsyncIterator[str]:
    cid, created = p.new_id("chatcmpl"), p.now()
    pending = []  # logprobs of tokens whose text has not been sent yet

    def chunk(delta: p.ChatDelta, finish: str | None = None) -> str:
        logprobs = None
        if names is not None and (pending or finish):
            logprobs = chat_logprobs(pending, names)
            pending.clear()
        return _sse(p.ChatCompletionChunk(id=cid, created=created, model=model_name, choices=[
            p.ChatChunkChoice(delta=delta, finish_reason=finish, logprobs=logprobs)]))

    text, last = chatfmt.response_streamer(), None
    try:
        yield chunk(p.ChatDelta(role="assistant", content=""))
        async for last in job:
            pending.extend((last.stats.logprobs if last.stats else None) or [])
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
    # The tokenizer's size, not the embedding's: the real checkpoint's embedding has rows
    # (130344..130527) that no piece decodes to.
    tokenizer = worker.model.tokenizer
    vocab = tokenizer.vocab_size
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise p.APIError(400, "this server takes one prompt per request", param=param)
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer.encode(prompt), prompt
    if not prompt or any(not 0 <= t < vocab for t in prompt):
        raise p.APIError(400, f"token ids must be a non-empty list of ids in [0, {vocab}) "
                         "(the tokenizer's vocabulary)", param=param)
    return list(prompt), tokenizer.decode(prompt)


def _add_completion_route(app: FastAPI, settings: Settings, auth) -> None:
    worker = settings.worker

    @app.post("/v1/completions", dependencies=auth, tags=["openai"], response_model=None,
              responses=responses(p.Completion, p.Completion))
    async def completions(
            request: Request,
            body: _json_body(p.CompletionRequest, settings)):
        """Raw text completion: the prompt is encoded as is (ending in [gMASK] <sop>)."""
        body.check_supported()
        if body.echo and body.logprobs is not None:
            raise p.APIError(400, "'echo' together with 'logprobs' is not supported (the "
                             "prompt's tokens are not scored)", param="logprobs",
                             code="unsupported_parameter")
        ids, text = await run_in_threadpool(_prompt_ids, worker, body.prompt)
        _check_max_tokens(body.max_tokens, worker)
        room = worker.max_context - len(ids)
        max_tokens = body.max_tokens or min(COMPLETION_MAX_TOKENS, room)
        if room < 1 or max_tokens > room:
            raise p.APIError(400,
                f"the prompt has {len(ids)} tokens; with max_tokens={max_tokens} it does not "
                f"fit this model's context of {worker.max_context} tokens", param="prompt",
                code="context_length_exceeded")
        gen = sampling_config(COMPLETION_DEFAULTS, max_tokens, body.temperature, body.top_p,
                              stop=body.stop_list(), seed=body.seed, top_k=body.top_k,
                              repetition_penalty=body.repetition_penalty,
                              logprobs=body.logprobs)
        job = worker.complete(ids, gen)
        echo = text if body.echo else ""
        names = TokenNames(worker.model.tokenizer) if body.logprobs is not None else None
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _completion_events(job, worker.model_name, echo, usage, names),
                media_type="text/event-stream", headers=SSE_HEADERS)
        steps = []

        async def gather(job):  # every delta, not only the last step
            async for step in job:
                steps.append(step)
            return steps[-1] if steps else None

        last = await _collect(job, request, gather)
        logprobs = None
        if names is not None:
            logprobs = completion_logprobs([e for s in steps for e in s.logprobs or []], names)
        return p.Completion(
            id=p.new_id("cmpl"), created=p.now(), model=worker.model_name,
            choices=[p.CompletionChoice(text=echo + "".join(s.text for s in steps),
                                        finish_reason=last.finish_reason, logprobs=logprobs)],
            usage=_usage(last))


def _add_embedding_route(app: FastAPI, settings: Settings, auth) -> None:
    worker = settings.worker

    @app.post("/v1/embeddings", dependencies=auth, tags=["openai"], response_model=None,
              responses=responses(p.EmbeddingList))
    async def embeddings(
            request: Request,
            body: _json_body(p.EmbeddingRequest, settings)) -> p.EmbeddingList:
        """Normalised mean of the final hidden states of each input."""
        inputs = body.texts_or_ids()
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


async def _completion_events(job, model_name: str, echo: str, include_usage: bool,
                             names: TokenNames | None) -> AsyncIterator[str]:
    cid, created = p.new_id("cmpl"), p.now()
    offset = len(echo)

    def chunk(text: str, finish: str | None = None, entries=None) -> str:
        logprobs = None
        if names is not None and entries is not None:
            logprobs = completion_logprobs(entries, names, offset)
        return _sse(p.Completion(id=cid, created=created, model=model_name, choices=[
            p.CompletionChoice(text=text, finish_reason=finish, logprobs=logprobs)]))

    last = None
    try:
        if echo:
            yield chunk(echo)
        async for last in job:
            if last.text or last.finish_reason or last.logprobs:
                yield chunk(last.text, last.finish_reason, last.logprobs or [])
                offset += len(last.text)
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

    @app.post("/", dependencies=auth, tags=["api.py"], response_model=None,
              responses=responses(p.ApiPyResponse, errors=(400, 401, 413, 422, 429, 503)))
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
        fitted = await run_in_threadpool(_fit_chat, worker, body.prompt, history, gen,
                                         "max_length")
        step = await _collect(worker.chat(body.prompt, history, gen, fitted), request)
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
            "POST /v1/completions", "POST /v1/embeddings", "GET /health", "GET /docs"],
            "webui": app.state.webui_error}
