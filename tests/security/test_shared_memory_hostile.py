"""Hostile use of Triton's system shared-memory extension, over real RPCs to a real server
process (one process, and an engine with two front ends), gRPC and HTTP alike.

Keys: what is not a POSIX shared-memory name as Triton takes it (no slash, two slashes,
``/../x``, a path, empty, longer than `MAX_KEY` bytes, a NUL) is refused even where the
file it might mean exists; a symlink in /dev/shm (to a file elsewhere or to an object
there) is refused, never followed; a FIFO or a directory is not an object; a key that names
nothing is named. Ranges: a registration past the object's end, negative or overflowing
offsets and sizes, a reference past the region or of another size than the tensor, an
output range shorter than the logits. A region truncated by its client after it was
registered, used for a small input (read on the event loop), a large one (read on the
decode pool) and an output: INVALID_ARGUMENT saying how many bytes the object holds now,
never a SIGBUS: every process of the server still runs, health says SERVING and the same
request over the wire is answered. Caps (`MAX_REGIONS` regions, `MAX_BYTES` bytes, server
settings), a region registered twice (ALREADY_EXISTS, the first kept), an unknown one
unregistered (no error, as Triton) or asked for (NOT_FOUND), and every call without the
bearer token (UNAUTHENTICATED, nothing registered). Each refusal's message says what was
wrong and what is allowed. The rules themselves: `server.shared_memory`; the extension
used as intended: tests/server/protocols/test_shared_memory.py.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import pytest
import tritonclient.utils.shared_memory as shm
from grpc_health.v1 import health_pb2
from tritonclient.grpc import service_pb2, service_pb2_grpc

from bench import serving
from server.shared_memory import MAX_KEY, MAX_NAME
from tests.reliability.repos import derive

TOKEN = "shm-hostile-token-8d2e"
MIB = 1 << 20
MAX_REGIONS = 4  # --shared-memory-regions
MAX_BYTES = 4 * MIB  # --shared-memory-bytes
MAX_MESSAGE = 2 * MIB  # --max-message-bytes: also the most one read of a region takes
CIFAR = (3, 32, 32)  # float32, 10 classes
U8 = (224, 224, 3)  # resnet18_u8
CIFAR_IMAGE = 3 * 32 * 32 * 4
U8_IMAGE = 224 * 224 * 3
LARGE = 7  # uint8 images of a large input: 1,053,696 bytes, over 1 MiB, read on the pool
DEV_SHM = Path("/dev/shm")
# the HTTP status each gRPC status is answered with (Triton's)
HTTP = {"INVALID_ARGUMENT": 400, "ALREADY_EXISTS": 400, "NOT_FOUND": 404,
        "RESOURCE_EXHAUSTED": 503, "UNAUTHENTICATED": 401}  # fmt: skip
KEY_RULE = f"'/' and then 1 to {MAX_KEY} bytes with no other '/'"


class Refused(Exception):
    """A call answered with an error: its gRPC status name (gRPC) or HTTP status (HTTP)."""

    def __init__(self, status: str | int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status, self.message = status, message


class Api:
    """The extension's calls and ModelInfer over one transport; errors raise `Refused`."""

    def __init__(self, server: serving.Server, transport: str) -> None:
        self.server, self.transport = server, transport

    def refused(self, call: Callable[[], Any], code: str, *fragments: str) -> str:
        """`call` refused with `code` (its HTTP status over HTTP), the message holding every
        fragment; the message."""
        with pytest.raises(Refused) as error:
            call()
        expected = code if self.transport == "grpc" else HTTP[code]
        assert error.value.status == expected, error.value
        for fragment in fragments:
            assert fragment in error.value.message, error.value.message
        return error.value.message

    # the extension

    def register(self, name: str, key: str, byte_size: Any, offset: Any = 0,
                 token: str | None = TOKEN) -> None:  # fmt: skip
        if self.transport == "grpc":
            request = service_pb2.SystemSharedMemoryRegisterRequest(
                name=name, key=key, offset=offset, byte_size=byte_size
            )
            self._grpc("SystemSharedMemoryRegister", request, token)
        else:
            body = {"key": key, "offset": offset, "byte_size": byte_size}
            self._http(f"/v2/systemsharedmemory/region/{_quote(name)}/register", body, token)

    def status(self, name: str = "", token: str | None = TOKEN) -> dict[str, tuple]:
        """Registered regions: name -> (key, offset, byte_size)."""
        if self.transport == "grpc":
            request = service_pb2.SystemSharedMemoryStatusRequest(name=name)
            found = self._grpc("SystemSharedMemoryStatus", request, token)
            return {r.name: (r.key, r.offset, r.byte_size) for r in found.regions.values()}
        path = f"/region/{_quote(name)}/status" if name else "/status"
        entries = self._http(f"/v2/systemsharedmemory{path}", None, token)
        return {e["name"]: (e["key"], e["offset"], e["byte_size"]) for e in entries}

    def unregister(self, name: str = "", token: str | None = TOKEN) -> None:
        if self.transport == "grpc":
            request = service_pb2.SystemSharedMemoryUnregisterRequest(name=name)
            self._grpc("SystemSharedMemoryUnregister", request, token)
        else:
            path = f"/region/{_quote(name)}/unregister" if name else "/unregister"
            self._http(f"/v2/systemsharedmemory{path}", {}, token)

    # inference

    def infer(
        self, model: str, datatype: str, shape: tuple[int, ...],
        source: dict[str, Any] | np.ndarray, output: dict[str, Any] | None = None,
        token: str | None = TOKEN,
    ) -> np.ndarray | None:  # fmt: skip
        """ModelInfer with the input from shared memory (`source`: its parameters) or on the
        wire (an array), the output into shared memory (`output`: its parameters) or back;
        the logits that came back, None when they went into shared memory."""
        if self.transport == "grpc":
            message = service_pb2.ModelInferRequest(model_name=model)
            tensor = message.inputs.add(name="images", datatype=datatype, shape=list(shape))
            if isinstance(source, np.ndarray):
                message.raw_input_contents.append(source.tobytes())
            else:
                _parameters(tensor.parameters, source)
            if output is not None:
                _parameters(message.outputs.add(name="logits").parameters, output)
            answer = self._grpc("ModelInfer", message, token)
            (raw,) = answer.raw_output_contents  # empty when the output went to shared memory
            if not raw:
                return None
            return np.frombuffer(raw, np.float32).reshape(list(answer.outputs[0].shape))
        tensor_json: dict[str, Any] = {"name": "images", "datatype": datatype, "shape": shape}
        if isinstance(source, np.ndarray):
            tensor_json["data"] = source.ravel().tolist()
        else:
            tensor_json["parameters"] = source
        body: dict[str, Any] = {"inputs": [tensor_json]}
        if output is not None:
            body["outputs"] = [{"name": "logits", "parameters": output}]
        answer = self._http(f"/v2/models/{model}/infer", body, token)
        (logits,) = answer["outputs"]
        if "data" not in logits:
            return None
        return np.array(logits["data"], np.float32).reshape(logits["shape"])

    # the transports

    def _grpc(self, method: str, request: Any, token: str | None) -> Any:
        metadata = () if token is None else (("authorization", f"Bearer {token}"),)
        with self.server.channel() as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            try:
                return getattr(stub, method)(request, metadata=metadata, timeout=60)
            except grpc.RpcError as error:
                raise Refused(error.code().name, error.details() or "") from None

    def _http(self, path: str, body: Any, token: str | None) -> Any:
        assert self.server.http_url is not None
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(self.server.http_url + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                text = response.read()
        except urllib.error.HTTPError as error:
            raise Refused(error.code, json.loads(error.read())["error"]) from None
        return json.loads(text) if text else None


def _quote(name: str) -> str:
    return urllib.request.quote(name, safe="")


def _parameters(into: Any, values: dict[str, Any]) -> None:
    for key, value in values.items():
        if isinstance(value, str):
            into[key].string_param = value
        elif value >= 1 << 63:
            into[key].uint64_param = value
        else:
            into[key].int64_param = value


def ref(region: str, byte_size: Any, offset: Any = None) -> dict[str, Any]:
    """A tensor's shared-memory parameters."""
    found = {"shared_memory_region": region, "shared_memory_byte_size": byte_size}
    if offset is not None:
        found["shared_memory_offset"] = offset
    return found


# the server, its objects in /dev/shm, the calls


@pytest.fixture(scope="module")
def hostile_repo(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("shm-repo")
    derive(repo, model_repo / "cifar")
    derive(repo, model_repo / "resnet18_u8")
    return repo


@pytest.fixture(scope="module", params=[0, 2], ids=["one-process", "two-frontends"])
def server(
    request: pytest.FixtureRequest, hostile_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[serving.Server]:
    flags = ["--device", "cpu", "--frontends", str(request.param),
             "--shared-memory-regions", str(MAX_REGIONS), "--shared-memory-bytes", str(MAX_BYTES),
             "--max-message-bytes", str(MAX_MESSAGE)]  # fmt: skip
    log = tmp_path_factory.mktemp("shm-hostile") / "server.log"
    running = serving.start(hostile_repo, log, flags, env={"RESNET_SERVE_AUTH_TOKEN": TOKEN})
    yield running
    assert running.stop() == 0, running.log()


@pytest.fixture(params=["grpc", "http"])
def api(request: pytest.FixtureRequest, server: serving.Server) -> Iterator[Api]:
    calls = Api(server, request.param)
    processes = _processes(server)
    yield calls
    calls.unregister()  # every test leaves the table empty
    assert calls.status() == {}
    assert _processes(server) == processes, "a process of the server ended"


def _processes(server: serving.Server) -> set[int]:
    root = psutil.Process(server.process.pid)
    return {root.pid, *(p.pid for p in root.children(recursive=True))}


@pytest.fixture
def dev_shm() -> Iterator[Callable[..., str]]:
    """Objects in /dev/shm for one test: ``make(size, data)`` -> its key ``/name``;
    removed after the test (so are links, FIFOs and directories put there by `path`)."""
    made: list[Path] = []

    def make(size: int = 4096, data: bytes = b"") -> str:
        path = fresh()
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            os.pwrite(fd, data, 0)
        finally:
            os.close(fd)
        return f"/{path.name}"

    def fresh() -> Path:
        made.append(DEV_SHM / f"rs-hostile-{uuid.uuid4().hex[:12]}")
        return made[-1]

    make.path = fresh  # type: ignore[attr-defined]
    yield make
    for path in made:
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink(missing_ok=True)


def assert_healthy(api: Api) -> None:
    """Every process runs (the `api` fixture checks none ended), health says SERVING, and
    a request over the wire is answered."""
    server = api.server
    assert server.process.poll() is None, server.log()
    assert server.health() == health_pb2.HealthCheckResponse.SERVING
    batch = np.random.default_rng(0).standard_normal((1, *CIFAR), dtype=np.float32)
    logits = api.infer("cifar", "FP32", batch.shape, batch)
    assert logits is not None and logits.shape == (1, 10)


# keys


def test_keys_that_are_not_posix_names_are_refused_with_the_rule(
    api: Api, dev_shm: Callable[..., str]
) -> None:
    key = dev_shm()  # an object that exists: the form is refused, not its absence
    name = key[1:]
    bad = {
        "no slash": name, "two slashes": f"/{key}", "a slash inside": f"{key}/x",
        "parent": f"/../{name}", "dot-dot": "/..", "dot": "/.", "a path": f"/dev/shm/{name}",
        "empty": "", "a slash alone": "/", "too long": "/" + "a" * (MAX_KEY + 1),
        "NUL": f"{key}\0x",
    }  # fmt: skip
    for what, bad_key in bad.items():
        message = api.refused(lambda k=bad_key: api.register("r", k, 64), "INVALID_ARGUMENT",
                              "is not allowed", KEY_RULE)  # fmt: skip
        assert "Traceback" not in message, what
    assert api.status() == {}
    # the longest name is a name: refused for what it names (nothing), not for its form
    api.refused(lambda: api.register("r", "/" + "a" * MAX_KEY, 64), "INVALID_ARGUMENT",
                "no shared-memory object", "create it first")  # fmt: skip
    api.refused(lambda: api.register("r", "/resnet-serve.1.abc", 64), "INVALID_ARGUMENT",
                "names one of the server's own segments")  # fmt: skip
    api.register("r", key, 64)  # the same object under its POSIX name
    assert api.status() == {"r": (key, 0, 64)}


def test_a_symlink_in_dev_shm_is_refused_not_followed(
    api: Api, dev_shm: Callable[..., Any], tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"not for callers " * 256)
    outside = dev_shm.path()
    outside.symlink_to(secret)
    inside = dev_shm.path()
    inside.symlink_to(DEV_SHM / dev_shm(4096)[1:])  # to an object of /dev/shm itself
    for link in (outside, inside):
        api.refused(lambda k=f"/{link.name}": api.register("r", k, 64), "INVALID_ARGUMENT",
                    "is a symlink, which the server does not follow")  # fmt: skip
    fifo = dev_shm.path()
    os.mkfifo(fifo, 0o600)  # opened without blocking: no reader stalls the server
    directory = dev_shm.path()
    directory.mkdir()
    for other in (fifo, directory):
        api.refused(lambda k=f"/{other.name}": api.register("r", k, 64), "INVALID_ARGUMENT",
                    "is not a shared-memory object (not a regular file)")  # fmt: skip
    assert api.status() == {}
    assert_healthy(api)


def test_a_key_that_names_nothing_is_named(api: Api) -> None:
    key = f"/rs-hostile-absent-{uuid.uuid4().hex[:8]}"
    api.refused(lambda: api.register("r", key, 64), "INVALID_ARGUMENT",
                f"no shared-memory object '{key}' in /dev/shm", "create it first")  # fmt: skip


def test_region_names_are_bounded(api: Api, dev_shm: Callable[..., str]) -> None:
    key = dev_shm()
    if api.transport == "grpc":  # a path segment of HTTP cannot be empty
        api.refused(lambda: api.register("", key, 64), "INVALID_ARGUMENT",
                    f"a region's name is 1 to {MAX_NAME} characters")  # fmt: skip
    api.refused(lambda: api.register("n" * (MAX_NAME + 1), key, 64), "INVALID_ARGUMENT",
                f"a region's name is 1 to {MAX_NAME} characters; got {MAX_NAME + 1}")  # fmt: skip
    api.register("n" * MAX_NAME, key, 64)
    assert list(api.status()) == ["n" * MAX_NAME]


# ranges


def test_registered_ranges_must_lie_within_the_object(
    api: Api, dev_shm: Callable[..., str]
) -> None:
    key = dev_shm(4096)
    past = [(0, 4097), (4096, 1), (4000, 200), ((1 << 64) - 1, 1), (1, (1 << 64) - 1)]
    for offset, size in past:
        api.refused(lambda o=offset, s=size: api.register("r", key, s, o), "INVALID_ARGUMENT",
                    f"offset {offset} + byte_size {size} passes the end of '{key}', "
                    "which holds 4096 bytes")  # fmt: skip
    api.refused(lambda: api.register("r", key, 0), "INVALID_ARGUMENT",
                "byte_size one >= 1; got offset 0, byte_size 0")  # fmt: skip
    if api.transport == "http":  # gRPC's fields are uint64: no sign, no type to get wrong
        for field, value in [("offset", -1), ("byte_size", -1), ("byte_size", 1.5),
                             ("byte_size", "64"), ("offset", True), ("byte_size", None)]:
            values = {"offset": 0, "byte_size": 64, field: value}
            api.refused(lambda v=values: api.register("r", key, **v), "INVALID_ARGUMENT",
                        f"the body needs '{field}', an integer >= 0")  # fmt: skip
    assert api.status() == {}
    api.register("r", key, 96, 4000)  # the last 96 bytes: within
    assert api.status() == {"r": (key, 4000, 96)}


def test_references_must_lie_within_the_region_and_match_the_tensor(
    api: Api, dev_shm: Callable[..., str]
) -> None:
    batch = np.random.default_rng(1).standard_normal((2, *CIFAR), dtype=np.float32)
    size = batch.nbytes
    api.register("in", dev_shm(size + 64, batch.tobytes()), size)
    shape = batch.shape
    cases = [
        (ref("in", size, 1), f"shared_memory_offset 1 + shared_memory_byte_size {size} passes "
         f"the end of region 'in' ({size} bytes registered); the range must lie within it"),
        (ref("in", size - 4), f"is FP32 {list(shape)}, {size} bytes, but its "
         f"shared_memory_byte_size is {size - 4}; they must be equal"),
        (ref("in", size + 4), "passes the end of region 'in'"),
        (ref("in", size, -1), "'shared_memory_offset' must be an integer >= 0"),
        (ref("in", -size), "'shared_memory_byte_size' must be an integer >= 0"),
        (ref("in", size, (1 << 64) - 1), f"shared_memory_offset {(1 << 64) - 1} + "
         f"shared_memory_byte_size {size} passes the end of region 'in'"),
        (ref("in", (1 << 64) - 1), "passes the end of region 'in'"),
        (ref("in", "12"), "'shared_memory_byte_size' must be an integer >= 0"),
        ({"shared_memory_region": "in"}, "'shared_memory_byte_size' must be an integer >= 0"),
        ({"shared_memory_byte_size": size}, "name a registered region"),
        (ref("absent", size), "shared memory region 'absent' is not registered; registered: "
         "'in'; register it first"),
    ]  # fmt: skip
    for source, fragment in cases:
        api.refused(lambda s=source: api.infer("cifar", "FP32", shape, s), "INVALID_ARGUMENT",
                    fragment)  # fmt: skip
    if api.transport == "http":  # JSON numbers without a bound: Python's ints
        api.refused(lambda: api.infer("cifar", "FP32", shape, ref("in", size, 1 << 70)),
                    "INVALID_ARGUMENT", "passes the end of region 'in'")  # fmt: skip
    logits = api.infer("cifar", "FP32", shape, ref("in", size))
    assert logits is not None
    np.testing.assert_allclose(logits, api.infer("cifar", "FP32", shape, batch), rtol=1e-5)


def test_an_output_range_must_hold_the_logits(api: Api, dev_shm: Callable[..., str]) -> None:
    batch = np.random.default_rng(2).standard_normal((2, *CIFAR), dtype=np.float32)
    key = dev_shm(4096)
    api.register("out", key, 4096)
    api.refused(
        lambda: api.infer("cifar", "FP32", batch.shape, batch, ref("out", 79)),
        "INVALID_ARGUMENT",
        "output 'logits' is FP32 [2, 10], 80 bytes, but its shared_memory_byte_size is 79; "
        "give at least 80 bytes",
    )
    api.refused(lambda: api.infer("cifar", "FP32", batch.shape, batch, ref("out", 80, 4090)),
                "INVALID_ARGUMENT", "passes the end of region 'out'")  # fmt: skip
    assert (DEV_SHM / key[1:]).read_bytes() == bytes(4096)  # nothing written
    assert api.infer("cifar", "FP32", batch.shape, batch, ref("out", 80, 4016)) is None
    written = np.frombuffer((DEV_SHM / key[1:]).read_bytes()[4016:], np.float32)
    expected = api.infer("cifar", "FP32", batch.shape, batch)
    np.testing.assert_allclose(written.reshape(2, 10), expected, rtol=1e-5)


# truncation


def test_a_region_truncated_after_registering_is_an_error_not_a_crash(api: Api) -> None:
    rng = np.random.default_rng(3)
    small = rng.standard_normal((2, *CIFAR), dtype=np.float32)
    large = rng.integers(0, 256, (LARGE, *U8), dtype=np.uint8)
    assert large.nbytes > MIB  # read on the decode pool, not on the event loop
    small_name, large_name, out = (f"rs-hostile-{uuid.uuid4().hex[:12]}" for _ in range(3))
    made = []
    try:  # tritonclient's own regions: the client maps them, the server must not
        for name, tensor in ((small_name, small), (large_name, large)):
            made.append(shm.create_shared_memory_region(name, f"/{name}", tensor.nbytes))
            shm.set_shared_memory_region(made[-1], [tensor])
            api.register(name, f"/{name}", tensor.nbytes)
        made.append(shm.create_shared_memory_region(out, f"/{out}", 80))
        api.register(out, f"/{out}", 80)
        assert api.infer("cifar", "FP32", small.shape, ref(small_name, small.nbytes)) is not None

        for kept in (100, 0):
            os.truncate(DEV_SHM / small_name, kept)
            api.refused(
                lambda: api.infer("cifar", "FP32", small.shape, ref(small_name, small.nbytes)),
                "INVALID_ARGUMENT",
                f"input 'images': the object '/{small_name}' of region '{small_name}' holds "
                f"{kept} bytes now, fewer than the range asked for",
                "unregister it, or register it again at its new size",
            )
        os.truncate(DEV_SHM / large_name, large.nbytes // 2)
        api.refused(
            lambda: api.infer("resnet18_u8", "UINT8", large.shape, ref(large_name, large.nbytes)),
            "INVALID_ARGUMENT", f"holds {large.nbytes // 2} bytes now",
        )  # fmt: skip
        os.truncate(DEV_SHM / out, 10)
        api.refused(
            lambda: api.infer("cifar", "FP32", small.shape, small, ref(out, 80)),
            "INVALID_ARGUMENT", f"output 'logits': the object '/{out}' of region '{out}' holds "
            "10 bytes now",
        )  # fmt: skip
        assert (DEV_SHM / out).stat().st_size == 10  # never grown by the server
        assert_healthy(api)
        assert "Traceback" not in api.server.log() and "SIGBUS" not in api.server.log()
    finally:
        for handle in made:
            shm.destroy_shared_memory_region(handle)


def test_a_read_is_bounded_by_the_message_limit(api: Api, dev_shm: Callable[..., str]) -> None:
    images = MAX_MESSAGE // U8_IMAGE + 1
    size = images * U8_IMAGE
    api.register("big", dev_shm(size), size)
    api.refused(
        lambda: api.infer("resnet18_u8", "UINT8", (images, *U8), ref("big", size)),
        "INVALID_ARGUMENT",
        f"shared_memory_byte_size {size} is more than one request may carry "
        f"({MAX_MESSAGE} bytes, max_message_bytes)",
    )


# the table's limits and rules


def test_caps_on_regions_and_bytes_are_named(api: Api, dev_shm: Callable[..., str]) -> None:
    keys = [dev_shm(4096) for _ in range(MAX_REGIONS + 1)]
    for i, key in enumerate(keys[:MAX_REGIONS]):
        api.register(f"r{i}", key, 4096)
    api.refused(lambda: api.register("one-more", keys[-1], 4096), "RESOURCE_EXHAUSTED",
                f"{MAX_REGIONS} shared memory regions are registered, the most this server "
                "takes (shared_memory_regions); unregister one first")  # fmt: skip
    assert len(api.status()) == MAX_REGIONS
    api.unregister()
    big = dev_shm(MAX_BYTES)
    api.register("three-quarters", big, MAX_BYTES * 3 // 4)
    api.refused(
        lambda: api.register("half", big, MAX_BYTES // 2), "RESOURCE_EXHAUSTED",
        f"registering {MAX_BYTES // 2} bytes would make {MAX_BYTES * 5 // 4} bytes of shared "
        f"memory registered; this server takes at most {MAX_BYTES} (shared_memory_bytes)",
    )  # fmt: skip
    api.register("quarter", big, MAX_BYTES // 4, MAX_BYTES * 3 // 4)  # up to the cap exactly
    assert sorted(api.status()) == ["quarter", "three-quarters"]


def test_registering_a_name_twice_is_already_exists_and_keeps_the_first(
    api: Api, dev_shm: Callable[..., str]
) -> None:
    first, second = dev_shm(4096), dev_shm(8192)
    api.register("r", first, 1024, 16)
    api.refused(lambda: api.register("r", second, 8192), "ALREADY_EXISTS",
                "shared memory region 'r' is already registered; unregister it first")  # fmt: skip
    assert api.status() == {"r": (first, 16, 1024)}


def test_unknown_regions_unregister_quietly_and_are_not_found(
    api: Api, dev_shm: Callable[..., str]
) -> None:
    api.register("kept", dev_shm(), 64)
    api.unregister("never-registered")  # Triton's answer: no error
    assert list(api.status()) == ["kept"]
    api.refused(lambda: api.status("never-registered"), "NOT_FOUND",
                "no shared memory region 'never-registered' is registered; registered: "
                "'kept'")  # fmt: skip


def test_every_call_needs_the_token(api: Api, dev_shm: Callable[..., str]) -> None:
    key = dev_shm(CIFAR_IMAGE)
    api.register("mine", key, CIFAR_IMAGE)
    for token, message in ((None, "missing bearer token"), ("wrong", "not accepted")):
        api.refused(lambda t=token: api.register("theirs", key, 64, token=t),
                    "UNAUTHENTICATED", message)  # fmt: skip
        api.refused(lambda t=token: api.status(token=t), "UNAUTHENTICATED", message)
        api.refused(lambda t=token: api.unregister("mine", token=t), "UNAUTHENTICATED", message)
        api.refused(lambda t=token: api.unregister(token=t), "UNAUTHENTICATED", message)
        api.refused(
            lambda t=token: api.infer("cifar", "FP32", (1, *CIFAR), ref("mine", CIFAR_IMAGE),
                                      token=t),
            "UNAUTHENTICATED", message,
        )  # fmt: skip
    assert api.status() == {"mine": (key, 0, CIFAR_IMAGE)}  # nothing added, nothing removed
