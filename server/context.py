"""What every servicer is given: the settings and the shared serving parts."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from grpc_health.v1.health import aio as health_aio

from server.config import Settings
from server.drain import Drain
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
    # Begun once when the server starts draining; create the context inside the running loop.
    draining: Drain = field(default_factory=Drain)
    # Set once loading is done and a model is ready (overall health SERVING from then on
    # until the drain).
    loaded: asyncio.Event = field(default_factory=asyncio.Event)

    def ready(self) -> bool:
        """The server's readiness: loaded and not draining (overall health SERVING)."""
        return self.loaded.is_set() and not self.draining.is_set()
