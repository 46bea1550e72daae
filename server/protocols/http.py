"""HTTP/REST on the HTTP port (8000): the Open Inference Protocol v2 as Triton serves it,
health for load balancers, and an image ``classify`` route for curl and browsers.

Routes (``{v}``: ``/versions/<version>`` optional after the model's name):

- ``GET /v2/health/live``, ``GET /v2/health/ready``: 200 with ``{"live": true}`` /
  ``{"ready": true}`` (KServe's bodies), or 503 while loading or draining;
  ``GET /v2/models/<name>{v}/ready``: 200 with ``{"name": ..., "ready": true}``, or 503
  (404 for an unknown model);
- ``GET /v2``: server metadata; ``GET /v2/models/<name>{v}``: model metadata;
  ``GET /v2/models/<name>{v}/config``: the model configuration;
- ``GET /v2/models/stats``, ``GET /v2/models/<name>{v}/stats``: statistics;
- ``POST /v2/repository/index``: every model version and its state;
  ``GET`` and ``POST /v2/logging``: the logging extension (the log level at run time);
  ``POST /v2/repository/models/<name>/load`` and ``/unload``: model control (with
  ``--model-control-mode explicit``; otherwise 501, as gRPC answers UNIMPLEMENTED);
- ``POST /v2/models/<name>{v}/infer``: inference, JSON tensors or Triton's
  binary-tensor extension (`server.protocols.v2.rest`), the classification extension,
  tensors in system shared memory;
- Triton's system shared-memory extension (`server.shared_memory`): ``GET
  /v2/systemsharedmemory/status`` and ``/v2/systemsharedmemory/region/<name>/status``;
  ``POST /v2/systemsharedmemory/region/<name>/register`` with ``{"key": "/name",
  "offset": 0, "byte_size": N}``; ``POST /v2/systemsharedmemory/unregister`` (every
  region) and ``/v2/systemsharedmemory/region/<name>/unregister``. The same routes under
  ``/v2/cudasharedmemory`` answer 501 (no CUDA shared memory here, as Triton without
  GPUs answers);
- ``POST`` (or ``PUT``, as ``curl -T`` sends) ``/v2/models/<name>{v}/classify``: the
  body is an image file (or a ``multipart/form-data`` form of them); the answer is
  ``Classify``'s as JSON, top ``?top_k=`` (default 5) classes with labels.

Thin, like the gRPC adapters: inference goes through `server.request_path` (shared
batches, one count of every request, the same limits), the metadata, statistics and
configuration are the gRPC adapter's messages written as JSON. What the gRPC
handler wrapper does, one middleware does here, with the same
`server.interceptors.Admission`: errors answered as ``{"error": "..."}`` with the
HTTP status of `server.errors.to_http`; while draining, every route but the probes
503 with ``Retry-After``; bearer tokens checked (probes open); calls counted in the
server's `Calls` so the drain waits for them.

Hostile clients (docs/security.md): the gate (`server.protocols.http_gate`) reads each
body within its limits before the call counts; a connection without a whole request line
and headers within ``http_keepalive_timeout`` (idle, or slowloris) is closed; an answer
given before the body was read leaves the rest undecoded, dropped for at most
`LINGER_SECONDS`.
"""

from __future__ import annotations

import ssl
from typing import Any

from aiohttp import web

from server import tracing
from server.context import ServingContext
from server.errors import (
    InvalidInput,
    NotOffered,
)
from server.interceptors import Admission
from server.logs import log_settings, update_log_settings
from server.protocols.http_answers import (
    ServerLog,
    error,
    json_response,
)
from server.protocols.http_body import image_files
from server.protocols.http_gate import BODY, PROBE, Gate, Handler
from server.protocols.shared import UNLOAD_PARAMETERS, check_control, classify_response
from server.protocols.v2 import describe, rest, stats
from server.protocols.v2.request import output_arrays, write_shared
from server.protocols.v2.tensors import encode_raw
from server.request import InferRequest
from server.request_path import Result
from server.shared_memory import CUDA_UNSUPPORTED
from server.validation import DEFAULT_TOP_K

_MODEL = "/v2/models/{model}"
_VERSION = "/v2/models/{model}/versions/{version}"
REQUEST_ID_HEADER = "X-Request-ID"
CLOSE_TIMEOUT = 1.0
LINGER_SECONDS = 1.0  # an unread body's rest is dropped this long, so the client sees the answer


