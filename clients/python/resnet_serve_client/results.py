"""Typed results: what the SDK returns instead of protobuf messages."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .proto.resnet_serve.v1 import classifier_pb2 as pb


@dataclass(frozen=True, slots=True)
class ClassScore:
    """One class of a classification: its index in the model's output, label and probability."""

    index: int
    label: str
    score: float


@dataclass(frozen=True, slots=True)
class Classification:
    """The top-k classes for one image, best first, and the model version that answered."""

    classes: tuple[ClassScore, ...]
    model: str
    version: str
    request_id: str

    @property
    def top(self) -> ClassScore:
        """The best class."""
        return self.classes[0]


class ModelState(enum.Enum):
    UNSPECIFIED = "UNSPECIFIED"
    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True, slots=True)
class VersionInfo:
    version: str
    state: ModelState
    reason: str
    providers: tuple[str, ...] = ()  # each instance's execution provider, once READY
    # where its weights came from: "random (seed N)" is an untrained model whose classes
    # mean nothing; "torchvision <url>", a URL or a file; "" when the build did not say
    weights: str = ""

    @property
    def random_weights(self) -> bool:
        return self.weights.startswith("random")


@dataclass(frozen=True, slots=True)
class InputSpec:
    name: str
    dtype: str
    layout: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    arch: str
    platform: str
    num_classes: int
    input: InputSpec
    max_batch_size: int
    versions: tuple[VersionInfo, ...]


class HealthStatus(enum.Enum):
    """``grpc.health.v1`` serving status."""

    UNKNOWN = "UNKNOWN"
    SERVING = "SERVING"
    NOT_SERVING = "NOT_SERVING"
    SERVICE_UNKNOWN = "SERVICE_UNKNOWN"


def classifications(response: pb.ClassifyResponse) -> list[Classification]:
    """One ``Classification`` per image of a response, in input order."""
    return [
        Classification(
            classes=tuple(ClassScore(c.index, c.label, c.score) for c in result.classes),
            model=response.model,
            version=response.version,
            request_id=response.request_id,
        )
        for result in response.results
    ]


def model_info(message: pb.ModelInfo) -> ModelInfo:
    spec = message.input
    return ModelInfo(
        name=message.name,
        arch=message.arch,
        platform=message.platform,
        num_classes=message.num_classes,
        input=InputSpec(spec.name, spec.dtype, spec.layout, tuple(spec.shape)),
        max_batch_size=message.max_batch_size,
        versions=tuple(
            VersionInfo(v.version, _state(v.state), v.reason, tuple(v.providers), v.weights)
            for v in message.versions
        ),
    )


def _state(value: int) -> ModelState:
    return ModelState(pb.VersionInfo.State.Name(value).removeprefix("STATE_"))
