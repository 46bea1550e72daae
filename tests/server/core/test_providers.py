"""Where each model version runs, decided by the registry over injected sessions.

The sessions are fakes (`tests.server.test_sessions.FakeFactory`) behind the real
`open_session`, so every step but ONNX Runtime's own is the server's code: the provider
choice, the fallback to the CPU at creation and at warm-up, ``--device cuda`` refusing to
start, every instance's provider in the metric, a session that leaves the GPU.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.config import Settings
from server.core.health import Health
from server.core.loader import GPU_MEMORY_SHARE, Loader, warmup_sizes
from server.core.manager import RepositoryManager
from server.core.registry import ModelRegistry, State
from server.drain import Drain
from server.errors import ModelNotReady
from server.metrics import Metrics
from server.providers import CPU, CUDA
from server.repository import (
    MODEL_FILE,
    Batching,
    CudaOptions,
    InputSpec,
    ModelConfig,
    Optimization,
    Verification,
    VersionPolicy,
    sha256_file,
)
from server.sessions import DeviceUnavailable, open_session
from tests.server.test_sessions import FakeFactory, FakeSession

CONFIG = ModelConfig(
    name="net",
    arch="resnet20",
    num_classes=3,
    input=InputSpec(size=4),
    batching=Batching(max_batch_size=6),
)


def with_instances(count: int) -> ModelConfig:
    return CONFIG.model_copy(
        update={"instances": CONFIG.instances.model_copy(update={"count": count})}
    )


def make_repo(tmp_path: Path, models: dict[str, ModelConfig], versions: int = 1) -> Path:
    """Verified versions whose model.onnx is a stand-in: the sessions are fakes."""
    repo = tmp_path / "repo"
    for name, config in models.items():
        model_dir = repo / name
        model_dir.mkdir(parents=True)
        config.model_copy(update={"name": name}).dump(model_dir)
        (model_dir / "labels.txt").write_text("a\nb\nc\n")
        for number in range(1, versions + 1):
            vdir = model_dir / str(number)
            vdir.mkdir()
            (vdir / MODEL_FILE).write_bytes(b"stand-in " + name.encode())
            Verification(passed=True, sha256=sha256_file(vdir / MODEL_FILE)).write(vdir)
    return repo


class WarmupFails(FakeFactory):
    """GPU sessions come up, then fail at batches above `fails_above` (out of memory)."""

    def __init__(self, fails_above: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fails_above = fails_above
        self.sessions: list[FakeSession] = []

    def __call__(self, *args: Any, **kwargs: Any) -> FakeSession:
        session = super().__call__(*args, **kwargs)
        self.sessions.append(session)
        if session.get_providers()[0] == CUDA:
            plain_run, limit = session.run, self.fails_above

            def run(outputs: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
                (batch,) = feed.values()
                if len(batch) > limit:
                    raise RuntimeError("CUDA failure 2: out of memory")
                return plain_run(outputs, feed)

            session.run = run  # type: ignore[method-assign]
        return session


@dataclass
class Core:
    """The serving core over injected sessions, wired as `server.app.start` wires it."""

    registry: ModelRegistry
    loader: Loader
    manager: RepositoryManager


def registry(
    repo: Path, factory: FakeFactory, *, driver: bool = True, **settings: Any
) -> tuple[Core, Metrics]:
    metrics = Metrics()
    opener = functools.partial(
        open_session,
        factory=factory,
        driver_present=lambda: driver,
        available=lambda: [CUDA, CPU],
        diagnose=lambda: "libcudart.so.13: cannot open shared object file",
    )
    chosen = Settings(repo=repo, io_binding=False, intra_op_threads=1, **settings)
    found = ModelRegistry()
    health = Health(found, metrics, Drain())
    loader = Loader(
        chosen, found, health, metrics, opener=opener, gpu_memory=lambda device: 10 << 30
    )
    manager = RepositoryManager(chosen, found, loader, health)
    manager.scan()
    return Core(found, loader, manager), metrics


async def load_all(found: Core) -> None:
    """Start-up loading as the server does it: through the repository manager."""
    await found.manager.load_all()


def provider_samples(metrics: Metrics) -> dict[tuple[str, str, str, str], float]:
    [family] = [
        f for f in metrics.registry.collect() if f.name == "resnet_serve_execution_provider"
    ]
    return {
        (
            s.labels["model"],
            s.labels["version"],
            s.labels["instance"],
            s.labels["provider"],
        ): s.value
        for s in family.samples
    }


async def test_auto_on_the_gpu_records_every_instance_and_warms_every_size(tmp_path: Path) -> None:
    config = with_instances(2)
    factory = WarmupFails(fails_above=99)
    found, metrics = registry(make_repo(tmp_path, {"net": config}), factory, device="auto")
    await load_all(found)
    mv = found.registry.get("net")
    assert mv.state is State.READY and mv.providers == (CUDA, CUDA)
    assert provider_samples(metrics) == {
        ("net", "1", "0", CUDA): 1.0,
        ("net", "1", "1", CUDA): 1.0,
    }
    for session in factory.sessions:
        assert session.batches == [1, 2, 3, 4, 5, 6], "every size the batcher can form"
    await found.registry.close()


class SwapsTheFile(FakeFactory):
    """Replaces model.onnx on disk as each session is created: after the version check."""

    def __init__(self, model_file: Path) -> None:
        super().__init__()
        self.model_file = model_file

    def __call__(self, *args: Any, **kwargs: Any) -> FakeSession:
        self.model_file.write_bytes(b"swapped in between the check and the load")
        return super().__call__(*args, **kwargs)


async def test_sessions_run_the_very_bytes_that_were_verified(tmp_path: Path) -> None:
    """model.onnx is read once, by the check; every session is created from those bytes, so
    a file replaced between the check and the load is never what runs."""
    repo = make_repo(tmp_path, {"net": with_instances(2)})
    model_file = repo / "net" / "1" / MODEL_FILE
    verified = model_file.read_bytes()
    factory = SwapsTheFile(model_file)
    found, _ = registry(repo, factory, device="cpu")
    await load_all(found)
    assert found.registry.get("net").state is State.READY
    assert factory.models == [verified, verified]
    record = Verification.load(model_file.parent)
    assert hashlib.sha256(factory.models[0]).hexdigest() == record.sha256  # type: ignore[arg-type]
    assert model_file.read_bytes() != verified  # the file did change under the load
    await found.registry.close()


async def test_auto_reopens_on_the_cpu_when_gpu_warm_up_fails_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    factory = WarmupFails(fails_above=4)
    found, metrics = registry(make_repo(tmp_path, {"net": CONFIG}), factory, device="auto")
    with caplog.at_level(logging.WARNING, "server.core.loader"):
        await load_all(found)
    mv = found.registry.get("net")
    assert mv.state is State.READY and mv.providers == (CPU,)
    assert provider_samples(metrics) == {("net", "1", "0", CPU): 1.0}
    [line] = [r.getMessage() for r in caplog.records if "reopening it on the CPU" in r.message]
    assert "warm-up on CUDAExecutionProvider failed: CUDA failure 2: out of memory" in line
    assert factory.sessions[-1].batches == [1, 2, 4, 6], "the CPU's own warm-up sizes"
    await found.registry.close()


async def test_auto_without_cuda_says_why_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    factory = FakeFactory(cuda_comes_up=False)
    found, _ = registry(make_repo(tmp_path, {"net": CONFIG}), factory, device="auto")
    with caplog.at_level(logging.INFO, "server.core.loader"):
        await load_all(found)
    assert found.registry.get("net").providers == (CPU,)
    [line] = [r.getMessage() for r in caplog.records if "runs on" in r.message]
    assert "runs on CPUExecutionProvider" in line and "libcudart.so.13" in line
    await found.registry.close()


@pytest.mark.parametrize(
    ("factory", "driver", "why"),
    [
        (FakeFactory(), False, "no CUDA driver found"),
        (FakeFactory(cuda_comes_up=False), True, "libcudart.so.13"),
        (WarmupFails(fails_above=4), True, "warm-up on CUDAExecutionProvider failed"),
    ],
)
async def test_device_cuda_refuses_to_load_anywhere_else(
    tmp_path: Path, factory: FakeFactory, driver: bool, why: str
) -> None:
    found, metrics = registry(
        make_repo(tmp_path, {"net": CONFIG}), factory, driver=driver, device="cuda"
    )
    with pytest.raises(DeviceUnavailable, match=f"--device cuda, but .*{why}"):
        await load_all(found)
    assert all(call != [CPU] for call in factory.calls), "never opened on the CPU"
    assert provider_samples(metrics) == {}
    await found.registry.close()


async def test_device_cuda_after_the_start_refuses_only_the_version_off_the_gpu(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A model found by a later poll that cannot run on the GPU does not end the server (its
    start is over): that version alone is UNAVAILABLE, saying why, the others serve on."""
    factory = FakeFactory()
    repo = make_repo(tmp_path, {"net": CONFIG})
    found, _ = registry(repo, factory, device="cuda")
    await load_all(found)
    factory.cuda_comes_up = False
    make_repo(tmp_path, {"late": CONFIG})  # added to the same repository
    with caplog.at_level(logging.ERROR, "server.core.loader"):
        await found.manager.poll()
    late = found.registry.model("late").version("1")
    assert late.state is State.UNAVAILABLE and "does not run on the GPU" in late.reason
    [line] = [r.getMessage() for r in caplog.records if "late" in r.getMessage()]
    assert "--device cuda, but" in line and "libcudart.so.13" in line
    assert found.registry.get("net").state is State.READY
    await found.registry.close()


