"""The server's lifecycle: one gRPC port with every service, the HTTP/REST port, /metrics,
drain, stop.

`start(settings)` scans the repository, binds, starts serving (health NOT_SERVING)
and loads and warms every model in the background: SERVING per model name once
it is ready, and overall ("") once loading is done and a model is ready. It
returns a `Running` handle; a test starts a server in-process with it.

After loading, the repository manager (`server.core.manager`) keeps the models in line
with the repository as ``--model-control-mode`` says (poll: a background task that
`Running.drain` stops). Readiness, grpc.health.v1 included, is `server.core.health`'s.

`Running.drain()`: health NOT_SERVING for all, new calls UNAVAILABLE (answered
by the handler wrapper while the port stays open, so balancers and clients see a
status they retry elsewhere, not a cancelled call), open streams stop reading
and end with UNAVAILABLE, queued and in-flight calls finish; then, once refused
callers have been pushed back past it (`server.drain`), the port closes. All
within the grace period. The HTTP port drains alike: 503 with Retry-After for new
requests (probes answered), then it closes once the accepted ones are answered.
`Running.stop()` drains if that has not begun, then
closes the models, the decode workers and /metrics.

`run(settings)` is the process: start, then SIGTERM/SIGINT → drain and stop; exit 0.

Services are added by the registrars in `SERVICES`, each
``register(server, ctx) -> full service name`` (for reflection).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, disable_created_metrics

from server import reflection_pool, shm, threads, tls, tracing
from server.auth import TokenCheck, load_tokens
from server.config import Settings, available_cores, cgroup_cpu_limit
from server.context import ServingContext
from server.core.health import Health
from server.core.loader import Loader, limit_malloc_arenas
from server.core.manager import Manager, RepositoryManager
from server.core.registry import ModelRegistry
from server.drain import Drain
from server.errors import ModelNotFound
from server.handlers import wrap_registrations
from server.interceptors import Admission, Calls, Guard
from server.metrics import Metrics
from server.preprocess import Preprocessor
from server.protocols import v1
from server.protocols.http import HttpServer
from server.protocols.v2 import servicer as v2
from server.providers import serves_on_gpu
from server.shared_memory import SharedMemory

log = logging.getLogger(__name__)

Registrar = Callable[[grpc.aio.Server, ServingContext], str]

SERVICES: tuple[Registrar, ...] = (v1.add_to_server, v2.add_to_server)


class StartupError(Exception):
    """The server cannot start; the message says why, in one line."""


def host_port(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


@dataclass(frozen=True)
class Core:
    """What serves the models in one process: the metrics, the registry, readiness, the drain
    and model control (`server.core.manager`, or in a front end its link to the engine)."""

    metrics: Metrics
    registry: ModelRegistry
    draining: Drain
    health: Health
    manager: Manager
    # The system shared-memory regions: this process's own table (one process, the engine),
    # or in a front end the mirror of the engine's.
    shared_memory: SharedMemory | None = None
    # A front end's row of the engine's tally (`server.shm.Tally`), so that the call, body
    # and decode-backlog limits hold over every front end; None in one process.
    tally: shm.Tally | None = None


def serving_core(settings: Settings) -> Core:
    """The models' side of a server (one process, or the engine): the repository scanned,
    nothing loaded yet. Raises `StartupError` when the repository cannot be read."""
    metrics = Metrics()
    registry, draining = ModelRegistry(), Drain()
    health = Health(registry, metrics, draining, models_required=models_required(settings))
    loader = Loader(settings, registry, health, metrics)
    manager = RepositoryManager(settings, registry, loader, health)
    try:
        manager.scan()
        manager.start_models()  # a --load-model name not in the repository: refused now
    except OSError as exc:
        raise StartupError(f"cannot read the model repository: {exc}") from exc
    except ModelNotFound as exc:
        raise StartupError(str(exc)) from exc
    return Core(metrics, registry, draining, health, manager, SharedMemory.of(settings))


def models_required(settings: Settings) -> bool:
    """Whether the server's readiness needs a READY model: not with explicit model control,
    where the operator loads and unloads them (`server.core.health`)."""
    return settings.model_control_mode != "explicit"


async def start(settings: Settings, core: Core | None = None, *, frontend: bool = False) -> Running:
    """Bind and start serving; the models load in the background (`Running.wait_loaded`).

    Raises `StartupError` when the repository cannot be read, the TLS or token settings
    cannot be used, or a port cannot be bound. Port 0 binds a free port (`Running.port`).
    A `frontend` (`server.frontend`) shares its ports with the other front ends
    (SO_REUSEPORT) and serves no /metrics port: the engine shows every process's metrics.
    """
    disable_created_metrics()  # no *_created series beside every counter and histogram
    threads.name_current("event_loop")
    core = core or serving_core(settings)
    metrics = core.metrics
    tokens, credentials, ssl_context = _security(settings)
    exporter = None if frontend else serve_metrics(settings, metrics)
    preprocessor = Preprocessor(settings, _held(core, "decodes"))
    try:  # from here on, one way out on failure
        ctx = ServingContext(
            settings, core.registry, preprocessor, metrics, core.health, core.manager,
            core.draining, core.shared_memory or SharedMemory.of(settings),
        )  # fmt: skip
        calls = Calls(settings.max_concurrent_calls, _held(core, "calls"))
        auth = TokenCheck(tokens, metrics) if tokens else None  # one check for gRPC and HTTP
        # one rule for gRPC and HTTP
        admission = Admission(core.draining, calls, auth, _held(core, "bodies"))
        server, names = _grpc_server(settings, ctx, admission, reuse_port=frontend)
        port = _bind_grpc(server, settings, credentials)
        rest, http_port = await _bind_http(settings, ctx, admission, ssl_context, frontend)
    except BaseException:
        preprocessor.close()
        if exporter is not None:
            exporter.shutdown()
        raise
    await core.health.start()
    await server.start()
    running = Running(settings, ctx, server, calls, exporter, port, rest, http_port)
    _log_started(running, names, ssl_context is not None, tokens)
    return running


def _security(
    settings: Settings,
) -> tuple[tuple[str, ...], grpc.ServerCredentials | None, ssl.SSLContext | None]:
    """The bearer tokens accepted, the gRPC port's TLS credentials, the HTTP port's."""
    try:
        return load_tokens(settings), tls.server_credentials(settings), tls.ssl_context(settings)
    except ValueError as exc:
        raise StartupError(str(exc)) from exc


def serve_metrics(
    settings: Settings, metrics: Metrics, registry: CollectorRegistry | None = None
) -> WSGIServer:
    """The /metrics port, serving `metrics`' families (or `registry`'s); StartupError when it
    cannot be bound."""
    try:
        return metrics.serve(settings.metrics_host, settings.metrics_port, registry)
    except OSError as exc:
        metrics_address = host_port(settings.metrics_host, settings.metrics_port)
        raise StartupError(f"cannot bind the metrics port {metrics_address}: {exc}") from exc


def _grpc_server(
    settings: Settings, ctx: ServingContext, admission: Admission, *, reuse_port: bool
) -> tuple[grpc.aio.Server, list[str]]:
    """The gRPC server with every service, each handler wrapped; the services' names."""
    server = grpc.aio.server(
        options=[
            # A second server on a taken port fails to start instead of sharing it; front
            # ends share theirs (the engine holds it, `server.engine`).
            ("grpc.so_reuseport", int(reuse_port)),
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
            *settings.grpc_connection_options(),
        ],
    )
    wrap_registrations(server, Guard(admission).wrap)  # every service below, reflection too
    names = [register(server, ctx) for register in SERVICES]
    health_pb2_grpc.add_HealthServicer_to_server(ctx.health.servicer, server)
    names.append(HEALTH_SERVICE)
    if settings.reflection:
        reflected = [*names, reflection.SERVICE_NAME]
        pool = reflection_pool.for_services(reflected)
        reflection.enable_server_reflection(reflected, server, pool=pool)
    return server, names


