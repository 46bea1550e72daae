"""The floor: the same stack with nothing of ours on it.

A bare ``grpc.aio`` server with the v2 protocol's generated servicer, as the server has,
and no model, batcher, interceptor, metrics or request path: ``ModelInfer`` answers a
response built once at start. What a client measures against it is what grpc.aio,
protobuf and one Python process cost per request on this machine; the server's figures
beside it show how much on top of that is ours (``python -m bench frontend``).

It answers what perf_analyzer and the SDK's load generator ask of a v2 server, for every
model of ``--repo`` (its config.json): ServerLive, ServerReady, ModelReady,
ServerMetadata, ModelMetadata, ModelConfig, ModelStatistics (the requests answered: an
integer added per call), ModelInfer, and grpc.health.v1 (SERVING) so
that `bench.serving.start` waits for it as for the server. ModelInfer's answer is the
model's logits ``FP32 [1, classes]`` (zeros) or, when the request asks for the
classification extension, one ``BYTES [1, 1]`` class, as the server would answer a
one-image request.

Run as ``python -m bench.floor --repo REPO --host H --port P`` (``--metrics-host`` and
``--metrics-port`` are accepted, so the one harness starts it like the server, and
ignored: the floor has no metrics). ``--processes N`` runs N such processes sharing the
port (``SO_REUSEPORT``; the kernel spreads connections over them): what more front-end
processes give on a machine, at the floor of the stack (docs/architecture.md, "Front
end: one process or several").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from resnet_serve_client.proto.inference import grpc_service_pb2 as pb
from resnet_serve_client.proto.inference import grpc_service_pb2_grpc as pb_grpc
from resnet_serve_client.proto.inference import model_config_pb2 as mc

from server.repository import ModelConfig

COMMAND = [sys.executable, "-m", "bench.floor"]
_TYPES = {"uint8": ("UINT8", mc.TYPE_UINT8), "float32": ("FP32", mc.TYPE_FP32)}


class Floor(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, configs: dict[str, ModelConfig]) -> None:
        self._metadata = {name: _metadata(c) for name, c in configs.items()}
        self._config = {name: _config(c) for name, c in configs.items()}
        self._logits = {name: _logits(c) for name, c in configs.items()}
        self._top1 = {name: _top1(c) for name, c in configs.items()}
        self._answered = dict.fromkeys(configs, 0)

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=request.name in self._metadata)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="floor", version="0", extensions=["classification"])

    async def ModelMetadata(self, request, context):
        return self._metadata[request.name]

    async def ModelConfig(self, request, context):
        return self._config[request.name]

    async def ModelStatistics(self, request, context):
        """Requests answered per model, as the server counts successes (for the bench)."""
        return pb.ModelStatisticsResponse(
            model_stats=[
                pb.ModelStatistics(
                    name=name,
                    version="1",
                    inference_stats=pb.InferStatistics(success=pb.StatisticDuration(count=count)),
                )
                for name, count in self._answered.items()
                if name == request.name or not request.name
            ]
        )

    async def ModelInfer(self, request, context):
        name = request.model_name
        self._answered[name] += 1
        return (self._top1 if request.outputs else self._logits)[name]


def _metadata(config: ModelConfig) -> pb.ModelMetadataResponse:
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=config.name,
        versions=["1"],
        platform=config.platform,
        inputs=[
            tensor(
                name=config.input.name,
                datatype=_TYPES[config.input.dtype][0],
                shape=config.input.shape(),
            )
        ],
        outputs=[tensor(name=config.output.name, datatype="FP32", shape=[-1, config.num_classes])],
    )


def _config(config: ModelConfig) -> pb.ModelConfigResponse:
    return pb.ModelConfigResponse(
        config=mc.ModelConfig(
            name=config.name,
            platform=config.platform,
            max_batch_size=config.batching.max_batch_size,
            input=[
                mc.ModelInput(
                    name=config.input.name,
                    data_type=_TYPES[config.input.dtype][1],
                    dims=config.input.shape()[1:],
                )
            ],
            output=[
                mc.ModelOutput(
                    name=config.output.name, data_type=mc.TYPE_FP32, dims=[config.num_classes]
                )
            ],
        )
    )


def _logits(config: ModelConfig) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=config.name, model_version="1")
    response.outputs.add(name=config.output.name, datatype="FP32", shape=[1, config.num_classes])
    response.raw_output_contents.append(bytes(4 * config.num_classes))
    return response


def _top1(config: ModelConfig) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=config.name, model_version="1")
    response.outputs.add(name=config.output.name, datatype="BYTES", shape=[1, 1])
    text = b"0.000000:0:class 0"
    response.raw_output_contents.append(len(text).to_bytes(4, "little") + text)
    return response


async def serve(repo: Path, address: str, reuse_port: bool = False) -> None:
    configs = {
        p.name: ModelConfig.load(p) for p in sorted(repo.iterdir()) if (p / "config.json").is_file()
    }
    server = grpc.aio.server(options=[("grpc.so_reuseport", int(reuse_port))])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Floor(configs), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(address)
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    print(f"floor listening on {address}: {', '.join(configs)}", flush=True)
    stop = asyncio.Event()  # SIGTERM: stop serving, then (in main) the other processes
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--repo", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--metrics-host", help="ignored: the floor has no metrics")
    parser.add_argument("--metrics-port", help="ignored: the floor has no metrics")
    parser.add_argument("--http-port", help="ignored: the floor has no HTTP port")
    parser.add_argument("--processes", type=int, default=1,
                        help="processes sharing the port with SO_REUSEPORT (default 1)")
    parser.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    address = f"{args.host}:{args.port}"
    others = [
        subprocess.Popen([*COMMAND, "--repo", str(args.repo), "--host", args.host,
                          "--port", str(args.port), "--reuse-port"])
        for _ in range(args.processes - 1)
    ]  # fmt: skip
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(args.repo, address, args.reuse_port or bool(others)))
    finally:
        for other in others:
            other.terminate()
        for other in others:
            other.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
