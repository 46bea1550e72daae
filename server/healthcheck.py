"""The container's HEALTHCHECK: one grpc.health.v1 Check; exit 0 only when SERVING.

    python -m server.healthcheck 127.0.0.1:8001 [--service NAME] [--timeout 3]

A probe runs every few seconds for the life of a container, and importing grpc
alone costs about 0.2 s of CPU and 35 MB (its core starts asyncio and ssl), so
this probe speaks the few bytes of gRPC it needs over a plain socket with the
standard library only: the HTTP/2 preface, one HEADERS frame (HPACK literals,
no table, no Huffman), one DATA frame with the HealthCheckRequest, and then it
reads frames until the stream ends. The answer's only field is the status
varint, so SERVING is exactly the message ``08 01``; anything else (another
status, a gRPC error in the trailers, a reset, a refused connection, the
timeout) is unhealthy. It is plaintext, like the server's port in the image.
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys
import time
from collections.abc import Sequence

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
END_STREAM, ACK, END_HEADERS, PADDED = 0x1, 0x1, 0x4, 0x8
STREAM = 1
SERVING = b"\x08\x01"  # HealthCheckResponse{status: SERVING}
CHECK = "/grpc.health.v1.Health/Check"


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) \
        + payload  # fmt: skip


def _string(value: bytes) -> bytes:
    assert len(value) < 127, "one-byte HPACK length prefix"
    return bytes([len(value)]) + value


def _headers(authority: str, timeout: float) -> bytes:
    """HPACK: each field a literal without indexing, new name (0x00), no Huffman."""
    fields = [(":method", "POST"), (":scheme", "http"), (":path", CHECK),
              (":authority", authority), ("content-type", "application/grpc"), ("te", "trailers"),
              ("grpc-timeout", f"{max(1, int(timeout * 1000))}m")]  # fmt: skip
    return b"".join(b"\x00" + _string(k.encode()) + _string(v.encode()) for k, v in fields)


def _request(service: str) -> bytes:
    """HealthCheckRequest{service} with gRPC's 5-byte message prefix."""
    name = service.encode()
    message = b"\x0a" + bytes([len(name)]) + name if name else b""
    assert len(name) < 128, "service name too long for a one-byte varint"
    return b"\x00" + struct.pack(">I", len(message)) + message


def _read_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed by the server")
        data += chunk
    return data


def check(address: str, service: str = "", timeout: float = 3.0) -> bytes:
    """The health answer's message bytes (``08 01`` when SERVING); raises on any failure."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
        sock.sendall(PREFACE + _frame(SETTINGS, 0, 0)
                     + _frame(HEADERS, END_HEADERS, STREAM, _headers(address, timeout))
                     + _frame(DATA, END_STREAM, STREAM, _request(service)))  # fmt: skip
        body = b""
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            length, kind, flags, stream = struct.unpack(">IBBI", b"\x00" + _read_exact(sock, 9))
            payload = _read_exact(sock, length)
            stream &= 0x7FFFFFFF
            if kind == SETTINGS and not flags & ACK:
                sock.sendall(_frame(SETTINGS, ACK, 0))
            elif kind == PING and not flags & ACK:
                sock.sendall(_frame(PING, ACK, 0, payload))
            elif kind == GOAWAY or (kind == RST_STREAM and stream == STREAM):
                raise ConnectionError(f"the server ended the call (frame type {kind})")
            elif stream == STREAM and kind == DATA:
                body += payload[1 + payload[0] :] if flags & PADDED else payload
            if stream == STREAM and kind in (DATA, HEADERS) and flags & END_STREAM:
                return body[5:]  # without the gRPC message prefix (a missing answer: b"")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.healthcheck",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    parser.add_argument("address", help="host:port of the gRPC server")
    parser.add_argument("--service", default="", help="a service or model name (default: server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default: 3)")
    args = parser.parse_args(argv)
    try:
        answer = check(args.address, args.service, args.timeout)
    except (OSError, ValueError) as exc:
        print(f"{args.address}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if answer == SERVING:
        print("SERVING")
        return 0
    print(f"not serving (answer {answer.hex() or 'none'})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
