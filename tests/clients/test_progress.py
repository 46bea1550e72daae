"""The CLI's progress bar."""

from __future__ import annotations

import io

from resnet_serve_client.progress import Progress


def test_progress_counts_to_the_end_and_leaves_the_line() -> None:
    stream = io.StringIO()
    with Progress(40, stream) as progress:
        for _ in range(40):
            progress.update()
    text = stream.getvalue()
    assert text.startswith("\r 0/40   0% |")
    last = text.rstrip("\n").rsplit("\r", 1)[-1]
    assert last.startswith("40/40 100% |" + "█" * 24 + "|")
    assert "images/s" in last
    assert text.endswith("\n")


def test_clear_blanks_the_line_for_other_output() -> None:
    stream = io.StringIO()
    progress = Progress(3, stream)
    progress.clear()
    assert stream.getvalue() == "\r\033[K"
