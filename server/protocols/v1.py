"""resnet_serve.v1.Classifier: images in, top-k classes out.

Thin: a ``ClassifyRequest`` is turned into a `server.request_path.Request`
(its images read here: encoded files as they are, tensors checked against the
model), the request path does the rest, and the logits come back as top-k
classes. Errors leave as `server.errors` exceptions for `server.interceptors`
to map (for ClassifyStream, per message by `server.protocols.calls`).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator

import grpc
import numpy as np
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2 as pb
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2_grpc as pb_grpc

from server.context import ServingContext
from server.errors import InvalidInput
from server.models import Model, ModelVersion, State
from server.postprocess import top_k
from server.protocols.calls import answer_in_order, deadline_of
from server.request_path import Image, Inputs, Request, Result

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Classifier"].full_name
DEFAULT_TOP_K = 5
# Requests of one ClassifyStream being worked on at once (answers stay in order).
STREAM_WINDOW = 32

_STATES = {
    State.LOADING: pb.VersionInfo.LOADING,
    State.READY: pb.VersionInfo.READY,
    State.UNLOADING: pb.VersionInfo.UNAVAILABLE,  # takes no new requests; the reason says why
    State.UNAVAILABLE: pb.VersionInfo.UNAVAILABLE,
}


def check_top_k(k: int, model: ModelVersion) -> int:
    classes = model.config.num_classes
    if not 1 <= k <= classes:
        raise InvalidInput(f"top_k is {k}; allowed: 1 to {classes} (model {model.name})")
    return k


def classify_response(result: Result[int]) -> pb.ClassifyResponse:
    """The top ``result.parsed`` classes of each image, best first, with their labels."""
    indices, scores = top_k(result.logits, result.parsed)
    labels = result.served.labels
    response = pb.ClassifyResponse(
        model=result.served.name, version=result.served.version, request_id=result.request_id
    )
    for row_i, row_s in zip(indices.tolist(), scores.tolist(), strict=True):
        classes = response.results.add().classes  # filled in place: no message per class
        for i, s in zip(row_i, row_s, strict=True):
            classes.add(index=i, label=labels[i], score=s)
    return response


def add_to_server(server: grpc.aio.Server, ctx: ServingContext) -> str:
    pb_grpc.add_ClassifierServicer_to_server(ClassifierServicer(ctx), server)
    return SERVICE_NAME


class ClassifierServicer(pb_grpc.ClassifierServicer):
    def __init__(self, ctx: ServingContext) -> None:
        self._ctx = ctx
        self._path = ctx.path

    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        return await self._classify(request, deadline_of(context))

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[pb.ClassifyRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ClassifyStreamResponse]:
        deadline = deadline_of(context)

        async def answer(request: pb.ClassifyRequest, sequence: int) -> pb.ClassifyStreamResponse:
            response = await self._classify(request, deadline)
            return pb.ClassifyStreamResponse(sequence=sequence, response=response)

        def failed(
            request: pb.ClassifyRequest, sequence: int, code: grpc.StatusCode, message: str
        ) -> pb.ClassifyStreamResponse:
            error = pb.Error(code=code.value[0], message=message)
            return pb.ClassifyStreamResponse(sequence=sequence, error=error)

        async for response in answer_in_order(
            request_iterator, answer, failed, self._ctx.draining, STREAM_WINDOW, "ClassifyStream"
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
        if not request.model:
            raise InvalidInput("model is empty; ListModels shows the models")
        result = await self._path.infer(
            Request(
                model=request.model,
                version=request.version,
                request_id=request.request_id,
                deadline=deadline,
                images=len(request.images),
                read=functools.partial(self._read, request),
            )
        )
        return classify_response(result)

    def _read(self, request: pb.ClassifyRequest, model: ModelVersion) -> tuple[Inputs, int]:
        """The request's images and its top_k, checked against the model."""
        k = check_top_k(request.top_k if request.HasField("top_k") else DEFAULT_TOP_K, model)
        return Inputs(images=[self._image(image, model) for image in request.images]), k

    def _image(self, image: pb.Image, model: ModelVersion) -> Image:
        if image.WhichOneof("data") == "encoded":
            return image.encoded
        return functools.partial(self._tensor, image, model)

    async def _tensor(self, image: pb.Image, model: ModelVersion) -> np.ndarray:
        if not image.HasField("tensor"):
            raise InvalidInput("has no data; set encoded (image bytes) or tensor")
        tensor = image.tensor
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
            pb.VersionInfo(
                version=v.version,
                state=_STATES[v.state],
                reason=v.reason,
                providers=v.providers if v.state is State.READY else (),
                weights=v.weights,
            )
            for v in versions
        ],
    )
