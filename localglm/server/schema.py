"""The OpenAPI description of the server: request bodies and response shapes.

Request bodies are read by the app itself (size limit, strict UTF-8, strict validation), so
FastAPI cannot see them; ``declare_request_bodies`` puts their pydantic models into the
served ``/openapi.json``. ``responses`` lists what a route answers, errors included.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from . import protocol as p

_ERRORS = {
    400: "invalid request (a wrong field, a prompt that does not fit the context, an "
         "unsupported option)",
    401: "missing or wrong API key (only with --api-key)",
    413: "request body larger than --max-body",
    429: "the queue is full; retry shortly",
    503: "the server is shutting down, or the request was cancelled",
}
_REF = "#/components/schemas/{model}"


def responses(model: type[BaseModel] | None = None, chunk: type[BaseModel] | None = None,
              errors: tuple[int, ...] = tuple(_ERRORS)) -> dict:
    """The ``responses=`` of a route: ``model`` on 200 (plus server-sent events whose data
    are ``chunk``s with ``"stream": true``), and the OpenAI-style error body on each status
    in ``errors``."""
    out: dict = {}
    if model is not None:
        out[200] = {"model": model, "description": "the answer"}
        if chunk is not None:
            out[200]["description"] += ("; with \"stream\": true, server-sent events of "
                                        f"{chunk.__name__} ending with 'data: [DONE]' (an "
                                        "error after the start is an ErrorResponse event)")
            # One event (OpenAPI 3.1 has `schema` describe each event of a stream).
            data = {"type": "string", "contentMediaType": "application/json",
                    "contentSchema": {"anyOf": [{"$ref": _REF.format(model=chunk.__name__)},
                                                {"$ref": _REF.format(model="ErrorResponse")}]}}
            event = {"type": "object", "required": ["data"], "properties": {
                "data": {"anyOf": [{"type": "string", "enum": ["[DONE]"]}, data]}}}
            out[200]["content"] = {"text/event-stream": {"schema": event}}
    for status in errors:
        out[status] = {"model": p.ErrorResponse,
                       "description": _ERRORS.get(status, "validation error (api.py)")}
    return out


def declare_request_bodies(app: FastAPI, bodies: dict[str, type[BaseModel]],
                           chunks: tuple[type[BaseModel], ...] = ()) -> None:
    """Describe the JSON body of each ``POST path`` with its model in ``app.openapi()``,
    and add the streamed ``chunks`` models (see ``responses``) to its components."""
    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version,
                             description=app.description, routes=app.routes)
        names, defs = models_json_schema(
            [(m, "validation") for m in bodies.values()]
            + [(m, "serialization") for m in (*chunks, p.ErrorResponse)], ref_template=_REF)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, definition in defs.get("$defs", {}).items():
            components.setdefault(name, definition)
        for path, model in bodies.items():
            operation = schema["paths"][path]["post"]
            operation["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": names[(model, "validation")]}}}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
