"""What one benchmark run measures, and the server knobs it runs with."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from bench.load import VARIANT_KEYS


@dataclass(frozen=True)
class Knobs:
    """Server tuning knobs the figures depend on; None leaves the server's own default.

    intra_op_threads: ONNX Runtime threads per session (server default: cores / instances).
    instances: sessions per model version, each with its own batch in flight.
    decode_workers: threads decoding and resizing images (server default: one per core).
    allow_spinning: ONNX Runtime's idle threads busy-wait for work instead of sleeping.
    spin_duration_us: how long they do (server default 20; 0: ONNX Runtime's own).
    max_batch_size, max_queue_delay_us, refill_wait: dynamic batching, written into each
    config.json (refill_wait None: the config's default).
    """

    intra_op_threads: int | None = None
    instances: int | None = None
    decode_workers: int | None = None
    allow_spinning: bool | None = None
    spin_duration_us: int | None = None
    max_batch_size: int = 32
    max_queue_delay_us: int = 0
    refill_wait: float | None = None

    def server_flags(self) -> list[str]:
        flags = []
        for name in ("intra_op_threads", "instances", "decode_workers", "spin_duration_us"):
            value = getattr(self, name)
            if value is not None:
                flags += ["--" + name.replace("_", "-"), str(value)]
        if self.allow_spinning is not None:
            flags.append("--allow-spinning" if self.allow_spinning else "--no-allow-spinning")
        return flags


@dataclass(frozen=True)
class Plan:
    models: tuple[str, ...] = ("resnet50", "resnet18")
    variants: tuple[str, ...] = VARIANT_KEYS
    concurrencies: tuple[int, ...] = (1, 4, 16, 64)
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    warmup: float = 2.0  # before every slice
    seconds: float = 12.0  # measured per level, over all its slices
    raw_seconds: float = 4.0  # per batch size of the sweep
    rounds: int = 2  # slices per level, interleaved with the other variants
    reference_seconds: float = 3.0  # raw ORT next to each level, per batch and round
    knobs: Knobs = field(default_factory=Knobs)
    profile: bool = False  # py-spy on the server during each measured window

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


SWEEP = {
    "server defaults": Knobs(),
    "ORT threads never spin": Knobs(allow_spinning=False),
    "ORT's own spin duration": Knobs(spin_duration_us=0),
    "spinning 200 µs": Knobs(spin_duration_us=200),
    "2 instances × 1 thread": Knobs(instances=2, intra_op_threads=1),
    "1 intra-op thread": Knobs(intra_op_threads=1),
    "1 decode worker": Knobs(decode_workers=1),
    "max queue delay 5 ms": Knobs(max_queue_delay_us=5000),
    "no refill wait": Knobs(refill_wait=0.0),
}
"""The knob sets ``python -m bench sweep`` compares, each on a fresh server."""
