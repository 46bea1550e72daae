"""Hostile clients of the HTTP port: a catalogue of malformed, oversized, compressed, deeply
nested, abandoned and slow requests against one real server process, then the costs that
must stay bounded.

For every case (`CASES`, one row each, sent over a raw socket so framing can be broken at
will): the exact status (``None``: the client leaves and no answer can come), a fragment
of the answer's message, and then the server's log holds no traceback and no ERROR line,
the message is at most `MESSAGE_BOUND` characters, ``/v2/health/live`` answers and a valid
inference over HTTP and over gRPC succeeds.

Then: 300 stalled bodies leave a normal HTTP and a normal gRPC call within
`STALL_SLOWDOWN` of their usual time (and are answered 408 after ``http_body_timeout``);
compression bombs cost at most `BOMB_CPU_SECONDS` of the server's CPU and
``/v2/health/live`` answers within `HEALTH_BOUND` meanwhile; idle and slow-header
connections are closed after ``http_keepalive_timeout``; one JSON request's peak RSS is
at most `RSS_MULTIPLE` times its size.

The server runs with a bearer token, ``--max-message-bytes`` `LIMIT` (4 MB),
``--max-concurrent-calls`` `MAX_CALLS` (fewer than the stalled bodies: they must not count),
``--http-keepalive-timeout`` `KEEPALIVE` and ``--http-body-timeout`` `BODY_TIMEOUT`.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import socket
import statistics
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import brotli
import numpy as np
import pytest
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2 as pb
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2_grpc as pb_grpc

from bench import serving
from tests.reliability import images
from tests.security.leaks import leaks

TOKEN = "hostile-http-token-5c1d"
AUTH = f"Bearer {TOKEN}"
MODEL = "cifar"  # float32 [batch, 3, 32, 32], 10 classes
INFER = f"/v2/models/{MODEL}/infer"
CLASSIFY = f"/v2/models/{MODEL}/classify"
LIMIT = 4_000_000  # --max-message-bytes: the body cap, decompressed
MAX_CALLS = 64  # --max-concurrent-calls
MAX_IMAGES = 64  # max_images_per_request, the default
KEEPALIVE = 2.0  # --http-keepalive-timeout (s)
BODY_TIMEOUT = 6.0  # --http-body-timeout (s)
SERVER_FLAGS = (
    "--max-message-bytes", str(LIMIT), "--max-concurrent-calls", str(MAX_CALLS),
    "--http-keepalive-timeout", f"{KEEPALIVE:g}", "--http-body-timeout", f"{BODY_TIMEOUT:g}",
    "--reject-non-finite",
)  # fmt: skip

# what the tests assert (docs/security.md states each)
MESSAGE_BOUND = 1100  # characters of an error message: 1000 and the note saying it was cut
# aiohttp answers what it cannot parse itself, quoting one line (at most 8190 bytes, escaped)
PARSER_MESSAGE_BOUND = 4 * 8190 + 100
STALLED = 300  # bodies stalled after 12 bytes of 1 MB
STALL_SLOWDOWN = 0.25  # s a normal call may take beyond its usual time meanwhile
HEALTH_BOUND = 0.25  # s /v2/health/live may take during compression bombs
BOMBS = 20  # gzip bombs of `BOMB_BYTES` compressed, each decompressing to ~1 GB
BOMB_BYTES = 1_000_000
BOMB_CPU_SECONDS = 3.0  # server CPU for all of them together (they stop at LIMIT)
RSS_MULTIPLE = 48  # peak RSS of one JSON request over its size (`[],` is 3 bytes, 64 in Python)
SLOWLORIS = 200  # connections dripping header bytes
LOG_LINES = 3  # lines 200 malformed or abandoned requests may add to the log

MIB = 1 << 20


# one raw HTTP/1.1 exchange


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def message(self) -> str:
        try:
            return str(json.loads(self.body)["error"])
        except (ValueError, KeyError, TypeError):
            return self.body.decode("latin-1")


def request(
    method: str,
    path: str,
    body: bytes = b"",
    headers: tuple[tuple[str, str], ...] = (),
    *,
    token: bool = True,
    length: bool = True,
) -> bytes:
    """A raw request: Host, the token (unless not), Content-Length of `body` (unless not),
    `headers`, ``Connection: close``, then `body`."""
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost"]
    if token:
        lines.append(f"Authorization: {AUTH}")
    if length and not any(k.lower() == "transfer-encoding" for k, _ in headers):
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in headers]
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _head(sock: socket.socket, data: bytes) -> tuple[bytes, bytes] | None:
    """The next response head and what followed it, `data` read already; None at the end."""
    while b"\r\n\r\n" not in data:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return None
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def read_answer(sock: socket.socket, data: bytes = b"") -> Answer | None:
    """One response (a 100 Continue skipped), or None when the server closed without one."""
    while True:
        found = _head(sock, data)
        if found is None:
            return None
        head, data = found
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        if status != 100:
            break
    headers = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "-1"))
    while length < 0 or len(data) < length:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return Answer(status, headers, data if length < 0 else data[:length])


def exchange(
    port: int, data: bytes, mode: str = "read", timeout: float = 30.0, rest: bytes = b""
) -> Answer | None:
    """Send `data` and read the answer. Modes: ``read``; ``half-close`` (shut the sending
    side after `data`); ``leave`` (close at once, no answer read); ``expect-leave`` (leave
    once the interim 100 Continue came); ``expect-send`` (then send `rest`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        if mode == "leave":
            return None
        if mode == "half-close":
            sock.shutdown(socket.SHUT_WR)
        if mode.startswith("expect"):
            found = _head(sock, b"")
            if found is None or not found[0].startswith(b"HTTP/1.1 100"):
                return read_answer(sock, b"" if found is None else b"\r\n\r\n".join(found))
            if mode == "expect-leave":
                return None
            sock.sendall(rest)
            return read_answer(sock, found[1])
        return read_answer(sock)


# bodies


def infer_body(data: object = None, shape: object = None, datatype: str = "FP32",
               compact: bool = False, **fields: object) -> bytes:  # fmt: skip
    tensor = {"name": "images", "datatype": datatype,
              "shape": [1, 3, 32, 32] if shape is None else shape,
              "data": [0.5] * 3072 if data is None else data}  # fmt: skip
    separators = (",", ":") if compact else None
    return json.dumps({"inputs": [tensor], **fields}, separators=separators).encode()


def infer(body: bytes, *headers: tuple[str, str], **options: bool) -> Callable[[], bytes]:
    return lambda: request("POST", INFER, body, headers, **options)


@functools.cache
def bomb(coding: str, size: int = BOMB_BYTES) -> bytes:
    """About `size` compressed bytes of zeros, ~1000 times as many decompressed (made a MiB
    at a time)."""
    zeros, rounds = bytes(MIB), size * 1000 // MIB
    if coding == "br":
        compressor = brotli.Compressor(quality=5)
        return b"".join(compressor.process(zeros) for _ in range(rounds)) + compressor.finish()
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(coding, -zlib.MAX_WBITS)
    deflate = zlib.compressobj(9, zlib.DEFLATED, wbits)
    return b"".join(deflate.compress(zeros) for _ in range(rounds)) + deflate.flush()


def binary_input(size: int) -> bytes:
    tensor = {"name": "images", "datatype": "FP32", "shape": [1, 3, 32, 32],
              "parameters": {"binary_data_size": size}}  # fmt: skip
    return json.dumps({"inputs": [tensor]}).encode()


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def form(*parts: bytes, boundary: str = "xyz", close: bool = True) -> bytes:
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="f{i}"; filename="f{i}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode() + part + b"\r\n"
        for i, part in enumerate(parts)
    )
    return body + (f"--{boundary}--\r\n".encode() if close else b"")


