"""The v2 protocol's BYTES tensor framing, for the SDK's requests and the server alike.

Each element is a 4-byte little-endian length followed by its bytes, elements
back to back: what tritonclient's ``serialize_byte_tensor`` sends and what a
``raw_input_contents`` / ``raw_output_contents`` entry of datatype BYTES holds.
Plain bytes in and out; imports neither grpc nor numpy.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

_LENGTH = struct.Struct("<I")


def serialize(elements: Iterable[bytes]) -> bytes:
    """BYTES elements as one raw buffer: each a 4-byte little-endian length, then its bytes."""
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def deserialize(raw: bytes) -> list[bytes]:
    """Split a raw BYTES buffer into its elements; `ValueError` when a length prefix is cut
    off or runs past the end (the message says which element and by how much)."""
    elements: list[bytes] = []
    view = memoryview(raw)
    offset = 0
    while offset < len(view):
        if offset + _LENGTH.size > len(view):
            raise ValueError(
                f"BYTES element {len(elements)} starts at byte {offset} but only "
                f"{len(view) - offset} bytes remain for its 4-byte length prefix"
            )
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += _LENGTH.size
        if offset + length > len(view):
            raise ValueError(
                f"BYTES element {len(elements)} declares {length} bytes but only "
                f"{len(view) - offset} remain"
            )
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    return elements