def _bind_grpc(
    server: grpc.aio.Server, settings: Settings, credentials: grpc.ServerCredentials | None
) -> int:
    address = host_port(settings.host, settings.port)
    try:
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise StartupError(f"cannot bind the gRPC port {address}: {exc}") from exc


def _held(core: Core, column: str) -> shm.Held:
    """What this process holds of `column`, counted over every front end in a front end."""
    return shm.Held(core.tally.share(column) if core.tally is not None else None)


async def _bind_http(
    settings: Settings,
    ctx: ServingContext,
    admission: Admission,
    context: ssl.SSLContext | None,
    reuse_port: bool,
) -> tuple[HttpServer | None, int | None]:
    """The HTTP port, bound and serving, and its number; (None, None) without one."""
    if not settings.http_port:
        return None, None
    rest = HttpServer(ctx, admission)
    try:
        return rest, await rest.start(settings.host, settings.http_port, context, reuse_port)
    except OSError as exc:
        http_address = host_port(settings.host, settings.http_port)
        raise StartupError(f"cannot bind the HTTP port {http_address}: {exc}") from exc


def _log_started(running: Running, names: list[str], tls_on: bool, tokens: tuple[str, ...]) -> None:
    settings = running.settings
    scheme = "https" if tls_on else "http"
    rest_line = (
        f"HTTP/REST on {scheme}://{host_port(settings.host, running.http_port)}/v2"
        if running.http_port is not None
        else "no HTTP/REST port"
    )
    metrics_line = (
        f"metrics on http://{running.metrics_address}/metrics"
        if running.metrics_port is not None
        else "metrics on the engine's port"
    )
    log.info("listening on %s (%s), %s, %s", running.address, ", ".join(names), rest_line,
             metrics_line)  # fmt: skip
    log.info(
        "gRPC and HTTP ports: %s, %s", tls.describe(settings),
        f"bearer tokens required ({len(tokens)} accepted)" if tokens else "no authentication",
    )  # fmt: skip
    quota = cgroup_cpu_limit()
    log.info(
        "CPU: %d usable core(s)%s, %d decode worker(s)", available_cores(),
        "" if quota is None else f" (cgroup CPU quota {quota:g})", settings.decode_threads(),
    )  # fmt: skip
    if settings.model_control_mode == "explicit" and not tokens:
        log.warning("model control is explicit and the ports take no bearer token: "
                    "anyone who reaches them can load and unload models")  # fmt: skip


