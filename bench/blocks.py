"""The generated blocks of a markdown document (docs/benchmarks.md).

Each subcommand owns a block between its two markers, ``<!-- NAME:begin (…) -->`` and
``<!-- NAME:end -->``, and rewrites only that block; the prose around it is kept as
written. A document without the block gets it appended at its end (the document is made,
``# Benchmarks``, where it does not exist). One marker without the other is refused: the
next run would take everything from it to a new marker for the block.
"""

from __future__ import annotations

from pathlib import Path

NEW_DOC = "# Benchmarks\n"  # the text of a document that does not exist yet


def replace(text: str, begin: str, end: str, body: str) -> str:
    """`text` with the block from `begin` to `end` (markers included) holding `body`; where
    both markers are missing, the block appended after a blank line. ValueError where one
    is there without the other, or they are out of order."""
    block = f"{begin}\n{body}\n{end}"
    if (begin in text) != (end in text) or (begin in text and text.index(end) < text.index(begin)):
        raise ValueError(
            f"the document has {begin!r} or {end!r} without the other (or in the wrong "
            "order): mend the markers by hand, then run again"
        )
    if begin in text:
        head, rest = text.split(begin, 1)
        return head + block + rest.split(end, 1)[1]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def write(doc: Path, *blocks: tuple[str, str, str]) -> None:
    """Each ``(begin, end, body)`` of `blocks` into `doc`, in order (`replace`)."""
    text = doc.read_text() if doc.exists() else NEW_DOC
    for begin, end, body in blocks:
        text = replace(text, begin, end, body)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
