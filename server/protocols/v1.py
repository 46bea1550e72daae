"""resnet_serve.v1.Classifier: images in, top-k classes out.

Thin: a ``ClassifyRequest`` is decoded into the neutral `server.request.InferRequest`
(encoded files as they are, tensors as `Pixels`), the request path does the rest
(`server.validation` checks it against the model), and the logits come back as top-k
classes. Errors leave as `server.errors` exceptions for `server.interceptors`
to map (for ClassifyStream, per message by `server.protocols.calls`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2 as pb
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2_grpc as pb_grpc

from server import tracing
from server.context import ServingContext
from server.core.registry import Model, ModelVersion, State
from server.errors import InvalidInput
from server.protocols.calls import answer_in_order, deadline_of
from server.protocols.shared import classify_response
from server.request import Image, InferRequest, Invalid, Pixels
from server.validation import DEFAULT_TOP_K

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Classifier"].full_name
# Requests of one ClassifyStream being worked on at once (answers stay in order).
STREAM_WINDOW = 32

_STATES = {
    State.LOADING: pb.VersionInfo.LOADING,
    State.READY: pb.VersionInfo.READY,
    State.UNLOADING: pb.VersionInfo.UNAVAILABLE,  # takes no new requests; the reason says why
    State.UNAVAILABLE: pb.VersionInfo.UNAVAILABLE,
}


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
            InferRequest(
                model=request.model,
                version=request.version,
                id=request.request_id,
                deadline=deadline,
                images=tuple(_image(image) for image in request.images),
                top_k=request.top_k if request.HasField("top_k") else DEFAULT_TOP_K,
            )
        )
        with tracing.step(tracing.ENCODE):
            return classify_response(result)


_DTYPES = {pb.Tensor.UINT8: "uint8", pb.Tensor.FLOAT32: "float32"}


def _image(image: pb.Image) -> Image:
    """An image of the message as the neutral request holds it (checked by validation)."""
    if image.WhichOneof("data") == "encoded":
        return image.encoded
    if not image.HasField("tensor"):
        return Invalid("has no data; set encoded (image bytes) or tensor")
    tensor = image.tensor
    return Pixels(_DTYPES.get(tensor.dtype, ""), tuple(tensor.shape), tensor.data)


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
