"""What every servicer is given: the settings and the shared serving parts."""

from __future__ import annotations

from dataclasses import dataclass, field

from grpc_health.v1.health import aio as health_aio

from server.config import Settings
from server.drain import Drain
from server.lifecycle import ModelLifecycle
from server.metrics import Metrics
from server.models import ModelRegistry
from server.preprocess import Preprocessor
from server.request_path import RequestPath


@dataclass(frozen=True)
class ServingContext:
    settings: Settings
    registry: ModelRegistry
    preprocessor: Preprocessor
    metrics: Metrics
    health: health_aio.HealthServicer
    lifecycle: ModelLifecycle
    # Begun once when the server starts draining; create the context inside the running loop.
    draining: Drain = field(default_factory=Drain)
    # The one request path every adapter calls.
    path: RequestPath = field(init=False)

    def __post_init__(self) -> None:
        path = RequestPath(self.settings, self.registry, self.preprocessor, self.metrics)
        object.__setattr__(self, "path", path)  # frozen

    def ready(self) -> bool:
        """The server's readiness, as overall health says it: loaded, a model READY, and
        not draining."""
        return self.lifecycle.ready() and not self.draining.is_set()
