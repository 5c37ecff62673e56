"""`localglm serve`: the OpenAI-compatible API, the official api.py protocol and a web chat."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import LocalGLMError
from .common import add_model_arguments, load_from_args

INSTALL_HINT = 'pip install "localglm[serve]"'


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this computer only; "
                   "0.0.0.0 exposes the model to your network)")
    s.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    s.add_argument("--api-key", default=os.environ.get("LOCALGLM_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every API route; also the web "
                   "chat's password, any user name (default: $LOCALGLM_API_KEY, else no key)")
    s.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN call the API and the web chat "
                   "(repeatable; '*' for any). Default: none, localhost included")
    s.add_argument("--queue-size", type=int, default=16,
                   help="requests that may wait while one is answered; more get HTTP 429 "
                   "(default: 16)")
    s.add_argument("--max-body", type=int, default=1 << 20, metavar="BYTES",
                   help="largest request body accepted (default: 1 MiB)")
    s.add_argument("--no-webui", action="store_true", help="serve the API only")
    s.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"],
                   help="server log level (default: info)")


def _check_args(args: argparse.Namespace) -> None:
    if not 0 < args.port < 65536:
        raise LocalGLMError(f"--port must be in 1..65535, not {args.port}")
    if args.queue_size < 1:
        raise LocalGLMError("--queue-size must be at least 1")
    if args.max_body < 1024:
        raise LocalGLMError("--max-body must be at least 1024 bytes")


def main(args: argparse.Namespace) -> int:
    _check_args(args)
    try:
        import uvicorn

        from ..server import EngineWorker
        from ..server.app import create_app
    except ImportError as e:
        raise LocalGLMError(f"serving needs {e.name or 'fastapi and uvicorn'}: "
                            f"{INSTALL_HINT}") from None
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: anyone who can reach this computer can use "
              "the model" + ("" if args.api_key else "; consider --api-key"), file=sys.stderr)
    model = load_from_args(args)
    worker = EngineWorker(model, queue_size=args.queue_size).start()
    try:
        app = create_app(worker, api_key=args.api_key, cors_origins=args.cors_origin,
                         max_body_bytes=args.max_body, webui=not args.no_webui)
        _banner(args, worker, app)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                    timeout_graceful_shutdown=5)
    finally:
        worker.close()
    return 0


def _banner(args: argparse.Namespace, worker, app) -> None:
    host = f"[{args.host}]" if ":" in args.host else args.host
    base = f"http://{host}:{args.port}"
    lines = [
        f"localglm: {worker.model.describe()}",
        f"  model '{worker.model_name}', context {worker.max_context} tokens, "
        f"queue {args.queue_size}",
        f"  OpenAI API   {base}/v1   (model '{worker.model_name}')",
        f"  api.py       POST {base}/",
    ]
    if app.state.webui:
        lines.append(f"  web chat     {base}/chat/")
    elif args.no_webui:
        lines.append("  web chat     off (--no-webui)")
    else:
        lines.append(f"  web chat     unavailable: {app.state.webui_error}; {INSTALL_HINT}")
    if args.api_key:
        lines.append("  API key      required (Authorization: Bearer KEY)")
    if args.cors_origin:
        lines.append(f"  CORS         {', '.join(args.cors_origin)}")
    print("\n".join(lines), file=sys.stderr, flush=True)
