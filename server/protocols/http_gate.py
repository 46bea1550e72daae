"""The HTTP port's gate: what the gRPC handler wrapper does, for HTTP, with the same
`server.interceptors.Admission` (drain, bearer token, the call limit), and the one guard
against hostile bodies (docs/security.md).

A request's body is read whole before the call counts against ``max_concurrent_calls``,
after the drain and token checks (a stranger's body is never read or decompressed), one
of at most ``http_max_body_reads`` at once (more: 503), within ``http_body_timeout``
(408) and ``max_message_bytes`` (413, at once for a larger ``Content-Length``;
`server.protocols.http_body`). ``Expect: 100-continue`` is answered only once the headers
pass. A body too slow, too large or not in its coding is the client's doing: no
traceback, one rate-limited log line for all of them (`server.auth`'s rule). With tracing
on, every request but the probes is a SERVER span (`Gate.traced`, `server.tracing`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from server import tracing
from server.auth import RateLimitedLog
from server.config import Settings
from server.errors import QueueFull, Unauthenticated, bounded
from server.interceptors import Admission
from server.protocols.http_answers import authorization, brief, error, failure
from server.protocols.http_body import BodyRefused, Decoder
from server.protocols.http_body import read as read_body

log = logging.getLogger("server.protocols.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PROBE = "probe"  # route names of the probes: open without a token, answered while draining
BODY = web.RequestKey("resnet_serve.body", bytes)  # the request's body, read by the middleware


class Gate:
    """The middleware and the ``Expect`` handler of the HTTP port."""

    def __init__(self, settings: Settings, admission: Admission) -> None:
        self._settings = settings
        self._admission = admission
        self._reading = admission.bodies  # bodies being read (http_max_body_reads)
        self.client_faults = RateLimitedLog(
            log, "HTTP request(s) malformed, too slow, too large or left by the client",
            "; each answered 4xx or closed",
        )  # fmt: skip

    def middlewares(self) -> list[Handler]:
        """The port's middlewares: `middleware`, inside `traced` when tracing is on."""
        if tracing.ENABLED:  # decided once, when the port starts
            return [self.traced, self.middleware]  # type: ignore[list-item]
        return [self.middleware]  # type: ignore[list-item]

    @web.middleware
    async def traced(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """A SERVER span for every request but the probes (`server.tracing`), its parent
        the caller's ``traceparent`` header; refusals are answers it records."""
        if _is_probe(request):
            return await handler(request)
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else ""
        attributes = {
            "http.request.method": request.method,
            "url.path": request.path,
            "url.scheme": request.scheme,
            "network.protocol.version": f"{request.version.major}.{request.version.minor}",
        }
        if route:
            attributes["http.route"] = route
        if request.remote:
            attributes["client.address"] = request.remote
        agent = request.headers.get("User-Agent")
        if agent:
            attributes["user_agent.original"] = agent
        name = f"{request.method} {route}" if route else request.method
        with tracing.server_span(name, request.headers, attributes) as span:
            response = await handler(request)
            tracing.http_status(span, response.status)
            return response

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
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

    async def expect(self, request: web.Request) -> web.StreamResponse | None:
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
            self._admission.check(where, lambda: authorization(request))
        except Unauthenticated as exc:  # the same reasons, in HTTP's words
            raise Unauthenticated(str(exc).replace("metadata", "header")) from None
        limit = self._settings.max_message_bytes
        declared = request.content_length
        if declared is not None and declared > limit:
            raise BodyRefused(
                413, f"the body is {declared} bytes (Content-Length); at most {limit} are "
                "allowed (max_message_bytes)",
            )  # fmt: skip

    def _refusal(self, request: web.Request, where: str, exc: Exception) -> web.Response:
        if isinstance(exc, BodyRefused):  # the client's doing: one rate-limited line for all
            message = bounded(f"{where}: {exc}")
            self.client_faults.event(f"{exc.status}, {message}")
            return error(exc.status, message, {"Connection": "close"})
        if isinstance(exc, web.HTTPException):  # no such route, method not allowed
            if exc.status < 400:
                raise exc
            return error(exc.status, f"{where}: {exc.reason}", exc.headers)
        return failure(request, exc)

    async def _read_body(self, request: web.Request) -> bytes:
        """The body, decompressed: at most ``max_message_bytes`` (`_check_head` refused a
        larger Content-Length), within ``http_body_timeout``, one of at most
        ``http_max_body_reads`` bodies being read."""
        settings = self._settings
        limit = settings.max_message_bytes
        if not request.body_exists:
            return b""
        decoder = Decoder.of(request.headers.getall("Content-Encoding", []))
        if (reading := self._reading.total()) >= settings.http_max_body_reads:
            raise QueueFull(
                f"the server is reading {reading} request bodies, its limit "
                f"(http_max_body_reads {settings.http_max_body_reads}); retry later or on "
                "another instance"
            )
        self._reading.add(1)
        try:
            async with asyncio.timeout(settings.http_body_timeout):
                return await read_body(request.content, decoder, limit)
        except TimeoutError:
            raise BodyRefused(
                408, f"the body did not arrive within {settings.http_body_timeout:g} s "
                "(http_body_timeout)",
            ) from None  # fmt: skip
        except (ConnectionError, RequestPayloadError, HttpProcessingError) as exc:
            raise BodyRefused(400, f"the body could not be read: {brief(exc)}") from None
        finally:
            self._reading.add(-1)


def _is_probe(request: web.Request) -> bool:
    return (request.match_info.route.name or "").startswith(PROBE)
