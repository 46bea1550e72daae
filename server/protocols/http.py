"""HTTP/REST on the HTTP port (8000): the Open Inference Protocol v2 as Triton serves it,
health for load balancers, and an image ``classify`` route for curl and browsers.

Routes (``{v}``: ``/versions/<version>`` optional after the model's name):

- ``GET /v2/health/live``, ``GET /v2/health/ready``: 200, or 503 while loading or
  draining; ``GET /v2/models/<name>{v}/ready``: 200, or 503 (404 for an unknown model);
- ``GET /v2``: server metadata; ``GET /v2/models/<name>{v}``: model metadata;
  ``GET /v2/models/<name>{v}/config``: the model configuration;
- ``GET /v2/models/stats``, ``GET /v2/models/<name>{v}/stats``: statistics;
- ``POST /v2/repository/index``: every model version and its state;
  ``POST /v2/repository/models/<name>/load`` and ``/unload``: model control (with
  ``--model-control-mode explicit``; otherwise 501, as gRPC answers UNIMPLEMENTED);
- ``POST /v2/models/<name>{v}/infer``: inference, JSON tensors or Triton's
  binary-tensor extension (`server.protocols.v2.rest`), the classification extension;
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

Hostile clients (docs/security.md): a request's body is read whole before the call
counts against ``max_concurrent_calls`` — after the drain and token checks, so a
stranger's body is never read or decompressed —, one of at most ``http_max_body_reads``
at once (more: 503), within ``http_body_timeout`` (408) and ``max_message_bytes`` (413,
at once for a larger ``Content-Length``), decompressed here a step at a time (gzip,
deflate, br, zstd: aiohttp's decoders, each step asked for no more than the room left) so
it stops at the first byte past the limit. A connection without a whole request line and
headers within ``http_keepalive_timeout`` (idle, or slowloris) is closed. An answer given
before the body was read leaves the rest undecoded: read and dropped for at most
`LINGER_SECONDS`, then the connection closes. A request aiohttp cannot parse (400), a
client that left, a body too slow, too large or not in its coding are the client's
doing: no traceback, one rate-limited log line for all of them (`server.auth`'s rule).
Error messages are cut at `MAX_ERROR_CHARS`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import BodyPartReader, StreamReader, web
from aiohttp.compression_utils import (
    HAS_BROTLI,
    HAS_ZSTD,
    BrotliDecompressor,
    DecompressionBaseHandler,
    ZLibDecompressor,
    ZSTDDecompressor,
)
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.multipart import MultipartReader
from aiohttp.web_protocol import RequestPayloadError

from server.auth import RateLimitedLog
from server.context import ServingContext
from server.errors import (
    INTERNAL_MESSAGE,
    Draining,
    InvalidInput,
    QueueFull,
    Unauthenticated,
    to_http,
)
from server.interceptors import Admission
from server.protocols.shared import UNLOAD_PARAMETERS, check_control, classify_response
from server.protocols.v2 import describe, rest, stats
from server.protocols.v2.request import output_arrays
from server.request import InferRequest
from server.validation import DEFAULT_TOP_K

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Route names of the probes: open without a token and answered while draining.
PROBE = "probe"
_MODEL = "/v2/models/{model}"
_VERSION = "/v2/models/{model}/versions/{version}"
REQUEST_ID_HEADER = "X-Request-ID"
CLOSE_TIMEOUT = 1.0
BODY = "resnet_serve.body"  # the request's body, read by the middleware
LINGER_SECONDS = 1.0  # an unread body's rest is dropped this long, so the client sees the answer
MAX_ERROR_CHARS = 1000  # an error message is cut here (and says how long it was)
INFLATE_STEP = 1 << 20  # decompressed bytes per step; the loop serves others between steps
CODINGS = ("gzip", "x-gzip", "deflate", "br", "zstd")


class HttpServer:
    """The HTTP port: `start` binds and serves, `close` stops taking connections and
    answers those in flight. Create it inside the running loop."""

    def __init__(self, ctx: ServingContext, admission: Admission) -> None:
        self._ctx = ctx
        self._admission = admission
        self._registry = ctx.registry
        self._path = ctx.path
        self._runner: web.AppRunner | None = None
        self._reading = 0  # bodies being read (http_max_body_reads)
        self._client_faults = RateLimitedLog(
            log, "HTTP request(s) malformed, too slow, too large or left by the client",
            "; each answered 4xx or closed",
        )  # fmt: skip

    def application(self) -> web.Application:
        app = web.Application(
            middlewares=[self._middleware], client_max_size=self._ctx.settings.max_message_bytes
        )
        router = app.router

        def get(path: str, handler: Handler, **options: Any) -> None:
            router.add_get(path, handler, expect_handler=self._expect, **options)

        def post(path: str, handler: Handler) -> None:
            router.add_post(path, handler, expect_handler=self._expect)
        get("/v2/health/live", self.live, name=f"{PROBE}-live", allow_head=True)
        get("/v2/health/ready", self.ready, name=f"{PROBE}-ready", allow_head=True)
        get("/v2", self.server_metadata)
        get("/v2/models/stats", self.statistics)
        post("/v2/repository/index", self.repository_index)
        post("/v2/repository/models/{model}/load", self.load_model)
        post("/v2/repository/models/{model}/unload", self.unload_model)
        for base, suffix in ((_MODEL, ""), (_VERSION, "-version")):
            get(f"{base}/ready", self.model_ready, name=f"{PROBE}-model{suffix}")
            get(base, self.model_metadata)
            get(f"{base}/config", self.model_config)
            get(f"{base}/stats", self.statistics)
            post(f"{base}/infer", self.infer)
            post(f"{base}/classify", self.classify)
            router.add_put(f"{base}/classify", self.classify, expect_handler=self._expect)
        return app

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None) -> int:
        """Bind ``host:port`` (OSError when it cannot be bound) and serve; the port bound."""
        runner = web.AppRunner(
            self.application(),
            access_log=None,
            handle_signals=False,
            # `close` comes once the drain has seen every call answered (or its grace end)
            shutdown_timeout=CLOSE_TIMEOUT,
            keepalive_timeout=self._ctx.settings.http_keepalive_timeout,
            lingering_time=LINGER_SECONDS,
            auto_decompress=False,  # `_read`: after the token check, a step at a time
            logger=_ServerLog(self._client_faults),
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_port=False)
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

    # what the gRPC handler wrapper does: errors, and the one Admission (drain, tokens, calls)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        where = f"{request.method} {request.path}"
        try:
            if _is_probe(request):
                return await handler(request)
            self._check_head(request, where)
            if request.match_info.http_exception is not None:  # no such route: body unread
                raise request.match_info.http_exception
            request[BODY] = await self._read_body(request)
            self._admission.enter()  # the call counts once its body is in
            try:
                return await handler(request)
            finally:
                self._admission.done()
        except Exception as exc:
            return self._refusal(request, where, exc)

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
        """``Expect: 100-continue``: what the headers settle (draining, the token, a
        Content-Length over the limit) is answered before the body is invited."""
        where = f"{request.method} {request.path}"
        if not _is_probe(request):
            try:
                self._check_head(request, where)
            except Exception as exc:
                return self._refusal(request, where, exc)
        if request.headers.get("Expect", "").lower() != "100-continue":
            raise web.HTTPExpectationFailed(reason="only Expect: 100-continue is known")
        if request.version >= (1, 1):  # as aiohttp's own expect handler answers it
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        return None

    def _check_head(self, request: web.Request, where: str) -> None:
        """Raise what the request line and headers settle: draining, the token, and a
        Content-Length over ``max_message_bytes``."""
        try:
            self._admission.check(where, lambda: _authorization(request))
        except Unauthenticated as exc:  # the same reasons, in HTTP's words
            raise Unauthenticated(str(exc).replace("metadata", "header")) from None
        limit = self._ctx.settings.max_message_bytes
        declared = request.content_length
        if declared is not None and declared > limit:
            raise _BodyRefused(
                413, f"the body is {declared} bytes (Content-Length); at most {limit} are "
                "allowed (max_message_bytes)",
            )  # fmt: skip

    def _refusal(self, request: web.Request, where: str, exc: Exception) -> web.Response:
        if isinstance(exc, _BodyRefused):  # the client's doing: one rate-limited line for all
            message = _bounded(f"{where}: {exc}")
            self._client_faults.event(f"{exc.status}, {message}")
            return _error(exc.status, message, {"Connection": "close"})
        if isinstance(exc, web.HTTPException):  # no such route, method not allowed
            if exc.status < 400:
                raise exc
            return _error(exc.status, f"{where}: {exc.reason}", exc.headers)
        return _failure(request, exc)

    async def _read_body(self, request: web.Request) -> bytes:
        """The body, decompressed: at most ``max_message_bytes`` (`_check_head` refused a
        larger Content-Length), within ``http_body_timeout``, one of at most
        ``http_max_body_reads`` bodies being read."""
        settings = self._ctx.settings
        limit = settings.max_message_bytes
        if not request.body_exists:
            return b""
        decoder = _Decoder.of(request.headers.getall("Content-Encoding", []))
        if self._reading >= settings.http_max_body_reads:
            raise QueueFull(
                f"the server is reading {self._reading} request bodies, its limit "
                f"(http_max_body_reads {settings.http_max_body_reads}); retry later or on "
                "another instance"
            )
        self._reading += 1
        try:
            async with asyncio.timeout(settings.http_body_timeout):
                return await _read(request.content, decoder, limit)
        except TimeoutError:
            raise _BodyRefused(
                408, f"the body did not arrive within {settings.http_body_timeout:g} s "
                "(http_body_timeout)",
            ) from None  # fmt: skip
        except (ConnectionError, RequestPayloadError, HttpProcessingError) as exc:
            raise _BodyRefused(400, f"the body could not be read: {_brief(exc)}") from None
        finally:
            self._reading -= 1

    # health and metadata

    async def live(self, request: web.Request) -> web.Response:
        if self._ctx.health.live():
            return web.Response()
        return _error(503, "server is not live")

    async def ready(self, request: web.Request) -> web.Response:
        if self._ctx.health.server_ready():
            return web.Response()
        return _error(503, f"server is not ready: {self._ctx.health.why_not_ready()}")

    async def model_ready(self, request: web.Request) -> web.Response:
        self._ctx.health.model_ready(request.match_info["model"], _version(request))
        return web.Response()

    async def server_metadata(self, request: web.Request) -> web.Response:
        return _json(
            rest.message_json(describe.server_metadata(self._ctx.settings.model_control_mode))
        )

    async def model_metadata(self, request: web.Request) -> web.Response:
        served = self._registry.get(request.match_info["model"], _version(request))
        message = describe.model_metadata(self._registry.model(served.name), served)
        value = rest.message_json(message)
        if served.weights:  # beside Triton's fields: "random (seed N)" is an untrained model
            value["parameters"] = {"weights": served.weights}
        return _json(value)

    async def model_config(self, request: web.Request) -> web.Response:
        served = self._registry.get(request.match_info["model"], _version(request))
        message = describe.config_response(served, self._ctx.settings.cuda_device_id)
        return _json(rest.message_json(message)["config"])

    async def statistics(self, request: web.Request) -> web.Response:
        versions = stats.selected(
            self._registry, request.match_info.get("model", ""), _version(request)
        )
        return _json(rest.message_json(stats.model_statistics(self._ctx.metrics, versions)))

    async def repository_index(self, request: web.Request) -> web.Response:
        body = request[BODY]
        options = rest.parse_object(body) if body.strip() else {}
        ready = options.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidInput("'ready' must be true or false")
        index = describe.repository_index(self._registry, ready_only=ready)
        return _json(rest.message_json(index)["models"])

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
        options = rest.parse_object(body) if body.strip() else {}
        parameters = options.get("parameters", {})
        if not isinstance(parameters, dict):
            raise InvalidInput("'parameters' must be a JSON object")
        check_control(request.match_info["model"], "", parameters, known)

    # inference

    async def infer(self, request: web.Request) -> web.Response:
        body = rest.parse_infer(request[BODY], request.headers.get(rest.HEADER_LENGTH))
        result = await self._path.infer(
            body.request(request.match_info["model"], _version(request))
        )
        served, requested = result.served, result.checked.outputs
        arrays = output_arrays(requested, result.logits, served.labels)
        outputs = [
            (name, array, binary)
            for (name, array), binary in zip(arrays, body.binary(requested), strict=True)
        ]
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
        images = await _image_files(
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
        return _json(rest.message_json(classify_response(result)))


def _is_probe(request: web.Request) -> bool:
    return (request.match_info.route.name or "").startswith(PROBE)


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


async def _image_files(request: web.Request, body: bytes, max_images: int) -> list[bytes]:
    """The body as one image file, or each file of a ``multipart/form-data`` form (aiohttp's
    reader over the body already read), refused at the first file past `max_images`."""
    if not request.content_type.startswith("multipart/"):
        if not body:
            raise InvalidInput(
                "the body is empty; send the image file as the body "
                "(curl --data-binary @photo.jpg URL)"
            )
        return [body]
    stream = StreamReader(  # a limit above the body's size: it never pauses the connection
        request.protocol, max(len(body), 1 << 16), loop=asyncio.get_running_loop()
    )
    stream.feed_data(body)
    stream.feed_eof()
    images: list[bytes] = []
    try:
        form = MultipartReader(request.headers, stream)
        while (part := await form.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise InvalidInput(
                    "nested multipart forms are not supported; send files as fields"
                )
            if len(images) == max_images:
                raise InvalidInput(
                    f"request has more than {max_images} images; at most {max_images} are "
                    "allowed"
                )
            images.append(bytes(await part.read()))
    except ValueError as exc:  # aiohttp's word for a form it cannot read
        raise InvalidInput(f"the multipart form cannot be read: {exc}") from None
    if not images:
        raise InvalidInput("the form holds no file; send each image as a form field")
    return images


class _BodyRefused(Exception):
    """A request refused while its body is read, the client's doing: its HTTP status and
    why; the connection closes after the answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Decoder:
    """A body's Content-Encoding undone with aiohttp's decoders, asked a step at a time for
    at most the room left plus one byte: it stops at the first byte past the limit and
    decompresses nothing after that."""

    def __init__(self, coding: str) -> None:
        self.coding = coding
        self._decoder: DecompressionBaseHandler | None = None

    @classmethod
    def of(cls, codings: list[str]) -> _Decoder | None:
        named = [c.strip().lower() for value in codings for c in value.split(",") if c.strip()]
        named = [c for c in named if c != "identity"]
        if not named:
            return None
        supported = [c for c in CODINGS if {"br": HAS_BROTLI, "zstd": HAS_ZSTD}.get(c, True)]
        if len(named) > 1 or named[0] not in supported:
            raise _BodyRefused(
                415, f"Content-Encoding {', '.join(named)!r} is not supported; send one of "
                f"{', '.join(supported)} (or none)",
            )  # fmt: skip
        return cls(named[0])

    def step(self, data: bytes, most: int) -> bytes:
        """At most `most` bytes of output, `data` fed first (b"": what is pending)."""
        try:
            if self._decoder is None:
                if not data:
                    return b""
                self._decoder = self._new(data)
            return self._decoder.decompress_sync(data, max_length=most)
        except Exception:  # the decoders' errors name no type of their own
            raise _BodyRefused(400, f"the body is not valid {self.coding} data") from None

    def _new(self, first: bytes) -> DecompressionBaseHandler:
        if self.coding == "br":
            return BrotliDecompressor()
        if self.coding == "zstd":
            return ZSTDDecompressor()
        if self.coding == "deflate":  # zlib-wrapped (RFC 1950) or raw, as aiohttp takes it
            return ZLibDecompressor("deflate", suppress_deflate_header=first[0] & 0xF != 8)
        return ZLibDecompressor("gzip")


