"""Python SDK for resnet-serve: classify images over gRPC, check health, list models.

>>> from resnet_serve_client import Client
>>> with Client("localhost:8001", model="resnet50") as client:
...     for result in client.classify(["cat.jpg", "dog.png"]):
...         print(result.top.label, result.top.score)
"""

from .aio import AsyncClient
from .client import Client
from .errors import (
    Cancelled,
    DeadlineExceeded,
    InternalError,
    InvalidArgument,
    InvalidImage,
    ModelNotFound,
    Overloaded,
    PermissionDenied,
    ResnetServeError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from .options.channel import ChannelOptions
from .options.keepalive import Keepalive
from .options.retry import Retry
from .options.tls import TLS
from .resize import Resize
from .results import (
    Classification,
    ClassScore,
    HealthStatus,
    InputSpec,
    ModelInfo,
    ModelState,
    VersionInfo,
)

__all__ = [
    "TLS",
    "AsyncClient",
    "Cancelled",
    "ChannelOptions",
    "ClassScore",
    "Classification",
    "Client",
    "DeadlineExceeded",
    "HealthStatus",
    "InputSpec",
    "InternalError",
    "InvalidArgument",
    "InvalidImage",
    "Keepalive",
    "ModelInfo",
    "ModelNotFound",
    "ModelState",
    "Overloaded",
    "PermissionDenied",
    "Resize",
    "ResnetServeError",
    "Retry",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "VersionInfo",
]
