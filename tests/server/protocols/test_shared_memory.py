"""Triton's system shared-memory extension end to end, with tritonclient's own
`tritonclient.utils.shared_memory`: regions registered, listed and unregistered over gRPC
and HTTP; inputs read from a region and outputs written into one (the response carrying
no data), equal to the same request on the wire; with ``--frontends 2`` a region
registered through one connection serves calls on every front end. Hostile use:
tests/security/test_shared_memory_hostile.py; the table's own rules:
test_shared_memory_table below."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from bench import serving
from server.errors import AlreadyExists, InvalidInput, LimitReached, RegionNotFound
from server.request import SharedRegion
from server.shared_memory import SharedMemory
from tests.fixtures.servers import InProcessServer
from tests.server.test_frontends import spread

CIFAR = (3, 32, 32)
U8 = (224, 224, 3)


def key() -> str:
    return f"/rs-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def regions() -> Iterator[Callable[[int], tuple[str, shm.SharedMemoryRegion]]]:
    """Regions created in /dev/shm for a test (name, handle), destroyed after it."""
    made: list[shm.SharedMemoryRegion] = []

    def create(size: int) -> tuple[str, shm.SharedMemoryRegion]:
        name = key()
        made.append(shm.create_shared_memory_region(name[1:], name, size))
        return name, made[-1]

    yield create
    for handle in made:
        shm.destroy_shared_memory_region(handle)


@pytest.fixture(scope="module")
def grpc_client(model_server: InProcessServer) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(model_server.address) as client:
        yield client


@pytest.fixture(scope="module")
def http_client(model_server: InProcessServer) -> Iterator[httpclient.InferenceServerClient]:
    assert model_server.http_url is not None
    with httpclient.InferenceServerClient(model_server.http_url.removeprefix("http://")) as c:
        yield c


Client = grpcclient.InferenceServerClient | httpclient.InferenceServerClient


def module_of(client: Client):  # type: ignore[no-untyped-def]
    return grpcclient if isinstance(client, grpcclient.InferenceServerClient) else httpclient


def shm_infer(
    client: Client, model: str, batch: np.ndarray, datatype: str, make: Callable[..., tuple]
) -> tuple[np.ndarray, object]:
    """`batch` through a region, logits into another; (logits read from it, the result)."""
    lib = module_of(client)
    in_key, in_handle = make(batch.nbytes)
    out_bytes = len(batch) * 10 * 4 if model == "cifar" else len(batch) * 1000 * 4
    out_key, out_handle = make(out_bytes)
    shm.set_shared_memory_region(in_handle, [batch])
    in_name, out_name = f"in-{in_key[1:]}", f"out-{out_key[1:]}"
    client.register_system_shared_memory(in_name, in_key, batch.nbytes)
    client.register_system_shared_memory(out_name, out_key, out_bytes)
    try:
        tensor = lib.InferInput("images", list(batch.shape), datatype)
        tensor.set_shared_memory(in_name, batch.nbytes)
        output = lib.InferRequestedOutput("logits")
        output.set_shared_memory(out_name, out_bytes)
        result = client.infer(model, [tensor], outputs=[output])
        meta = result.get_output("logits")
        shape = list(meta.shape if lib is grpcclient else meta["shape"])
        datatype_out = meta.datatype if lib is grpcclient else meta["datatype"]
        assert (datatype_out, shape) == ("FP32", [len(batch), out_bytes // 4 // len(batch)])
        logits = shm.get_contents_as_numpy(out_handle, np.float32, shape)
        return logits.copy(), result
    finally:
        client.unregister_system_shared_memory(in_name)
        client.unregister_system_shared_memory(out_name)


def wire_infer(client: Client, model: str, batch: np.ndarray, datatype: str) -> np.ndarray:
    lib = module_of(client)
    tensor = lib.InferInput("images", list(batch.shape), datatype)
    tensor.set_data_from_numpy(batch)
    return client.infer(model, [tensor]).as_numpy("logits")


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_inputs_and_outputs_through_shared_memory_equal_the_wire(
    transport: str,
    grpc_client: grpcclient.InferenceServerClient,
    http_client: httpclient.InferenceServerClient,
    regions: Callable[..., tuple],
) -> None:
    client = grpc_client if transport == "grpc" else http_client
    rng = np.random.default_rng(3)
    cases = [
        ("cifar", rng.standard_normal((3, *CIFAR), dtype=np.float32), "FP32"),
        ("resnet18_u8", rng.integers(0, 256, (2, *U8), dtype=np.uint8), "UINT8"),
    ]
    for model, batch, datatype in cases:
        logits, result = shm_infer(client, model, batch, datatype, regions)
        np.testing.assert_allclose(logits, wire_infer(client, model, batch, datatype), rtol=1e-5)
        if transport == "grpc":  # the data went into the region; its entry empty, as Triton's
            assert list(result.get_response().raw_output_contents) == [b""]
        else:
            assert "data" not in result.get_output("logits")
            assert "binary_data_size" not in result.get_output("logits").get("parameters", {})
    assert client.get_system_shared_memory_status() in ([], {}) or not list(
        client.get_system_shared_memory_status().regions
    )


def test_an_input_at_an_offset_and_classification_not_into_shared_memory(
    grpc_client: grpcclient.InferenceServerClient, regions: Callable[..., tuple]
) -> None:
    batch = np.random.default_rng(4).standard_normal((2, *CIFAR), dtype=np.float32)
    in_key, in_handle = regions(4096 + batch.nbytes)
    shm.set_shared_memory_region(in_handle, [batch], offset=4096 + 0)
    out_key, out_handle = regions(4096)
    grpc_client.register_system_shared_memory("offset-in", in_key, batch.nbytes, offset=4096)
    grpc_client.register_system_shared_memory("top", out_key, 4096)
    try:
        tensor = grpcclient.InferInput("images", list(batch.shape), "FP32")
        tensor.set_shared_memory("offset-in", batch.nbytes)
        top = grpcclient.InferRequestedOutput("logits", class_count=3)
        result = grpc_client.infer("cifar", [tensor], outputs=[top])
        wire = grpcclient.InferInput("images", list(batch.shape), "FP32")
        wire.set_data_from_numpy(batch)
        expected = grpc_client.infer("cifar", [wire], outputs=[top]).as_numpy("logits")
        assert result.as_numpy("logits").tolist() == expected.tolist()
        # a classification output into shared memory is refused, as Triton's client does
        message = service_pb2.ModelInferRequest(model_name="cifar")
        message.inputs.add(name="images", datatype="FP32", shape=list(batch.shape))
        message.inputs[0].parameters["shared_memory_region"].string_param = "offset-in"
        message.inputs[0].parameters["shared_memory_byte_size"].int64_param = batch.nbytes
        output = message.outputs.add(name="logits")
        output.parameters["classification"].int64_param = 3
        output.parameters["shared_memory_region"].string_param = "top"
        output.parameters["shared_memory_byte_size"].int64_param = 4096
        with grpc.insecure_channel(grpc_client._channel._channel.target().decode()) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as error:
                stub.ModelInfer(message, timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "a classification output goes in the response only" in str(error.value.details())
        assert not shm.get_contents_as_numpy(out_handle, np.uint8, [4096]).any()
    finally:
        grpc_client.unregister_system_shared_memory()


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_status_lists_regions_and_unregister_removes_them(
    transport: str,
    grpc_client: grpcclient.InferenceServerClient,
    http_client: httpclient.InferenceServerClient,
    regions: Callable[..., tuple],
) -> None:
    client = grpc_client if transport == "grpc" else http_client
    first, _ = regions(1024)
    second, _ = regions(4096)
    client.register_system_shared_memory("a", first, 1024)
    client.register_system_shared_memory("b", second, 1000, offset=96)

    def listed(name: str = "") -> list[tuple[str, str, int, int]]:
        status = client.get_system_shared_memory_status(name)
        entries = status if transport == "http" else [
            {"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size}
            for r in status.regions.values()
        ]
        return sorted((e["name"], e["key"], int(e["offset"]), int(e["byte_size"]))
                      for e in entries)  # fmt: skip

    try:
        assert listed() == [("a", first, 0, 1024), ("b", second, 96, 1000)]
        assert listed("b") == [("b", second, 96, 1000)]
        with pytest.raises(InferenceServerException, match="no shared memory region 'c'") as e:
            listed("c")
        assert "404" in str(e.value.status()) or "NOT_FOUND" in str(e.value.status())
        with pytest.raises(InferenceServerException, match="already registered"):
            client.register_system_shared_memory("a", first, 1024)
        client.unregister_system_shared_memory("a")
        client.unregister_system_shared_memory("a")  # again: no error, as Triton
        assert listed() == [("b", second, 96, 1000)]
    finally:
        client.unregister_system_shared_memory()
    assert listed() == []


def test_server_metadata_lists_system_shared_memory(
    grpc_client: grpcclient.InferenceServerClient, http_client: httpclient.InferenceServerClient
) -> None:
    assert "system_shared_memory" in grpc_client.get_server_metadata().extensions
    assert "system_shared_memory" in http_client.get_server_metadata()["extensions"]


def test_cuda_shared_memory_is_unimplemented_and_says_what_to_use(
    grpc_client: grpcclient.InferenceServerClient, http_client: httpclient.InferenceServerClient
) -> None:
    with pytest.raises(InferenceServerException) as grpc_error:
        grpc_client.get_cuda_shared_memory_status()
    assert grpc_error.value.status() == "StatusCode.UNIMPLEMENTED"
    assert "CUDA shared memory is not supported" in grpc_error.value.message()
    assert "system shared memory" in grpc_error.value.message()
    with pytest.raises(InferenceServerException) as http_error:
        http_client.get_cuda_shared_memory_status()
    assert http_error.value.status() == "501"
    assert "CUDA shared memory is not supported" in http_error.value.message()


def test_registration_on_one_front_end_serves_every_front_end(
    model_repo: Path, tmp_path: Path, regions: Callable[..., tuple]
) -> None:
    server = serving.start(model_repo, tmp_path / "server.log",
                           ["--frontends", "2", "--device", "cpu"])  # fmt: skip
    try:
        batch = np.random.default_rng(5).standard_normal((2, *CIFAR), dtype=np.float32)
        in_key, in_handle = regions(batch.nbytes)
        shm.set_shared_memory_region(in_handle, [batch])
        out_keys = [regions(80) for _ in range(4)]
        with grpcclient.InferenceServerClient(server.address) as one:
            one.register_system_shared_memory("input", in_key, batch.nbytes)
            for i, (out_key, _) in enumerate(out_keys):
                one.register_system_shared_memory(f"out{i}", out_key, 80)
            expected = wire_infer(one, "cifar", batch, "FP32")
        request = grpcclient.InferInput("images", list(batch.shape), "FP32")
        request.set_shared_memory("input", batch.nbytes)
        def message(output: str) -> service_pb2.ModelInferRequest:
            m = service_pb2.ModelInferRequest(model_name="cifar")
            t = m.inputs.add(name="images", datatype="FP32", shape=list(batch.shape))
            t.parameters["shared_memory_region"].string_param = "input"
            t.parameters["shared_memory_byte_size"].int64_param = batch.nbytes
            o = m.outputs.add(name="logits")
            o.parameters["shared_memory_region"].string_param = output
            o.parameters["shared_memory_byte_size"].int64_param = 80
            return m

        with spread(server) as channels:  # every front end holds at least one
            for index, channel in enumerate(channels):
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                slot = index % len(out_keys)
                response = stub.ModelInfer(message(f"out{slot}"), timeout=60)
                assert list(response.raw_output_contents) == [b""]
                handle = out_keys[slot][1]
                got = shm.get_contents_as_numpy(handle, np.float32, [2, 10])
                np.testing.assert_allclose(got, expected, rtol=1e-5)
            status = service_pb2_grpc.GRPCInferenceServiceStub(channels[-1])
            listed = status.SystemSharedMemoryStatus(
                service_pb2.SystemSharedMemoryStatusRequest(), timeout=30
            )
            assert sorted(listed.regions) == ["input", "out0", "out1", "out2", "out3"]
            status.SystemSharedMemoryUnregister(
                service_pb2.SystemSharedMemoryUnregisterRequest(name="input"), timeout=30
            )
            for channel in channels:  # gone on every front end when the call returned
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                with pytest.raises(grpc.RpcError) as error:
                    stub.ModelInfer(message("out0"), timeout=60)
                assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "region 'input' is not registered" in str(error.value.details())
    finally:
        code = server.stop()
        assert code == 0, server.log()


# the table itself, over a directory of the test's


def test_shared_memory_table(tmp_path: Path) -> None:
    table = SharedMemory(max_regions=2, max_bytes=100, max_read=1 << 20, directory=str(tmp_path))
    (tmp_path / "obj").write_bytes(bytes(range(64)) + bytes(64))  # room past "big"
    table.apply("register", "r", "/obj", 16, 32)
    assert table.read("input 'x'", SharedRegion("r", 4, 8)) == bytes(range(20, 28))
    table.write("output 'y'", SharedRegion("r", 0, 4), b"\xff\xff")
    assert (tmp_path / "obj").read_bytes()[16:19] == b"\xff\xff\x12"
    with pytest.raises(AlreadyExists):
        table.apply("register", "r", "/obj", 0, 8)
    with pytest.raises(LimitReached, match="shared_memory_bytes"):
        table.apply("register", "big", "/obj", 0, 70)
    table.apply("register", "s", "/obj", 0, 8)
    with pytest.raises(LimitReached, match="shared_memory_regions"):
        table.apply("register", "t", "/obj", 0, 8)
    with pytest.raises(InvalidInput, match="passes the end of region 'r'"):
        table.read("input 'x'", SharedRegion("r", 30, 4))
    os.truncate(tmp_path / "obj", 20)
    with pytest.raises(InvalidInput, match="holds 20 bytes now"):
        table.read("input 'x'", SharedRegion("r", 0, 8))
    with pytest.raises(InvalidInput, match="holds 20 bytes now"):
        table.write("output 'y'", SharedRegion("r", 0, 8), b"12345678")
    assert (tmp_path / "obj").stat().st_size == 20  # never grown by a write
    mirror = SharedMemory()
    mirror.replace(table.snapshot())
    assert mirror.status() == table.status()
    with pytest.raises(RegionNotFound):
        table.status("nope")
    table.apply("unregister", "")
    assert table.status() == []
