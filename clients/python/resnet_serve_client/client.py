"""The blocking client."""

from __future__ import annotations

import queue
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .errors import ResnetServeError, from_rpc_error
from .images import ImageLike
from .messages import (
    DEFAULT_TOP_K,
    Failed,
    classify_request,
    health_status,
    is_retryable,
    requests_of,
    stream_result,
)
from .options.channel import ChannelOptions, sync_channel
from .patience import Patience
from .proto.resnet_serve.v1 import classifier_pb2 as pb
from .proto.resnet_serve.v1 import classifier_pb2_grpc as pb_grpc
from .resize import Resize
from .results import Classification, HealthStatus, ModelInfo, classifications, model_info

DEFAULT_TIMEOUT = 30.0
_Sent = tuple[pb.ClassifyRequest, grpc.Future]
DEFAULT_CONCURRENCY = 8


class Client:
    """A connection to one resnet-serve endpoint (or a load-balanced set of them).

    >>> with Client("localhost:8001", model="resnet50") as client:
    ...     best = client.classify("cat.jpg")[0].top

    target: ``host:port`` (port 8001 if left out), ``dns:///host:port`` for
    round-robin over every address the name resolves to, or any gRPC target.
    model: the model used when a call names none. timeout: the default
    deadline of each call in seconds (``None``: no deadline). resize: shrink
    images on the client before sending them (needs the ``resize`` extra).
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
        self._channel = sync_channel(target, self.options)
        self._stub = pb_grpc.ClassifierStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def classify(
        self,
        images: ImageLike | Iterable[ImageLike],
        *,
        model: str | None = None,
        version: str = "",
        top_k: int = DEFAULT_TOP_K,
        timeout: float | None = None,
        request_id: str = "",
    ) -> list[Classification]:
        """Classify one image or several in one request; one result per image, in order.

        Raises a ``ResnetServeError`` subclass when the call fails.
        """
        request = classify_request(
            images, model=model or self.model, version=version, top_k=top_k,
            resize=self.resize, request_id=request_id,
        )
        return classifications(self._unary(self._stub.Classify, request, timeout))

    def classify_many(
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
    ) -> Iterator[Classification | Exception]:
        """Classify many images, one per request, yielding results in input order.

        At most ``concurrency`` requests are in flight; ``images`` is read
        lazily, so it may be a generator over a huge folder. By default they
        go over one ``ClassifyStream`` call, which measured 15-25% more
        images/s than one ``Classify`` call per image when the model is cheap
        (and the same when inference dominates); there ``timeout`` bounds the
        whole stream (``None``: no deadline), and a stream broken by
        UNAVAILABLE (a server restarting or draining) is reopened with backoff
        and its unanswered requests sent again. ``stream=False`` makes each
        image its own ``Classify`` call, with ``timeout`` per call and gRPC's
        retry policy. A failed image raises its error, or with
        ``return_exceptions=True`` the error is yielded in its place and the
        rest go on.
        """
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1; got {concurrency}")
        requests = requests_of(
            images, model=model or self.model, version=version, top_k=top_k, resize=self.resize
        )
        run = self._stream_many if stream else self._unary_many
        for result in run(requests, concurrency, timeout):
            if isinstance(result, Exception) and not return_exceptions:
                raise result
            yield result

    def health(self, service: str = "", *, timeout: float | None = None) -> HealthStatus:
        """``grpc.health.v1`` status of the server ("") or of one service or model."""
        call = self._call(timeout) | {"wait_for_ready": False}
        try:
            response = self._health.Check(health_pb2.HealthCheckRequest(service=service), **call)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return health_status(response)

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        response = self._unary(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return [model_info(model) for model in response.models]

    def get_model(
        self, name: str, version: str = "", *, timeout: float | None = None
    ) -> ModelInfo:
        request = pb.GetModelRequest(name=name, version=version)
        return model_info(self._unary(self._stub.GetModel, request, timeout))

    def _call(self, timeout: float | None) -> dict[str, Any]:
        return {
            "timeout": self.timeout if timeout is None else timeout,
            "metadata": self.options.call_metadata(),
            "wait_for_ready": self.options.wait_for_ready,
        }

    def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        patience = Patience.for_call(self.options, self.timeout if timeout is None else timeout)
        while True:
            try:
                call = self._call(timeout) | {"timeout": patience.remaining()}
                return method(request, **call)
            except grpc.RpcError as error:
                failure = from_rpc_error(error)
                if (delay := patience.delay(failure)) is None:
                    raise failure from None
                time.sleep(delay)

    def _unary_many(
        self, requests: Iterable[pb.ClassifyRequest | Failed], concurrency: int,
        timeout: float | None,
    ) -> Iterator[Classification | Exception]:
        window: deque[_Sent | Failed] = deque()

        def settle(item: _Sent | Failed) -> Classification | Exception:
            if isinstance(item, Failed):
                return item.error
            request, future = item
            try:
                return classifications(future.result())[0]
            except grpc.RpcError as error:
                failure = from_rpc_error(error)
            if not (self.options.wait_for_ready and is_retryable(failure)):
                return failure
            try:  # go on waiting for the server, up to the deadline
                return classifications(self._unary(self._stub.Classify, request, timeout))[0]
            except ResnetServeError as error:
                return error

        try:
            for request in requests:
                if isinstance(request, Failed):
                    window.append(request)
                else:
                    future = self._stub.Classify.future(request, **self._call(timeout))
                    window.append((request, future))
                if len(window) >= concurrency:
                    yield settle(window.popleft())
            while window:
                yield settle(window.popleft())
        finally:
            for item in window:
                if not isinstance(item, Failed):
                    item[1].cancel()

    def _stream_many(
        self, requests: Iterable[pb.ClassifyRequest | Failed], concurrency: int,
        timeout: float | None,
    ) -> Iterator[Classification | Exception]:
        # window: requests sent and not yet answered (and client-side errors), in input order.
        window: deque[pb.ClassifyRequest | Failed] = deque()
        source = iter(requests)
        stream = _Stream(self._stub, self._call(timeout) | {"timeout": timeout})
        patience = self._stream_patience(timeout)
        try:
            while True:
                while len(window) < concurrency and (request := next(source, None)) is not None:
                    window.append(request)
                    if not isinstance(request, Failed):
                        stream.send(request)
                if not window:
                    stream.finish()
                    return
                if isinstance(window[0], Failed):
                    yield window.popleft().error  # type: ignore[union-attr]
                    continue
                try:
                    response = stream.receive()
                except ResnetServeError as error:
                    if (delay := patience.delay(error)) is not None:
                        time.sleep(delay)
                    else:
                        window.popleft()
                        patience = self._stream_patience(timeout)
                        yield error
                    stream = stream.reopen([r for r in window if not isinstance(r, Failed)])
                    continue
                if patience.attempts:
                    patience = self._stream_patience(timeout)
                window.popleft()
                yield stream_result(response)
        finally:
            stream.close()


    def _stream_patience(self, timeout: float | None) -> Patience:
        return Patience.for_stream(self.options, self.timeout if timeout is None else timeout)


class _Stream:
    """One ``ClassifyStream`` call fed from a queue by the caller's thread."""

    _END = object()

    def __init__(self, stub: pb_grpc.ClassifierStub, call: dict[str, Any]) -> None:
        self._stub, self._call_kwargs = stub, call
        self._feed: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._responses = stub.ClassifyStream(iter(self._feed.get, self._END), **call)

    def send(self, request: pb.ClassifyRequest) -> None:
        self._feed.put(request)

    def receive(self) -> pb.ClassifyStreamResponse:
        try:
            return next(self._responses)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        except StopIteration:
            raise ResnetServeError(
                grpc.StatusCode.INTERNAL, "the server ended the stream before answering"
            ) from None

    def reopen(self, unanswered: list[pb.ClassifyRequest]) -> _Stream:
        self.close()
        stream = _Stream(self._stub, self._call_kwargs)
        for request in unanswered:
            stream.send(request)
        return stream

    def finish(self) -> None:
        """Half-close and let the server end the call cleanly."""
        self._feed.put(self._END)
        for _ in self._responses:
            pass

    def close(self) -> None:
        self._feed.put(self._END)
        self._responses.cancel()
