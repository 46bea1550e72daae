"""The server runs: the client SDK's load generator against each variant and concurrency.

Requests are built once by the SDK's `payloads` module and sent by its
closed-loop `run_level` (the same code as ``resnet-serve-client bench``), over
one channel without retries, so an overloaded server shows as errors. Each
level is warmed up, then measured; the server's batch-size histogram is read
from /metrics right before and after the measured window, and CPU time is
taken for the load generator (this process), the server process and the
whole machine (what is left is other processes: a disturbed run shows there).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import psutil
from resnet_serve_client import report
from resnet_serve_client.bench import Level, LevelResult, Stop, run_level
from resnet_serve_client.options.channel import ChannelOptions, aio_channel
from resnet_serve_client.payloads import classify_requests, make_inputs, v2_requests
from resnet_serve_client.proto.inference import grpc_service_pb2_grpc as v2_grpc
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2_grpc as pb_grpc

from bench import histograms, perf_analyzer
from bench.profile import Sampling
from bench.repository import Served
from bench.serving import Server

CALL_TIMEOUT = 120.0


@dataclass(frozen=True)
class Variant:
    key: str
    api: Literal["classify", "v2"]
    input: Literal["uint8", "jpeg"]
    batching: bool
    description: str
    client: Literal["sdk", "perf_analyzer"] = "sdk"
    # Only these concurrencies (None: every one of the plan).
    concurrencies: tuple[int, ...] | None = None

    def runs_at(self, concurrency: int) -> bool:
        return self.concurrencies is None or concurrency in self.concurrencies


VARIANTS = (
    Variant(
        "uint8",
        "classify",
        "uint8",
        True,
        "Classify, uint8 HWC tensor at the resize side (256×256: the SDK's client-side "
        "resize), server crops",
    ),
    Variant(
        "jpeg",
        "classify",
        "jpeg",
        True,
        "Classify, ~1 MP JPEG bytes: the server decodes, resizes and crops",
    ),
    Variant(
        "v2", "v2", "uint8", True, "v2 ModelInfer, UINT8 [1, 224, 224, 3]: the graph's own tensor"
    ),
    Variant(
        "nobatch", "classify", "uint8", False, "as uint8, dynamic batching off (max_batch_size 1)"
    ),
    Variant(
        "v2-pa",
        "v2",
        "uint8",
        True,
        "as v2, sent by perf_analyzer (Triton's C++ load generator) instead of the Python SDK; "
        "concurrency 1 and 16",
        client="perf_analyzer",
        concurrencies=(1, 16),
    ),
)
VARIANT_KEYS = tuple(v.key for v in VARIANTS)


def requests_for(variant: Variant, served: Served, photos: list[Path]) -> list[Any]:
    """One request per distinct image, one image per request, top-1."""
    name = served.name if variant.batching else served.nobatch
    config = served.config
    if variant.input == "jpeg":
        inputs = make_inputs("files", 0, photos)
    elif variant.api == "classify":
        inputs = make_inputs("uint8", config.preprocessing.resize, [])
    else:  # the graph's own tensor
        kind = "uint8" if config.input.dtype == "uint8" else "float"
        inputs = make_inputs(kind, config.input.size, [])
    if variant.api == "classify":
        return classify_requests(inputs, model=name, batch=1, top_k=1)
    return v2_requests(
        inputs,
        model=name,
        input_name=config.input.name,
        output_name=config.output.name,
        batch=1,
        top_k=1,
    )


def _busy_seconds() -> float:
    """CPU time the whole machine spent busy or stolen by the hypervisor (every core)."""
    times = psutil.cpu_times()._asdict()
    # guest time is already inside user time; idle and iowait are not busy
    return sum(v for k, v in times.items() if k not in ("idle", "iowait", "guest", "guest_nice"))


@dataclass
class Accumulated:
    """One level measured in one or more slices, summed (see `run_variant`)."""

    result: LevelResult
    server_cpu: float = 0.0
    machine_cpu: float = 0.0
    histograms: dict[str, histograms.Histogram] = field(default_factory=dict)
    slice_img_per_s: list[float] = field(default_factory=list)  # one per slice
    profile: dict[str, Any] | None = None

    def add(
        self,
        result: LevelResult,
        server_cpu: float,
        machine_cpu: float,
        differences: dict[str, histograms.Histogram],
    ) -> None:
        self.result.add(result)
        self.server_cpu += server_cpu
        self.machine_cpu += machine_cpu
        for name, histogram in differences.items():
            self.histograms[name] = (
                self.histograms[name] + histogram if name in self.histograms else histogram
            )
        self.slice_img_per_s.append(round(result.images_per_second, 2))


async def run_variant(
    server: Server,
    served: Served,
    variant: Variant,
    concurrency: int,
    requests: list[Any],
    *,
    warmup: float,
    seconds: float,
    into: Accumulated | None = None,
    profile_dir: Path | None = None,
) -> Accumulated:
    """Warm up, then measure one slice of a level, added to `into`.

    A level is measured in slices alternating with the other variants and raw
    ONNX Runtime (`bench.run`), so a machine that speeds up or slows down
    during the run moves every figure of a level alike. With `profile_dir`,
    py-spy samples the server during the slice (`bench.profile`) and the
    level gets its summary.
    """
    model = served.name if variant.batching else served.nobatch
    options = ChannelOptions(retry=None)
    async with aio_channel(server.address, options) as channel:
        method: Callable[..., Any]
        if variant.api == "classify":
            method = pb_grpc.ClassifierStub(channel).Classify
        else:
            method = v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer

        async def call(number: int) -> object:
            return await method(requests[number % len(requests)], timeout=CALL_TIMEOUT)

        level = Level(concurrency)
        await run_level(call, level, Stop(seconds=warmup), warmup=0, images_per_request=1)
        # scrapes outside the CPU window, so their cost is not counted
        before = histograms.read_all(server.metrics(), model)
        sampling = None
        if profile_dir is not None:
            name = f"{model}-{variant.key}-c{concurrency}"
            sampling = Sampling.start(server.process.pid, seconds, profile_dir, name)
        server_cpu, machine_cpu = server.cpu_seconds(), _busy_seconds()
        result: LevelResult
        if variant.client == "perf_analyzer":
            # Its start-up and metadata calls fall inside the CPU window: a little more
            # server and client CPU than the measured windows alone.
            work = server.log_path.parent / "perf_analyzer"
            first = requests[0]  # a v2 ModelInferRequest, one image
            inputs = {
                tensor.name: raw
                for tensor, raw in zip(first.inputs, first.raw_input_contents, strict=True)
            }
            result = await asyncio.to_thread(
                perf_analyzer.measure, server.address, model, concurrency, seconds, work, inputs
            )
        else:
            result = await run_level(
                call, level, Stop(seconds=seconds), warmup=0, images_per_request=1
            )
        server_cpu = server.cpu_seconds() - server_cpu
        machine_cpu = _busy_seconds() - machine_cpu
        after = histograms.read_all(server.metrics(), model)
    if into is None:
        into = Accumulated(LevelResult(concurrency, None, 1))
    into.add(result, server_cpu, machine_cpu, {k: after[k] - before[k] for k in after})
    if sampling is not None:
        into.profile = sampling.finish(result.seconds)
    return into


def level_row(served: Served, variant: Variant, level: Accumulated) -> dict[str, Any]:
    """The row of the results JSON for one level, over all its slices."""
    result = level.result
    batch = level.histograms[histograms.BATCH_SIZE]
    stages = {
        stage: round(1000 * level.histograms[name].mean, 2)
        for stage, name in histograms.STAGES.items()
    }
    profile = {} if level.profile is None else {"profile": level.profile}
    return {
        "model": served.name,
        "variant": variant.key,
        "api": variant.api,
        "input": variant.input,
        "batching": variant.batching,
        **report.row(result),
        "slices": len(level.slice_img_per_s),
        "slice_img_per_s": level.slice_img_per_s,
        "server_cpu_pct": round(100 * level.server_cpu / result.seconds, 1),
        "other_cpu_pct": round(
            100 * (level.machine_cpu - level.server_cpu - result.cpu_seconds) / result.seconds, 1
        ),
        "server_cpu_ms_per_image": round(1000 * level.server_cpu / max(1, result.ok), 2),
        "batch_mean": round(batch.mean, 2),
        "batch_sizes": dict(batch.per_bucket()),
        "server_mean_ms": stages,
        "measured_at": time.time(),
        **profile,
    }
