"""The image's own commands, run outside Docker.

The builder stage's model-building RUN step runs as written (through /bin/sh,
Docker's default shell, with the build args as environment variables, as
BuildKit passes them), with a small architecture given through the ARCHS build
arg (and once more with a checkpoint given through WEIGHTS, from a stand-in
build context). Then each runtime stage's ENTRYPOINT runs as written against that
repository, configured by the stage's own RESNET_SERVE_* variables with only
the paths and ports replaced; the stage's HEALTHCHECK command must report it
healthy, a Classify must succeed, and SIGTERM must end it with exit code 0.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

import pytest

from bench import serving
from tests.deploy import dockerfile, procs
from tests.deploy.dockerfile import ROOT

ARCH = "resnet18"  # the smallest ImageNet net: exercises the default 224 px preprocessing


def _healthcheck_command(stage: dockerfile.Stage) -> str:
    health = stage.last("HEALTHCHECK")
    assert health is not None
    _options, _, command = health.value.partition(" CMD ")
    assert command, f"HEALTHCHECK without CMD: {health.value}"
    return command.strip()


def run_builder_step(repo: Path, context: Path, **build_args: str) -> str:
    """Run the builder stage's model-building RUN as written; `context` stands in for the
    build context it mounts. Returns its output."""
    df = dockerfile.load()
    builder = df.stage("builder")
    (run,) = [r for r in builder.all("RUN") if "resnet-serve build" in r.value]
    flags, command = run.flags_and_rest()
    for mount in flags.get("mount", []):
        opts = dict(kv.partition("=")[::2] for kv in mount.split(","))
        if opts.get("type") == "bind" and opts.get("source") == ".":
            command = command.replace(opts["target"], str(context))
    args = {k: v for k, v in df.global_args.items() if v is not None}
    args |= {k: v for k, v in builder.args().items() if v is not None}
    assert {"ARCHS", "MODEL_REPO", "WEIGHTS", "PRECISION", "CALIBRATION"} <= set(args) | set(
        builder.args()
    )
    args |= {"MODEL_REPO": str(repo), **build_args}
    env = procs.image_env(procs.clean_env(**args), **builder.env())
    result = subprocess.run(
        ["/bin/sh", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, f"builder step failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def built_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("image") / "models"
    output = run_builder_step(repo, ROOT, ARCHS=ARCH)
    assert sorted(repo.glob(f"{ARCH}/*/model.onnx")), f"no model under {repo}:\n{output}"
    return repo


def test_builder_step_takes_a_checkpoint_from_the_context(tmp_path: Path) -> None:
    """WEIGHTS, a path inside the build context, reaches `resnet-serve build --weights`."""
    import torch

    from builder.options import ModelOptions
    from builder.resnet import create_model

    context = tmp_path / "context"
    checkpoint = context / "checkpoints" / "resnet20.pth"
    checkpoint.parent.mkdir(parents=True)
    torch.save(create_model("resnet20", ModelOptions(seed=7)).state_dict(), checkpoint)
    repo = tmp_path / "models"
    run_builder_step(repo, context, ARCHS="resnet20", WEIGHTS="checkpoints/resnet20.pth")
    (record,) = [json.loads(p.read_text()) for p in repo.glob("resnet20/*/verification.json")]
    recipe = record["recipe"]
    assert recipe["weights"] is not None, "the build ignored WEIGHTS"
    assert Path(recipe["weights"]) == checkpoint.resolve()
    assert recipe["weights_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()


def test_builder_step_passes_the_precision_and_calibration_folder(tmp_path: Path) -> None:
    """PRECISION and CALIBRATION (a folder inside the context) reach the build."""
    import numpy as np
    from PIL import Image

    context = tmp_path / "context"
    folder = context / "calibration"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(10):
        pixels = rng.integers(0, 256, size=(36, 36, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(folder / f"{index}.png")
    repo = tmp_path / "models"
    run_builder_step(repo, context, ARCHS="resnet20", PRECISION="int8", CALIBRATION="calibration")
    (record,) = [json.loads(p.read_text()) for p in repo.glob("resnet20/*/verification.json")]
    assert record["precision"] == "int8" and record["passed"]
    assert record["calibration"]["source"] == "folder"
    assert Path(record["calibration"]["path"]) == folder.resolve()


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("stage_name", ["runtime-cpu", "runtime"])
def test_entrypoint_serves_what_the_builder_built(
    built_repo: Path, stage_name: str, tmp_path: Path
) -> None:
    from resnet_serve_client import Client, HealthStatus

    df = dockerfile.load()
    stage = df.stage(stage_name)
    argv = stage.entrypoint() + stage.cmd()
    grpc_port, metrics_port = serving.free_port(), serving.free_port()
    image_env = {k: df.resolve(v, stage) for k, v in stage.env().items()
                 if k.startswith("RESNET_SERVE_")}  # fmt: skip
    env = procs.clean_env(**image_env)
    env |= {
        "RESNET_SERVE_REPO": str(built_repo),
        "RESNET_SERVE_PORT": str(grpc_port),
        "RESNET_SERVE_METRICS_PORT": str(metrics_port),
        "RESNET_SERVE_HTTP_PORT": str(serving.free_port()),
        # loopback only, here
        "RESNET_SERVE_HOST": "127.0.0.1",
        "RESNET_SERVE_METRICS_HOST": "127.0.0.1",
    }
    healthcheck = _healthcheck_command(stage)
    assert re.search(r"\$\{?RESNET_SERVE_PORT", healthcheck), "the probe follows the port"

    def healthy() -> bool:
        probe = subprocess.run(["/bin/sh", "-c", healthcheck], env=env, capture_output=True,
                               timeout=60)  # fmt: skip
        return probe.returncode == 0

    log = (tmp_path / "server.log").open("w+")
    server = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        procs.wait_until(healthy, server, f"{stage_name}: HEALTHCHECK passing")
        with Client(f"127.0.0.1:{grpc_port}", timeout=60) as client:
            assert client.health() is HealthStatus.SERVING
            (model,) = [m.name for m in client.list_models()]
            (result,) = client.classify(procs.jpeg(), model=model, top_k=5)
        assert len(result.classes) == 5 and result.model == model
        assert all(c.label for c in result.classes)
        assert procs.requests_total(metrics_port, "OK") == 1
    finally:
        code = procs.stop(server)
        log.seek(0)
        output = log.read()
        log.close()
    assert code == 0, f"{stage_name}: exit code {code} after SIGTERM\n{output[-4000:]}"
