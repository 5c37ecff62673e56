"""Scale-out with Ray Serve: N replicas of the same app, each with its own copy of the model.

Every replica loads the model, runs its own ``EngineWorker`` (continuous batching inside the
replica) and serves the app of ``create_app``; Ray's proxy routes each request to a replica
(it prefers the less busy of two) and passes streamed responses through. Each response
carries ``X-LocalGLM-Replica`` and ``GET /health`` reports ``replica``, so one can see who
answered. Needs the ``ray`` extra (``pip install "localglm[ray]"``).

    localglm serve MODEL --ray-replicas 2                       # a local Ray instance
    ray start --head; localglm serve MODEL --ray-replicas 4 --ray-address auto

or from Python::

    from ray import serve
    from localglm.server.ray import deployment
    serve.run(deployment("path/to/model", replicas=2).bind(), route_prefix="/")
"""

from __future__ import annotations

import os

REPLICA_HEADER = b"x-localglm-replica"


def replica_app(model: str, load_options: dict, worker_options: dict, app_options: dict,
                threads: int | None = None):
    """The ASGI app one replica serves: load the model, start a worker, build the app."""
    import torch
    from ray import serve

    from ..loader import load
    from .app import create_app
    from .engine import EngineWorker

    if threads:
        torch.set_num_threads(threads)
    try:
        replica = serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a replica (tests building the app directly)
        replica = f"pid{os.getpid()}"
    llm = load(model, **load_options)
    if worker_options.get("parallel") is None:
        from ..batch import default_parallel

        worker_options = {**worker_options, "parallel": default_parallel(llm)}
    worker = EngineWorker(llm, replica=replica, **worker_options).start()
    return with_header(create_app(worker, **app_options), REPLICA_HEADER, replica.encode())


def with_header(app, name: bytes, value: bytes):
    """``app`` with one more header on every HTTP response (streamed ones too)."""
    async def asgi(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (name, value)]}
            await send(message)

        return await app(scope, receive, send_with_header)
    return asgi


def deployment(model: str, replicas: int = 2, load_options: dict | None = None,
               worker_options: dict | None = None, app_options: dict | None = None,
               cpus: float = 1, gpus: float = 0, name: str = "localglm"):
    """A Ray Serve deployment of ``replicas`` copies of the localglm app (call ``.bind()``).

    cpus/gpus: Ray resources of each replica (torch uses that many threads per replica).
    Ray sends a replica at most ``parallel + queue_size`` requests; more wait in Ray's proxy.
    """
    from ray import serve

    load_options = dict(load_options or {})
    worker_options = dict(worker_options or {})
    app_options = dict(app_options or {})
    threads = max(1, int(cpus))
    in_flight = (worker_options.get("parallel") or 4) + worker_options.get("queue_size", 16)

    def build():
        return replica_app(model, load_options, worker_options, app_options, threads)

    return serve.deployment(
        serve.ingress(build)(), name=name, num_replicas=replicas,
        max_ongoing_requests=in_flight,
        ray_actor_options={"num_cpus": cpus, "num_gpus": gpus})


def run(model: str, replicas: int, host: str, port: int, address: str | None = None,
        blocking: bool = True, **options):
    """Start (or join, with ``address``) a Ray cluster and serve the app on host:port."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=address, namespace="localglm")
    serve.start(http_options={"host": host, "port": port})
    app = deployment(model, replicas, **options).bind()
    serve.run(app, name="localglm", route_prefix="/", blocking=blocking)
