"""The HTTP adapter's request bodies: read whole within their limits, decompressed a step
at a time, and a ``classify`` body split into its image files.

A body stops at the first byte past ``max_message_bytes`` (413), compressed or not: each
decompression step (gzip, deflate, br, zstd: aiohttp's decoders) is asked for no more than
the room left plus one byte, so nothing is decompressed after the refusal.
"""

from __future__ import annotations

import asyncio

from aiohttp import BodyPartReader, StreamReader, web
from aiohttp.compression_utils import (
    HAS_BROTLI,
    HAS_ZSTD,
    BrotliDecompressor,
    DecompressionBaseHandler,
    ZLibDecompressor,
    ZSTDDecompressor,
)
from aiohttp.multipart import MultipartReader

from server.errors import InvalidInput

INFLATE_STEP = 1 << 20  # decompressed bytes per step; the loop serves others between steps
CODINGS = ("gzip", "x-gzip", "deflate", "br", "zstd")


class BodyRefused(Exception):
    """A request refused while its body is read, the client's doing: its HTTP status and
    why; the connection closes after the answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Decoder:
    """A body's Content-Encoding undone with aiohttp's decoders, asked a step at a time for
    at most the room left plus one byte: it stops at the first byte past the limit and
    decompresses nothing after that."""

    def __init__(self, coding: str) -> None:
        self.coding = coding
        self._decoder: DecompressionBaseHandler | None = None

    @classmethod
    def of(cls, codings: list[str]) -> Decoder | None:
        named = [c.strip().lower() for value in codings for c in value.split(",") if c.strip()]
        named = [c for c in named if c != "identity"]
        if not named:
            return None
        supported = [c for c in CODINGS if {"br": HAS_BROTLI, "zstd": HAS_ZSTD}.get(c, True)]
        if len(named) > 1 or named[0] not in supported:
            raise BodyRefused(
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
            raise BodyRefused(400, f"the body is not valid {self.coding} data") from None

    def _new(self, first: bytes) -> DecompressionBaseHandler:
        if self.coding == "br":
            return BrotliDecompressor()
        if self.coding == "zstd":
            return ZSTDDecompressor()
        if self.coding == "deflate":  # zlib-wrapped (RFC 1950) or raw, as aiohttp takes it
            return ZLibDecompressor("deflate", suppress_deflate_header=first[0] & 0xF != 8)
        return ZLibDecompressor("gzip")


async def read(stream: StreamReader, decoder: Decoder | None, limit: int) -> bytes:
    """The body from `stream`, decoded, refused (413) at the first byte past `limit`."""
    parts: list[bytes] = []
    size = 0
    async for chunk in stream.iter_any():
        if decoder is None:
            size += len(chunk)
            if size > limit:
                raise BodyRefused(413, f"the body is over {limit} bytes (max_message_bytes)")
            parts.append(chunk)
            continue
        data = chunk
        while out := decoder.step(data, min(limit - size + 1, INFLATE_STEP)):
            data = b""
            size += len(out)
            if size > limit:
                raise BodyRefused(
                    413, f"the body decompresses ({decoder.coding}) to over {limit} bytes "
                    "(max_message_bytes)",
                )  # fmt: skip
            parts.append(out)
            await asyncio.sleep(0)  # the loop serves others between steps
    return b"".join(parts)


async def image_files(request: web.Request, body: bytes, max_images: int) -> list[bytes]:
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