def multipart(body: bytes, content_type: str = "multipart/form-data; boundary=xyz",
              *headers: tuple[str, str]) -> Callable[[], bytes]:  # fmt: skip
    return lambda: request("POST", CLASSIFY, body, (("Content-Type", content_type), *headers))


def deep(opening: bytes, closing: bytes, depth: int) -> bytes:
    return opening * depth + closing * depth


def chunked(*chunks: bytes, end: bool = True) -> bytes:
    body = b"".join(f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in chunks)
    return body + (b"0\r\n\r\n" if end else b"")


def raw(text: str | bytes) -> Callable[[], bytes]:
    return lambda: text.encode("latin-1") if isinstance(text, str) else text


def tls_client_hello() -> bytes:
    """The first bytes of a TLS 1.2 ClientHello, as a TLS client sends them to a plain port."""
    hello = bytes.fromhex("0303") + bytes(32) + b"\x00" + b"\x00\x02\x00\x2f" + b"\x01\x00"
    handshake = b"\x01" + len(hello).to_bytes(3, "big") + hello
    return b"\x16\x03\x01" + len(handshake).to_bytes(2, "big") + handshake


PHOTO = images.jpeg(images.photo())
VALID = infer_body()
# 64 float images (2.6 MB), the last number a string: numpy made every number a string
_FLOATS = infer_body([[[[0.1234567891] * 32] * 32] * 3] * 64, [64, 3, 32, 32])
_HEAD, _, _TAIL = _FLOATS.rpartition(b"0.1234567891")
FLOATS_WITH_A_STRING = _HEAD + b'"' + b"x" * 200 + b'"' + _TAIL
EMPTY_LISTS = infer_body([[]] * 1_250_000, compact=True)  # 3.75 MB: 64 bytes of Python per `[],`
EMPTY_OBJECTS = infer_body([{}] * 1_250_000, compact=True)  # 72 bytes of Python per `{},`


