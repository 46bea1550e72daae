"""Shared-memory slots: where a front end writes a request's input tensor once and the
engine reads it in place and writes the outputs back (`server.engine`, `server.frontend`).

Each front end owns one segment, a file in ``/dev/shm`` created 0600 with an unguessable
name (``resnet-serve.<engine pid>.<random>``): the front end creates and maps it, the
engine maps it when the front end says hello, and the front end unlinks the name as
soon as the engine has it mapped. From then on the segment has no name; its memory goes
back to the system when the last of the two processes unmaps it or dies, so a crash
leaves nothing behind. A server killed in the instant between creation and unlink leaves
a name whose engine pid is gone: `remove_stale` deletes those at start.

Inside a segment the front end allocates one slot per request (`Slots.take`): a run of
`CHUNK`-byte chunks, first fit from a sorted list of free extents, given back when the
engine's answer (outputs, error or cancellation) has arrived (`Slots.give`), never
before: until then the engine may still be reading it. No slot free is the front end's
back-pressure: the call is refused at once with RESOURCE_EXHAUSTED.

The engine's queues are in sight of every front end through one more piece of shared
memory, the `Board`: an int64 cell per model version holding the images its batcher has
queued, written by the engine as the queue changes and read by a front end before it
decodes or sends a call (`server.frontend.EngineScheduler.check_room`). It is a memfd,
which has no name at all: each front end gets its descriptor when it starts and maps it
read-only, and the memory goes back to the system with the last process holding it.

A limit given server-wide (``max_concurrent_calls``, ``http_max_body_reads``,
``max_decode_backlog``) holds over every front end through the `Tally`, one more memfd: a
row per front end, where it writes how many calls it is answering, bodies it is reading
and images it has waiting for or in a decode worker, and whose columns it sums before it
takes one more (`Held`).
"""

from __future__ import annotations

import bisect
import contextlib
import mmap
import os
import secrets
from pathlib import Path

import numpy as np

from server.errors import QueueFull

SHM_DIR = Path("/dev/shm")
PREFIX = "resnet-serve."
CHUNK = 4096
BOARD_CELLS = 512  # model versions whose queues the front ends see (beyond: the engine's)


def segment_name(engine_pid: int) -> str:
    return f"{PREFIX}{engine_pid}.{secrets.token_hex(16)}"


