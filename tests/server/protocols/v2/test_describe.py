"""ModelMetadata, ModelConfig and ModelStatistics built from a model version and the metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
from resnet_serve_client.proto.inference import model_config_pb2 as mc

from server.core.registry import Model, ModelVersion, State
from server.errors import InvalidInput
from server.metrics import Metrics
from server.protocols.v2 import describe as v2_describe
from server.protocols.v2 import stats as v2_stats
from server.providers import CPU, CUDA, TENSORRT
from server.repository import Batching, InputSpec, ModelConfig

CONFIG = ModelConfig(
    name="net",
    arch="resnet18",
    num_classes=5,
    input=InputSpec(dtype="uint8", layout="NHWC", size=8),
    batching=Batching(max_batch_size=4, max_queue_delay_us=500, preferred_batch_sizes=(2, 4)),
)


def version(
    number: str, state: State = State.READY, providers: tuple[str, ...] = (CPU,)
) -> ModelVersion:
    return ModelVersion(
        "net", number, CONFIG, list("abcde"), Path(number), state, providers=providers
    )


def test_metadata_lists_ready_versions_and_batched_shapes() -> None:
    model = Model("net", CONFIG, {v: version(v) for v in ("2", "10")})
    model.versions["3"] = version("3", State.UNAVAILABLE)
    metadata = v2_describe.model_metadata(model, model.versions["10"])
    assert list(metadata.versions) == ["2", "10"]
    assert (metadata.inputs[0].datatype, list(metadata.inputs[0].shape)) == ("UINT8", [-1, 8, 8, 3])
    assert list(metadata.outputs[0].shape) == [-1, 5]


@pytest.mark.parametrize(
    ("provider", "kind", "gpus"),
    [(CPU, "KIND_CPU", []), (CUDA, "KIND_GPU", [1]), (TENSORRT, "KIND_GPU", [1])],
)
def test_config(provider: str, kind: str, gpus: list[int]) -> None:
    config = v2_describe.config_response(version("1", providers=(provider,) * 2), 1).config
    assert (config.max_batch_size, config.platform, config.backend) == (
        4,
        "onnxruntime_onnx",
        "onnxruntime",
    )
    assert config.input[0].format == mc.ModelInput.FORMAT_NHWC and list(config.input[0].dims) == [
        8,
        8,
        3,
    ]
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 4]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    [group] = config.instance_group
    assert (group.count, mc.ModelInstanceGroup.Kind.Name(group.kind), list(group.gpus)) == (
        2,
        kind,
        gpus,
    )


def test_config_has_one_instance_group_per_provider_the_instances_run_on() -> None:
    served = version("1", providers=(CUDA, CUDA, CPU))
    groups = v2_describe.config_response(served, 0).config.instance_group
    kind = mc.ModelInstanceGroup.Kind.Name
    kinds = [(g.name, g.count, kind(g.kind), list(g.gpus)) for g in groups]
    assert kinds == [("net_0", 2, "KIND_GPU", [0]), ("net_1", 1, "KIND_CPU", [])]


def test_statistics_from_the_metrics() -> None:
    metrics = Metrics()
    served = version("1")
    with metrics.track_request("net", "1", 3):
        metrics.queue_duration.labels("net", "1").observe(0.5)
        metrics.inference_duration.labels("net", "1").observe(0.25)
        metrics.batch_size.labels("net", "1").observe(3)
    with pytest.raises(InvalidInput), metrics.track_request("net", "1", 1):
        raise InvalidInput("bad")
    families = list(metrics.registry.collect())
    [stats] = v2_stats.model_statistics(metrics, families, [served]).model_stats
    assert (stats.inference_count, stats.execution_count) == (3, 1)
    inference = stats.inference_stats
    assert (inference.success.count, inference.fail.count) == (1, 1)
    assert (inference.queue.count, inference.queue.ns) == (1, 500_000_000)
    assert (inference.compute_infer.count, inference.compute_infer.ns) == (1, 250_000_000)
    # one count per session run for all three, or perf_analyzer refuses the statistics
    assert inference.compute_input.count == inference.compute_output.count == 1
    assert inference.success.ns > 0 and stats.last_inference > 0
    fresh = Metrics()
    [other] = v2_stats.model_statistics(fresh, fresh.registry.collect(), [served]).model_stats
    assert (other.inference_count, other.inference_stats.success.count, other.last_inference) == (
        0,
        0,
        0,
    )