@dataclass(frozen=True)
class Case:
    name: str
    send: Callable[[], bytes]
    status: int | None  # None: the client leaves, no answer
    fragment: str = ""
    mode: str = "read"
    rest: bytes = b""

    @property
    def id(self) -> str:
        return self.name


def _case(name: str, send: Callable[[], bytes], status: int | None, fragment: str = "",
          mode: str = "read", rest: bytes = b"") -> Case:  # fmt: skip
    return Case(name, send, status, fragment, mode, rest)


HEADER = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH}\r\n"
GET = "GET /v2 HTTP/1.1\r\nHost: x\r\n"
CL, TE, CE = "Content-Length", "Transfer-Encoding", "Content-Encoding"
CHUNKED = HEADER + "Transfer-Encoding: chunked\r\n\r\n"
EXPECT = ("Expect", "100-continue")
PARTIAL = raw(HEADER + "Content-Length: 1000\r\n\r\n" + '{"inputs"')
PARTIAL_CHUNKED = infer(chunked(b'{"inputs"', end=False), (TE, "chunked"))
MANY_HEADERS = "".join(f"X-H{i}: {i}\r\n" for i in range(500))

FRAMING = [
    _case("duplicate-content-length", raw(HEADER + "Content-Length: 2\r\n" * 2 + "\r\n{}"), 400),
    _case("duplicate-unequal-content-length",
          raw(HEADER + "Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}"), 400),
    _case("negative-content-length", raw(HEADER + "Content-Length: -5\r\n\r\n{}"), 400),
    _case("non-numeric-content-length", raw(HEADER + "Content-Length: 1e3\r\n\r\n{}"), 400),
    _case("content-length-with-chunked",
          raw(HEADER + "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"), 400),
    _case("bad-chunk-size", raw(CHUNKED + "zz\r\n{}\r\n0\r\n\r\n"), 400),
    _case("chunk-size-overflow", raw(CHUNKED + "f" * 40 + "\r\n{}\r\n0\r\n\r\n"), 400),
    _case("chunk-extension-garbage", raw(CHUNKED + "2;\x01\r\n{}\r\n0\r\n\r\n"), 400),
    _case("transfer-encoding-unknown", raw(HEADER + "Transfer-Encoding: foo\r\n\r\n{}"), 400),
    _case("transfer-encoding-chunked-not-last",
          raw(HEADER + "Transfer-Encoding: chunked, gzip\r\n\r\n{}"), 400),
    _case("url-100kb", raw(f"GET /v2/{'a' * 100_000} HTTP/1.1\r\nHost: x\r\n\r\n"), 400),
    _case("header-value-100kb", raw(GET + f"X-Big: {'a' * 100_000}\r\n\r\n"), 400),
    _case("header-name-10kb", raw(GET + f"{'a' * 10_000}: 1\r\n\r\n"), 400),
    _case("500-headers", raw(GET + MANY_HEADERS + "\r\n"), 400),
    _case("control-character-in-header", raw(GET + "X-A: a\x01b\r\n\r\n"), 400),
    _case("nul-in-url", raw("GET /v2\x00 HTTP/1.1\r\nHost: x\r\n\r\n"), 400),
    _case("space-before-colon", raw(GET + "X-A : b\r\n\r\n"), 400),
    _case("obsolete-line-folding", raw(GET + "X-A: b\r\n c\r\n\r\n"), 400),
    _case("bad-header-name", raw(GET + "Bad Name: b\r\n\r\n"), 400),
    _case("method-with-space", raw("GE T /v2 HTTP/1.1\r\nHost: x\r\n\r\n"), 400),
    _case("request-line-only-method", raw("GET\r\n\r\n"), 400),
    _case("http-version-garbage", raw("GET /v2 HTTP/x.y\r\nHost: x\r\n\r\n"), 400),
    _case("tls-client-hello-on-plain-port", tls_client_hello, 400),
    _case("binary-garbage", raw(bytes(range(256)) * 4), 400),
    _case("http2-preface", raw("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), 400),
]  # fmt: skip

BODIES = [
    _case("declared-10-gib", raw(HEADER + f"Content-Length: {10 << 30}\r\n\r\n" + "{" * 1000),
          413, f"at most {LIMIT} are allowed"),
    _case("declared-one-past-the-limit", raw(HEADER + f"Content-Length: {LIMIT + 1}\r\n\r\n{{"),
          413, f"the body is {LIMIT + 1} bytes (Content-Length)"),
    _case("chunked-past-the-limit", infer(chunked(*[b" " * 1_000_000] * 5), (TE, "chunked")),
          413, f"the body is over {LIMIT} bytes"),
    _case("at-the-limit-is-read", infer(b" " * (LIMIT - 2) + b"{}"), 400,
          "the request body needs 'inputs'"),
    _case("expect-100-continue-then-leave", infer(b"", EXPECT, (CL, "9000"), length=False),
          None, mode="expect-leave"),
    _case("expect-100-continue-then-body", infer(b"", EXPECT, (CL, str(len(VALID))), length=False),
          200, mode="expect-send", rest=VALID),
    _case("expect-100-continue-over-the-limit",
          infer(b"", EXPECT, (CL, str(LIMIT + 1)), length=False), 413, "(max_message_bytes)",
          mode="expect-send"),
    _case("expect-100-continue-without-token",
          infer(b"", EXPECT, (CL, str(len(VALID))), length=False, token=False), 401,
          "missing bearer token", mode="expect-send"),
    _case("truncated-body-then-leave", PARTIAL, None, mode="leave"),
    _case("half-close-mid-body", PARTIAL, None, mode="half-close"),
    _case("chunked-without-last-chunk-then-leave", PARTIAL_CHUNKED, None, mode="leave"),
    _case("chunked-half-close-mid-body", PARTIAL_CHUNKED, None, mode="half-close"),
    _case("valid-chunked", infer(chunked(VALID[:100], VALID[100:]), (TE, "chunked")), 200),
]  # fmt: skip

NOISE = images.random_bytes(5000)
COMPRESSION = [
    _case("gzip-bomb", infer(bomb("gzip"), (CE, "gzip")), 413,
          f"decompresses (gzip) to over {LIMIT} bytes"),
    _case("x-gzip-bomb", infer(bomb("gzip"), (CE, "x-gzip")), 413, "decompresses (x-gzip)"),
    _case("deflate-bomb", infer(bomb("deflate"), (CE, "deflate")), 413, "decompresses (deflate)"),
    _case("raw-deflate-bomb", infer(bomb("raw-deflate"), (CE, "deflate")), 413,
          "decompresses (deflate)"),
    _case("br-bomb", infer(bomb("br"), (CE, "br")), 413, "decompresses (br)"),
    _case("gzip-bomb-without-token", infer(bomb("gzip"), (CE, "gzip"), token=False), 401,
          "missing bearer token"),
    _case("gzip-header-on-plain-json", infer(VALID, (CE, "gzip")), 400,
          "the body is not valid gzip data"),
    _case("deflate-header-on-noise", infer(NOISE, (CE, "deflate")), 400,
          "the body is not valid deflate data"),
    _case("br-header-on-noise", infer(NOISE, (CE, "br")), 400, "the body is not valid br data"),
    _case("gzip-truncated", infer(gzip.compress(VALID)[:-30], (CE, "gzip")), 400,
          "the request body is not valid JSON"),
    _case("unknown-coding", infer(VALID, (CE, "compress")), 415,
          "Content-Encoding 'compress' is not supported"),
    _case("stacked-codings", infer(gzip.compress(gzip.compress(VALID)), (CE, "gzip, gzip")), 415,
          "Content-Encoding 'gzip, gzip' is not supported"),
    _case("valid-gzip", infer(gzip.compress(VALID), (CE, "gzip")), 200),
    _case("valid-deflate", infer(zlib.compress(VALID), (CE, "deflate")), 200),
    _case("valid-raw-deflate", infer(raw_deflate(VALID), (CE, "deflate")), 200),
    _case("valid-br", infer(brotli.compress(VALID), (CE, "br")), 200),
    _case("valid-gzip-members",
          infer(gzip.compress(VALID[:50]) + gzip.compress(VALID[50:]), (CE, "gzip")), 200),
    _case("identity", infer(VALID, (CE, "identity")), 200),
]  # fmt: skip


def _data(text: bytes) -> bytes:
    """A valid body whose ``data`` is `text`, as sent."""
    return infer_body(data="DATA").replace(b'"DATA"', text)


def _shape(text: bytes) -> bytes:
    return infer_body(shape="SHAPE").replace(b'"SHAPE"', text)


DEPTH = "the request's JSON nests deeper than 64 levels"
DIGITS = "the request body holds an integer of more than 4300 digits"
NON_FINITE = "input holds NaN or Inf values"
HL = "Inference-Header-Content-Length"
MANY_INPUTS = json.dumps({"inputs": [{"name": f"in{i}", "datatype": "FP32", "shape": [1],
                                      "data": [0]} for i in range(40_000)]}).encode()  # fmt: skip
DEEP_PARAMETERS = b'{"parameters": ' + b'{"a":' * 99 + b"1" + b"}" * 99 + b', "inputs": []}'
JSON_CASES = [
    _case("arrays-100000-deep", infer(deep(b"[", b"]", 100_000)), 400, DEPTH),
    _case("objects-100000-deep", infer(deep(b'{"a":', b"}", 100_000)), 400, DEPTH),
    _case("arrays-100000-deep-unclosed", infer(b"[" * 100_000), 400, DEPTH),
    _case("data-65-deep", infer(_data(deep(b"[", b"]", 62))), 400, DEPTH),
    _case("parameters-100-deep", infer(DEEP_PARAMETERS), 400, DEPTH),
    _case("brackets-inside-strings", infer(infer_body(id="r" + "[" * 100)), 200),
    _case("escaped-quote-then-deep", infer(b'{"id":"\\"","x":' + deep(b"[", b"]", 100) + b"}"),
          400, DEPTH),
    _case("integer-5000-digits-in-data", infer(_data(b"[" + b"9" * 5000 + b"]")), 400, DIGITS),
    _case("integer-5000-digits-in-shape", infer(_shape(b"[" + b"9" * 5000 + b"]")), 400, DIGITS),
    _case("float-5000-digits", infer(_data(b"[" + b"9" * 5000 + b".5]")), 400,
          "has shape [1, 3, 32, 32] (3072 elements) but 'data' holds 1"),
    _case("float-overflow-is-infinite", infer(_data(b"[" + b"1e999," * 3071 + b"1e999]")), 400,
          NON_FINITE),
    _case("nan-literal", infer(_data(b"[" + b"NaN," * 3071 + b"NaN]")), 400, NON_FINITE),
    _case("not-utf8", infer(b'{"inputs": "\xff\xfe"}'), 400, "the request's JSON is not UTF-8"),
    _case("not-json", infer(b"hello"), 400, "the request body is not valid JSON"),
    _case("empty-body", infer(b""), 400, "the request body is not valid JSON"),
    _case("top-level-array", infer(b"[]"), 400, "the request body must be a JSON object"),
    _case("floats-with-a-string-at-the-end", infer(FLOATS_WITH_A_STRING), 400,
          "input 'images' is FP32 but its 'data' holds strings"),
    _case("data-of-empty-lists", infer(EMPTY_LISTS), 400,
          "has shape [1, 3, 32, 32] (3072 elements) but 'data' holds 0"),
    _case("40000-inputs", infer(MANY_INPUTS), 400, "(cut; "),
    _case("header-length-past-the-body", infer(VALID, (HL, "99999")), 400,
          f"{HL} is 99999 but the body has"),
    _case("header-length-5000-digits", infer(VALID, (HL, "9" * 5000)), 400,
          "it must be a byte count"),
    _case("header-length-negative", infer(VALID, (HL, "-1")), 400, f"{HL} is -1"),
    _case("binary-size-negative", infer(binary_input(-1)), 400,
          "'binary_data_size' must be an integer >= 0"),
    _case("binary-size-past-the-body", infer(binary_input(10**12)), 400,
          "declares 1000000000000 bytes of binary data"),
]  # fmt: skip

LONG = "b" * 200
NESTED = (b"--xyz\r\nContent-Type: multipart/mixed; boundary=in\r\n\r\n"
          b"--in\r\n\r\nA\r\n--in--\r\n--xyz--\r\n")  # fmt: skip
TINY_PARTS = b"--b\r\n\r\nx\r\n" * 100_000 + b"--b--\r\n"
MULTIPART = [
    _case("no-boundary", multipart(form(PHOTO), "multipart/form-data"), 400,
          "the multipart form cannot be read: boundary missed"),
    _case("boundary-200-characters",
          multipart(form(PHOTO, boundary=LONG), f"multipart/form-data; boundary={LONG}"), 400,
          "is too long (70 chars max)"),
    _case("no-closing-boundary", multipart(form(PHOTO, close=False)), 400,
          "the multipart form cannot be read"),
    _case("no-starting-boundary", multipart(b"garbage"), 400, "Could not find starting boundary"),
    _case("65-parts", multipart(form(*[PHOTO] * 65)), 400,
          f"request has more than {MAX_IMAGES} images; at most {MAX_IMAGES} are allowed"),
    _case("100000-parts", multipart(TINY_PARTS, "multipart/form-data; boundary=b"), 400,
          f"request has more than {MAX_IMAGES} images"),
    _case("nested-form", multipart(NESTED), 400, "nested multipart forms are not supported"),
    _case("empty-form", multipart(b"--xyz--\r\n"), 400, "the form holds no file"),
    _case("form-over-the-limit", multipart(form(images.random_bytes(LIMIT))), 413, "the body is"),
    _case("valid-form-of-two", multipart(form(PHOTO, PHOTO)), 200),
    _case("valid-gzip-form", multipart(gzip.compress(form(PHOTO)),
                                       "multipart/form-data; boundary=xyz", (CE, "gzip")), 200),
    _case("image-as-body", lambda: request("POST", CLASSIFY, PHOTO), 200),
]  # fmt: skip

ROUTES = [
    _case("unknown-route-with-body", lambda: request("POST", "/v2/nothing", b"x" * 1000), 404),
    _case("wrong-method", lambda: request("DELETE", INFER), 405),
    _case("head-on-infer", lambda: request("HEAD", INFER), 405),
    _case("no-token", infer(VALID, token=False), 401, "missing bearer token"),
    _case("wrong-token", infer(VALID, ("Authorization", "Bearer nope"), token=False), 401,
          "bearer token is not accepted"),
    _case("two-authorization-headers",
          infer(VALID, ("Authorization", AUTH), ("Authorization", AUTH), token=False), 401,
          "2 authorization header entries"),
    _case("top-k-5000-characters",
          lambda: request("POST", f"{CLASSIFY}?top_k={'x' * 5000}", PHOTO), 400, "(cut; "),
    _case("repository-index-deep",
          lambda: request("POST", "/v2/repository/index", deep(b"[", b"]", 100_000)), 400, DEPTH),
    _case("probe-without-token", lambda: request("GET", "/v2/health/live", token=False), 200),
]  # fmt: skip

CASES = [*FRAMING, *BODIES, *COMPRESSION, *JSON_CASES, *MULTIPART, *ROUTES]


# the server and what must hold after every case


@pytest.fixture(scope="module")
def server(cifar_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[serving.Server]:
    running = serving.start(
        cifar_repo, tmp_path_factory.mktemp("hostile-http-logs") / "server.log", SERVER_FLAGS,
        env={"RESNET_SERVE_AUTH_TOKEN": TOKEN},
    )  # fmt: skip
    yield running
    assert running.stop() == 0, running.log()


def http_port(server: serving.Server) -> int:
    assert server.http_url is not None
    return int(server.http_url.rsplit(":", 1)[1])


def classify_grpc(server: serving.Server) -> None:
    with server.channel() as channel:
        response = pb_grpc.ClassifierStub(channel).Classify(
            pb.ClassifyRequest(model=MODEL, images=[pb.Image(encoded=PHOTO)]),
            metadata=[("authorization", AUTH)], timeout=30,
        )  # fmt: skip
    assert len(response.results) == 1


def infer_http(server: serving.Server) -> None:
    answer = exchange(http_port(server), request("POST", INFER, VALID))
    assert answer is not None and answer.status == 200, answer


def clean_log(server: serving.Server) -> None:
    log = server.log()
    assert "Traceback" not in log, log
    assert " ERROR " not in log, log


def still_healthy(server: serving.Server) -> None:
    assert server.process.poll() is None, server.log()
    live = exchange(http_port(server), request("GET", "/v2/health/live", token=False))
    assert live is not None and live.status == 200
    infer_http(server)
    classify_grpc(server)
    clean_log(server)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_request(server: serving.Server, case: Case) -> None:
    answer = exchange(http_port(server), case.send(), case.mode, rest=case.rest)
    if case.status is None:
        assert answer is None, answer
    else:
        assert answer is not None, "no answer"
        assert answer.status == case.status, (answer.status, answer.message[:500])
        assert case.fragment in answer.message, answer.message[:2000]
        parser = answer.headers.get("content-type", "").startswith("text/plain")
        bound = PARSER_MESSAGE_BOUND if parser else MESSAGE_BOUND
        assert len(answer.message) <= bound, len(answer.message)
        assert leaks(answer.message, server.log_path.parent) == [], answer.message[:500]
    still_healthy(server)


def test_the_catalogue_is_large_and_named_once() -> None:
    ids = [c.id for c in CASES]
    assert len(CASES) >= 80 and len(set(ids)) == len(ids)


def test_client_faults_are_logged_in_few_lines(server: serving.Server) -> None:
    """A burst of malformed requests writes at most a few rate-limited lines, no traceback."""
    before = server.log().count("HTTP request(s) malformed")
    port = http_port(server)
    for _ in range(100):
        answer = exchange(port, raw(HEADER + "Content-Length: -5\r\n\r\n")())
        assert answer is not None and answer.status == 400
    for _ in range(100):
        assert exchange(port, raw(HEADER + "Content-Length: 100\r\n\r\n{")(), "half-close") is None
    assert server.log().count("HTTP request(s) malformed") - before <= LOG_LINES
    still_healthy(server)


# bounded costs


def _timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def test_stalled_bodies_do_not_stop_other_calls(server: serving.Server) -> None:
    """`STALLED` requests send their headers and 12 bytes of a 1 MB body, then stall: more
    than ``--max-concurrent-calls``, yet a normal HTTP and gRPC call are answered as usual,
    and each stalled body is answered 408 once ``http_body_timeout`` has passed."""
    port = http_port(server)
    usual_http = statistics.median(_timed(lambda: infer_http(server)) for _ in range(5))
    usual_grpc = statistics.median(_timed(lambda: classify_grpc(server)) for _ in range(5))
    head = (HEADER + f"Content-Length: {1 << 20}\r\n\r\n" + '{"inputs": ').encode()
    stalled = []
    try:
        for _ in range(STALLED):
            sock = socket.create_connection(("127.0.0.1", port), timeout=BODY_TIMEOUT + 30)
            sock.sendall(head)
            stalled.append(sock)
        opened = time.monotonic()
        time.sleep(0.5)  # every head read, every body waiting
        took_http = max(_timed(lambda: infer_http(server)) for _ in range(3))
        took_grpc = max(_timed(lambda: classify_grpc(server)) for _ in range(3))
        assert time.monotonic() - opened < BODY_TIMEOUT, "measured after the stall ended"
        print(f"\nusual: HTTP {usual_http * 1000:.0f} ms, gRPC {usual_grpc * 1000:.0f} ms; with "
              f"{STALLED} stalled bodies: HTTP {took_http * 1000:.0f} ms, gRPC "
              f"{took_grpc * 1000:.0f} ms")  # fmt: skip
        assert took_http <= usual_http + STALL_SLOWDOWN
        assert took_grpc <= usual_grpc + STALL_SLOWDOWN
        answers = [read_answer(sock) for sock in stalled]
    finally:
        for sock in stalled:
            sock.close()
    assert {a.status if a else None for a in answers} == {408}
    assert all(f"within {BODY_TIMEOUT:g} s (http_body_timeout)" in a.message for a in answers if a)
    assert server.log().count("HTTP request(s) malformed") <= 20  # rate-limited, not 300
    still_healthy(server)


def test_compression_bombs_cost_bounded_cpu(server: serving.Server) -> None:
    """`BOMBS` gzip bodies of 1 MB, each ~1 GB decompressed, half of them without a token:
    413 (decompression stops past the limit) and 401 (never decompressed), within
    `BOMB_CPU_SECONDS` of the server's CPU, while /v2/health/live answers in time."""
    port = http_port(server)
    body = bomb("gzip")
    statuses: list[int | None] = []
    done = threading.Event()

    def send() -> None:
        try:
            for i in range(BOMBS):
                sent = request("POST", INFER, body, (("Content-Encoding", "gzip"),),
                               token=i % 2 == 0)  # fmt: skip
                answer = exchange(port, sent)
                statuses.append(answer.status if answer else None)
        finally:
            done.set()

    before = server.cpu_seconds()
    bombs = threading.Thread(target=send)
    bombs.start()
    health = []
    live = request("GET", "/v2/health/live", token=False)
    while not done.is_set():
        health.append(_timed(lambda: exchange(port, live)))
        time.sleep(0.005)
    bombs.join()
    cpu = server.cpu_seconds() - before
    print(f"\n{BOMBS} bombs: {cpu:.2f} s of server CPU; /v2/health/live at most "
          f"{max(health) * 1000:.0f} ms ({len(health)} probes)")  # fmt: skip
    assert statuses == [413, 401] * (BOMBS // 2)
    assert cpu < BOMB_CPU_SECONDS
    assert max(health) < HEALTH_BOUND
    still_healthy(server)


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_idle_and_slow_header_connections_are_closed(server: serving.Server) -> None:
    """`SLOWLORIS` connections, half idle, half dripping a header line every 0.3 s, and one
    kept alive after an answer: each is closed ``http_keepalive_timeout`` after it opened
    (or after its answer), the dripping ones too."""
    port = http_port(server)
    socks, opened_at = [], {}
    for _ in range(SLOWLORIS):
        socks.append(socket.create_connection(("127.0.0.1", port)))
        opened_at[socks[-1]] = time.monotonic()
    opened = time.monotonic()
    dripping = socks[::2]
    for sock in dripping:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")
    kept = socket.create_connection(("127.0.0.1", port))
    kept.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = read_answer(kept)
    answered = time.monotonic()
    assert answer is not None and answer.status == 200
    closed_at: dict[socket.socket, float] = {}
    deadline = opened + KEEPALIVE + 10
    last_drip = opened
    while len(closed_at) < len(socks) + 1 and time.monotonic() < deadline:
        now = time.monotonic()
        for sock in [*socks, kept]:
            if sock not in closed_at and _closed(sock):
                closed_at[sock] = now
        if now - last_drip >= 0.3:
            for sock in dripping:
                if sock not in closed_at:
                    try:
                        sock.sendall(b"X-Drip: 1\r\n")
                    except OSError:
                        closed_at[sock] = now
            last_drip = now
        time.sleep(0.05)
    for sock in [*socks, kept]:
        sock.close()
    assert len(closed_at) == len(socks) + 1, f"{len(socks) + 1 - len(closed_at)} still open"
    ages = [closed_at[s] - opened_at[s] for s in socks]
    print(f"\nclosed after {min(ages):.2f} to {max(ages):.2f} s (keepalive {KEEPALIVE:g} s)")
    assert min(ages) >= KEEPALIVE - 0.5 and max(ages) <= KEEPALIVE + 3
    assert KEEPALIVE - 0.5 <= closed_at[kept] - answered <= KEEPALIVE + 3
    still_healthy(server)


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key}")


LARGE_VALID = infer_body([[[[0.1234567891] * 32] * 32] * 3] * 64, [64, 3, 32, 32])
RSS_BODIES = {"empty-lists": (EMPTY_LISTS, 400), "empty-objects": (EMPTY_OBJECTS, 400),
              "floats-with-a-string": (FLOATS_WITH_A_STRING, 400),
              "64-float-images": (LARGE_VALID, 200)}  # fmt: skip


@pytest.mark.parametrize("name", list(RSS_BODIES))
def test_peak_rss_of_a_json_request_is_bounded(server: serving.Server, name: str) -> None:
    """The server's peak RSS (VmHWM, reset through /proc/<pid>/clear_refs) while it answers
    one JSON request grows at most `RSS_MULTIPLE` times the request's size."""
    body, status = RSS_BODIES[name]
    pid = server.process.pid
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak starts again from now
    except OSError:
        pytest.skip("cannot reset the peak RSS here")
    base = _status_kib(pid, "VmRSS")
    answer = exchange(http_port(server), request("POST", INFER, body))
    assert answer is not None and answer.status == status, answer
    grown = _status_kib(pid, "VmHWM") - base
    print(f"\n{name}: {len(body) / MIB:.1f} MiB body, peak RSS +{grown / MIB:.1f} MiB "
          f"({grown / len(body):.1f}x)")  # fmt: skip
    assert grown <= RSS_MULTIPLE * len(body)
    still_healthy(server)


# a large JSON body is parsed off the event loop

BIG_IMAGES = 1000  # float images of 3x32x32 in one JSON body, each number 10 characters: 34 MB
PARSE_BOUND = 0.25  # s /v2/health/live may take while that body is parsed


@pytest.fixture(scope="module")
def roomy_server(
    cifar_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[serving.Server]:
    """A server with the default ``--max-message-bytes`` (40 MiB), room for the large body."""
    running = serving.start(
        cifar_repo, tmp_path_factory.mktemp("large-json-logs") / "server.log",
        ("--frontends", "0"), env={"RESNET_SERVE_AUTH_TOKEN": TOKEN},
    )  # fmt: skip
    yield running
    assert running.stop() == 0, running.log()


def test_a_large_json_body_leaves_other_callers_answered(roomy_server: serving.Server) -> None:
    """A 34 MB JSON body of float images (1.7 s of `json.loads`) is parsed on a worker thread
    in short steps: /v2/health/live, asked over and over meanwhile, answers every time within
    `PARSE_BOUND`, and the body's answer is the one the parse leads to (too many images)."""
    port = http_port(roomy_server)
    numbers = ",".join(map("{:.8f}".format, np.random.default_rng(7).random(BIG_IMAGES * 3072)))
    body = (f'{{"inputs":[{{"name":"images","datatype":"FP32","shape":[{BIG_IMAGES},3,32,32],'
            f'"data":[{numbers}]}}]}}').encode()  # fmt: skip
    assert len(body) > 30 * MIB
    answers: list[Answer | None] = []
    done = threading.Event()

    def send() -> None:
        try:
            answers.append(exchange(port, request("POST", INFER, body), timeout=120))
        finally:
            done.set()

    big = threading.Thread(target=send)
    big.start()
    health = []
    live = request("GET", "/v2/health/live", token=False)
    while not done.is_set():
        health.append(_timed(lambda: exchange(port, live)))
        time.sleep(0.005)
    big.join()
    print(f"\n{len(body) / MIB:.0f} MiB JSON body: /v2/health/live at most "
          f"{max(health) * 1000:.0f} ms ({len(health)} probes)")  # fmt: skip
    [answer] = answers
    assert answer is not None and answer.status == 400, answer
    assert f"request has {BIG_IMAGES} images; at most {MAX_IMAGES} are allowed" in answer.message
    assert len(health) >= 5, "the body was answered before the probes could measure it"
    assert max(health) < PARSE_BOUND
    clean_log(roomy_server)
