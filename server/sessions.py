"""ONNX Runtime sessions: how they are opened and how they run.

`open_session` is the one place that picks an execution provider:

- ``cpu``: the CPU provider, nothing else is tried.
- ``cuda``: the CUDA provider (TensorRT first where config.json opts in; a session that
  fails for TensorRT is opened again on CUDA alone), or a `DeviceUnavailable` error
  naming the reason.
- ``auto``: as ``cuda``, but where CUDA does not come up the session is opened on
  the CPU, and `Opened.reason` says why.

ONNX Runtime's own fallback is off on every GPU session (``enable_fallback=0``):
its constructor would otherwise retry on the CPU by itself and its ``run`` would
move a session to the CPU for good after a CUDA failure, printing to stdout. When
the CUDA provider library cannot load, ONNX Runtime opens the session on the CPU
anyway and says why only in its own log, which is kept quiet here;
`server.providers.why_no_cuda` finds the reason again (the library and the symbol
or file it misses) so that it is logged in one line. The session factory, the
driver probe and that diagnosis are parameters, so the choice is unit-tested on CPU.
The providers' names and the options sessions are opened with are `server.providers`'.

`Runner` runs batches on one session. It takes a batch as the requests' tensors and copies
each image once, into what the session reads (on CUDA with pinned memory, the page-locked
buffer ONNX Runtime copies to the GPU from), padding it there to the model's bucket sizes
when config.json asks for them (CUDA graphs need fixed shapes). It checks after every run
that the session still runs on the provider it was opened on (`ProviderLost` otherwise).
Every GPU run and page-locked allocation holds `GATE` shared; a run that may capture a
CUDA graph holds it alone (`CaptureGate`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import io
import logging
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from server.config import Settings
from server.logs import one_line
from server.providers import (
    CPU,
    CUDA,
    GPU_PROVIDERS,
    TENSORRT,
    cuda_driver_present,
    cuda_provider_options,
    session_options,
    tensorrt_provider_options,
    why_no_cuda,
)
from server.repository import ModelConfig, Optimization

log = logging.getLogger(__name__)

_ORT_WARNING = 2
_ORT_FATAL = 4

_NO_OPTIMIZATION = Optimization()


class DeviceUnavailable(RuntimeError):
    """``--device cuda`` was asked for and a session does not come up (or run) on the GPU."""


class ProviderLost(RuntimeError):
    """A session opened on the GPU no longer runs there."""


class Session(Protocol):
    """The part of `onnxruntime.InferenceSession` the server uses."""

    def get_providers(self) -> list[str]: ...
    def get_inputs(self) -> list[Any]: ...
    def get_outputs(self) -> list[Any]: ...
    def run(self, output_names: Sequence[str] | None, input_feed: dict[str, Any]) -> list[Any]: ...
    def io_binding(self) -> Any: ...
    def run_with_iobinding(self, iobinding: Any, run_options: Any = None) -> None: ...


SessionFactory = Callable[..., Session]


_preloaded = False


def preload_cuda_libraries() -> None:
    """Load CUDA, cuBLAS and cuDNN from the ``gpu`` extra's NVIDIA wheels, once.

    The CUDA provider library has no run path to those wheels' directories; ONNX
    Runtime's `preload_dlls` loads them by full path first, so the provider finds them.
    Where the wheels are absent (the CUDA base image) the system's libraries serve and
    nothing is done. What `preload_dlls` prints goes to the debug log, not stdout.
    """
    global _preloaded
    if _preloaded or importlib.util.find_spec("nvidia") is None:
        return
    _preloaded = True
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        preload()
    for line in printed.getvalue().splitlines():
        log.debug("onnxruntime.preload_dlls: %s", line)


@contextlib.contextmanager
def _quiet_ort() -> Any:
    """Silence ONNX Runtime's process-wide logger while a provider is tried."""
    ort.set_default_logger_severity(_ORT_FATAL)
    try:
        yield
    finally:
        ort.set_default_logger_severity(_ORT_WARNING)