async def test_an_int8_version_on_the_gpu_is_served_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """int8 graphs are for CPUs: on CUDA they serve, and the log says to build fp16."""
    repo = make_repo(tmp_path, {"net": CONFIG, "plain": CONFIG})
    vdir = repo / "net" / "1"
    Verification(passed=True, sha256=sha256_file(vdir / MODEL_FILE), precision="int8").write(vdir)
    found, _ = registry(repo, FakeFactory(), device="auto")
    with caplog.at_level(logging.WARNING, "server.core.loader"):
        await load_all(found)
    assert found.registry.get("net").state is State.READY
    said = [r.getMessage() for r in caplog.records if "int8" in r.getMessage()]
    assert len(said) == 1 and "model net version 1 is int8" in said[0], said
    assert "build fp16 for GPUs" in said[0]
    await found.registry.close()


async def test_one_instance_off_the_gpu_moves_every_instance_to_the_cpu(tmp_path: Path) -> None:
    class SecondFails(FakeFactory):
        def __call__(self, *args: Any, **kwargs: Any) -> FakeSession:
            self.cuda_comes_up = len(self.calls) == 0
            return super().__call__(*args, **kwargs)

    config = with_instances(3)
    found, _ = registry(make_repo(tmp_path, {"net": config}), SecondFails(), device="auto")
    await load_all(found)
    assert found.registry.get("net").providers == (CPU, CPU, CPU)
    await found.registry.close()