async def _read(stream: StreamReader, decoder: _Decoder | None, limit: int) -> bytes:
    """The body from `stream`, decoded, refused (413) at the first byte past `limit`."""
    parts: list[bytes] = []
    size = 0
    async for chunk in stream.iter_any():
        if decoder is None:
            size += len(chunk)
            if size > limit:
                raise _BodyRefused(413, f"the body is over {limit} bytes (max_message_bytes)")
            parts.append(chunk)
            continue
        data = chunk
        while out := decoder.step(data, min(limit - size + 1, INFLATE_STEP)):
            data = b""
            size += len(out)
            if size > limit:
                raise _BodyRefused(
                    413, f"the body decompresses ({decoder.coding}) to over {limit} bytes "
                    "(max_message_bytes)",
                )  # fmt: skip
            parts.append(out)
            await asyncio.sleep(0)  # the loop serves others between steps
    return b"".join(parts)


class _ServerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's log of a connection: a request it could not parse (answered 400 by aiohttp)
    or a client that left is the client's doing, one more event of the port's rate-limited
    line, no traceback; anything else as aiohttp logs it."""

    def __init__(self, faults: RateLimitedLog) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})
        self._faults = faults

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(exc, HttpProcessingError | ConnectionError):
            self._faults.event(f"400, a request aiohttp could not read: {_brief(exc)}")
            return
        super().exception(msg, *args, exc_info=exc_info, **kwargs)


def _brief(exc: BaseException) -> str:
    """An exception in one short line: its type and the first line of its message."""
    text = str(getattr(exc, "message", "") or exc).strip()
    return f"{type(exc).__name__}: {(text.splitlines() or [''])[0][:200]}"


def _bounded(message: str) -> str:
    if len(message) <= MAX_ERROR_CHARS:
        return message
    return f"{message[:MAX_ERROR_CHARS]}... (cut; {len(message)} characters in all)"


def _json(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=rest.dumps(value), status=status, content_type=rest.JSON_TYPE)


def _error(status: int, message: str, headers: Any = None) -> web.Response:
    response = _json({"error": _bounded(message)}, status)
    for key in ("Allow", "Retry-After", "WWW-Authenticate", "Connection"):
        if headers is not None and key in headers:
            response.headers[key] = headers[key]
    return response


def _authorization(request: web.Request) -> list[tuple[str, str]]:
    """The Authorization headers as the token check reads gRPC metadata."""
    return [("authorization", value) for value in request.headers.getall("Authorization", [])]


def _failure(request: web.Request, exc: Exception) -> web.Response:
    status, message = to_http(exc)
    message = _bounded(message)
    where = f"{request.method} {request.path}"
    if status == 500:
        log.error("%s failed", where, exc_info=exc)
        message = INTERNAL_MESSAGE
    elif not isinstance(exc, Unauthenticated):  # those are logged rate-limited (TokenCheck)
        log.info("%s -> %d: %s", where, status, message)
    headers: dict[str, str] = {}
    if isinstance(exc, Draining):
        pushback = exc.pushback_ms if exc.pushback_ms is not None else 1000
        headers["Retry-After"] = str(max(1, math.ceil(pushback / 1000)))
        headers["Connection"] = "close"
    elif isinstance(exc, Unauthenticated):
        headers["WWW-Authenticate"] = "Bearer"
    return _error(status, message, headers)