def create(name: str, size: int) -> mmap.mmap:
    """A new segment of `size` bytes, 0600, mapped; OSError when the name exists."""
    fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def attach(name: str, size: int) -> mmap.mmap:
    """Map the segment `name` that a front end created (the engine's side)."""
    if "/" in name or not name.startswith(PREFIX):
        raise ValueError(f"not a segment name: {name!r}")
    fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_NOFOLLOW)
    try:
        if os.fstat(fd).st_size != size:
            raise ValueError(f"segment {name} is not {size} bytes")
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def unlink(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(SHM_DIR / name)


def remove_stale(directory: Path = SHM_DIR) -> list[str]:
    """Delete the segments whose engine process is gone (a crashed run); their names."""
    removed = []
    for path in directory.glob(f"{PREFIX}*"):
        pid = path.name[len(PREFIX) :].partition(".")[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path.name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def view(buffer: mmap.mmap, offset: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """The array of `dtype` and `shape` stored at `offset`, in place (no copy)."""
    return np.ndarray(shape, dtype=np.dtype(dtype), buffer=buffer, offset=offset)


class Slots:
    """The front end's allocator over its segment: slots of whole chunks, first fit."""

    def __init__(self, size: int) -> None:
        self.chunks = size // CHUNK
        self._starts = [0]  # free extents, sorted by start chunk
        self._lengths = [self.chunks]
        self.used = 0  # chunks

    def take(self, nbytes: int) -> tuple[int, int]:
        """A slot of at least `nbytes`: (byte offset, byte size). QueueFull when no run of
        free chunks is long enough."""
        need = max(1, -(-nbytes // CHUNK))
        for i, length in enumerate(self._lengths):
            if length >= need:
                start = self._starts[i]
                if length == need:
                    del self._starts[i], self._lengths[i]
                else:
                    self._starts[i] += need
                    self._lengths[i] -= need
                self.used += need
                return start * CHUNK, need * CHUNK
        raise QueueFull(
            f"this front end's shared memory is full ({self.used * CHUNK >> 20} of "
            f"{self.chunks * CHUNK >> 20} MiB held by requests in flight; a slot of "
            f"{nbytes} bytes does not fit); retry later, or raise frontend_shm_bytes"
        )

    def give(self, offset: int, nbytes: int) -> None:
        """Return a slot (once the engine has answered for it), merged with its neighbours."""
        start, length = offset // CHUNK, nbytes // CHUNK
        self.used -= length
        i = bisect.bisect_left(self._starts, start)
        if i < len(self._starts) and start + length == self._starts[i]:  # joins the next
            length += self._lengths[i]
            del self._starts[i], self._lengths[i]
        if i > 0 and self._starts[i - 1] + self._lengths[i - 1] == start:  # joins the previous
            self._lengths[i - 1] += length
            return
        self._starts.insert(i, start)
        self._lengths.insert(i, length)


class Board:
    """The queued images of each model version, one int64 cell per version, in a memfd.

    ``Board()`` is the engine's: it creates the memory, `assign`s a cell to each batcher
    it serves (its index goes to the front ends with the registry) and `release`s it when
    the batcher is gone. ``Board(fd)`` is a front end's: the same memory, read-only; a
    cell is read with ``board.cells[index]`` (an aligned 8-byte load: never torn)."""

    def __init__(self, fd: int | None = None) -> None:
        owner = fd is None
        if fd is None:
            fd = os.memfd_create("resnet-serve-queues", os.MFD_CLOEXEC)
            os.ftruncate(fd, BOARD_CELLS * 8)
        self.fd = fd
        access = mmap.ACCESS_WRITE if owner else mmap.ACCESS_READ
        self._memory = mmap.mmap(fd, BOARD_CELLS * 8, access=access)
        self.cells = memoryview(self._memory).cast("q")
        self._free = list(range(BOARD_CELLS - 1, -1, -1))  # the lowest index first
        self._held: dict[object, int] = {}

    def assign(self, owner: object) -> int | None:
        """`owner`'s cell (the same one on every call); None once every cell is held."""
        index = self._held.get(owner)
        if index is None and self._free:
            index = self._held[owner] = self._free.pop()
            self.cells[index] = 0
        return index

    def release(self, keep: set[object]) -> list[object]:
        """The cells of owners not in `keep` back to the free list, zeroed (a front end that
        still reads one sees room, and the engine decides); those owners."""
        gone = [owner for owner in self._held if owner not in keep]
        for owner in gone:
            index = self._held.pop(owner)
            self.cells[index] = 0
            self._free.append(index)
        return gone


class Tally:
    """What each front end holds at once, one int64 row per front end in a memfd, so that
    a limit given server-wide holds over all of them: a front end writes only its own
    row's cells (`Share.set`) and sums a column over every row (`Share.total`) before it
    takes one more. Two front ends taking the last unit at the same instant may both
    pass, so a limit can be passed by at most one unit per other front end, for as long
    as those calls last.

    ``Tally(rows)`` is the engine's: it creates the memory, and `clear`s the row of a
    front end that died (whatever it held went with it). ``Tally(fd=fd, row=row)`` is front
    end `row`'s: the same memory, read-write."""

    COLUMNS = ("calls", "bodies", "decodes")

    def __init__(self, rows: int = 0, fd: int | None = None, row: int | None = None) -> None:
        if fd is None:
            fd = os.memfd_create("resnet-serve-tally", os.MFD_CLOEXEC)
            os.ftruncate(fd, max(rows, 1) * len(self.COLUMNS) * 8)
        size = os.fstat(fd).st_size
        self.fd, self.rows, self.row = fd, size // (len(self.COLUMNS) * 8), row
        self._memory = mmap.mmap(fd, size)
        self.cells = memoryview(self._memory).cast("q")

    def share(self, column: str) -> Share:
        """This front end's cell of `column`, zeroed (a replaced front end starts with
        nothing), and the column."""
        assert self.row is not None, "the engine's tally has no row of its own"
        start = self.COLUMNS.index(column) * self.rows
        share = Share(self.cells, start, start + self.rows, start + self.row)
        share.set(0)
        return share

    def clear(self, row: int) -> None:
        """Front end `row` is gone: it holds nothing."""
        for column in range(len(self.COLUMNS)):
            self.cells[column * self.rows + row] = 0

    def total(self, column: str) -> int:
        start = self.COLUMNS.index(column) * self.rows
        return sum(self.cells[start : start + self.rows])


class Share:
    """One front end's cell of a `Tally` column, and the column's total over every front
    end (aligned 8-byte loads and stores: never torn)."""

    __slots__ = ("_cell", "_cells", "_end", "_start")

    def __init__(self, cells: memoryview, start: int, end: int, cell: int) -> None:
        self._cells, self._start, self._end, self._cell = cells, start, end, cell

    def total(self) -> int:
        return sum(self._cells[self._start : self._end])

    def set(self, value: int) -> None:
        self._cells[self._cell] = value


class Held:
    """How many of something this process holds at once (`count`), and how many the server
    holds (`total`): with front ends, every front end's, through `share` (this front end's
    cell of a `Tally` column), so that a limit given server-wide holds over all of them."""

    __slots__ = ("_share", "count")

    def __init__(self, share: Share | None = None) -> None:
        self.count = 0
        self._share = share

    def total(self) -> int:
        return self.count if self._share is None else self._share.total()

    def add(self, n: int) -> None:
        self.count += n
        if self._share is not None:
            self._share.set(self.count)