async def test_a_version_whose_session_leaves_the_gpu_stops_serving(tmp_path: Path) -> None:
    factory = WarmupFails(fails_above=99)
    found, metrics = registry(make_repo(tmp_path, {"net": CONFIG}), factory, device="auto")
    await load_all(found)
    mv = found.registry.get("net")
    batch = np.zeros((2, 3, 4, 4), np.float32)
    assert (await mv.infer(batch)).shape == (2, 3)
    factory.sessions[0]._providers = [CPU]  # ONNX Runtime moved it to the CPU
    with pytest.raises(ModelNotReady, match="left the GPU"):
        await mv.infer(batch)
    assert mv.state is State.UNAVAILABLE
    assert provider_samples(metrics) == {}, "no series claims the GPU any more"
    with pytest.raises(ModelNotReady):
        found.registry.get("net")
    await found.registry.close()


async def test_bucket_sizes_are_all_a_gpu_version_warms_and_runs(tmp_path: Path) -> None:
    config = CONFIG.model_copy(
        update={"optimization": Optimization(cuda=CudaOptions(batch_buckets=(2,)))}
    )
    factory = WarmupFails(fails_above=99)
    found, _ = registry(make_repo(tmp_path, {"net": config}), factory, device="auto")
    await load_all(found)
    [session] = factory.sessions
    assert session.batches == [2, 6]
    logits = await found.registry.get("net").infer(np.zeros((3, 3, 4, 4), np.float32))
    assert logits.shape == (3, 3) and session.batches[-1] == 6
    await found.registry.close()


