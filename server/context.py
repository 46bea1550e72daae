"""What every servicer is given: the settings and the shared serving parts."""

from __future__ import annotations

from dataclasses import dataclass

from grpc_health.v1.health import aio as health_aio

from server.config import Settings
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
