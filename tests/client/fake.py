"""A small in-process Classifier for the behaviour a real server cannot be made to show on
demand: scripted failures (for retries and the typed errors), TLS, auth headers, two
backends behind one target. Everything else is tested against the real server.

Each fake runs in a child process (`FakeServer`), so nothing grpcio does at shutdown can
hold the test process."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2 as pb
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2_grpc as pb_grpc

MODEL = "fake"


@dataclass
class Script:
    """What the fake does: statuses (and optional trailing metadata) to fail the next calls
    with, where to break streams."""

    failures: deque[
        tuple[grpc.StatusCode, str] | tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]
    ] = field(default_factory=deque)
    break_stream_after: int | None = None
    calls: int = 0
    stream_calls: int = 0
    metadata: list[dict[str, str]] = field(default_factory=list)


def _answer(request: pb.ClassifyRequest) -> pb.ClassifyResponse:
    """Image i of a request is 'classified' as the class its byte length picks."""
    results = []
    for image in request.images:
        size = len(image.encoded) if image.WhichOneof("data") == "encoded" else len(
            image.tensor.data)
        index = size % 1000
        classes = [pb.ClassScore(index=(index + k) % 1000, label=f"class{(index + k) % 1000}",
                                 score=1.0 / (k + 2)) for k in range(request.top_k or 5)]
        results.append(pb.Classification(classes=classes))
    return pb.ClassifyResponse(model=request.model, version="1", results=results,
                               request_id=request.request_id or "fake-id")


class FakeClassifier(pb_grpc.ClassifierServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        self.script.calls += 1
        self.script.metadata.append(dict(context.invocation_metadata() or ()))
        if self.script.failures:
            await context.abort(*self.script.failures.popleft())
        if request.model != MODEL:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.model!r}")
        return _answer(request)

    async def ClassifyStream(
        self, requests: AsyncIterator[pb.ClassifyRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ClassifyStreamResponse]:
        self.script.stream_calls += 1
        sequence = 0
        async for request in requests:
            if self.script.break_stream_after == sequence:
                self.script.break_stream_after = None
                await context.abort(grpc.StatusCode.UNAVAILABLE, "draining")
            if request.model != MODEL:
                error = pb.Error(code=grpc.StatusCode.NOT_FOUND.value[0], message="no model")
                yield pb.ClassifyStreamResponse(sequence=sequence, error=error)
            else:
                yield pb.ClassifyStreamResponse(sequence=sequence, response=_answer(request))
            sequence += 1

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[_model()])

    async def GetModel(
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        if request.name != MODEL:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.name!r}")
        return _model()


def _model() -> pb.ModelInfo:
    return pb.ModelInfo(
        name=MODEL, arch="resnet18", platform="onnxruntime_onnx", num_classes=1000,
        input=pb.InputSpec(name="images", dtype="float32", layout="NCHW", shape=[-1, 3, 224, 224]),
        max_batch_size=8,
        versions=[pb.VersionInfo(version="1", state=pb.VersionInfo.READY)],
    )


STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class FakeTLS:
    """PEM bytes for the fake's TLS port (credentials objects don't cross processes)."""

    key: bytes
    certificate: bytes
    client_ca: bytes | None = None
    require_client_auth: bool = False

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.certificate)], root_certificates=self.client_ca,
            require_client_auth=self.require_client_auth,
        )  # fmt: skip


class FakeServer:
    """The fake in a child process of its own, its script read and written over a pipe.

    A child process, because grpcio's shutdown can deadlock while holding the GIL (seen in
    ``grpc.aio.Server.stop`` with a metadata-plugin client): in the test process that
    freezes every thread, pytest-timeout's included; in a child it costs a kill."""

    def __init__(self, tls: FakeTLS | None = None) -> None:
        self._conn, child = _CONTEXT.Pipe()
        self._process = _CONTEXT.Process(target=_serve, args=(child, tls), daemon=True)
        self._process.start()
        child.close()
        self.port: int = self._ask("port")
        self.script = RemoteScript(self._ask)

    def _ask(self, *command: Any) -> Any:
        self._conn.send(command)
        if not self._conn.poll(STOP_TIMEOUT):
            raise TimeoutError(f"the fake did not answer {command[0]!r}")
        return self._conn.recv()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> bool:
        """Stop the fake; False when it had to be killed (its shutdown hung)."""
        with contextlib.suppress(OSError, EOFError, TimeoutError):
            self._ask("stop")
        self._process.join(STOP_TIMEOUT)
        clean = not self._process.is_alive() and self._process.exitcode == 0
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()
        return clean


class RemoteScript:
    """`Script`'s fields as the tests use them, read and written in the fake's process."""

    def __init__(self, ask: Callable[..., Any]) -> None:
        self._ask = ask
        self.failures = _RemoteFailures(ask)

    def __getattr__(self, name: str) -> Any:
        return self._ask("get", name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_") or name == "failures":
            object.__setattr__(self, name, value)
        else:
            self._ask("set", name, value)


class _RemoteFailures:
    def __init__(self, ask: Callable[..., Any]) -> None:
        self._ask = ask

    def append(self, failure: tuple[Any, ...]) -> None:
        self.extend([failure])

    def extend(self, failures: list[tuple[Any, ...]]) -> None:
        self._ask("fail", list(failures))


# forkserver: children fork from a process that imported grpc but never started it, fast
# and fork-safe; the test process's own grpc threads are never forked.
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload([__name__])


def _serve(conn: Connection, tls: FakeTLS | None) -> None:
    asyncio.run(_serving(conn, tls))


async def _serving(conn: Connection, tls: FakeTLS | None) -> None:
    script = Script()
    server = grpc.aio.server()
    pb_grpc.add_ClassifierServicer_to_server(FakeClassifier(script), server)
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), server)
    if tls is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", tls.credentials())
    await server.start()
    stopped = asyncio.Event()

    def answer() -> None:
        try:
            command, *args = conn.recv()
        except EOFError:  # the test process went away
            command, args = "stop", []
        if command == "port":
            conn.send(port)
        elif command == "get":
            conn.send(getattr(script, args[0]))
        elif command == "set":
            setattr(script, args[0], args[1])
            conn.send(None)
        elif command == "fail":
            script.failures.extend(args[0])
            conn.send(None)
        elif command == "stop":
            stopped.set()

    asyncio.get_running_loop().add_reader(conn.fileno(), answer)
    await stopped.wait()
    await server.stop(None)
    with contextlib.suppress(OSError):
        conn.send(None)
