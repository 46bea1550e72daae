"""Triton's system shared-memory extension: the table of registered regions, the rule for
their names, and every read and write of a region's bytes.

A co-located client creates a POSIX shared-memory object (a file in ``/dev/shm``),
registers a range of it under a name (``SystemSharedMemoryRegister``, HTTP ``POST
/v2/systemsharedmemory/region/<name>/register``), and then sends inputs and asks for
outputs by reference (the tensor parameters ``shared_memory_region``,
``shared_memory_offset``, ``shared_memory_byte_size``) instead of in the message.

What the server trusts of it, and what not (docs/security.md):

- a key is a POSIX shared-memory name as Triton takes it: ``/name``, one leading slash and
  no other, not ``.`` or ``..``, at most `MAX_KEY` bytes; the file is opened under
  `DIRECTORY` with ``O_NOFOLLOW`` (a symlink is refused, never followed) and
  ``O_NONBLOCK`` (a FIFO cannot stall the loop), and must be a regular file;
- the server never maps a region: every access opens the file, checks its size *now*
  (``fstat``) and reads with ``os.preadv`` or writes with ``os.pwrite``, so a client that
  truncates its object after registering gets INVALID_ARGUMENT, never a SIGBUS;
- offsets and sizes are checked against the registered range and the tensor (in
  `server.validation`, with `SharedMemory.region`), and what one read may take is
  bounded (``max_message_bytes``, as a request on the wire);
- at most ``shared_memory_regions`` regions and ``shared_memory_bytes`` registered bytes
  (``shared_memory_regions = 0`` turns the extension off);
- the RPCs go through the same admission as every call (a bearer token when one is set).

One table per server: in one process it is local; with front ends (`server.engine`) the
engine owns it, a front end's `register`/`unregister` go to the engine (`forward`), which
applies them (`apply`), sends every front end the new table (`replace`) and answers once
each has applied it, so a region registered (or unregistered) through one connection is
in force on every other when the call returns. Each
process opens the files itself when it reads or writes.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from server.config import Settings
from server.errors import AlreadyExists, InvalidInput, LimitReached, NotOffered, RegionNotFound
from server.request import Invalid, SharedRegion

DIRECTORY = "/dev/shm"
MAX_KEY = 255  # NAME_MAX: one file name in /dev/shm
MAX_NAME = 256  # a region's name (what the caller calls it)
REGION = "shared_memory_region"
OFFSET = "shared_memory_offset"
BYTE_SIZE = "shared_memory_byte_size"
PARAMETERS = (REGION, OFFSET, BYTE_SIZE)
OWN_PREFIX = "resnet-serve."  # the server's own segments (server.shm): never a region
CUDA_UNSUPPORTED = (
    "CUDA shared memory is not supported by this server; send tensors through system shared "
    "memory (SystemSharedMemoryRegister, /v2/systemsharedmemory) or in the request"
)

Forward = Callable[..., Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Region:
    """One registered region: the caller's name, the object's key (``/name``), and the
    registered range of it."""

    name: str
    key: str
    offset: int
    byte_size: int


def check_key(key: str) -> str:
    """The file name under `DIRECTORY` of a POSIX shared-memory key ``/name``, or
    `InvalidInput` saying what is allowed."""
    rest = key[1:] if key.startswith("/") else None
    if (
        not rest
        or "/" in rest
        or "\0" in rest
        or rest in (".", "..")
        or len(rest.encode("utf-8", "surrogatepass")) > MAX_KEY
    ):
        raise InvalidInput(
            f"shared-memory key {_shown(key)} is not allowed: a key is a POSIX shared-memory "
            f"name, '/' and then 1 to {MAX_KEY} bytes with no other '/' (not '.' or '..'), "
            f"naming an object in {DIRECTORY}"
        )
    if rest.startswith(OWN_PREFIX):
        raise InvalidInput(
            f"shared-memory key {_shown(key)} names one of the server's own segments; "
            "register an object of your own"
        )
    return rest


def reference(what: str, parameters: Mapping[str, Any]) -> SharedRegion | Invalid | None:
    """A tensor's shared-memory parameters (plain values) as a reference to a region; None
    when it sets none; `Invalid` saying what is wrong with them."""
    if not any(p in parameters for p in PARAMETERS):
        return None
    region = parameters.get(REGION)
    if not isinstance(region, str) or not region:
        return Invalid(
            f"{what} sets {', '.join(p for p in PARAMETERS if p in parameters)} but no "
            f"'{REGION}'; name a registered region (a non-empty string)"
        )
    size = parameters.get(BYTE_SIZE)
    if not _is_count(size):
        return Invalid(f"{what}: '{BYTE_SIZE}' must be an integer >= 0 with '{REGION}'")
    offset = parameters.get(OFFSET, 0)
    if not _is_count(offset):
        return Invalid(f"{what}: '{OFFSET}' must be an integer >= 0")
    return SharedRegion(region, offset, size)


class SharedMemory:
    """The server's table of regions, and the reads and writes of their bytes."""

    def __init__(
        self,
        max_regions: int = 0,
        max_bytes: int = 0,
        max_read: int = 0,
        forward: Forward | None = None,
        directory: str = DIRECTORY,
    ) -> None:
        self.max_regions, self.max_bytes, self.max_read = max_regions, max_bytes, max_read
        self.directory = directory
        self._forward = forward
        self._regions: dict[str, Region] = {}

    @classmethod
    def of(cls, settings: Settings, forward: Forward | None = None) -> SharedMemory:
        table = cls(forward=forward)
        table.limit(settings)
        return table

    def limit(self, settings: Settings) -> None:
        self.max_regions = settings.shared_memory_regions
        self.max_bytes = settings.shared_memory_bytes
        self.max_read = settings.max_message_bytes

    # the table

    async def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if self._forward is not None:
            await self._forward("register", name, key, offset, byte_size)
        else:
            self.apply("register", name, key, offset, byte_size)

    async def unregister(self, name: str) -> None:
        """Unregister `name` ("" for every region); an unknown name is no error (Triton's)."""
        if self._forward is not None:
            await self._forward("unregister", name)
        else:
            self.apply("unregister", name)

    def apply(self, op: str, *args: Any) -> None:
        """``("register", name, key, offset, byte_size)`` or ``("unregister", name)`` on this
        table: the owner's side (one process, or the engine)."""
        if op == "register":
            self._add(*args)
        elif op == "unregister":
            name = args[0]
            if name:
                self._regions.pop(name, None)
            else:
                self._regions.clear()
        else:
            raise ValueError(f"unknown shared-memory operation {op!r}")

    def _add(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if self.max_regions == 0:
            raise NotOffered(
                "system shared memory is turned off on this server (shared_memory_regions "
                "is 0); send tensors in the request"
            )
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME:
            raise InvalidInput(
                f"a region's name is 1 to {MAX_NAME} characters; got {len(str(name))}"
            )
        check_key(key)
        if not _is_count(offset) or not _is_count(byte_size) or byte_size == 0:
            raise InvalidInput(
                f"region '{_cut(name)}': offset must be an integer >= 0 and byte_size one >= 1; "
                f"got offset {offset}, byte_size {byte_size}"
            )
        if name in self._regions:
            raise AlreadyExists(
                f"shared memory region '{_cut(name)}' is already registered; unregister it "
                "first to register it again"
            )
        # what is wrong with the request itself first, then what the server can take
        with self._open(key, os.O_RDONLY, f"region '{_cut(name)}'") as (fd, size):
            del fd
            if offset + byte_size > size:
                raise InvalidInput(
                    f"region '{_cut(name)}': offset {offset} + byte_size {byte_size} passes the "
                    f"end of {_shown(key)}, which holds {size} bytes"
                )
        if len(self._regions) >= self.max_regions:
            raise LimitReached(
                f"{len(self._regions)} shared memory regions are registered, the most this "
                f"server takes (shared_memory_regions); unregister one first"
            )
        total = sum(r.byte_size for r in self._regions.values())
        if total + byte_size > self.max_bytes:
            raise LimitReached(
                f"registering {byte_size} bytes would make {total + byte_size} bytes of shared "
                f"memory registered; this server takes at most {self.max_bytes} "
                f"(shared_memory_bytes); unregister regions first"
            )
        self._regions[name] = Region(name, key, offset, byte_size)

    def status(self, name: str = "") -> list[Region]:
        """The regions registered (`name` "": every one), or `RegionNotFound`."""
        if not name:
            return sorted(self._regions.values(), key=lambda r: r.name)
        return [self._find(name)]

    def snapshot(self) -> list[tuple[str, str, int, int]]:
        return [(r.name, r.key, r.offset, r.byte_size) for r in self._regions.values()]

    def replace(self, snapshot: list[tuple[str, str, int, int]]) -> None:
        """The owner's table, as a front end mirrors it."""
        self._regions = {name: Region(name, *rest) for name, *rest in snapshot}

    def _find(self, name: str) -> Region:
        found = self._regions.get(name)
        if found is None:
            raise RegionNotFound(
                f"no shared memory region '{_cut(name)}' is registered"
                f"{self._registered()}"
            )
        return found

    def _registered(self) -> str:
        names = sorted(self._regions)
        if not names:
            return "; none is"
        shown = ", ".join(f"'{_cut(n, 40)}'" for n in names[:8])
        return f"; registered: {shown}{', ...' if len(names) > 8 else ''}"

    # the tensors' bytes

    def region(self, what: str, ref: SharedRegion) -> Region:
        """The region `ref` names, with its range inside the registered one, or
        `InvalidInput` (the one check of a reference against the table)."""
        found = self._regions.get(ref.region)
        if found is None:
            raise InvalidInput(
                f"{what}: shared memory region '{_cut(ref.region)}' is not registered"
                f"{self._registered()}; register it first"
            )
        if ref.offset + ref.byte_size > found.byte_size:
            raise InvalidInput(
                f"{what}: {OFFSET} {ref.offset} + {BYTE_SIZE} {ref.byte_size} passes the end of "
                f"region '{_cut(ref.region)}' ({found.byte_size} bytes registered); the range "
                f"must lie within it"
            )
        return found

    def read(self, what: str, ref: SharedRegion) -> bytearray:
        """`ref`'s bytes, read from the object as it is now (never mapped)."""
        region = self.region(what, ref)
        if ref.byte_size > self.max_read:
            raise InvalidInput(
                f"{what}: {BYTE_SIZE} {ref.byte_size} is more than one request may carry "
                f"({self.max_read} bytes, max_message_bytes)"
            )
        start = region.offset + ref.offset
        data = bytearray(ref.byte_size)
        view = memoryview(data)
        with self._open(region.key, os.O_RDONLY, what) as (fd, size):
            self._within(what, region, ref, start, size)
            done = 0
            while done < ref.byte_size:
                count = os.preadv(fd, [view[done:]], start + done)
                if count == 0:  # truncated since the fstat
                    raise self._truncated(what, region, start + done)
                done += count
        return data

    def write(self, what: str, ref: SharedRegion, data: bytes) -> None:
        """`data` into `ref`'s range (`InvalidInput` when it does not fit)."""
        region = self.region(what, ref)
        if len(data) > ref.byte_size:
            raise InvalidInput(
                f"{what} is {len(data)} bytes but {BYTE_SIZE} is {ref.byte_size}; give a "
                f"range of at least {len(data)} bytes"
            )
        start = region.offset + ref.offset
        with self._open(region.key, os.O_WRONLY, what) as (fd, size):
            self._within(what, region, ref, start, size, len(data))
            view = memoryview(data)
            done = 0
            while done < len(data):
                done += os.pwrite(fd, view[done:], start + done)

    def _within(
        self, what: str, region: Region, ref: SharedRegion, start: int, size: int,
        length: int | None = None,
    ) -> None:  # fmt: skip
        end = start + (ref.byte_size if length is None else length)
        if end > size:
            raise self._truncated(what, region, size)

    @staticmethod
    def _truncated(what: str, region: Region, size: int) -> InvalidInput:
        return InvalidInput(
            f"{what}: the object {_shown(region.key)} of region '{_cut(region.name)}' holds "
            f"{size} bytes now, fewer than the range asked for (truncated after it was "
            f"registered?); unregister it, or register it again at its new size"
        )

    def _open(self, key: str, flags: int, what: str) -> _Opened:
        return _Opened(os.path.join(self.directory, check_key(key)), flags, key, what)


class _Opened:
    """An object of `DIRECTORY` opened without following a symlink and without blocking, a
    regular file; ``(fd, size now)``."""

    def __init__(self, path: str, flags: int, key: str, what: str) -> None:
        self._path, self._flags, self._key, self._what = path, flags, key, what
        self._fd = -1

    def __enter__(self) -> tuple[int, int]:
        flags = self._flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            self._fd = os.open(self._path, flags)
        except FileNotFoundError:
            raise InvalidInput(
                f"{self._what}: no shared-memory object {_shown(self._key)} in {DIRECTORY}; "
                "create it first (shm_open)"
            ) from None
        except OSError as exc:
            raise InvalidInput(
                f"{self._what}: cannot open shared-memory object {_shown(self._key)}: "
                f"{_reason(exc)}"
            ) from None
        info = os.fstat(self._fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(self._fd)
            self._fd = -1
            raise InvalidInput(
                f"{self._what}: {_shown(self._key)} is not a shared-memory object (not a "
                "regular file)"
            )
        return self._fd, info.st_size

    def __exit__(self, *exc: object) -> None:
        if self._fd >= 0:
            os.close(self._fd)


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "it is a symlink, which the server does not follow"
    if exc.errno == errno.EACCES:
        return "permission denied (the server's user cannot open it)"
    return exc.strerror or type(exc).__name__


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _cut(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else f"{text[:limit]}..."


def _shown(key: str) -> str:
    return repr(_cut(key))
