"""The floor: the same stack with nothing of ours on it.

A bare ``grpc.aio`` server with the v2 protocol's generated servicer, as the server has,
added as the server adds it (one generic handler per service:
`server.handlers.wrap_registrations`, here wrapping nothing), and no model, batcher,
interceptor, metrics or request path: ``ModelInfer`` answers a response built once at
start. What a client measures against it is what grpc.aio, protobuf and one Python
process cost per request on this machine; the server's figures beside it show how much
on top of that is ours (``python -m bench frontend``).

It answers what perf_analyzer and the SDK's load generator ask of a v2 server, for every
model of ``--repo`` (its config.json): ServerLive, ServerReady, ModelReady,
ServerMetadata, ModelMetadata, ModelConfig, ModelStatistics (the requests answered: an
integer added per call), ModelInfer, and grpc.health.v1 (SERVING) so
that `bench.serving.start` waits for it as for the server. ModelInfer's answer is the
model's logits ``FP32 [1, classes]`` (zeros) or, when the request asks for the
classification extension, one ``BYTES [1, 1]`` class, as the server would answer a
one-image request.

With ``--split`` ModelInfer goes through the split's transport and nothing else of ours:
the first input's bytes are written into a slot of a shared-memory segment (`server.shm`)
and a frame goes over the engine channel (`server.ipc`) to a second process, the echo
engine (named ``floor-engine``), which writes the logits' bytes into the slot in place and
answers; the floor reads them back and answers its fixed response. What a front end and
an engine cost at the least, for the same call: the front-end sweep runs it beside the
floor (`bench.frontends`). With ``--processes N`` each process has an echo engine of its own.

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
import itertools
import mmap
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from resnet_serve_client.proto.inference import grpc_service_pb2 as pb
from resnet_serve_client.proto.inference import grpc_service_pb2_grpc as pb_grpc
from resnet_serve_client.proto.inference import model_config_pb2 as mc

from server import ipc, shm, threads
from server.config import Settings
from server.frontend import FLUSH_HOLD
from server.handlers import wrap_registrations
from server.repository import ModelConfig

COMMAND = [sys.executable, "-m", "bench.floor"]
_TYPES = {"uint8": ("UINT8", mc.TYPE_UINT8), "float32": ("FP32", mc.TYPE_FP32)}


SEGMENT_BYTES = Settings().frontend_shm_bytes  # as a front end's segment by default
# the split floor's processes, as ps shows them (the sweep counts them as a front end and
# an engine)
SPLIT_FRONTEND = "floor-frontend"
ECHO_ENGINE = "floor-engine"


class Floor(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, configs: dict[str, ModelConfig], link: EchoLink | None = None) -> None:
        self._link = link
        self._metadata = {name: _metadata(c) for name, c in configs.items()}
        self._config = {name: _config(c) for name, c in configs.items()}
        self._logits = {name: _logits(c) for name, c in configs.items()}
        self._top1 = {name: _top1(c) for name, c in configs.items()}
        self._answered = dict.fromkeys(configs, 0)
        self._logits_bytes = {name: 4 * c.num_classes for name, c in configs.items()}

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
        if self._link is not None:
            await self._link.round_trip(request.raw_input_contents[0], self._logits_bytes[name])
        self._answered[name] += 1
        return (self._top1 if request.outputs else self._logits)[name]


class EchoLink:
    """The floor's side of the split's transport: a slot, a frame out, a frame back."""

    def __init__(self) -> None:
        self.buffer: mmap.mmap | None = None
        self.slots = shm.Slots(SEGMENT_BYTES)
        self.channel: ipc.Channel | None = None
        self.segment = shm.segment_name(os.getpid())
        self.process: subprocess.Popen[bytes] | None = None
        self._keys = itertools.count()
        # key -> (future, slot offset, output bytes, slot size)
        self._pending: dict[int, tuple[asyncio.Future[bytes], int, int, int]] = {}
        self._attached: asyncio.Future[None] | None = None

    async def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with theirs:
            self.process = subprocess.Popen(
                [*COMMAND, "--echo-engine", str(theirs.fileno())], pass_fds=(theirs.fileno(),)
            )
        self.buffer = shm.create(self.segment, SEGMENT_BYTES)
        self._attached = asyncio.get_running_loop().create_future()
        self.channel = await ipc.Channel.open(ours, self.on_messages, lambda: None, FLUSH_HOLD)
        self.channel.send(("hello", self.segment, SEGMENT_BYTES))
        await self._attached  # the echo engine runs, named, with the segment mapped

    async def round_trip(self, data: bytes, out_bytes: int) -> bytes:
        """`data` through the echo engine: the `out_bytes` it wrote back into the slot."""
        assert self.buffer is not None and self.channel is not None
        offset, size = self.slots.take(max(len(data), out_bytes))
        self.buffer[offset : offset + len(data)] = data
        key = next(self._keys)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[key] = (future, offset, out_bytes, size)
        self.channel.send(("infer", key, offset, len(data), out_bytes))
        return await future

    def on_messages(self, messages: list[tuple[Any, ...]]) -> None:
        assert self.buffer is not None
        for message in messages:
            if message[0] == "attached":
                assert self._attached is not None
                self._attached.set_result(None)
                continue
            future, offset, out_bytes, size = self._pending.pop(message[1])
            future.set_result(self.buffer[offset : offset + out_bytes])
            self.slots.give(offset, size)

    def stop(self) -> None:
        shm.unlink(self.segment)
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)


async def echo_engine(fd: int) -> None:
    """The echo engine: each slot's input read in place, the logits' bytes written into it,
    the answers of one wake-up in one frame; ends with its channel."""
    buffer: mmap.mmap | None = None
    closed = asyncio.Event()

    def on_messages(messages: list[tuple[Any, ...]]) -> None:
        nonlocal buffer
        for message in messages:
            if message[0] == "hello":
                buffer = shm.attach(message[1], message[2])
                channel.send(("attached",))
                continue
            _, key, offset, nbytes, out_bytes = message
            assert buffer is not None
            shm.view(buffer, offset, "|u1", (nbytes,))  # the input, in place
            buffer[offset : offset + out_bytes] = bytes(out_bytes)  # the logits (zeros)
            channel.send(("done", key))

    channel = await ipc.Channel.open(socket.socket(fileno=fd), on_messages, closed.set)
    await closed.wait()


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


async def serve(repo: Path, address: str, reuse_port: bool = False, split: bool = False) -> None:
    configs = {
        p.name: ModelConfig.load(p) for p in sorted(repo.iterdir()) if (p / "config.json").is_file()
    }
    link = EchoLink() if split else None
    if link is not None:
        await link.start()
    try:
        await _serve(configs, address, reuse_port, link)
    finally:
        if link is not None:
            link.stop()


async def _serve(
    configs: dict[str, ModelConfig], address: str, reuse_port: bool, link: EchoLink | None
) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", int(reuse_port))])
    wrap_registrations(server, lambda handler, _method: handler)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Floor(configs, link), server)
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
    parser.add_argument("--repo", type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int)
    parser.add_argument("--metrics-host", help="ignored: the floor has no metrics")
    parser.add_argument("--metrics-port", help="ignored: the floor has no metrics")
    parser.add_argument("--http-port", help="ignored: the floor has no HTTP port")
    parser.add_argument("--processes", type=int, default=1,
                        help="processes sharing the port with SO_REUSEPORT (default 1)")
    parser.add_argument("--split", action="store_true",
                        help="ModelInfer through a shared-memory slot and an echo engine process")
    parser.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--echo-engine", type=int, help=argparse.SUPPRESS)  # its channel's fd
    args = parser.parse_args(argv)
    if args.echo_engine is not None:
        threads.name_process(ECHO_ENGINE)
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(echo_engine(args.echo_engine))
        return 0
    if args.repo is None or args.port is None:
        parser.error("--repo and --port are required")
    address = f"{args.host}:{args.port}"
    split = ["--split"] if args.split else []
    if args.split:
        threads.name_process(SPLIT_FRONTEND)
    others = [
        subprocess.Popen([*COMMAND, "--repo", str(args.repo), "--host", args.host,
                          "--port", str(args.port), "--reuse-port", *split])
        for _ in range(args.processes - 1)
    ]  # fmt: skip
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(args.repo, address, args.reuse_port or bool(others), args.split))
    finally:
        for other in others:
            other.terminate()
        for other in others:
            other.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
