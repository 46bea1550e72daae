"""`server.shm`: the slot allocator of a front end's segment, and the segment files.

- `Slots`: any sequence of takes and gives (hypothesis) never hands out overlapping
  slots or slots past the segment, keeps `used` exact, succeeds exactly when a run of
  free chunks is long enough (so freed neighbours are merged: first fit over merged
  extents), and after everything is given back one slot of the whole segment fits;
  a take that does not fit is `QueueFull`, its message naming the sizes.
- `create`, `attach`, `unlink`, `remove_stale`: on a temporary directory (0600, never
  over an existing name, no symbolic links followed, names and sizes checked) and on
  /dev/shm itself (a mapping outlives its name).
- `Board`: a cell per owner, the same on every call, released and zeroed when its owner
  is gone, none past `BOARD_CELLS`; another process given its descriptor reads what the
  engine writes, cannot write, and finds no name for it anywhere.
- `Tally`: each front end's share writes its own cell and totals its column over every
  front end, another process's share through the descriptor alone included; a share
  starts at zero, and the engine's `clear` zeroes a dead front end's row.
"""

from __future__ import annotations

import mmap
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server import shm
from server.errors import QueueFull

CHUNK = shm.CHUNK

# ("take", bytes) or ("give", which of the held slots, modulo their number)
OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("take"), st.integers(0, 12 * CHUNK)),
        st.tuples(st.just("give"), st.integers(0, 1000)),
    ),
    max_size=200,
)


