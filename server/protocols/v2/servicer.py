"""``inference.GRPCInferenceService``: the Open Inference Protocol v2 on the server's port.

Thin: requests are decoded by `server.protocols.v2.request` into the neutral request, described by
`server.protocols.v2.describe`, counted by `server.protocols.v2.stats`. Inference
goes through `server.request_path`, as ``Classify`` does (shared batches, one
count of every request, the domain errors of `server.errors`, which the server's
handler wrapper maps to status codes). ModelStreamInfer runs a stream's requests
concurrently (so they batch together) and answers in request order
(`server.protocols.calls`); a failed request is answered with ``error_message``
and the stream goes on. RepositoryModelLoad and RepositoryModelUnload go to
`server.core.manager`, which offers them as ``--model-control-mode`` says (UNIMPLEMENTED,
naming the switch, when it is none; unload only when it is explicit). The system
shared-memory RPCs go to the server's one table (`server.shared_memory`; with front ends,
the engine's). Triton RPCs this server does not implement (CUDA shared memory, trace)
answer UNIMPLEMENTED and say why. ModelInfer and ModelStreamInfer receive their messages
as the v2 codec's `parse` reads them (`Received`: a large message's raw contents are not
copied out of the received bytes).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from resnet_serve_client.proto.inference import grpc_service_pb2 as pb
from resnet_serve_client.proto.inference import grpc_service_pb2_grpc as pb_grpc

from server import tracing
from server.context import ServingContext
from server.errors import ServeError
from server.handlers import behavior, replace_behavior
from server.logs import log_settings, update_log_settings
from server.protocols.calls import answer_in_order, deadline_of
from server.protocols.shared import UNLOAD_PARAMETERS, check_control
from server.protocols.v2 import describe, stats
from server.protocols.v2.request import Received, fill_response, infer_request, parse
from server.request_path import Result
from server.shared_memory import CUDA_UNSUPPORTED

Context = grpc.aio.ServicerContext

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name

# Requests of one stream being worked on at once; the stream is read no further ahead.
STREAM_WINDOW = 64

_UNSUPPORTED = {
    "CudaSharedMemoryStatus": "the CUDA-shared-memory extension",
    "CudaSharedMemoryRegister": "the CUDA-shared-memory extension",
    "CudaSharedMemoryUnregister": "the CUDA-shared-memory extension",
    "TraceSetting": "the trace extension",
}


def _unsupported(rpc: str, extension: str) -> Callable[..., Awaitable[None]]:
    async def handler(self: V2Servicer, request: object, context: Context) -> None:
        if rpc.startswith("Cuda"):
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{rpc}: {CUDA_UNSUPPORTED}")
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{rpc} ({extension}) is not supported by this server; its extensions are "
            f"{', '.join(describe.extensions(*_offered(self._ctx)))} "
            "(see ServerMetadata)",
        )

    handler.__name__ = rpc
    return handler


def _offered(ctx: ServingContext) -> tuple[str, bool]:
    """What `describe.extensions` takes: the model control mode, whether shared memory is on."""
    return ctx.settings.model_control_mode, ctx.settings.shared_memory_regions > 0


# the RPCs whose requests `parse` reads
_PARSED = ("ModelInfer", "ModelStreamInfer")


def add_to_server(server: grpc.aio.Server, ctx: ServingContext) -> str:
    generated = _Registered()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(V2Servicer(ctx), generated)
    handlers = {
        name: replace_behavior(handler, behavior(handler), parse) if name in _PARSED else handler
        for name, handler in generated.handlers.items()
    }
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
    return SERVICE_NAME


class _Registered:
    """Keeps the method handlers generated code registers (it gives them twice: as a
    generic handler, and by method)."""

    handlers: dict[str, grpc.RpcMethodHandler]

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.handlers = handlers


class V2Servicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, ctx: ServingContext) -> None:
        self._ctx = ctx
        self._registry = ctx.registry
        self._path = ctx.path

    # health and metadata

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Context
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self._ctx.health.live())

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Context
    ) -> pb.ServerReadyResponse:
        """Ready when models are loaded, one is READY, and the server is not draining."""
        return pb.ServerReadyResponse(ready=self._ctx.health.server_ready())

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Context
    ) -> pb.ModelReadyResponse:
        """Ready when the version is READY and the server is not draining."""
        try:
            self._ctx.health.model_ready(request.name, request.version)
        except ServeError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        return describe.server_metadata(*_offered(self._ctx))

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        served = self._registry.get(request.name, request.version)
        return describe.model_metadata(self._registry.model(served.name), served)

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: Context
    ) -> pb.ModelConfigResponse:
        served = self._registry.get(request.name, request.version)
        return describe.config_response(served, self._ctx.settings.cuda_device_id)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Context
    ) -> pb.ModelStatisticsResponse:
        versions = stats.selected(self._registry, request.name, request.version)
        metrics = self._ctx.metrics
        return stats.model_statistics(metrics, await metrics.every_process(), versions)

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:
        """Every version of every model known to the server, its state and why."""
        return describe.repository_index(self._registry, ready_only=request.ready)

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        """Load the model (again) from the repository by its version policy; the answer comes
        once its versions are READY, or says which could not be loaded and why."""
        _check_control_request(request, known=())
        await self._ctx.manager.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        """Unload every version of the model; the answer comes once they have finished the
        requests they took and closed."""
        # Triton's flag for ensembles; this server has none, so there are no dependents
        _check_control_request(request, known=UNLOAD_PARAMETERS)
        await self._ctx.manager.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    async def LogSettings(
        self, request: pb.LogSettingsRequest, context: Context
    ) -> pb.LogSettingsResponse:
        """Triton's logging extension: the settings, after applying those the request sets."""
        changes = {key: getattr(value, value.WhichOneof("parameter_choice") or "string_param")
                   for key, value in request.settings.items()}  # fmt: skip
        settings = update_log_settings(changes) if changes else log_settings()
        response = pb.LogSettingsResponse()
        for key, value in settings.items():
            kind = {bool: "bool_param", int: "uint32_param"}.get(type(value), "string_param")
            setattr(response.settings[key], kind, value)
        return response

    # system shared memory

    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Context
    ) -> pb.SystemSharedMemoryRegisterResponse:
        await self._ctx.shared_memory.register(
            request.name, request.key, request.offset, request.byte_size
        )
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Context
    ) -> pb.SystemSharedMemoryStatusResponse:
        response = pb.SystemSharedMemoryStatusResponse()
        for region in self._ctx.shared_memory.status(request.name):
            response.regions[region.name].CopyFrom(
                pb.SystemSharedMemoryStatusResponse.RegionStatus(
                    name=region.name, key=region.key, offset=region.offset,
                    byte_size=region.byte_size,
                )
            )  # fmt: skip
        return response

    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Context
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        await self._ctx.shared_memory.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    # inference

    async def ModelInfer(self, request: Received, context: Context) -> pb.ModelInferResponse:
        return await self._infer(request, deadline_of(context))

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[Received], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        deadline = deadline_of(context)

        async def answer(received: Received, _: int) -> pb.ModelStreamInferResponse:
            return pb.ModelStreamInferResponse(
                infer_response=await self._infer(received, deadline)
            )

        def failed(
            received: Received, _: int, code: grpc.StatusCode, error: str
        ) -> pb.ModelStreamInferResponse:
            message = received.message
            return pb.ModelStreamInferResponse(
                error_message=error,
                infer_response=pb.ModelInferResponse(
                    model_name=message.model_name,
                    model_version=message.model_version,
                    id=message.id,
                ),
            )

        async for response in answer_in_order(
            request_iterator, answer, failed, self._ctx.draining, STREAM_WINDOW, "ModelStreamInfer"
        ):
            yield response

    async def _infer(self, received: Received, deadline: float | None) -> pb.ModelInferResponse:
        result = await self._path.infer(infer_request(received, deadline))
        with tracing.step(tracing.ENCODE):
            return self._response(received.message, result)

    def _response(self, message: pb.ModelInferRequest, result: Result) -> pb.ModelInferResponse:
        served = result.served
        response = pb.ModelInferResponse(
            model_name=served.name, model_version=served.version, id=message.id
        )
        fill_response(response, result.checked.outputs, result.logits, served.labels,
                      self._ctx.shared_memory)  # fmt: skip
        return response


for _rpc, _extension in _UNSUPPORTED.items():
    setattr(V2Servicer, _rpc, _unsupported(_rpc, _extension))


def _check_control_request(
    request: pb.RepositoryModelLoadRequest | pb.RepositoryModelUnloadRequest,
    known: tuple[str, ...],
) -> None:
    check_control(request.model_name, request.repository_name, request.parameters, known)
