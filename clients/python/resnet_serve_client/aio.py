"""The asyncio client: the same calls as ``Client``, awaited."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .client import DEFAULT_CONCURRENCY, DEFAULT_TIMEOUT
from .errors import ResnetServeError, Unavailable, from_rpc_error
from .images import ImageLike
from .messages import (
    DEFAULT_TOP_K,
    Failed,
    classify_request,
    health_status,
    requests_of,
    stream_result,
)
from .options.channel import ChannelOptions, aio_channel
from .patience import Patience
from .proto.resnet_serve.v1 import classifier_pb2 as pb
from .proto.resnet_serve.v1 import classifier_pb2_grpc as pb_grpc
from .resize import Resize
from .results import Classification, HealthStatus, ModelInfo, classifications, model_info


class AsyncClient:
    """``Client`` for asyncio code; create it inside the running event loop.

    >>> async with AsyncClient("localhost:8001", model="resnet50") as client:
    ...     results = await client.classify(["a.jpg", "b.jpg"])
    """

    def __init__(
        self,
        target: str = "localhost:8001",
        *,
        model: str | None = None,
        options: ChannelOptions | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        resize: Resize | None = None,
    ) -> None:
        self.options = options or ChannelOptions()
        self.model = model
        self.timeout = timeout
        self.resize = resize
        self._channel = aio_channel(target, self.options)
        self._stub = pb_grpc.ClassifierStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def classify(
        self,
        images: ImageLike | Iterable[ImageLike],
        *,
        model: str | None = None,
        version: str = "",
        top_k: int = DEFAULT_TOP_K,
        timeout: float | None = None,
        request_id: str = "",
    ) -> list[Classification]:
        """See ``Client.classify``."""
        request = classify_request(
            images, model=model or self.model, version=version, top_k=top_k,
            resize=self.resize, request_id=request_id,
        )
        return classifications(await self._unary(self._stub.Classify, request, timeout))

    async def classify_many(
        self,
        images: Iterable[ImageLike],
        *,
        model: str | None = None,
        version: str = "",
        top_k: int = DEFAULT_TOP_K,
        concurrency: int = DEFAULT_CONCURRENCY,
        stream: bool = True,
        timeout: float | None = None,
        return_exceptions: bool = False,
    ) -> AsyncIterator[Classification | Exception]:
        """See ``Client.classify_many``."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1; got {concurrency}")
        requests = requests_of(
            images, model=model or self.model, version=version, top_k=top_k, resize=self.resize
        )
        run = self._stream_many if stream else self._unary_many
        async for result in run(requests, concurrency, timeout):
            if isinstance(result, Exception) and not return_exceptions:
                raise result
            yield result

    async def health(self, service: str = "", *, timeout: float | None = None) -> HealthStatus:
        """See ``Client.health``."""
        call = self._call(timeout) | {"wait_for_ready": False}
        try:
            response = await self._health.Check(
                health_pb2.HealthCheckRequest(service=service), **call
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return health_status(response)

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        response = await self._unary(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return [model_info(model) for model in response.models]

    async def get_model(
        self, name: str, version: str = "", *, timeout: float | None = None
    ) -> ModelInfo:
        request = pb.GetModelRequest(name=name, version=version)
        return model_info(await self._unary(self._stub.GetModel, request, timeout))

    def _call(self, timeout: float | None) -> dict[str, Any]:
        return {
            "timeout": self.timeout if timeout is None else timeout,
            "metadata": self.options.call_metadata(),
            "wait_for_ready": self.options.wait_for_ready,
        }

    async def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        patience = Patience.for_call(self.options, self.timeout if timeout is None else timeout)
        while True:
            try:
                call = self._call(timeout) | {"timeout": patience.remaining()}
                return await method(request, **call)
            except grpc.RpcError as error:
                failure = from_rpc_error(error)
                if (delay := patience.delay(failure)) is None:
                    raise failure from None
                await asyncio.sleep(delay)

    async def _unary_many(
        self, requests: Iterable[pb.ClassifyRequest | Failed], concurrency: int,
        timeout: float | None,
    ) -> AsyncIterator[Classification | Exception]:
        window: deque[asyncio.Task[Any] | Failed] = deque()

        async def settle(item: asyncio.Task[Any] | Failed) -> Classification | Exception:
            if isinstance(item, Failed):
                return item.error
            try:
                return classifications(await item)[0]
            except ResnetServeError as error:
                return error

        try:
            for request in requests:
                if isinstance(request, Failed):
                    window.append(request)
                else:
                    call = self._unary(self._stub.Classify, request, timeout)
                    window.append(asyncio.ensure_future(call))
                if len(window) >= concurrency:
                    yield await settle(window.popleft())
            while window:
                yield await settle(window.popleft())
        finally:
            for item in window:
                if not isinstance(item, Failed):
                    item.cancel()

    async def _stream_many(
        self, requests: Iterable[pb.ClassifyRequest | Failed], concurrency: int,
        timeout: float | None,
    ) -> AsyncIterator[Classification | Exception]:
        # window: requests sent and not yet answered (and client-side errors), in input order.
        window: deque[pb.ClassifyRequest | Failed] = deque()
        source = iter(requests)
        call_kwargs = self._call(timeout) | {"timeout": timeout}
        stream = _Stream.open(self._stub, call_kwargs, [])
        patience = self._stream_patience(timeout)
        try:
            while True:
                while len(window) < concurrency and (request := next(source, None)) is not None:
                    window.append(request)
                    if not isinstance(request, Failed):
                        stream.send(request)
                if not window:
                    await stream.finish()
                    return
                if isinstance(window[0], Failed):
                    yield window.popleft().error  # type: ignore[union-attr]
                    continue
                try:
                    response = await stream.receive()
                except ResnetServeError as error:
                    if (delay := patience.delay(error)) is not None:
                        await asyncio.sleep(delay)
                    else:
                        window.popleft()
                        patience = self._stream_patience(timeout)
                        yield error
                    stream.close()
                    unanswered = [r for r in window if not isinstance(r, Failed)]
                    stream = _Stream.open(self._stub, call_kwargs, unanswered)
                    continue
                if patience.attempts:
                    patience = self._stream_patience(timeout)
                window.popleft()
                yield stream_result(response)
        finally:
            stream.close()


    def _stream_patience(self, timeout: float | None) -> Patience:
        return Patience.for_stream(self.options, self.timeout if timeout is None else timeout)


_CORE_INTERNAL = "Internal error from Core"


class _Stream:
    """One ``ClassifyStream`` call fed from a queue (gRPC reads it in its own task)."""

    def __init__(self, stub: pb_grpc.ClassifierStub, call_kwargs: dict[str, Any]) -> None:
        self._feed: asyncio.Queue[pb.ClassifyRequest | None] = asyncio.Queue()
        self._call = stub.ClassifyStream(self._requests(), **call_kwargs)

    @classmethod
    def open(
        cls, stub: pb_grpc.ClassifierStub, call_kwargs: dict[str, Any],
        unanswered: list[pb.ClassifyRequest],
    ) -> _Stream:
        stream = cls(stub, call_kwargs)
        for request in unanswered:
            stream.send(request)
        return stream

    async def _requests(self) -> AsyncIterator[pb.ClassifyRequest]:
        while (request := await self._feed.get()) is not None:
            yield request

    def send(self, request: pb.ClassifyRequest) -> None:
        self._feed.put_nowait(request)

    async def receive(self) -> pb.ClassifyStreamResponse:
        try:
            response = await self._call.read()
        except grpc.RpcError as error:
            failure = from_rpc_error(error)
            if failure.code is grpc.StatusCode.INTERNAL and failure.message == _CORE_INTERNAL:
                # grpc.aio replaces the status of a stream the server ended while a write
                # was under way with this one (grpc/grpc#36066): the stream broke, the
                # server's reason is lost. Treated as the break it is, so it is reopened.
                raise Unavailable(grpc.StatusCode.UNAVAILABLE,
                                  "the stream broke (its status was lost in grpc.aio)") from None
            raise failure from None
        if response is grpc.aio.EOF:
            raise ResnetServeError(
                grpc.StatusCode.INTERNAL, "the server ended the stream before answering"
            )
        return response

    async def finish(self) -> None:
        """Half-close and let the server end the call cleanly."""
        self._feed.put_nowait(None)
        while await self._call.read() is not grpc.aio.EOF:
            pass

    def close(self) -> None:
        self._feed.put_nowait(None)
        if not self._call.done():
            self._call.cancel()