class Running:
    """A started server: where it listens, whether its models are loaded, `drain()`, `stop()`.

    Made by `start`; use it from the event loop that started it.
    """

    def __init__(
        self,
        settings: Settings,
        ctx: ServingContext,
        server: grpc.aio.Server,
        calls: Calls,
        http: WSGIServer | None,
        port: int,
        rest: HttpServer | None = None,
        http_port: int | None = None,
    ) -> None:
        self.settings = settings
        # the ports bound: the free ones chosen where the settings say 0
        self.port = port
        self.metrics_port: int | None = None if http is None else http.server_port
        self.http_port = http_port  # None: no HTTP port
        self._ctx, self._server, self._calls, self._http = ctx, server, calls, http
        self._rest = rest
        self._loading = asyncio.ensure_future(self._load())
        self._draining: asyncio.Future[None] | None = None
        self._stopping: asyncio.Future[None] | None = None

    @property
    def address(self) -> str:
        """``host:port`` of the gRPC port as bound."""
        return host_port(self.settings.host, self.port)

    @property
    def metrics_address(self) -> str:
        return host_port(self.settings.metrics_host, self.metrics_port)

    def ready(self) -> bool:
        """True once loading is done and a model is ready, until the drain begins (health ""
        says SERVING)."""
        return self._ctx.health.server_ready()

    async def wait_loaded(self) -> bool:
        """Until every model has been loaded or refused (or the drain cut loading short);
        then `ready()`."""
        await asyncio.gather(asyncio.shield(self._loading), return_exceptions=True)
        return self.ready()

    def load_error(self) -> BaseException | None:
        """What ended loading (`DeviceUnavailable`: ``--device cuda`` and a model that cannot
        run on the GPU), or None."""
        loading = self._loading
        return loading.exception() if loading.done() and not loading.cancelled() else None

    async def drain(self) -> None:
        """Stop taking calls, answer the accepted ones within the grace period, close the
        port. Once; a second call waits for the first."""
        if self._draining is None:
            self._draining = asyncio.ensure_future(self._drain())
        await asyncio.shield(self._draining)

    async def stop(self) -> None:
        """Drain (unless done), then close the models, the decode workers and /metrics.
        Once; a second call waits for the first."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._stopping)

    async def _drain(self) -> None:
        settings, ctx, calls = self.settings, self._ctx, self._calls
        loop = asyncio.get_running_loop()
        grace_ends = loop.time() + settings.grace_period
        await ctx.health.drain()
        await ctx.manager.stop()
        self._loading.cancel()
        await asyncio.gather(self._loading, return_exceptions=True)
        try:
            await asyncio.wait_for(calls.idle(), settings.grace_period)
            log.info("every accepted call answered; closing the port")
            await ctx.draining.settle(grace_ends - loop.time())
        except TimeoutError:
            log.warning("grace period over with %d calls unanswered; cancelling them", calls.active)
        closing = [self._server.stop(max(0.0, grace_ends - loop.time()))]
        if self._rest is not None:
            closing.append(self._rest.close())
        await asyncio.gather(*closing)

    async def _stop(self) -> None:
        await self.drain()
        log.info("gRPC server stopped; closing models")
        await self._ctx.registry.close()
        self._ctx.preprocessor.close()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()

    async def _load(self) -> None:
        await load(self.settings, self._ctx.manager, self._ctx.health)


async def load(settings: Settings, manager: Manager, health: Health) -> None:
    """Load every model (health per model as each is ready, then overall), say what serves,
    then keep the models in line with the repository (``--model-control-mode``)."""
    await manager.load_all()
    if ready_models := health.serving():
        log.info("SERVING: %s", ", ".join(ready_models))
    elif settings.model_control_mode == "explicit":
        log.info("no model loaded (explicit model control, no --load-model); ready")
    else:
        log.error("no model could be loaded from %s; health is NOT_SERVING", settings.repo)
    manager.start_polling()


async def run(settings: Settings) -> int:
    """The serving process: start, serve until SIGTERM or SIGINT, drain, stop; exit code 0.
    Raises `StartupError` when loading fails as a whole (``--device cuda`` off the GPU).

    With front ends (``--frontends``, `Settings.frontend_count`) this process is the
    engine and the front ends are its children (`server.engine`)."""
    limit_malloc_arenas()
    frontends = settings.frontend_count(gpu=serves_on_gpu(settings))
    if frontends:
        from server import engine

        return await engine.run(settings, frontends)
    tracing.configure(settings.trace_endpoint, "server")
    running = await start(settings)
    signalled = on_signals(settings.grace_period)
    loaded = asyncio.ensure_future(running.wait_loaded())
    signal_wait = asyncio.ensure_future(signalled.wait())
    await asyncio.wait({loaded, signal_wait}, return_when=asyncio.FIRST_COMPLETED)
    error = running.load_error()
    if error is not None:  # nothing was served: stop at once, exit non-zero with why
        signal_wait.cancel()
        await running.stop()
        raise StartupError(str(error))
    await signal_wait
    await running.stop()
    await exiting()
    return 0


async def exiting() -> None:
    """A serving process's last line: work still in a thread (a session opening when the
    drain began) ends first, so nothing is logged after it."""
    await asyncio.get_running_loop().shutdown_default_executor()
    log.info("exiting")


def on_signals(grace_period: float) -> asyncio.Event:
    """An event set by the first SIGTERM or SIGINT (each logged once)."""
    signalled = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, sig, signalled, grace_period)
    return signalled


def _on_signal(sig: signal.Signals, signalled: asyncio.Event, grace_period: float) -> None:
    if signalled.is_set():
        log.info("%s received again; still draining", sig.name)
        return
    log.info("%s received: draining, grace period %.0f s", sig.name, grace_period)
    signalled.set()