class CaptureGate:
    """CUDA graph captures against the process's other GPU work.

    ONNX Runtime captures a CUDA graph in CUDA's global capture mode: while one thread
    captures, a synchronous copy or an allocation on any other thread fails, and spoils
    the capture too. So every GPU run and page-locked allocation holds the gate shared,
    and a run that may capture (`Runner`: a bucket's first `GRAPH_CAPTURE_RUNS`, which
    its warm-up makes) holds it alone: it waits for the others to finish, and new ones
    wait for it (a capture waiting goes first). Opening a session does not hold it: that
    can take minutes (TensorRT builds its engines), and a capture waiting behind it would
    hold every run of the process back. A capture spoiled by a session opening at the same
    time (two loads at once) fails its version's warm-up like any other failure."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._sharing = 0
        self._waiting = 0  # captures waiting for the shared holds to end
        self._capturing = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._changed:
            while self._capturing or self._waiting:
                self._changed.wait()
            self._sharing += 1
        try:
            yield
        finally:
            with self._changed:
                self._sharing -= 1
                if not self._sharing:
                    self._changed.notify_all()

    @contextlib.contextmanager
    def alone(self) -> Iterator[None]:
        with self._changed:
            self._waiting += 1
            while self._capturing or self._sharing:
                self._changed.wait()
            self._waiting -= 1
            self._capturing = True
        try:
            yield
        finally:
            with self._changed:
                self._capturing = False
                self._changed.notify_all()


GATE = CaptureGate()
# ONNX Runtime's CUDA provider runs a graph once before it captures it (to allocate), and
# captures on the next run; the first runs of a bucket hold the gate alone
GRAPH_CAPTURE_RUNS = 2


@dataclass(frozen=True)
class Opened:
    session: Session
    provider: str  # the provider the session's nodes run on first: TensorRT, CUDA or CPU
    reason: str  # why this provider, for the one log line

    @property
    def on_gpu(self) -> bool:
        return self.provider in GPU_PROVIDERS


def open_session(
    model: bytes | Path,
    settings: Settings,
    intra_op_threads: int,
    *,
    config: ModelConfig | None = None,
    mem_limit: int | None = None,
    factory: SessionFactory = ort.InferenceSession,
    driver_present: Callable[[], bool] = cuda_driver_present,
    available: Callable[[], list[str]] = ort.get_available_providers,
    diagnose: Callable[[], str] = why_no_cuda,
) -> Opened:
    """Open one session on the device `settings.device` asks for (see the module docstring).

    `model` is the graph itself (the server passes the bytes `check_version` hashed, so what
    runs is what was verified) or, in tools, the path of a model.onnx.
    `config` (the model's config.json) brings the model's provider options; `mem_limit` is
    this session's share of the GPU's memory (`server.core.loader`) unless ``--cuda-mem-limit``
    says otherwise.
    """
    source = model if isinstance(model, bytes) else str(model)
    options = session_options(settings, intra_op_threads)
    if settings.device == "cpu":
        return Opened(factory(source, options, providers=[CPU]), CPU, "--device cpu")
    if CUDA not in available():
        reason = "this onnxruntime build has no CUDA provider (the cpu extra?)"
    elif not driver_present():
        reason = "no CUDA driver found (libcuda.so.1 does not load: no NVIDIA GPU here?)"
    else:
        preload_cuda_libraries()
        providers = _gpu_providers(settings, config, mem_limit, available)
        session, reason = None, ""
        with _quiet_ort():
            try:
                session = factory(source, options, providers=providers, enable_fallback=0)
            except Exception as exc:  # ORT raises bare RuntimeErrors/Fails here
                reason = f"the CUDA session failed: {one_line(exc)}"
                if providers[0][0] == TENSORRT:
                    # TensorRT's own failure (its libraries missing, its options refused)
                    # fails the whole session: CUDA alone is tried again
                    _tensorrt_failed(model, one_line(exc))
                    providers = providers[1:]
                    try:
                        session = factory(source, options, providers=providers, enable_fallback=0)
                    except Exception as again:
                        reason = f"the CUDA session failed: {one_line(again)}"
        if session is not None:
            first = session.get_providers()[0]
            if first in GPU_PROVIDERS:
                if providers[0][0] == TENSORRT and first != TENSORRT:
                    _tensorrt_failed(model, "the session has no TensorRT provider")
                return Opened(session, first, f"--device {settings.device}")
            reason = diagnose()
    if settings.device == "cuda":
        raise DeviceUnavailable(f"--device cuda, but {reason}")
    return Opened(factory(source, options, providers=[CPU]), CPU, reason)


def _tensorrt_failed(model: bytes | Path, why: str) -> None:
    log.warning("TensorRT did not come up%s (%s); running on CUDA",
                "" if isinstance(model, bytes) else f" for {model}", why)  # fmt: skip


def _gpu_providers(
    settings: Settings,
    config: ModelConfig | None,
    mem_limit: int | None,
    available: Callable[[], list[str]],
) -> list[Any]:
    """The providers a GPU session is opened with: CUDA, TensorRT before it where
    config.json opts in and this onnxruntime build has it."""
    optimization = config.optimization if config is not None else _NO_OPTIMIZATION
    providers: list[Any] = [(CUDA, cuda_provider_options(settings, optimization, mem_limit))]
    if config is not None and optimization.tensorrt is not None:
        if TENSORRT in available():
            providers.insert(0, (TENSORRT, tensorrt_provider_options(settings, config)))
        else:
            log.warning("TensorRT asked for in config.json, but this onnxruntime build has "
                        "no TensorRT provider; trying CUDA")  # fmt: skip
    return providers


def graph_feed_dtype(session: Session) -> np.dtype | None:
    """float16 for a graph built with float16 inputs (``build --precision fp16 --fp16-io``),
    whose config.json still promises float32: the runner casts what it feeds. Else None."""
    if session.get_inputs()[0].type == "tensor(float16)":
        return np.dtype(np.float16)
    return None


# ONNX Runtime's names of the element types a graph's output may have here
_ELEMENT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def bucket_for(size: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `size` images (buckets sorted, the last the maximum)."""
    for bucket in buckets:
        if bucket >= size:
            return bucket
    raise ValueError(f"a batch of {size} is above the largest bucket {buckets[-1]}")


# (batch shape, element type, GPU ordinal) → an OrtValue in page-locked host memory
PinnedAllocator = Callable[[tuple[int, ...], np.dtype, int], Any]

_registering = threading.Lock()


@functools.cache
def _page_locked_memory(device_id: int) -> Any:
    """The memory info of page-locked host memory for CUDA device `device_id`, once ONNX
    Runtime's environment has an allocator for it: the one a registered CUDA
    execution-provider library shares, else the CUDA provider's own pinned allocator,
    registered here (``create_and_register_allocator_v2``). ONNX Runtime's error, saying
    why, where this onnxruntime has neither."""
    memory = ort.OrtMemoryInfo.create_v2(
        "CudaPinned", ort.OrtMemoryInfoDeviceType.GPU, int(ort.OrtDeviceVendorId.NVIDIA),
        device_id, ort.OrtDeviceMemoryType.HOST_ACCESSIBLE, 0,
        ort.OrtAllocatorType.ORT_DEVICE_ALLOCATOR,
    )  # fmt: skip
    try:
        ort.OrtValue.ortvalue_from_shape_and_type((1,), np.uint8, memory_info=memory)
    except Exception:  # no allocator for it yet (ONNX Runtime's own error types vary)
        ort.create_and_register_allocator_v2(CUDA, memory, {}, None)
    return memory


def page_locked(shape: tuple[int, ...], dtype: np.dtype, device_id: int) -> Any:
    """An OrtValue of `shape` in page-locked host memory, which the GPU copies from by DMA
    (ONNX Runtime's Python API names no pinned device type: the memory is asked for by its
    memory info, `_page_locked_memory`). An error where this onnxruntime offers none."""
    with _registering:  # one registration per device, whichever instance asks first
        memory = _page_locked_memory(device_id)
    return ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, memory_info=memory)


