"""The ``gpu`` extra on a machine without a GPU, in a venv of its own (about 2 GB of wheels,
so marked ``gpu_packages`` and left out of the default run: ``pytest -m gpu_packages``).

- Every library the CUDA provider links resolves from the extra's wheels except the
  driver's own ``libcuda.so.1``.
- A real CUDA session fails here, and the server says why in one line: ``--device cuda``
  raises with the loader's reason, ``--device auto`` runs on the CPU, nothing printed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from tests.server.test_sessions import _tiny_onnx

# the install alone takes minutes on a busy machine
pytestmark = [pytest.mark.gpu_packages, pytest.mark.timeout(3600)]
ROOT = Path(__file__).resolve().parents[2]


def gpu_extra() -> list[str]:
    """The one list: pyproject.toml's ``gpu`` extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["optional-dependencies"]["gpu"]


@pytest.fixture(scope="session")
def gpu_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("gpu-venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", *gpu_extra()], check=True, timeout=1800
    )
    site = Path(subprocess.check_output(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        text=True,
    ).strip())  # fmt: skip
    # the server's other dependencies from this venv, after the gpu venv's own packages
    (site / "zz-resnet-serve.pth").write_text(f"{ROOT}\n{sysconfig.get_paths()['purelib']}\n")
    return venv


def _site(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def test_every_library_the_cuda_provider_links_resolves_but_the_driver(gpu_venv: Path) -> None:
    site = _site(gpu_venv)
    provider = site / "onnxruntime" / "capi" / "libonnxruntime_providers_cuda.so"
    lib_dirs = sorted(str(d) for d in (site / "nvidia").glob("**/lib") if d.is_dir())
    env = {**os.environ, "LD_LIBRARY_PATH": ":".join(lib_dirs)}
    result = subprocess.run(["ldd", str(provider)], capture_output=True, text=True, env=env)
    missing = sorted(line.split()[0] for line in result.stdout.splitlines() if "not found" in line)
    assert missing == ["libcuda.so.1"], result.stdout


def test_a_real_cuda_session_fails_here_and_says_why(gpu_venv: Path, tmp_path: Path) -> None:
    model = _tiny_onnx(tmp_path / "model.onnx")
    script = (
        "import numpy as np\n"
        "from pathlib import Path\n"
        "from server.config import Settings\n"
        "from server.sessions import DeviceUnavailable, Runner, open_session\n"
        f"path = Path({str(model)!r})\n"
        "try:\n"
        "    open_session(path, Settings(device='cuda'), 1, driver_present=lambda: True)\n"
        "except DeviceUnavailable as exc:\n"
        "    print('cuda:', exc)\n"
        "opened = open_session(path, Settings(device='auto'), 1, driver_present=lambda: True)\n"
        "runner = Runner(opened, 'images', 'logits', io_binding=True, device_id=0)\n"
        "print('auto:', opened.provider, runner.run(np.ones((2, 3, 4, 4), np.float32)).shape)\n"
        "print('why:', opened.reason)\n"
    )
    result = subprocess.run(
        [str(gpu_venv / "bin" / "python"), "-c", script],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0 and result.stderr == "", result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert lines["cuda"].startswith("--device cuda, but libonnxruntime_providers_cuda.so does")
    assert "libcuda.so.1" in lines["cuda"], "the loader's own reason: no driver here"
    assert lines["auto"] == "CPUExecutionProvider (2, 3)"
    assert "libcuda.so.1" in lines["why"]
