"""Provider choice with an injected session factory, and a real CPU session that stays quiet."""

from __future__ import annotations

import ctypes
import math
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from server import providers, sessions
from server.config import Settings
from server.core.loader import GPU_MEMORY_SHARE, gpu_mem_limit
from server.providers import (
    CPU,
    CUDA,
    TENSORRT,
    cuda_provider_options,
    session_options,
    tensorrt_provider_options,
    why_no_cuda,
)
from server.repository import CudaOptions, InputSpec, ModelConfig, Optimization, TensorRT
from server.sessions import (
    GRAPH_CAPTURE_RUNS,
    CaptureGate,
    DeviceUnavailable,
    Opened,
    ProviderLost,
    Runner,
    bucket_for,
    graph_feed_dtype,
    open_session,
    page_locked,
)


class FakeSession:
    """Comes up on `providers`; runs return zero logits of `classes` columns."""

    def __init__(self, providers: list[str], classes: int = 3) -> None:
        self._providers = providers
        self.classes = classes
        self.batches: list[int] = []

    def get_providers(self) -> list[str]:
        return self._providers

    def get_inputs(self) -> list[Any]:
        return [SimpleNamespace(name="images", type="tensor(float)")]

    def run(self, outputs: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        (batch,) = feed.values()
        self.batches.append(len(batch))
        return [np.arange(len(batch) * self.classes, dtype=np.float32).reshape(len(batch), -1)]


class FakeFactory:
    """Records what each session was asked for; `cuda_comes_up` decides what a GPU request
    gets, `cuda_raises` makes it raise, `tensorrt_comes_up` whether TensorRT is first,
    `tensorrt_raises` makes a session asked for TensorRT raise (its libraries missing)."""

    def __init__(
        self,
        cuda_comes_up: bool = True,
        cuda_raises: bool = False,
        tensorrt_comes_up: bool = True,
        tensorrt_raises: bool = False,
    ) -> None:
        self.cuda_comes_up = cuda_comes_up
        self.cuda_raises = cuda_raises
        self.tensorrt_comes_up = tensorrt_comes_up
        self.tensorrt_raises = tensorrt_raises
        self.calls: list[list[Any]] = []
        self.kwargs: list[dict[str, Any]] = []
        self.models: list[str | bytes] = []  # what each session was created from

    def __call__(
        self, model: str | bytes, options: ort.SessionOptions, providers: list[Any], **kwargs: Any
    ) -> FakeSession:
        self.models.append(model)
        self.calls.append(providers)
        self.kwargs.append(kwargs)
        names = [p[0] if isinstance(p, tuple) else p for p in providers]
        if TENSORRT in names and self.tensorrt_raises:
            raise RuntimeError("Please install TensorRT libraries as mentioned in the GPU "
                               "requirements page")  # fmt: skip
        if CUDA in names:
            if self.cuda_raises:
                raise RuntimeError("CUDA failure 100: no CUDA-capable device is detected")
            if not self.cuda_comes_up:
                return FakeSession([CPU])
            if TENSORRT in names and self.tensorrt_comes_up:
                return FakeSession([TENSORRT, CUDA, CPU])
            return FakeSession([CUDA, CPU])
        return FakeSession([CPU])


def _open(
    device: str,
    factory: FakeFactory,
    *,
    driver: bool = True,
    config: ModelConfig | None = None,
    providers: tuple[str, ...] = (TENSORRT, CUDA, CPU),
    mem_limit: int | None = None,
    **settings: Any,
) -> Any:
    return open_session(
        Path("model.onnx"),
        Settings(device=device, **settings),
        2,
        config=config,
        mem_limit=mem_limit,
        factory=factory,
        driver_present=lambda: driver,
        available=lambda: list(providers),
        diagnose=lambda: "libonnxruntime_providers_cuda.so does not load: libcublasLt.so.13",
    )


CONFIG = ModelConfig(name="net", arch="resnet20", num_classes=3, input=InputSpec(size=4))


def _with(**optimization: Any) -> ModelConfig:
    return CONFIG.model_copy(update={"optimization": Optimization(**optimization)})


def test_auto_uses_cuda_when_the_session_comes_up_on_it() -> None:
    factory = FakeFactory()
    opened = _open("auto", factory, cuda_device_id=1, cuda_mem_limit=1 << 30)
    assert opened.provider == CUDA and opened.on_gpu
    [(name, options)] = factory.calls[0]
    assert name == CUDA
    assert options["device_id"] == "1"
    assert options["gpu_mem_limit"] == str(1 << 30)
    assert options["cudnn_conv_algo_search"] == "HEURISTIC"
    assert factory.kwargs[0] == {"enable_fallback": 0}, "ONNX Runtime's own fallback is off"


def test_auto_falls_back_when_cuda_does_not_come_up_and_says_why() -> None:
    factory = FakeFactory(cuda_comes_up=False)
    opened = _open("auto", factory)
    assert opened.provider == CPU
    assert "libcublasLt.so.13" in opened.reason, "the diagnosis, not a guess"
    assert factory.calls[-1] == [CPU]


def test_auto_falls_back_when_the_cuda_session_raises() -> None:
    opened = _open("auto", FakeFactory(cuda_raises=True))
    assert opened.provider == CPU and "no CUDA-capable device" in opened.reason


def test_auto_without_a_driver_never_tries_cuda() -> None:
    factory = FakeFactory()
    opened = _open("auto", factory, driver=False)
    assert opened.provider == CPU and opened.reason.startswith("no CUDA driver found")
    assert factory.calls == [[CPU]]


def test_auto_on_a_cpu_only_build() -> None:
    factory = FakeFactory()
    opened = open_session(
        Path("m.onnx"), Settings(), 1, factory=factory, available=lambda: [CPU]
    )
    assert opened.provider == CPU and "no CUDA provider" in opened.reason
    assert factory.calls == [[CPU]]


def test_cpu_never_tries_cuda() -> None:
    factory = FakeFactory()
    assert _open("cpu", factory).provider == CPU
    assert factory.calls == [[CPU]]


@pytest.mark.parametrize(
    ("driver", "comes_up", "raises", "why"),
    [
        (False, True, False, "no CUDA driver found"),
        (True, False, False, "libcublasLt.so.13"),
        (True, True, True, "no CUDA-capable device"),
    ],
)
def test_cuda_demanded_but_unavailable_raises_with_the_reason(
    driver: bool, comes_up: bool, raises: bool, why: str
) -> None:
    factory = FakeFactory(cuda_comes_up=comes_up, cuda_raises=raises)
    with pytest.raises(DeviceUnavailable, match=f"--device cuda, but .*{why}"):
        _open("cuda", factory, driver=driver)
    assert all(call != [CPU] for call in factory.calls), "never opened on the CPU"


def test_tf32_is_off_unless_config_json_turns_it_on() -> None:
    assert cuda_provider_options(Settings())["use_tf32"] == "0"
    options = cuda_provider_options(Settings(), _with(cuda=CudaOptions(use_tf32=True)).optimization)
    assert options["use_tf32"] == "1"


def test_gpu_mem_limit_is_the_share_unless_the_flag_says_otherwise() -> None:
    assert "gpu_mem_limit" not in cuda_provider_options(Settings())
    assert cuda_provider_options(Settings(), mem_limit=5)["gpu_mem_limit"] == "5"
    assert cuda_provider_options(Settings(cuda_mem_limit=7), mem_limit=5)["gpu_mem_limit"] == "7"
    factory = FakeFactory()
    _open("auto", factory, mem_limit=3 << 30)
    assert factory.calls[0][0][1]["gpu_mem_limit"] == str(3 << 30)


def test_gpu_mem_limit_divides_a_share_of_the_gpu_between_the_sessions() -> None:
    eighty_gb = 80 * 10**9
    assert gpu_mem_limit(eighty_gb, 4) == int(eighty_gb * GPU_MEMORY_SHARE) // 4
    assert gpu_mem_limit(None, 4) is None
    assert gpu_mem_limit(eighty_gb, 0) is None


def test_cuda_graphs_turn_on_the_providers_graph_capture() -> None:
    assert "enable_cuda_graph" not in cuda_provider_options(Settings())
    options = cuda_provider_options(Settings(), _with(cuda=CudaOptions(graphs=True)).optimization)
    assert options["enable_cuda_graph"] == "1"


def test_tensorrt_is_tried_first_with_its_cache_and_shapes(tmp_path: Path) -> None:
    factory = FakeFactory()
    config = _with(tensorrt=TensorRT(precision="fp16"))
    opened = _open("cuda", factory, config=config, tensorrt_cache_dir=tmp_path)
    assert opened.provider == TENSORRT and opened.on_gpu
    (trt, trt_options), (cuda, _) = factory.calls[0]
    assert (trt, cuda) == (TENSORRT, CUDA), "CUDA behind TensorRT takes what it cannot run"
    # ONNX Runtime's Python API refuses any other spelling of TensorRT's switches
    assert trt_options["trt_fp16_enable"] == "True"
    assert trt_options["trt_engine_cache_enable"] == "True"
    assert trt_options["trt_timing_cache_enable"] == "True"
    assert trt_options["trt_engine_cache_path"] == str(tmp_path)
    assert trt_options["trt_profile_min_shapes"] == "images:1x3x4x4"
    assert trt_options["trt_profile_max_shapes"] == "images:32x3x4x4"
    fp32 = tensorrt_provider_options(Settings(), _with(tensorrt=TensorRT(precision="fp32")))
    assert fp32["trt_fp16_enable"] == "False" and "trt_cuda_graph_enable" not in fp32
    graphs = _with(tensorrt=TensorRT(), cuda=CudaOptions(graphs=True, batch_buckets=[8]))
    assert tensorrt_provider_options(Settings(), graphs)["trt_cuda_graph_enable"] == "True"
    assert fp32["trt_engine_cache_path"].endswith("resnet-serve-tensorrt")


def test_tensorrt_falls_back_to_cuda() -> None:
    config = _with(tensorrt=TensorRT())
    # TensorRT does not come up: CUDA does
    assert _open("cuda", FakeFactory(tensorrt_comes_up=False), config=config).provider == CUDA
    # a build without the TensorRT provider: only CUDA is asked for
    factory = FakeFactory()
    opened = _open("cuda", factory, config=config, providers=(CUDA, CPU))
    assert opened.provider == CUDA and [p[0] for p in factory.calls[0]] == [CUDA]


def test_a_session_that_fails_for_tensorrt_comes_up_on_cuda(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """onnxruntime-gpu lists TensorRT wherever its libraries are missing too, and then fails
    the whole session: CUDA alone is asked for next, and the log says why."""
    factory = FakeFactory(tensorrt_raises=True)
    opened = _open("cuda", factory, config=_with(tensorrt=TensorRT()))
    assert opened.provider == CUDA
    assert [[p[0] for p in call] for call in factory.calls] == [[TENSORRT, CUDA], [CUDA]]
    said = [r.getMessage() for r in caplog.records if "TensorRT did not come up" in r.getMessage()]
    assert len(said) == 1 and "Please install TensorRT libraries" in said[0], said
    # where CUDA fails too, CUDA's failure is the reason given
    factory = FakeFactory(tensorrt_raises=True, cuda_raises=True)
    opened = _open("auto", factory, config=_with(tensorrt=TensorRT()))
    assert opened.provider == CPU and "no CUDA-capable device" in opened.reason
    with pytest.raises(DeviceUnavailable, match="no CUDA-capable device"):
        _open("cuda", FakeFactory(tensorrt_raises=True, cuda_raises=True),
              config=_with(tensorrt=TensorRT()))  # fmt: skip


def test_tensorrt_is_never_tried_unless_config_json_asks() -> None:
    factory = FakeFactory()
    _open("cuda", factory, config=CONFIG)
    assert [p[0] for p in factory.calls[0]] == [CUDA]


def test_why_no_cuda_gives_the_loaders_words(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "libonnxruntime_providers_cuda.so"
    monkeypatch.setattr(providers, "_provider_library", lambda: missing)
    assert "is not installed" in why_no_cuda()
    missing.write_bytes(b"not an ELF file")
    assert "does not load:" in why_no_cuda() and "file too short" in why_no_cuda()


def _runner(session: FakeSession, provider: str = CUDA, **options: Any) -> Runner:
    return Runner(
        Opened(session, provider, "test"), "images", "logits",
        io_binding=False, device_id=0, **options,
    )  # fmt: skip


def test_gpu_runner_pads_to_the_bucket_and_cuts_the_logits_back() -> None:
    session = FakeSession([CUDA, CPU])
    runner = _runner(session, buckets=(4, 8))
    logits = runner.run(np.ones((3, 3, 4, 4), np.float32))
    assert session.batches == [4] and logits.shape == (3, 3)
    runner.run(np.ones((5, 3, 4, 4), np.float32))
    assert session.batches == [4, 8]
    with pytest.raises(ValueError, match="above the largest bucket 8"):
        runner.run(np.ones((9, 3, 4, 4), np.float32))


def test_cpu_runner_never_pads() -> None:
    session = FakeSession([CPU])
    runner = _runner(session, CPU, buckets=(4, 8))
    runner.run(np.ones((3, 3, 4, 4), np.float32))
    assert session.batches == [3] and runner.buckets == ()


def test_a_session_that_leaves_the_gpu_is_caught_on_its_next_run() -> None:
    session = FakeSession([CUDA, CPU])
    runner = _runner(session, instance=1)
    runner.run(np.ones((1, 3, 4, 4), np.float32))
    session._providers = [CPU]  # what ONNX Runtime's run-time fallback does to a session
    with pytest.raises(ProviderLost, match="instance 1 was opened on CUDAExecutionProvider"):
        runner.run(np.ones((1, 3, 4, 4), np.float32))


def test_bucket_for() -> None:
    assert [bucket_for(n, (2, 8, 32)) for n in (1, 2, 3, 8, 9, 32)] == [2, 2, 8, 8, 32, 32]


def test_threads_default_to_cores_per_instance() -> None:
    settings = Settings()
    assert settings.threads_per_session(1, None) >= 1
    assert settings.threads_per_session(2, 3) == 3
    assert Settings(intra_op_threads=1).threads_per_session(1, 3) == 1


def _tiny_onnx(path: Path, elements: int = 1) -> Path:
    """A real graph: images [N,3,4,4] float32 (`elements`: an ONNX TensorProto type) →
    logits [N,3] of that type (spatial mean)."""
    from onnx import helper, save

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["images"], ["logits"], axes=[2, 3], keepdims=0)],
        "tiny",
        [helper.make_tensor_value_info("images", elements, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("logits", elements, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    save(model, path)
    return path


def test_real_session_on_this_machine_runs_and_says_nothing(tmp_path: Path) -> None:
    model = _tiny_onnx(tmp_path / "model.onnx")
    script = (
        "import sys, numpy as np\n"
        "from pathlib import Path\n"
        "from server.config import Settings\n"
        "from server.sessions import Runner, open_session\n"
        f"opened = open_session(Path({str(model)!r}), Settings(device='auto'), 1)\n"
        "runner = Runner(opened, 'images', 'logits', io_binding=True, device_id=0)\n"
        "out = runner.run(np.ones((2, 3, 4, 4), np.float32))\n"
        "print(opened.provider, out.shape)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stderr == ""
    provider, shape = result.stdout.split(" ", 1)
    assert provider in (CPU, CUDA) and shape.strip() == "(2, 3)"


def test_cpu_runner_runs_batches(tmp_path: Path) -> None:
    opened = open_session(_tiny_onnx(tmp_path / "m.onnx"), Settings(device="cpu"), 1)
    runner = Runner(opened, "images", "logits", io_binding=True, device_id=0)
    batch = np.arange(2 * 3 * 16, dtype=np.float32).reshape(2, 3, 4, 4)
    np.testing.assert_allclose(runner.run(batch), batch.mean(axis=(2, 3)), rtol=1e-6)


@pytest.mark.parametrize(
    ("settings", "spinning", "duration"),
    [
        (Settings(), "1", "20"),  # hot inside a run, asleep between requests
        (Settings(spin_duration_us=0), "1", None),  # ONNX Runtime's own duration
        (Settings(allow_spinning=False), "0", None),
    ],
)
def test_spinning_options(settings: Settings, spinning: str, duration: str | None) -> None:
    options = session_options(settings, 2)
    assert options.intra_op_num_threads == 2
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == spinning
    key = "session.intra_op.spin_duration_us"
    if duration is None:
        with pytest.raises(Exception, match=key):  # ORT raises its own bare Fail
            options.get_session_config_entry(key)
    else:
        assert options.get_session_config_entry(key) == duration


class OnGpu:
    """A real CPU session that says it runs on CUDA: a GPU runner's binding, staging and
    padding run for real on this machine, with its pinned buffers in CPU memory."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self._session = session
        # each run's input as bound: the array, the OrtValue, or the memory `ByAddress`
        self.fed: list[Any] = []
        self.refuse_by_address = False  # memory bound by address fails, as a GPU's might

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def get_providers(self) -> list[str]:
        return [CUDA, CPU]

    def run(self, outputs: Any, feed: dict[str, Any]) -> list[np.ndarray]:
        self.fed.extend(feed.values())
        return self._session.run(outputs, feed)

    def io_binding(self) -> Any:
        binding, fed = self._session.io_binding(), self.fed

        class Recorded:
            def __getattr__(self, name: str) -> Any:
                return getattr(binding, name)

            def bind_ortvalue_input(self, name: str, value: Any) -> None:
                fed.append(value)
                binding.bind_ortvalue_input(name, value)

            def bind_cpu_input(self, name: str, value: np.ndarray) -> None:
                fed.append(value)
                binding.bind_cpu_input(name, value)

            def bind_input(self, name: str, device: str, device_id: int, element: Any,
                           shape: list[int], address: int) -> None:  # fmt: skip
                bound = ByAddress(address, tuple(shape), _at(address, element, shape).copy())
                fed.append(bound)
                if outer.refuse_by_address:
                    raise RuntimeError("CUDA failure 1: invalid argument")
                binding.bind_input(name, device, device_id, element, shape, address)

        outer = self
        return Recorded()


@dataclass
class ByAddress:
    """An input bound by its memory's address: where, its shape, what it held then."""

    address: int
    shape: tuple[int, ...]
    data: np.ndarray


def _at(address: int, element: Any, shape: list[int]) -> np.ndarray:
    dtype = np.dtype(element)
    memory = (ctypes.c_char * (math.prod(shape) * dtype.itemsize)).from_address(address)
    return np.frombuffer(memory, dtype).reshape(shape)


def in_cpu_memory(shape: tuple[int, ...], dtype: np.dtype, device_id: int) -> Any:
    """What `page_locked` gives on a GPU node, in this machine's memory."""
    return ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, "cpu", 0)


def _on_gpu(tmp_path: Path, elements: int = 1, **options: Any) -> tuple[Runner, OnGpu]:
    model = _tiny_onnx(tmp_path / "m.onnx", elements)
    session = OnGpu(open_session(model, Settings(device="cpu"), 1).session)
    feed = graph_feed_dtype(session)  # type: ignore[arg-type]
    options.setdefault("allocate", in_cpu_memory)
    runner = Runner(Opened(session, CUDA, "test"), "images", "logits", device_id=0,  # type: ignore[arg-type]
                    feed_dtype=feed, **options)  # fmt: skip
    return runner, session


def _run_parts(runner: Runner, parts: list[np.ndarray]) -> np.ndarray:
    return runner.run_joined(*runner.join(parts))


def _parts(*sizes: int) -> list[np.ndarray]:
    """Requests' tensors of `sizes` images, every value distinct."""
    start, parts = 0, []
    for size in sizes:
        count = size * 3 * 16
        parts.append(np.arange(start, start + count, dtype=np.float32).reshape(size, 3, 4, 4))
        start += count
    return parts


def test_a_pinned_runner_joins_the_parts_into_one_reused_buffer_zero_padded(
    tmp_path: Path,
) -> None:
    runner, session = _on_gpu(tmp_path, io_binding=True, pinned=True, buckets=(4, 8))
    # a full bucket, one row short of it, the larger bucket, the smaller one again
    for sizes in [(2, 2), (1, 1, 1), (3, 2), (1,)]:
        parts = _parts(*sizes)
        logits = _run_parts(runner, parts)
        np.testing.assert_allclose(logits, np.concatenate(parts).mean(axis=(2, 3)), rtol=1e-6)
    bound = session.fed
    assert all(isinstance(value, ByAddress) for value in bound)
    assert [value.shape for value in bound] == [(4, 3, 4, 4)] * 2 + [(8, 3, 4, 4), (4, 3, 4, 4)]
    # one page-locked buffer, grown for the larger bucket: each batch in its first rows
    first, _, grown, again = (value.address for value in bound)
    assert bound[1].address == first != grown == again
    # the three images of the second run, then zeros where the first run's fourth was
    staged = bound[1].data
    np.testing.assert_array_equal(staged[:3], np.concatenate(_parts(1, 1, 1)))
    assert not staged[3].any() and not bound[2].data[5:].any() and not bound[3].data[1:].any()


def test_a_pinned_runner_warmed_at_every_size_holds_one_buffer_of_the_largest(
    tmp_path: Path,
) -> None:
    """A GPU warms every batch size 1..max: the page-locked memory grows by powers of two
    to the largest, one buffer at a time, not a buffer per size."""
    allocated: list[tuple[int, ...]] = []

    def counted(shape: tuple[int, ...], dtype: np.dtype, device_id: int) -> Any:
        allocated.append(shape)
        return in_cpu_memory(shape, dtype, device_id)

    runner, session = _on_gpu(tmp_path, io_binding=True, pinned=True, allocate=counted)
    for size in range(1, 10):
        _run_parts(runner, _parts(size))
    assert [shape[0] for shape in allocated] == [1, 2, 4, 8, 16]
    assert len(runner._hosts) == 1 and len(next(iter(runner._hosts.values()))[1]) == 16
    assert [value.shape[0] for value in session.fed] == list(range(1, 10))


def test_a_pinned_runner_casts_as_it_joins(tmp_path: Path) -> None:
    """A float16 graph (``--fp16-io``) gets the float32 requests cast in the same copy."""
    runner, session = _on_gpu(tmp_path, 10, io_binding=True, pinned=True)  # 10: FLOAT16
    parts = _parts(1, 2)
    logits = _run_parts(runner, parts)
    assert logits.dtype == np.float32 and session.fed[0].data.dtype == np.float16
    expected = np.concatenate(parts).astype(np.float16).mean(axis=(2, 3))
    np.testing.assert_allclose(logits, expected, rtol=1e-3)


def test_a_single_part_that_is_the_batch_is_read_where_it_is(tmp_path: Path) -> None:
    """No copy where none is needed: the tensor in the front end's slot is what the session
    reads; several parts, a bucket to pad to or a type to cast to make one array."""
    (part,) = _parts(3)
    runner, session = _on_gpu(tmp_path, io_binding=False)
    _run_parts(runner, [part])
    assert session.fed[-1] is part
    _run_parts(runner, _parts(1, 2))
    np.testing.assert_array_equal(session.fed[-1], np.concatenate(_parts(1, 2)))
    runner, session = _on_gpu(tmp_path, io_binding=True, buckets=(4,))
    _run_parts(runner, [part])
    assert session.fed[-1].shape == (4, 3, 4, 4) and not np.shares_memory(session.fed[-1], part)
    np.testing.assert_array_equal(session.fed[-1][:3], part)
    assert not session.fed[-1][3].any()


@pytest.mark.parametrize("elements", [1, 10])  # FLOAT, FLOAT16 (a ``--fp16-io`` graph)
def test_cuda_graphs_replay_one_binding_per_bucket_with_the_graphs_own_output_type(
    tmp_path: Path, elements: int
) -> None:
    """The graphs' runs bound for real (their buffers in this machine's memory): one fixed
    input and output per bucket, the output of the graph's own type, refilled each run."""
    runner, session = _on_gpu(tmp_path, elements, io_binding=True, graphs=True,
                              buckets=(2, 4), graph_memory="cpu")  # fmt: skip
    cast = np.float16 if elements == 10 else np.float32
    for sizes in [(1, 1), (1,), (2, 1), (1, 1, 1, 1), (1, 1)]:
        parts = [part.astype(cast) for part in _parts(*sizes)]
        logits = _run_parts(runner, parts)
        assert logits.dtype == np.float32 and len(logits) == sum(sizes)
        expected = np.concatenate(parts).mean(axis=(2, 3), dtype=np.float32)
        np.testing.assert_allclose(logits, expected, rtol=1e-3 if elements == 10 else 1e-6)
    assert sorted(runner._graph_bindings) == [2, 4]
    bound = [value for value in session.fed if isinstance(value, ort.OrtValue)]
    assert len(bound) == 2, "one input buffer per bucket, bound once"


def test_a_capture_waits_for_the_gpu_work_under_way_and_holds_back_new_work() -> None:
    """Shared holds overlap; a capture waits until they end, new shared holds wait behind
    a capture that waits, and go once it is done."""
    gate, said = CaptureGate(), []
    first_in, release_first, capture_done = (threading.Event() for _ in range(3))

    def first() -> None:
        with gate.shared():
            said.append("first runs")
            first_in.set()
            release_first.wait(5)
            said.append("first ends")

    def capture() -> None:
        with gate.alone():
            said.append("capture")
        capture_done.set()

    def later() -> None:
        with gate.shared():
            said.append("later runs")

    threads = [threading.Thread(target=first)]
    threads[0].start()
    assert first_in.wait(5)
    with gate.shared():  # shared holds overlap
        said.append("second runs")
    threads.append(threading.Thread(target=capture))
    threads[1].start()
    while not gate._waiting:  # the capture is waiting for the first run
        time.sleep(0.001)
    threads.append(threading.Thread(target=later))
    threads[2].start()
    time.sleep(0.05)
    assert said == ["first runs", "second runs"], "the capture and the later run wait"
    release_first.set()
    for thread in threads:
        thread.join(5)
    assert capture_done.is_set()
    assert said == ["first runs", "second runs", "first ends", "capture", "later runs"]


class Recording(CaptureGate):
    def __init__(self) -> None:
        super().__init__()
        self.holds: list[str] = []

    def shared(self) -> Any:
        self.holds.append("shared")
        return super().shared()

    def alone(self) -> Any:
        self.holds.append("alone")
        return super().alone()


def test_a_buckets_first_graph_runs_hold_the_gate_alone_and_later_ones_share_it(
    tmp_path: Path,
) -> None:
    gate = Recording()
    runner, _ = _on_gpu(tmp_path, io_binding=True, graphs=True, buckets=(2, 4),
                        graph_memory="cpu", gate=gate)  # fmt: skip
    for sizes in [(1, 1), (3,), (2,), (2,), (1,)]:  # buckets 2, 4, 2, 2, 2
        _run_parts(runner, _parts(*sizes))
    assert GRAPH_CAPTURE_RUNS == 2 and runner.warm_runs == 2  # warm-up makes the captures
    assert gate.holds == ["alone", "alone", "alone", "shared", "shared"]
    cpu = Runner(open_session(_tiny_onnx(tmp_path / "c.onnx"), Settings(device="cpu"), 1),
                 "images", "logits", io_binding=True, device_id=0, gate=gate)  # fmt: skip
    cpu.run(_parts(2)[0])
    assert len(gate.holds) == 5 and cpu.warm_runs == 1, "a CPU run holds nothing"


def test_without_page_locked_memory_a_pinned_runner_runs_from_ordinary_memory_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The real allocator on a machine whose onnxruntime has no CUDA provider (it cannot
    register the CUDA pinned allocator): every run still computes, from ordinary memory,
    and the reason is logged once."""
    runner, session = _on_gpu(tmp_path, io_binding=True, pinned=True, allocate=page_locked)
    for sizes in [(1, 2), (2,), (1, 1)]:
        parts = _parts(*sizes)
        logits = _run_parts(runner, parts)
        np.testing.assert_allclose(logits, np.concatenate(parts).mean(axis=(2, 3)), rtol=1e-6)
    assert all(isinstance(value, np.ndarray) for value in session.fed)  # bind_cpu_input
    said = [r.getMessage() for r in caplog.records if "page-locked" in r.getMessage()]
    assert len(said) == 1, said
    assert "it cannot be allocated" in said[0] and CUDA in said[0], said  # ONNX Runtime's why


def test_page_locked_memory_is_asked_of_the_cuda_provider_once_per_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where ONNX Runtime's environment has no allocator for a device's page-locked memory
    (onnxruntime-gpu registers none of its own), the CUDA provider's pinned allocator is
    registered for it: host-accessible memory of that NVIDIA device, once per device."""
    asked: list[tuple[str, int, Any, int]] = []

    def register(provider: str, memory: Any, options: Any, arena: Any) -> None:
        asked.append((provider, memory.device_id, memory.device_mem_type, memory.device_vendor_id))

    monkeypatch.setattr(ort, "create_and_register_allocator_v2", register)
    sessions._page_locked_memory.cache_clear()
    try:
        for device in (3, 3, 4):
            with pytest.raises(RuntimeError):  # nothing was registered here after all
                page_locked((2, 3), np.dtype(np.float32), device)
    finally:
        sessions._page_locked_memory.cache_clear()
    host = ort.OrtDeviceMemoryType.HOST_ACCESSIBLE
    assert asked == [(CUDA, 3, host, 0x10DE), (CUDA, 4, host, 0x10DE)]


def test_a_first_run_that_fails_on_page_locked_memory_runs_again_from_ordinary_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Memory that allocates but cannot be bound: the first run is answered from ordinary
    memory and the runner keeps to it, saying why."""
    runner, session = _on_gpu(tmp_path, io_binding=True, pinned=True)
    session.refuse_by_address = True
    for sizes in [(1, 2), (3,)]:
        parts = _parts(*sizes)
        logits = _run_parts(runner, parts)
        np.testing.assert_allclose(logits, np.concatenate(parts).mean(axis=(2, 3)), rtol=1e-6)
    kinds = [type(value).__name__ for value in session.fed]
    assert kinds == ["ByAddress", "ndarray", "ndarray"], kinds  # the failed bind, then ordinary
    said = [r.getMessage() for r in caplog.records if "page-locked" in r.getMessage()]
    assert len(said) == 1 and "a run bound to it failed" in said[0], said