class HttpServer:
    """The HTTP port: `start` binds and serves, `close` stops taking connections and
    answers those in flight. Create it inside the running loop."""

    def __init__(self, ctx: ServingContext, admission: Admission) -> None:
        self._ctx = ctx
        self._admission = admission
        self._registry = ctx.registry
        self._path = ctx.path
        self._runner: web.AppRunner | None = None
        self._gate = Gate(ctx.settings, admission)

    def application(self) -> web.Application:
        app = web.Application(
            middlewares=self._gate.middlewares(),
            client_max_size=self._ctx.settings.max_message_bytes,
        )
        router = app.router

        def get(path: str, handler: Handler, **options: Any) -> None:
            router.add_get(path, handler, expect_handler=self._gate.expect, **options)

        def post(path: str, handler: Handler) -> None:
            router.add_post(path, handler, expect_handler=self._gate.expect)
        get("/v2/health/live", self.live, name=f"{PROBE}-live", allow_head=True)
        get("/v2/health/ready", self.ready, name=f"{PROBE}-ready", allow_head=True)
        get("/v2", self.server_metadata)
        get("/v2/models/stats", self.statistics)
        post("/v2/repository/index", self.repository_index)
        get("/v2/logging", self.logging)
        post("/v2/logging", self.logging)
        post("/v2/repository/models/{model}/load", self.load_model)
        post("/v2/repository/models/{model}/unload", self.unload_model)
        shm, cuda = "/v2/systemsharedmemory", "/v2/cudasharedmemory"
        get(f"{shm}/status", self.shared_memory_status)
        get(f"{shm}/region/{{region}}/status", self.shared_memory_status)
        post(f"{shm}/region/{{region}}/register", self.shared_memory_register)
        post(f"{shm}/unregister", self.shared_memory_unregister)
        post(f"{shm}/region/{{region}}/unregister", self.shared_memory_unregister)
        get(f"{cuda}/status", self.cuda_shared_memory)
        get(f"{cuda}/region/{{region}}/status", self.cuda_shared_memory)
        post(f"{cuda}/region/{{region}}/register", self.cuda_shared_memory)
        post(f"{cuda}/unregister", self.cuda_shared_memory)
        post(f"{cuda}/region/{{region}}/unregister", self.cuda_shared_memory)
        for base, suffix in ((_MODEL, ""), (_VERSION, "-version")):
            get(f"{base}/ready", self.model_ready, name=f"{PROBE}-model{suffix}")
            get(base, self.model_metadata)
            get(f"{base}/config", self.model_config)
            get(f"{base}/stats", self.statistics)
            post(f"{base}/infer", self.infer)
            post(f"{base}/classify", self.classify)
            router.add_put(f"{base}/classify", self.classify, expect_handler=self._gate.expect)
        return app

    async def start(
        self, host: str, port: int, ssl_context: ssl.SSLContext | None, reuse_port: bool = False
    ) -> int:
        """Bind ``host:port`` (OSError when it cannot be bound) and serve; the port bound.
        `reuse_port`: share it with the other front ends (SO_REUSEPORT)."""
        runner = web.AppRunner(
            self.application(),
            access_log=None,
            handle_signals=False,
            # `close` comes once the drain has seen every call answered (or its grace end)
            shutdown_timeout=CLOSE_TIMEOUT,
            keepalive_timeout=self._ctx.settings.http_keepalive_timeout,
            lingering_time=LINGER_SECONDS,
            auto_decompress=False,  # `_read`: after the token check, a step at a time
            logger=ServerLog(self._gate.client_faults),
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_port=reuse_port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        return int(runner.addresses[0][1])

    async def close(self) -> None:
        """Stop listening, close idle connections, wait for the requests being answered."""
        if self._runner is not None:
            await self._runner.cleanup()

    # health and metadata

    # Bodies as KServe's server writes them ({"live": true}); Triton's clients read only the
    # status, KServe's SDK reads the body.

    async def live(self, request: web.Request) -> web.Response:
        if self._ctx.health.live():
            return json_response({"live": True})
        return error(503, "server is not live")

    async def ready(self, request: web.Request) -> web.Response:
        if self._ctx.health.server_ready():
            return json_response({"ready": True})
        return error(503, f"server is not ready: {self._ctx.health.why_not_ready()}")

    async def model_ready(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        self._ctx.health.model_ready(name, _version(request))
        return json_response({"name": name, "ready": True})

    async def server_metadata(self, request: web.Request) -> web.Response:
        settings = self._ctx.settings
        message = describe.server_metadata(
            settings.model_control_mode, settings.shared_memory_regions > 0
        )
        return json_response(rest.message_json(message))

    async def model_metadata(self, request: web.Request) -> web.Response:
        served = self._registry.get(request.match_info["model"], _version(request))
        message = describe.model_metadata(self._registry.model(served.name), served)
        value = rest.message_json(message)
        if served.weights:  # beside Triton's fields: "random (seed N)" is an untrained model
            value["parameters"] = {"weights": served.weights}
        return json_response(value)

    async def model_config(self, request: web.Request) -> web.Response:
        served = self._registry.get(request.match_info["model"], _version(request))
        message = describe.config_response(served, self._ctx.settings.cuda_device_id)
        return json_response(rest.message_json(message)["config"])

    async def statistics(self, request: web.Request) -> web.Response:
        versions = stats.selected(
            self._registry, request.match_info.get("model", ""), _version(request)
        )
        metrics = self._ctx.metrics
        message = stats.model_statistics(metrics, await metrics.every_process(), versions)
        return json_response(rest.message_json(message))

    async def repository_index(self, request: web.Request) -> web.Response:
        body = request[BODY]
        options = await rest.read_object(body)
        ready = options.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidInput("'ready' must be true or false")
        index = describe.repository_index(self._registry, ready_only=ready)
        return json_response(rest.message_json(index)["models"])

    async def logging(self, request: web.Request) -> web.Response:
        """Triton's logging extension: GET the settings, POST a JSON object of changes."""
        if request.method == "GET":
            return json_response(log_settings())
        body = request[BODY]
        changes = await rest.read_object(body)
        return json_response(update_log_settings(changes) if changes else log_settings())

    async def load_model(self, request: web.Request) -> web.Response:
        """Load (again) by the model's version policy (``--model-control-mode explicit``)."""
        await self._control(request, ())
        await self._ctx.manager.load(request.match_info["model"])
        return web.Response()

    async def unload_model(self, request: web.Request) -> web.Response:
        await self._control(request, UNLOAD_PARAMETERS)
        await self._ctx.manager.unload(request.match_info["model"])
        return web.Response()

    async def _control(self, request: web.Request, known: tuple[str, ...]) -> None:
        body = request[BODY]
        options = await rest.read_object(body)
        parameters = options.get("parameters", {})
        if not isinstance(parameters, dict):
            raise InvalidInput("'parameters' must be a JSON object")
        check_control(request.match_info["model"], "", parameters, known)

    # system shared memory

    async def shared_memory_status(self, request: web.Request) -> web.Response:
        regions = self._ctx.shared_memory.status(request.match_info.get("region", ""))
        return json_response([
            {"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size}
            for r in regions
        ])  # fmt: skip

    async def shared_memory_register(self, request: web.Request) -> web.Response:
        body = request[BODY]
        options = await rest.read_object(body)
        key, offset, size = options.get("key"), options.get("offset", 0), options.get("byte_size")
        if not isinstance(key, str):
            raise InvalidInput("the body needs 'key', a string: the object's name, '/name'")
        for name, value in (("offset", offset), ("byte_size", size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidInput(f"the body needs '{name}', an integer >= 0")
        await self._ctx.shared_memory.register(request.match_info["region"], key, offset, size)
        return web.Response()

    async def shared_memory_unregister(self, request: web.Request) -> web.Response:
        await self._ctx.shared_memory.unregister(request.match_info.get("region", ""))
        return web.Response()

    async def cuda_shared_memory(self, request: web.Request) -> web.Response:
        raise NotOffered(CUDA_UNSUPPORTED)

    # inference

    async def infer(self, request: web.Request) -> web.Response:
        body = await rest.read_infer(request[BODY], request.headers.get(rest.HEADER_LENGTH))
        result = await self._path.infer(
            body.request(request.match_info["model"], _version(request))
        )
        with tracing.step(tracing.ENCODE):
            return self._infer_response(body, result)

    def _infer_response(self, body: rest.InferBody, result: Result) -> web.Response:
        served, requested = result.served, result.checked.outputs
        arrays = output_arrays(requested, result.logits, served.labels)
        outputs: list[tuple[str, Any, bool | None]] = []
        for output, (name, array), binary in zip(
            requested, arrays, body.binary(requested), strict=True
        ):
            shared = output.region is not None and write_shared(
                self._ctx.shared_memory, output, encode_raw(array)[1]
            )
            outputs.append((name, array, None if shared else binary))
        payload, header_length = rest.write_infer(served.name, served.version, body.id, outputs)
        if header_length is None:
            response = web.Response(body=payload, content_type=rest.JSON_TYPE)
        else:
            response = web.Response(
                body=payload,
                content_type=rest.BINARY_TYPE,
                headers={rest.HEADER_LENGTH: str(header_length)},
            )
        response.enable_compression()  # when the client's Accept-Encoding asks for it
        return response

    async def classify(self, request: web.Request) -> web.Response:
        images = await image_files(
            request, request[BODY], self._ctx.settings.max_images_per_request
        )
        result = await self._path.infer(
            InferRequest(
                model=request.match_info["model"],
                version=_version(request),
                id=request.headers.get(REQUEST_ID_HEADER, ""),
                images=tuple(images),
                top_k=_top_k(request),
            )
        )
        with tracing.step(tracing.ENCODE):
            return json_response(rest.message_json(classify_response(result)))


def _version(request: web.Request) -> str:
    return request.match_info.get("version", "")


def _top_k(request: web.Request) -> int:
    text = request.query.get("top_k")
    if text is None:
        return DEFAULT_TOP_K
    try:
        return int(text)
    except ValueError:
        raise InvalidInput(f"top_k is {text!r}; give a whole number, e.g. ?top_k=5") from None


