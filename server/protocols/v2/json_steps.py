"""JSON parsed in short steps, for a large body parsed on a worker thread.

`json.loads` is one C call: on a worker thread it still holds the GIL until it is done
(1.7 s for 38 MB of numbers), and the event loop waits that long. `loads` gives the same
value and raises the same `json.JSONDecodeError` (or ValueError for an integer past
Python's limit on digits), but never holds the GIL for long: objects and arrays are
walked here, their scalars read by the C scanner one at a time, and a run of numbers in an
array (a tensor's ``data``) parsed by `json.loads` `CHUNK_CHARS` at a time, split at
commas. Between steps the GIL passes to the event loop (the interpreter's switch
interval, 5 ms). The nesting is at most `server.protocols.v2.rest.MAX_DEPTH` deep, checked
before.
"""

from __future__ import annotations

import json
import re
from typing import Any

CHUNK_CHARS = 1 << 18  # numbers parsed in one C call: about 10 ms
_DECODER = json.JSONDecoder()
_SCAN = json.scanner.make_scanner(_DECODER)  # one scalar (or a whole value) at an index
_STRING = json.decoder.scanstring
_SPACE = re.compile(r"[ \t\n\r]*")
_NUMBERS = re.compile(r"[-+0-9.eE \t\n\r,]*")  # a run of numbers, commas and space


def loads(data: bytes | str) -> Any:
    if isinstance(data, bytes):
        text = data.decode(json.detect_encoding(data), "surrogatepass")
    else:
        text = data
    value, end = _value(text, _SPACE.match(text, 0).end())
    end = _SPACE.match(text, end).end()
    if end != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return value


def _value(text: str, at: int) -> tuple[Any, int]:
    first = text[at : at + 1]
    if first == "{":
        return _object(text, at + 1)
    if first == "[":
        return _array(text, at + 1)
    try:
        return _SCAN(text, at)
    except StopIteration:
        raise json.JSONDecodeError("Expecting value", text, at) from None


def _object(text: str, at: int) -> tuple[dict[str, Any], int]:
    value: dict[str, Any] = {}
    at = _SPACE.match(text, at).end()
    if text[at : at + 1] == "}":
        return value, at + 1
    while True:
        if text[at : at + 1] != '"':
            raise json.JSONDecodeError(
                "Expecting property name enclosed in double quotes", text, at
            )
        key, at = _STRING(text, at + 1)
        at = _SPACE.match(text, at).end()
        if text[at : at + 1] != ":":
            raise json.JSONDecodeError("Expecting ':' delimiter", text, at)
        value[key], at = _value(text, _SPACE.match(text, at + 1).end())
        at = _SPACE.match(text, at).end()
        end = text[at : at + 1]
        if end == "}":
            return value, at + 1
        if end != ",":
            raise json.JSONDecodeError("Expecting ',' delimiter", text, at)
        at = _SPACE.match(text, at + 1).end()


def _array(text: str, at: int) -> tuple[list[Any], int]:
    value: list[Any] = []
    at = _SPACE.match(text, at).end()
    if text[at : at + 1] == "]":
        return value, at + 1
    while True:
        at, ended = _numbers(text, at, value)
        if ended:
            return value, at + 1
        item, at = _value(text, at)
        value.append(item)
        at = _SPACE.match(text, at).end()
        end = text[at : at + 1]
        if end == "]":
            return value, at + 1
        if end != ",":
            raise json.JSONDecodeError("Expecting ',' delimiter", text, at)
        at = _SPACE.match(text, at + 1).end()


def _numbers(text: str, at: int, into: list[Any]) -> tuple[int, bool]:
    """The numbers from `at` up to the last comma before something else, parsed a chunk at
    a time into `into`; where the next element starts, or the array's "]" (True) when the
    numbers ran to it."""
    run_end = at
    while True:  # the run, a window at a time (each match one short C call)
        window = _NUMBERS.match(text, run_end, run_end + CHUNK_CHARS).end()
        if window < run_end + CHUNK_CHARS or window == len(text):
            run_end = window
            break
        run_end = window
    if text[run_end : run_end + 1] == "]" and text[at:run_end].strip():
        stop = run_end  # every element to the end of the array
    else:
        stop = text.rfind(",", at, run_end)  # the rest from the next element on
        if stop < 0:
            return at, False
    start = at
    while start < stop:
        cut = text.rfind(",", start, start + CHUNK_CHARS) if stop - start > CHUNK_CHARS else -1
        cut = stop if cut < 0 else cut
        chunk = text[start:cut]
        try:
            into.extend(json.loads(f"[{chunk}]"))
        except json.JSONDecodeError as exc:
            raise json.JSONDecodeError(exc.msg, text, start + max(0, exc.pos - 1)) from None
        if not chunk.strip():  # "[1,,2]", "[1,]": an element missing
            raise json.JSONDecodeError("Expecting value", text, start)
        start = cut + 1
    if stop == run_end:
        return stop, True  # at the "]"
    return _SPACE.match(text, stop + 1).end(), False
