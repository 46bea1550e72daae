"""What an error message sent to a caller must never hold: tracebacks, file paths, object reprs."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import server

_FORBIDDEN = [
    re.compile(r"Traceback \(most recent call last\)"),
    re.compile(r'File "[^"]+", line \d+'),
    re.compile(r"\.py\b"),
    re.compile(r"<[\w.]+ object at 0x[0-9a-f]+>"),
    re.compile(r"(?<![\w.])/(tmp|usr|opt|home|root|srv|work|var)/"),
]
_INTERNAL_PLACES = [sys.prefix, str(Path(server.__file__).parent)]


def leaks(message: str, *places: Path | str) -> list[str]:
    """What ``message`` gives away (empty when nothing): patterns and the given paths."""
    found = [p.pattern for p in _FORBIDDEN if p.search(message)]
    found += [str(p) for p in (*_INTERNAL_PLACES, *places) if str(p) in message]
    return found
