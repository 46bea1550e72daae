"""resnet_serve.v1.Classifier: images in, top-k classes out.

Thin: requests are checked and turned into model inputs here, the model
registry and batcher do the rest, and errors leave as `server.errors`
exceptions for `server.interceptors` to map.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import numpy as np
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2 as pb
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2_grpc as pb_grpc

from server.context import ServingContext
from server.errors import InvalidInput, to_status
from server.logs import REQUEST_ID
from server.models import Model, ModelVersion, State
from server.postprocess import top_k
from server.streams import answer_in_order

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Classifier"].full_name
DEFAULT_TOP_K = 5
# Requests of one ClassifyStream being worked on at once (answers stay in order).
STREAM_WINDOW = 32

_STATES = {
    State.LOADING: pb.VersionInfo.LOADING,
    State.READY: pb.VersionInfo.READY,
    State.UNAVAILABLE: pb.VersionInfo.UNAVAILABLE,
}


def add_to_server(server: grpc.aio.Server, ctx: ServingContext) -> str:
    pb_grpc.add_ClassifierServicer_to_server(ClassifierServicer(ctx), server)
    return SERVICE_NAME


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's deadline as a `time.monotonic()` value, if it set one."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class ClassifierServicer(pb_grpc.ClassifierServicer):
    def __init__(self, ctx: ServingContext) -> None:
        self._ctx = ctx

    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        return await self._classify(request, deadline_of(context))

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[pb.ClassifyRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ClassifyStreamResponse]:
        deadline = deadline_of(context)

        async def answer(request: pb.ClassifyRequest, sequence: int) -> pb.ClassifyStreamResponse:
            try:
                response = await self._classify(request, deadline)
            except Exception as exc:
                code, message = to_status(exc)
                if code is grpc.StatusCode.INTERNAL:
                    log.error("ClassifyStream request %d failed", sequence, exc_info=exc)
                error = pb.Error(code=code.value[0], message=message)
                return pb.ClassifyStreamResponse(sequence=sequence, error=error)
            return pb.ClassifyStreamResponse(sequence=sequence, response=response)

        async for response in answer_in_order(
            request_iterator, answer, self._ctx.draining, STREAM_WINDOW
        ):
            yield response

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[_model_info(m, list(m.versions.values())) for m in self._ctx.registry.models()]
        )

    async def GetModel(
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        if not request.name:
            raise InvalidInput("name is empty; ListModels shows the models")
        model = self._ctx.registry.model(request.name)
        if request.version:
            chosen = [model.version(request.version)]
        else:
            latest = model.latest_ready()
            chosen = [latest] if latest is not None else list(model.versions.values())
        return _model_info(model, chosen)

    async def _classify(
        self, request: pb.ClassifyRequest, deadline: float | None
    ) -> pb.ClassifyResponse:
        request_id = request.request_id or uuid.uuid4().hex
        REQUEST_ID.set(request_id)
        if not request.model:
            raise InvalidInput("model is empty; ListModels shows the models")
        model = self._ctx.registry.get(request.model, request.version)
        count = len(request.images)
        with self._ctx.metrics.track_request(model.name, model.version, count, deadline):
            k = self._check(request, model)
            started = time.perf_counter()
            inputs = await asyncio.gather(
                *(self._prepare(i, image, model) for i, image in enumerate(request.images))
            )
            self._ctx.metrics.preprocess_duration.labels(model.name, model.version).observe(
                time.perf_counter() - started
            )
            logits = await model.infer(np.stack(inputs), deadline=deadline, request_id=request_id)
        indices, scores = top_k(logits, k)
        labels = model.labels
        return pb.ClassifyResponse(
            model=model.name,
            version=model.version,
            request_id=request_id,
            results=[
                pb.Classification(
                    classes=[
                        pb.ClassScore(index=int(i), label=labels[i], score=float(s))
                        for i, s in zip(row_i, row_s, strict=True)
                    ]
                )
                for row_i, row_s in zip(indices, scores, strict=True)
            ],
        )

    def _check(self, request: pb.ClassifyRequest, model: ModelVersion) -> int:
        """Request-level checks; returns top_k."""
        count = len(request.images)
        limit = self._ctx.settings.max_images_per_request
        if count == 0:
            raise InvalidInput(f"request has no images; send 1 to {limit}")
        if count > limit:
            raise InvalidInput(f"request has {count} images; at most {limit} are allowed")
        k = request.top_k if request.HasField("top_k") else DEFAULT_TOP_K
        classes = model.config.num_classes
        if not 1 <= k <= classes:
            raise InvalidInput(f"top_k is {k}; allowed: 1 to {classes} (model {model.name})")
        return k

    async def _prepare(self, index: int, image: pb.Image, model: ModelVersion) -> np.ndarray:
        try:
            kind = image.WhichOneof("data")
            if kind == "encoded":
                return await self._ctx.preprocessor.encoded(image.encoded, model.config)
            if kind == "tensor":
                return await self._tensor(image.tensor, model)
            raise InvalidInput("has no data; set encoded (image bytes) or tensor")
        except InvalidInput as exc:
            raise InvalidInput(f"image {index}: {exc}") from None

    async def _tensor(self, tensor: pb.Tensor, model: ModelVersion) -> np.ndarray:
        shape = list(tensor.shape)
        spec = model.config.input
        if tensor.dtype == pb.Tensor.UINT8:
            if len(shape) != 3 or shape[2] != 3 or min(shape) < 1:
                raise InvalidInput(f"uint8 tensor shape is {shape}; expected [height, width, 3]")
            pixels = shape[0] * shape[1]
            limit = self._ctx.settings.max_image_pixels
            if pixels > limit:
                raise InvalidInput(f"uint8 tensor has {pixels} pixels; at most {limit} allowed")
            array = _from_bytes(tensor.data, np.uint8, shape)
            return await self._ctx.preprocessor.pixels(array, model.config)
        if tensor.dtype == pb.Tensor.FLOAT32:
            if spec.dtype != "float32":
                raise InvalidInput(
                    f"model {model.name} takes uint8 pixels; send encoded images or uint8 tensors"
                )
            expected = [spec.channels, spec.size, spec.size]
            if shape != expected:
                raise InvalidInput(
                    f"float32 tensor shape is {shape}; model {model.name} takes {expected} (CHW)"
                )
            array = _from_bytes(tensor.data, np.dtype("<f4"), shape)
            if not np.isfinite(array).all():
                raise InvalidInput("float32 tensor holds NaN or Inf; only finite values allowed")
            return array.astype(np.float32, copy=False)
        raise InvalidInput("tensor dtype is unset; use UINT8 (HWC) or FLOAT32 (CHW)")


def _from_bytes(data: bytes, dtype: np.dtype | type, shape: list[int]) -> np.ndarray:
    dtype = np.dtype(dtype)
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise InvalidInput(
            f"tensor data has {len(data)} bytes; shape {shape} of {dtype.name} needs {expected}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _model_info(model: Model, versions: list[ModelVersion]) -> pb.ModelInfo:
    config = model.config
    return pb.ModelInfo(
        name=model.name,
        arch=config.arch,
        platform=config.platform,
        num_classes=config.num_classes,
        input=pb.InputSpec(
            name=config.input.name,
            dtype=config.input.dtype,
            layout=config.input.layout,
            shape=config.input.shape(),
        ),
        max_batch_size=config.batching.max_batch_size,
        versions=[
            pb.VersionInfo(version=v.version, state=_STATES[v.state], reason=v.reason)
            for v in versions
        ],
    )
