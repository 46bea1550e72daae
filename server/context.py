"""What every servicer is given: the settings and the shared serving parts."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.config import Settings
from server.core.health import Health
from server.core.manager import Manager
from server.core.registry import ModelRegistry
from server.drain import Drain
from server.metrics import Metrics
from server.preprocess import Preprocessor
from server.request_path import RequestPath
from server.shared_memory import SharedMemory


@dataclass(frozen=True)
class ServingContext:
    settings: Settings
    registry: ModelRegistry
    preprocessor: Preprocessor
    metrics: Metrics
    # The one answer to "is it ready?" (server, model, live), grpc.health.v1 included.
    health: Health
    # The repository manager: model control (load, unload) as --model-control-mode says.
    manager: Manager
    # Begun once when the server starts draining (`Health.drain`, which shares it).
    draining: Drain
    # The registered system shared-memory regions (`server.shared_memory`).
    shared_memory: SharedMemory
    # The one request path every adapter calls.
    path: RequestPath = field(init=False)

    def __post_init__(self) -> None:
        path = RequestPath(
            self.settings, self.registry, self.preprocessor, self.metrics, self.shared_memory
        )
        object.__setattr__(self, "path", path)  # frozen
