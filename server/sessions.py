"""ONNX Runtime sessions: where they run, how they are configured, how they run.

`open_session` is the one place that picks an execution provider:

- ``cpu``: the CPU provider, nothing else is tried.
- ``cuda``: the CUDA provider or a `DeviceUnavailable` error.
- ``auto``: CUDA when the CUDA provider is built in, a CUDA driver loads, and
  the session really comes up on it (``session.get_providers()``); else CPU.

onnxruntime-gpu prints errors when it fails to load its CUDA libraries, so
``auto`` asks for CUDA only where a driver is present and keeps ONNX
Runtime's default logger at FATAL while it tries. Both the session factory
and the driver probe are parameters, so the choice is unit-tested on CPU.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from server.config import Settings

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

_ORT_WARNING = 2
_ORT_ERROR = 3
_ORT_FATAL = 4


class DeviceUnavailable(RuntimeError):
    """``--device cuda`` was asked for and no session comes up on CUDA."""


class Session(Protocol):
    """The part of `onnxruntime.InferenceSession` the server uses."""

    def get_providers(self) -> list[str]: ...
    def get_inputs(self) -> list[Any]: ...
    def run(self, output_names: Sequence[str] | None, input_feed: dict[str, Any]) -> list[Any]: ...
    def io_binding(self) -> Any: ...
    def run_with_iobinding(self, iobinding: Any) -> None: ...


SessionFactory = Callable[..., Session]


def cuda_driver_present() -> bool:
    """Whether the CUDA driver library loads (false on machines without an NVIDIA GPU)."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def session_options(settings: Settings, intra_op_threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = _ORT_ERROR
    options.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if settings.allow_spinning else "0"
    )
    if settings.allow_spinning and settings.spin_duration_us:
        options.add_session_config_entry(
            "session.intra_op.spin_duration_us", str(settings.spin_duration_us)
        )
    return options


def cuda_provider_options(settings: Settings) -> dict[str, str]:
    options = {
        "device_id": str(settings.cuda_device_id),
        "cudnn_conv_algo_search": settings.cudnn_conv_algo_search,
        "arena_extend_strategy": settings.cuda_arena_extend_strategy,
        # one stream per session; outputs are copied to the host anyway
        "do_copy_in_default_stream": "1",
    }
    if settings.cuda_mem_limit is not None:
        options["gpu_mem_limit"] = str(settings.cuda_mem_limit)
    return options


@contextmanager
def _quiet_ort() -> Any:
    """Silence ONNX Runtime's process-wide logger while a provider is tried."""
    ort.set_default_logger_severity(_ORT_FATAL)
    try:
        yield
    finally:
        ort.set_default_logger_severity(_ORT_WARNING)


@dataclass(frozen=True)
class Opened:
    session: Session
    provider: str
    reason: str  # why this provider, for the one log line


def open_session(
    model_path: Path,
    settings: Settings,
    intra_op_threads: int,
    *,
    factory: SessionFactory = ort.InferenceSession,
    driver_present: Callable[[], bool] = cuda_driver_present,
    available: Callable[[], list[str]] = ort.get_available_providers,
) -> Opened:
    """Open one session on the device `settings.device` asks for (see the module docstring)."""
    options = session_options(settings, intra_op_threads)
    if settings.device == "cpu":
        return Opened(factory(str(model_path), options, providers=[CPU]), CPU, "--device cpu")
    if CUDA not in available():
        reason = "this onnxruntime build has no CUDA provider"
    elif not driver_present():
        reason = "no CUDA driver found"
    else:
        providers = [(CUDA, cuda_provider_options(settings)), CPU]
        with _quiet_ort():
            try:
                session = factory(str(model_path), options, providers=providers)
            except Exception as exc:  # ORT raises bare RuntimeErrors/Fails here
                session, reason = None, f"CUDA session failed: {exc}"
        if session is not None:
            if session.get_providers()[0] == CUDA:
                return Opened(session, CUDA, f"--device {settings.device}")
            reason = "the CUDA provider did not come up (missing CUDA/cuDNN libraries?)"
    if settings.device == "cuda":
        raise DeviceUnavailable(f"--device cuda, but {reason}")
    return Opened(factory(str(model_path), options, providers=[CPU]), CPU, reason)


def graph_feed_dtype(session: Session) -> np.dtype | None:
    """float16 for a graph built with float16 inputs (``build --precision fp16 --fp16-io``),
    whose config.json still promises float32: the runner casts what it feeds. Else None."""
    if session.get_inputs()[0].type == "tensor(float16)":
        return np.dtype(np.float16)
    return None


class Runner:
    """Runs batches on one session; on CUDA through I/O binding when configured.

    ``feed_dtype`` (see `graph_feed_dtype`): cast each batch to it before running; the
    logits always come back as float32.
    """

    def __init__(
        self,
        opened: Opened,
        input_name: str,
        output_name: str,
        *,
        io_binding: bool,
        device_id: int,
        feed_dtype: np.dtype | None = None,
    ) -> None:
        self.session = opened.session
        self.provider = opened.provider
        self._input = input_name
        self._output = output_name
        self._bind = io_binding and opened.provider == CUDA
        self._device_id = device_id
        self._feed_dtype = feed_dtype

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Blocking: call from an executor thread, never on the event loop."""
        if self._feed_dtype is not None:
            batch = batch.astype(self._feed_dtype)
            return self._run(batch).astype(np.float32)
        return self._run(batch)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if not self._bind:
            return self.session.run([self._output], {self._input: batch})[0]
        binding = self.session.io_binding()
        on_device = ort.OrtValue.ortvalue_from_numpy(batch, "cuda", self._device_id)
        binding.bind_ortvalue_input(self._input, on_device)
        binding.bind_output(self._output, "cpu")
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()
