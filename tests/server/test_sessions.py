"""Provider choice with an injected session factory, and a real CPU session that stays quiet."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from server.config import Settings
from server.sessions import CPU, CUDA, DeviceUnavailable, Runner, open_session, session_options


class FakeSession:
    def __init__(self, providers: list[str]) -> None:
        self._providers = providers

    def get_providers(self) -> list[str]:
        return self._providers


class FakeFactory:
    """Records the providers asked for; `cuda_comes_up` decides what a CUDA request gets."""

    def __init__(self, cuda_comes_up: bool = True, cuda_raises: bool = False) -> None:
        self.cuda_comes_up = cuda_comes_up
        self.cuda_raises = cuda_raises
        self.calls: list[list[Any]] = []

    def __call__(self, path: str, options: ort.SessionOptions, providers: list[Any]) -> FakeSession:
        self.calls.append(providers)
        names = [p[0] if isinstance(p, tuple) else p for p in providers]
        if CUDA in names:
            if self.cuda_raises:
                raise RuntimeError("CUDA failure 100: no CUDA-capable device is detected")
            return FakeSession([CUDA, CPU] if self.cuda_comes_up else [CPU])
        return FakeSession([CPU])


def _open(device: str, factory: FakeFactory, *, driver: bool = True, **settings: Any) -> Any:
    return open_session(
        Path("model.onnx"),
        Settings(device=device, **settings),
        2,
        factory=factory,
        driver_present=lambda: driver,
        available=lambda: [CUDA, CPU],
    )


def test_auto_uses_cuda_when_the_session_comes_up_on_it() -> None:
    factory = FakeFactory()
    opened = _open("auto", factory, cuda_device_id=1, cuda_mem_limit=1 << 30)
    assert opened.provider == CUDA
    (name, options), cpu = factory.calls[0]
    assert (name, cpu) == (CUDA, CPU)
    assert options["device_id"] == "1"
    assert options["gpu_mem_limit"] == str(1 << 30)
    assert options["cudnn_conv_algo_search"] == "HEURISTIC"


def test_auto_falls_back_when_cuda_does_not_come_up() -> None:
    factory = FakeFactory(cuda_comes_up=False)
    opened = _open("auto", factory)
    assert opened.provider == CPU
    assert "did not come up" in opened.reason
    assert factory.calls[-1] == [CPU]


def test_auto_falls_back_when_the_cuda_session_raises() -> None:
    opened = _open("auto", FakeFactory(cuda_raises=True))
    assert opened.provider == CPU and "no CUDA-capable device" in opened.reason


def test_auto_without_a_driver_never_tries_cuda() -> None:
    factory = FakeFactory()
    opened = _open("auto", factory, driver=False)
    assert opened.provider == CPU and opened.reason == "no CUDA driver found"
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


@pytest.mark.parametrize(("driver", "comes_up"), [(False, True), (True, False)])
def test_cuda_demanded_but_unavailable_raises(driver: bool, comes_up: bool) -> None:
    with pytest.raises(DeviceUnavailable, match="--device cuda, but"):
        _open("cuda", FakeFactory(cuda_comes_up=comes_up), driver=driver)


def test_threads_default_to_cores_per_instance() -> None:
    settings = Settings()
    assert settings.threads_per_session(1, None) >= 1
    assert settings.threads_per_session(2, 3) == 3
    assert Settings(intra_op_threads=1).threads_per_session(1, 3) == 1


def _tiny_onnx(path: Path) -> Path:
    """A real graph: images [N,3,4,4] float32 → logits [N,3] (spatial mean)."""
    from onnx import TensorProto, helper, save

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["images"], ["logits"], axes=[2, 3], keepdims=0)],
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
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
        (Settings(), "1", "200"),  # hot inside a run, asleep between requests
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
