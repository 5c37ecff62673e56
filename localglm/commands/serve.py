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
    s.add_argument("--parallel", type=int, default=None, metavar="N",
                   help="answers generated together in one continuous batch; each needs a "
                   "KV cache of the full context (default: as many as fit in half the free "
                   "memory, at most 4)")
    s.add_argument("--queue-size", type=int, default=16,
                   help="requests that may wait while --parallel are answered; more get "
                   "HTTP 429 (default: 16)")
    s.add_argument("--max-body", type=int, default=1 << 20, metavar="BYTES",
                   help="largest request body accepted (default: 1 MiB)")
    s.add_argument("--no-webui", action="store_true", help="serve the API only")
    r = p.add_argument_group("scale-out with Ray Serve (pip install \"localglm[ray]\")")
    r.add_argument("--ray-replicas", type=int, default=0, metavar="N",
                   help="serve N replicas of the app under Ray Serve, each with its own copy "
                   "of the model; Ray routes requests between them (default: off)")
    r.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join this Ray cluster ('auto' after 'ray start --head'); default: "
                   "start a Ray instance on this machine")
    r.add_argument("--ray-cpus", type=float, default=1, metavar="N",
                   help="CPUs Ray reserves for each replica; torch uses that many threads "
                   "(default: 1)")
    s.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"],
                   help="server log level (default: info)")


def _check_args(args: argparse.Namespace) -> None:
    if not 0 < args.port < 65536:
        raise LocalGLMError(f"--port must be in 1..65535, not {args.port}")
    if args.parallel is not None and args.parallel < 1:
        raise LocalGLMError("--parallel must be at least 1")
    if args.queue_size < 1:
        raise LocalGLMError("--queue-size must be at least 1")
    if args.max_body < 1024:
        raise LocalGLMError("--max-body must be at least 1024 bytes")
    if args.ray_replicas < 0:
        raise LocalGLMError("--ray-replicas must be at least 1 (or 0: no Ray)")


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
    if args.ray_replicas:
        return _serve_with_ray(args)
    model = load_from_args(args)
    if args.parallel is None:
        from ..batch import default_parallel

        args.parallel = default_parallel(model)
    worker = EngineWorker(model, queue_size=args.queue_size, parallel=args.parallel).start()
    try:
        app = create_app(worker, api_key=args.api_key, cors_origins=args.cors_origin,
                         max_body_bytes=args.max_body, webui=not args.no_webui)
        _banner(args, worker, app)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                    timeout_graceful_shutdown=5)
    finally:
        worker.close()
    return 0


def _serve_with_ray(args: argparse.Namespace) -> int:
    try:
        from ..server import ray as ray_serve
    except ImportError as e:
        raise LocalGLMError(f"--ray-replicas needs {e.name}: pip install \"localglm[ray]\"") \
            from None
    load_options = {"precision": args.precision, "device": args.device,
                    "compute_dtype": args.compute_dtype, "max_context": args.max_context,
                    "ptuning": args.ptuning, "adapter": args.adapter, "devices": args.devices}
    gpus = 1 if str(args.device).startswith("cuda") else 0
    # replicas on other machines find the model at the same absolute path
    model = os.path.abspath(args.model) if os.path.exists(args.model) else args.model
    print(f"localglm: {args.ray_replicas} replica(s) of {args.model} under Ray Serve, "
          f"http://{args.host}:{args.port} (each replica loads its own copy of the model)",
          file=sys.stderr, flush=True)
    try:
        ray_serve.run(model, args.ray_replicas, args.host, args.port, args.ray_address,
                      load_options=load_options,
                      worker_options={"parallel": args.parallel, "queue_size": args.queue_size},
                      app_options={"api_key": args.api_key, "cors_origins": args.cors_origin,
                                   "max_body_bytes": args.max_body,
                                   "webui": not args.no_webui},
                      cpus=args.ray_cpus, gpus=gpus)
    except ImportError as e:
        raise LocalGLMError(f"--ray-replicas needs {e.name}: pip install \"localglm[ray]\"") \
            from None
    return 0


def _banner(args: argparse.Namespace, worker, app) -> None:
    host = f"[{args.host}]" if ":" in args.host else args.host
    base = f"http://{host}:{args.port}"
    lines = [
        f"localglm: {worker.model.describe()}",
        f"  model '{worker.model_name}', context {worker.max_context} tokens, "
        f"{args.parallel} answer(s) at once, queue {args.queue_size}",
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