def longest_free_run(held: dict[int, int], chunks: int) -> int:
    """The longest run of chunks that no held slot (offset -> size, bytes) covers."""
    free = [True] * chunks
    for offset, size in held.items():
        for chunk in range(offset // CHUNK, (offset + size) // CHUNK):
            free[chunk] = False
    longest = run = 0
    for is_free in free:
        run = run + 1 if is_free else 0
        longest = max(longest, run)
    return longest


@settings(max_examples=300, deadline=None, derandomize=True)
@given(chunks=st.integers(1, 40), operations=OPERATIONS, tail=st.integers(0, CHUNK - 1))
def test_slots_never_overlap_and_take_fails_only_without_room(
    chunks: int, operations: list[tuple[str, int]], tail: int
) -> None:
    size = chunks * CHUNK + tail  # a partial last chunk is never handed out
    slots = shm.Slots(size)
    held: dict[int, int] = {}  # offset -> size
    for op, value in operations:
        if op == "take":
            need = max(1, -(-value // CHUNK))
            fits = longest_free_run(held, chunks) >= need
            if not fits:
                with pytest.raises(QueueFull):
                    slots.take(value)
                continue
            offset, got = slots.take(value)
            assert got == need * CHUNK >= value
            assert offset % CHUNK == 0 and offset >= 0 and offset + got <= chunks * CHUNK
            for other, other_size in held.items():
                assert offset + got <= other or other + other_size <= offset, "overlap"
            held[offset] = got
        elif held:
            offset = sorted(held)[value % len(held)]
            slots.give(offset, held.pop(offset))
        assert slots.used * CHUNK == sum(held.values())
    for offset in list(held):
        slots.give(offset, held.pop(offset))
    assert slots.used == 0
    assert slots.take(chunks * CHUNK) == (0, chunks * CHUNK)  # one extent again
    assert slots.used == chunks


def test_first_fit_reuses_the_lowest_room_and_merges_both_neighbours() -> None:
    slots = shm.Slots(8 * CHUNK)
    a, b, c = slots.take(CHUNK), slots.take(2 * CHUNK), slots.take(CHUNK)
    assert (a, b, c) == ((0, CHUNK), (CHUNK, 2 * CHUNK), (3 * CHUNK, CHUNK))
    slots.give(*a)
    slots.give(*c)
    assert slots.take(1) == (0, CHUNK)  # first fit: the lowest free run
    slots.give(0, CHUNK)
    slots.give(*b)  # joins the free run before it and the one after it
    assert slots.used == 0
    assert slots.take(8 * CHUNK) == (0, 8 * CHUNK)


def test_full_segment_is_queue_full_naming_the_sizes() -> None:
    slots = shm.Slots(1 << 20)
    slots.take(1 << 20)
    with pytest.raises(QueueFull) as full:
        slots.take(5000)
    message = str(full.value)
    assert "5000 bytes" in message and "1 of 1 MiB" in message
    assert "frontend_shm_bytes" in message and "\n" not in message
    with pytest.raises(QueueFull, match="2097152 bytes"):
        shm.Slots(1 << 20).take(2 << 20)  # larger than the whole segment


# segment files


@pytest.fixture
def shm_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(shm, "SHM_DIR", tmp_path)
    return tmp_path


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_segment_names_are_prefixed_by_the_engine_pid_and_unguessable() -> None:
    names = {shm.segment_name(1234) for _ in range(100)}
    assert len(names) == 100
    for name in names:
        assert name.startswith(f"{shm.PREFIX}1234.") and "/" not in name
        assert len(name.rpartition(".")[2]) == 32


def test_create_is_0600_exclusive_and_attach_maps_the_same_memory(shm_dir: Path) -> None:
    name = shm.segment_name(os.getpid())
    mine = shm.create(name, 4 * CHUNK)
    try:
        info = (shm_dir / name).stat()
        assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_size == 4 * CHUNK
        with pytest.raises(FileExistsError):
            shm.create(name, 4 * CHUNK)
        theirs = shm.attach(name, 4 * CHUNK)
        try:
            shm.view(mine, CHUNK, "<f4", (2, 3))[...] = np.arange(6).reshape(2, 3)
            assert shm.view(theirs, CHUNK, "<f4", (2, 3)).tolist() == [[0, 1, 2], [3, 4, 5]]
        finally:
            theirs.close()
    finally:
        mine.close()
    shm.unlink(name)
    assert not (shm_dir / name).exists()
    shm.unlink(name)  # gone already: nothing to do


def test_attach_refuses_other_names_sizes_and_links(shm_dir: Path) -> None:
    name = shm.segment_name(os.getpid())
    shm.create(name, 2 * CHUNK).close()
    (shm_dir / "other").write_bytes(b"\0" * 2 * CHUNK)
    for wrong in ("other", f"../{name}", f"{shm.PREFIX}x/../{name}", ""):
        with pytest.raises(ValueError, match="not a segment name"):
            shm.attach(wrong, 2 * CHUNK)
    with pytest.raises(ValueError, match=f"not {3 * CHUNK} bytes"):
        shm.attach(name, 3 * CHUNK)
    link = f"{shm.PREFIX}{os.getpid()}.link"
    (shm_dir / link).symlink_to(shm_dir / name)
    with pytest.raises(OSError):
        shm.attach(link, 2 * CHUNK)
    with pytest.raises(FileNotFoundError):
        shm.attach(f"{shm.PREFIX}{os.getpid()}.missing", 2 * CHUNK)
    with pytest.raises(FileExistsError):  # create follows no link either
        shm.create(link, 2 * CHUNK)


def test_remove_stale_deletes_only_segments_of_dead_engines(shm_dir: Path) -> None:
    dead, alive = dead_pid(), os.getpid()
    stale = [shm.segment_name(dead), shm.segment_name(dead)]
    kept = [shm.segment_name(alive), f"{shm.PREFIX}notapid.x", "other.1.x", f"{dead}.x"]
    for name in [*stale, *kept]:
        (shm_dir / name).write_bytes(b"")
    assert sorted(shm.remove_stale(shm_dir)) == sorted(stale)
    assert sorted(p.name for p in shm_dir.iterdir()) == sorted(kept)
    assert shm.remove_stale(shm_dir) == []


def test_init_process_counts_as_alive(shm_dir: Path) -> None:
    """pid 1 exists (maybe another user's: EPERM): its segments stay."""
    name = shm.segment_name(1)
    (shm_dir / name).write_bytes(b"")
    assert shm.remove_stale(shm_dir) == []
    assert (shm_dir / name).exists()


@pytest.mark.skipif(not shm.SHM_DIR.is_dir(), reason="no /dev/shm")
def test_dev_shm_mapping_outlives_its_name() -> None:
    name = shm.segment_name(os.getpid())
    mine = shm.create(name, 2 * CHUNK)
    try:
        theirs = shm.attach(name, 2 * CHUNK)
        shm.unlink(name)
        assert not (shm.SHM_DIR / name).exists()
        try:
            mine[:5] = b"hello"
            assert theirs[:5] == b"hello"
            assert isinstance(theirs, mmap.mmap)
        finally:
            theirs.close()
    finally:
        mine.close()
        shm.unlink(name)


def test_board_cells_are_assigned_once_released_zeroed_and_bounded() -> None:
    board = shm.Board()
    first, second = object(), object()
    a, b = board.assign(first), board.assign(second)
    assert (a, b) == (0, 1) and board.assign(first) == a
    board.cells[a], board.cells[b] = 7, 9
    assert board.release({second}) == [first]
    assert board.cells[a] == 0 and board.cells[b] == 9
    owners = [object() for _ in range(shm.BOARD_CELLS)]
    cells = [board.assign(owner) for owner in owners]
    assert None in cells and cells[0] == a  # the freed cell is reused first
    assert sorted(c for c in cells if c is not None) == [
        c for c in range(shm.BOARD_CELLS) if c != b
    ]


READER = """
import sys, time
from server import shm
board = shm.Board(int(sys.argv[1]))
try:
    board.cells[0] = 1
except TypeError:
    print("read-only", flush=True)
deadline = time.monotonic() + 30
while board.cells[3] != 41 and time.monotonic() < deadline:
    time.sleep(0.001)
print(board.cells[3], flush=True)
"""


def test_board_is_read_by_another_process_through_its_descriptor_alone() -> None:
    board = shm.Board()
    assert os.readlink(f"/proc/self/fd/{board.fd}").startswith("/memfd:")  # no file anywhere
    assert not list(shm.SHM_DIR.glob("*resnet-serve-queues*"))
    board.cells[3] = 40
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(board.fd)], pass_fds=(board.fd,),
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert reader.stdout is not None
    assert reader.stdout.readline().strip() == "read-only"
    board.cells[3] = 41
    assert reader.stdout.readline().strip() == "41"
    assert reader.wait(timeout=30) == 0


def test_tally_shares_total_their_column_over_every_front_end() -> None:
    engine = shm.Tally(3)
    assert engine.rows == 3 and os.readlink(f"/proc/self/fd/{engine.fd}").startswith("/memfd:")
    rows = [shm.Tally(fd=engine.fd, row=row) for row in range(3)]
    calls = [tally.share("calls") for tally in rows]
    bodies = [tally.share("bodies") for tally in rows]
    calls[0].set(2)
    calls[2].set(5)
    bodies[1].set(7)
    assert [share.total() for share in calls] == [7, 7, 7]  # every front end sees the sum
    assert [share.total() for share in bodies] == [7, 7, 7]
    assert (engine.total("calls"), engine.total("bodies")) == (7, 7)
    engine.clear(2)  # front end 2 died: what it held went with it
    assert (engine.total("calls"), engine.total("bodies")) == (2, 7)
    engine.clear(1)
    assert (engine.total("calls"), engine.total("bodies")) == (2, 0)
    calls[0].set(4)
    assert rows[0].share("calls").total() == 0  # a replaced front end starts with nothing


SHARER = """
import sys
from server import shm
share = shm.Tally(fd=int(sys.argv[1]), row=1).share("calls")
share.set(3)
print(share.total(), flush=True)
"""


def test_tally_is_shared_with_another_process_through_its_descriptor_alone() -> None:
    engine = shm.Tally(2)
    mine = shm.Tally(fd=engine.fd, row=0).share("calls")
    mine.set(4)
    sharer = subprocess.run(
        [sys.executable, "-c", SHARER, str(engine.fd)], pass_fds=(engine.fd,),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert sharer.returncode == 0, sharer.stderr
    assert sharer.stdout.strip() == "7"  # its 3 and our 4
    assert mine.total() == 7 and engine.total("calls") == 7