def test_gpu_sessions_share_the_gpus_memory(tmp_path: Path) -> None:
    two = with_instances(2)
    repo = make_repo(tmp_path, {"a": CONFIG, "b": two}, versions=2)
    found, _ = registry(repo, FakeFactory(), device="auto")
    # 2 versions x 1 instance + 2 versions x 2 instances = 6 sessions
    assert found.loader.session_mem_limit() == int((10 << 30) * GPU_MEMORY_SHARE) // 6
    flagged, _ = registry(repo, FakeFactory(), device="auto", cuda_mem_limit=1 << 20)
    assert flagged.loader.session_mem_limit() is None, "the flag is passed as it is"
    cpu, _ = registry(repo, FakeFactory(), device="cpu")
    assert cpu.loader.session_mem_limit() is None


@pytest.mark.parametrize(
    ("policy", "sessions"),
    [
        ({"latest": {"num_versions": 1}}, 1),
        ({"specific": {"versions": [2, 3, 9]}}, 2),
        ({"all": {}}, 4),
    ],
)
def test_the_share_counts_the_versions_the_policy_can_serve(
    tmp_path: Path, policy: dict[str, Any], sessions: int
) -> None:
    """Versions kept on disk that the version policy leaves out take no share."""
    config = CONFIG.model_copy(update={"version_policy": VersionPolicy(**policy)})
    found, _ = registry(make_repo(tmp_path, {"a": config}, versions=4), FakeFactory(),
                        device="auto")  # fmt: skip
    assert found.loader.session_mem_limit() == int((10 << 30) * GPU_MEMORY_SHARE) // sessions


async def test_the_share_reaches_every_gpu_session(tmp_path: Path) -> None:
    factory = FakeFactory()
    found, _ = registry(make_repo(tmp_path, {"net": CONFIG}), factory, device="cuda")
    await load_all(found)
    [(_, options)] = factory.calls[0]
    assert options["gpu_mem_limit"] == str(int((10 << 30) * GPU_MEMORY_SHARE))
    await found.registry.close()


def test_warmup_sizes_on_the_cpu() -> None:
    batching = Batching(max_batch_size=12, preferred_batch_sizes=(6,))
    config = CONFIG.model_copy(update={"batching": batching})
    assert warmup_sizes(config) == [1, 2, 4, 6, 8, 12]


def test_serve_device_cuda_without_a_gpu_exits_1_within_seconds_naming_the_reason(
    tmp_path: Path,
) -> None:
    repo = make_repo(tmp_path, {"net": CONFIG})
    command = [
        sys.executable, "-m", "server", "--repo", str(repo), "--device", "cuda",
        "--host", "127.0.0.1", "--port", "0", "--metrics-host", "127.0.0.1", "--metrics-port", "0",
    ]  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert time.monotonic() - started < 30
    [line] = [line for line in result.stderr.splitlines() if "--device cuda, but" in line]
    assert "no CUDA provider" in line or "no CUDA driver" in line, line
