"""A small in-process Classifier for the behaviour a real server cannot be made to show on
demand: scripted failures (for retries and the typed errors), TLS, auth headers, two
backends behind one target. Everything else is tested against the real server."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
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


class FakeServer:
    """The fake on its own event loop in a thread, so blocking clients can call it too."""

    def __init__(self, credentials: grpc.ServerCredentials | None = None) -> None:
        self.script = Script()
        self._credentials = credentials
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.port = self._run(self._start())

    def _run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def _start(self) -> int:
        self._server = grpc.aio.server()
        pb_grpc.add_ClassifierServicer_to_server(FakeClassifier(self.script), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), self._server)
        if self._credentials is None:
            port = self._server.add_insecure_port("127.0.0.1:0")
        else:
            port = self._server.add_secure_port("127.0.0.1:0", self._credentials)
        await self._server.start()
        return port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        # grpc.aio's Server.stop has been seen to hang here, once in a full run (a TLS
        # test); the fake is only the tests' stand-in, so its stop is bounded and its
        # daemon thread left behind rather than the run held for pytest's timeout.
        stopping = asyncio.run_coroutine_threadsafe(self._server.stop(None), self._loop)
        with contextlib.suppress(TimeoutError):
            stopping.result(timeout=STOP_TIMEOUT)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(STOP_TIMEOUT)
