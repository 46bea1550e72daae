"""The v2 protocol's BYTES tensor framing, for the SDK's requests and the server alike.

Each element is a 4-byte little-endian length followed by its bytes, elements
back to back: what tritonclient's ``serialize_byte_tensor`` sends and what a
``raw_input_contents`` / ``raw_output_contents`` entry of datatype BYTES holds.
Plain bytes in and out; imports neither grpc nor numpy.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

_LENGTH = struct.Struct("<I")


def serialize(elements: Iterable[bytes]) -> bytes:
    """BYTES elements as one raw buffer: each a 4-byte little-endian length, then its bytes."""
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def deserialize(raw: bytes) -> list[bytes]:
    """Split a raw BYTES buffer into its elements; `ValueError` when a length prefix is cut
    off or runs past the end (the message says which element and by how much)."""
    return list(elements(raw))


def elements(raw: bytes) -> Iterator[bytes]:
    """The elements of a raw BYTES buffer one by one, so a reader can stop at the count it
    expects instead of splitting a buffer of a million elements; errors as `deserialize`."""
    view = memoryview(raw)
    offset = 0
    index = 0
    while offset < len(view):
        if offset + _LENGTH.size > len(view):
            raise ValueError(
                f"BYTES element {index} starts at byte {offset} but only "
                f"{len(view) - offset} bytes remain for its 4-byte length prefix"
            )
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += _LENGTH.size
        if offset + length > len(view):
            raise ValueError(
                f"BYTES element {index} declares {length} bytes but only "
                f"{len(view) - offset} remain"
            )
        yield bytes(view[offset : offset + length])
        offset += length
        index += 1