def _join(parts: Sequence[np.ndarray], size: int, out: np.ndarray) -> None:
    """`parts` copied into the first `size` rows of `out`, cast to its type; the rows after
    them (a bucket's padding) zeroed."""
    np.concatenate(parts, out=out[:size], casting="same_kind")
    if size < len(out):
        out[size:] = 0


class Runner:
    """Runs batches on one session; on the GPU through I/O binding when configured.

    A batch comes as its parts (`join`: the requests' tensors, each ``[n, *dims]``, in
    order), and each image is copied once, into the array the session reads: the parts are
    joined, padded to the bucket and cast to the graph's input type in that one copy, or
    not copied at all when a single part is already the batch; `run_joined` runs it.
    ``feed_dtype`` (see `graph_feed_dtype`): the type the graph takes; the logits always
    come back as float32.
    ``buckets`` (GPU only): pad each batch with zero rows to the smallest of these sizes and
    cut the logits back. ``pinned``: the batch is joined straight into page-locked host
    memory (from `allocate`, `page_locked` by default; one buffer per image shape and type,
    the batch in its first rows, grown to the next power of two rows a batch needs), which
    ONNX Runtime copies to the GPU. Where that memory cannot be had, or the first run
    bound to it fails and succeeds again from ordinary memory, the runner says why once and
    goes on as ``--no-pinned-memory`` does. ``graphs``: replay one CUDA graph per bucket
    (inputs and outputs bound to fixed device buffers, filled from the joined batch).
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
        buckets: Sequence[int] = (),
        pinned: bool = False,
        graphs: bool = False,
        instance: int = 0,
        allocate: PinnedAllocator = page_locked,
        served: str = "",
        graph_memory: str = "cuda",
        gate: CaptureGate = GATE,
    ) -> None:
        self.session = opened.session
        self.provider = opened.provider
        self.instance = instance
        self._input = input_name
        self._output = output_name
        on_gpu = opened.on_gpu
        self._bind = io_binding and on_gpu
        self._device_id = device_id
        self._feed_dtype = feed_dtype
        self.buckets = tuple(buckets) if on_gpu else ()
        self._pinned = pinned and self._bind
        self._graphs = graphs and on_gpu and bool(self.buckets)
        self._allocate = allocate
        self._served = served  # "model M version V", for its log line
        self._graph_memory = graph_memory  # where the CUDA graphs' buffers are (tests: "cpu")
        self._pinned_ran = False  # a run has succeeded (pinned: bound to page-locked memory)
        # (image shape, element type) → (an OrtValue, a numpy view of its memory): the pinned
        # host buffer of batches of that image, its rows a power of two (`_host`)
        self._hosts: dict[tuple[tuple[int, ...], np.dtype], tuple[Any, np.ndarray]] = {}
        self._devices: dict[tuple[int, ...], Any] = {}  # batch shape → CUDA graphs' input
        self._graph_bindings: dict[int, tuple[Any, Any, Any]] = {}  # bucket → binding, out, opts
        self._graph_runs: dict[int, int] = {}  # bucket → its runs so far
        self._gate = gate

    @property
    def warm_runs(self) -> int:
        """Runs of each batch size its warm-up makes: with CUDA graphs, those that may
        capture one (`GRAPH_CAPTURE_RUNS`), so that no served batch does."""
        return GRAPH_CAPTURE_RUNS if self._graphs else 1

    def run(self, batch: np.ndarray) -> np.ndarray:
        """The logits of `batch`, one row per image (blocking: call from an inference thread,
        never on a busy event loop)."""
        return self.run_joined(*self.join([batch]))

    def join(self, parts: Sequence[np.ndarray]) -> tuple[np.ndarray, int]:
        """The batch made of `parts` as the session reads it, and how many of its rows are
        images (the rest pad it to a bucket): the one part itself when it already is that
        batch, else one array (pinned: the first rows of the page-locked buffer) the parts
        are copied into."""
        size = sum(len(part) for part in parts)
        rows = bucket_for(size, self.buckets) if self.buckets else size
        shape = (rows, *parts[0].shape[1:])
        dtype = self._feed_dtype if self._feed_dtype is not None else parts[0].dtype
        host = self._host(shape, np.dtype(dtype)) if self._pinned else None
        if host is not None:
            batch = host
        elif len(parts) == 1 and parts[0].shape == shape and parts[0].dtype == dtype:
            return parts[0], size  # read where it is
        else:
            batch = np.empty(shape, dtype)
        _join(parts, size, batch)
        return batch, size

    def run_joined(self, batch: np.ndarray, size: int) -> np.ndarray:
        """The logits of the first `size` rows of a batch from `join` (blocking)."""
        with self._hold(len(batch)):
            return self._run_joined(batch, size)

    def _hold(self, rows: int) -> contextlib.AbstractContextManager[None]:
        """How a run of `rows` holds the `CaptureGate`: alone where it may capture a CUDA
        graph, else shared; not at all on the CPU."""
        if self.provider == CPU:
            return contextlib.nullcontext()
        if self._graphs and self._graph_runs.get(rows, 0) < GRAPH_CAPTURE_RUNS:
            return self._gate.alone()
        return self._gate.shared()

    def _run_joined(self, batch: np.ndarray, size: int) -> np.ndarray:
        try:
            logits = self._run(batch)
        except Exception as exc:
            if not self._pinned or self._pinned_ran or self._graphs:
                raise
            logits = self._run(batch, pinned=False)  # what fails again is not the memory's
            self._unpin(f"a run bound to it failed ({one_line(exc)}) and the same run from "
                        "ordinary memory did not")  # fmt: skip
        else:
            self._pinned_ran = True  # (only a pinned run's failure is looked at above)
        if self.provider != CPU and self.session.get_providers()[0] != self.provider:
            raise ProviderLost(
                f"instance {self.instance} was opened on {self.provider} and now runs on "
                f"{self.session.get_providers()[0]}"
            )
        if logits.dtype != np.float32:
            logits = logits.astype(np.float32)
        return logits[:size]

    def _run(self, batch: np.ndarray, pinned: bool = True) -> np.ndarray:
        if self._graphs:
            return self._run_graph(batch)
        if not self._bind:
            return self.session.run([self._output], {self._input: batch})[0]
        binding = self.session.io_binding()
        host = self._hosts.get((batch.shape[1:], batch.dtype)) if pinned and self._pinned else None
        if host is not None and batch.ctypes.data == host[0].data_ptr():
            # joined into the first rows of its pinned buffer: those rows, by address (the
            # driver copies page-locked memory to the GPU by DMA whatever ONNX Runtime calls it)
            binding.bind_input(self._input, "cpu", 0, batch.dtype.type, list(batch.shape),
                               host[0].data_ptr())  # fmt: skip
        else:
            binding.bind_cpu_input(self._input, batch)
        binding.bind_output(self._output, "cpu")
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def _host(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
        """A batch of `shape` in page-locked memory: the first rows of the one buffer of its
        image shape and type, which grows to the next power of two rows a batch needs (one
        buffer per batch size would hold 1 + 2 + … + max_batch_size images, where a GPU
        warms every size); None once page-locked memory is given up."""
        rows, key = shape[0], (shape[1:], dtype)
        found = self._hosts.get(key)
        if found is None or len(found[1]) < rows:
            whole = (1 << (rows - 1).bit_length(), *shape[1:])
            try:
                with self._gate.shared():
                    value = self._allocate(whole, dtype, self._device_id)
            except Exception as exc:
                self._unpin(f"it cannot be allocated: {one_line(exc)}")
                return None
            nbytes = math.prod(whole) * dtype.itemsize
            memory = (ctypes.c_char * nbytes).from_address(value.data_ptr())
            view = np.frombuffer(memory, dtype).reshape(whole)
            view[...] = 0
            found = self._hosts[key] = (value, view)  # a smaller one before it is freed
        return found[1][:rows]

    def _unpin(self, why: str) -> None:
        """Go on without page-locked memory, as ``--no-pinned-memory`` does, saying why once."""
        self._pinned = False
        self._hosts.clear()
        log.warning("%s instance %d: no page-locked memory for its batches, %s; ONNX Runtime "
                    "copies them to the GPU from ordinary memory",
                    self._served or "a model's", self.instance, why)  # fmt: skip

    def _device(self, batch: np.ndarray) -> Any:
        """The CUDA graphs' device buffer of `batch`'s shape (made once), holding `batch`."""
        value = self._devices.get(batch.shape)
        if value is None:
            value = ort.OrtValue.ortvalue_from_shape_and_type(
                batch.shape, batch.dtype, self._graph_memory, self._device_id
            )
            self._devices[batch.shape] = value
        value.update_inplace(np.ascontiguousarray(batch))
        return value

    def _run_graph(self, batch: np.ndarray) -> np.ndarray:
        """One CUDA graph per bucket: fixed input and output buffers, captured on first run."""
        bucket = len(batch)
        found = self._graph_bindings.get(bucket)
        if found is None:
            logits = self.session.get_outputs()[0]
            # the graph's own output type: float16 for a ``--fp16-io`` graph (`run_joined`
            # gives float32 back either way)
            output = ort.OrtValue.ortvalue_from_shape_and_type(
                (bucket, *logits.shape[1:]), _ELEMENT_TYPES.get(logits.type, np.float32),
                self._graph_memory, self._device_id,
            )  # fmt: skip
            binding = self.session.io_binding()
            binding.bind_ortvalue_input(self._input, self._device(batch))
            binding.bind_ortvalue_output(self._output, output)
            run_options = ort.RunOptions()
            run_options.add_run_config_entry("gpu_graph_id", str(self.buckets.index(bucket) + 1))
            found = (binding, output, run_options)
            self._graph_bindings[bucket] = found
        else:
            self._device(batch)  # the same device buffer, new contents
        binding, output, run_options = found
        self._graph_runs[bucket] = self._graph_runs.get(bucket, 0) + 1
        self.session.run_with_iobinding(binding, run_options)
        return output.numpy()
