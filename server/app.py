"""The serving process: one gRPC port with every service, /metrics, lifecycle.

Start-up: bind, answer health NOT_SERVING, load and warm every model, then
SERVING per model name (and overall "" once loading is done and a model is
ready). SIGTERM/SIGINT: health NOT_SERVING for all, new calls UNAVAILABLE
(answered by the interceptor while the port stays open, so balancers and
clients see a status they retry elsewhere, not a cancelled call), open
streams stop reading and end with UNAVAILABLE, queued and in-flight calls
finish; then, once refused callers have been pushed back past it
(`server.drain`), the port closes. All within the grace period; exit 0.

Services are added by the registrars in `SERVICES`, each
``register(server, ctx) -> full service name`` (for reflection).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import disable_created_metrics

from server import reflection_pool, tls
from server.auth import AuthInterceptor, load_tokens
from server.config import Settings
from server.context import ServingContext
from server.interceptors import Calls, ErrorInterceptor
from server.metrics import Metrics
from server.models import Model, ModelRegistry
from server.preprocess import Preprocessor
from server.protocols import v1
from server.protocols.v2 import servicer as v2

log = logging.getLogger(__name__)

Registrar = Callable[[grpc.aio.Server, ServingContext], str]

SERVICES: tuple[Registrar, ...] = (v1.add_to_server, v2.add_to_server)

OVERALL = ""
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class StartupError(Exception):
    """The server cannot start; the message says why, in one line."""


def host_port(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def _failed(task: asyncio.Future[None]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is not None


class App:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def run(self) -> int:
        settings = self.settings
        disable_created_metrics()  # no *_created series beside every counter and histogram
        metrics = Metrics()
        registry = ModelRegistry(settings, metrics)
        try:
            registry.scan()
        except OSError as exc:
            raise StartupError(f"cannot read the model repository: {exc}") from exc
        try:
            tokens = load_tokens(settings)
            credentials = tls.server_credentials(settings)
        except ValueError as exc:
            raise StartupError(str(exc)) from exc
        metrics_address = host_port(settings.metrics_host, settings.metrics_port)
        try:
            http = metrics.serve(settings.metrics_host, settings.metrics_port)
        except OSError as exc:
            raise StartupError(f"cannot bind the metrics port {metrics_address}: {exc}") from exc
        preprocessor = Preprocessor(settings)
        health = health_aio.HealthServicer()
        ctx = ServingContext(settings, registry, preprocessor, metrics, health)
        calls = Calls()
        server = grpc.aio.server(
            interceptors=[
                ErrorInterceptor(ctx.draining, calls),
                *([AuthInterceptor(tokens)] if tokens else []),
            ],
            options=[
                # A second server on a taken port fails to start instead of sharing it.
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
            ],
        )
        names = [register(server, ctx) for register in SERVICES]
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        names.append(HEALTH_SERVICE)
        if settings.reflection:
            reflected = [*names, reflection.SERVICE_NAME]
            pool = reflection_pool.for_services(reflected)
            reflection.enable_server_reflection(reflected, server, pool=pool)
        address = host_port(settings.host, settings.port)
        try:
            if credentials is None:
                server.add_insecure_port(address)
            else:
                server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            http.shutdown()
            raise StartupError(f"cannot bind the gRPC port {address}: {exc}") from exc
        for name in (OVERALL, *(m.name for m in registry.models())):
            await health.set(name, NOT_SERVING)
        await server.start()
        log.info(
            "listening on %s (%s), metrics on http://%s/metrics",
            address, ", ".join(names), metrics_address,
        )  # fmt: skip
        log.info(
            "gRPC port: %s, %s", tls.describe(settings),
            f"bearer tokens required ({len(tokens)} accepted)" if tokens else "no authentication",
        )  # fmt: skip

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig, stop)
        loading = asyncio.ensure_future(self._load(registry, health))
        loading.add_done_callback(lambda task: _failed(task) and stop.set())
        await stop.wait()
        if _failed(loading):
            # --device cuda and a model cannot run on the GPU: no draining, exit with why
            await server.stop(0)
            await registry.close()
            preprocessor.close()
            http.shutdown()
            raise StartupError(str(loading.exception()))

        grace_ends = loop.time() + settings.grace_period
        ctx.draining.begin()
        await health.enter_graceful_shutdown()
        loading.cancel()
        await asyncio.gather(loading, return_exceptions=True)
        try:
            await asyncio.wait_for(calls.idle(), settings.grace_period)
            log.info("every accepted call answered; closing the port")
            await ctx.draining.settle(grace_ends - loop.time())
        except TimeoutError:
            log.warning("grace period over with %d calls unanswered; cancelling them", calls.active)
        await server.stop(max(0.0, grace_ends - loop.time()))
        log.info("gRPC server stopped; closing models")
        await registry.close()
        preprocessor.close()
        http.shutdown()
        log.info("exiting")
        return 0

    def _on_signal(self, sig: signal.Signals, stop: asyncio.Event) -> None:
        if stop.is_set():
            log.info("%s received again; still draining", sig.name)
            return
        log.info(
            "%s received: draining, grace period %.0f s", sig.name, self.settings.grace_period
        )
        stop.set()

    async def _load(self, registry: ModelRegistry, health: health_aio.HealthServicer) -> None:
        async def ready(model: Model) -> None:
            await health.set(model.name, SERVING)

        await registry.load_all(ready)
        ready_models = [m.name for m in registry.models() if m.latest_ready() is not None]
        if ready_models:
            await health.set(OVERALL, SERVING)
            log.info("SERVING: %s", ", ".join(ready_models))
        else:
            log.error("no model could be loaded from %s; health stays NOT_SERVING",
                      self.settings.repo)  # fmt: skip
