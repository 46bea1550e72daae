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

    def ready(self) -> bool:
        """The server's readiness, as overall health says it: loaded, a model READY, and
        not draining."""
        return self.lifecycle.ready() and not self.draining.is_set()
