#!/usr/bin/env python3
"""Build the images with Debian's Docker, a debootstrapped base and a wheelhouse: `make images`.

Nothing here needs a registry. The steps, each skipped when its result is cached
under .cache/images/ (gitignored) or wheelhouse/:

1. a Docker daemon: the one DOCKER_HOST or /var/run/docker.sock points at if it
   answers, else a private dockerd started as root (vfs storage, no iptables, no
   bridge: containers use the host network), its data under .cache/images/docker
   so that images and BuildKit's cache outlive it, its socket in a temp dir;
2. the base image: Debian bookworm `debootstrap --variant=minbase` with python3,
   python3-venv and ca-certificates, from the mirror apt uses, `docker import`ed;
3. the wheelhouse: every wheel the Dockerfile's pip steps install, for the base
   image's Python, fetched on the host with `pip download`;
4. `docker build` of each variant with PIP_NO_INDEX=1 (the wheelhouse only);
5. for the GPU image: every library ONNX Runtime's CUDA provider links must
   resolve inside the image, except the driver's own libcuda.so.1.

Stdlib only, so that `python3 deploy/images.py` runs before any venv exists.

    python3 deploy/images.py build                    # resnet-serve:cpu and resnet-serve:gpu
    python3 deploy/images.py build --variant cpu --archs resnet20 --tag-suffix -test
    python3 deploy/images.py daemon                   # start the daemon, print DOCKER_HOST
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
CACHE = ROOT / ".cache" / "images"
WHEELHOUSE = ROOT / "wheelhouse"

BASE_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
BASE_TAG = f"resnet-serve-base:{BASE_SUITE}-minbase"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_MIRROR = "http://deb.debian.org/debian"

# Docker build targets and image tags of each variant.
TARGETS = {"cpu": "runtime-cpu", "gpu": "runtime"}
# manylinux wheels Debian 12's glibc (2.36) loads.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64")  # fmt: skip
# The CUDA provider links these through the dynamic loader; the driver brings the first.
DRIVER_LIBRARIES = ("libcuda.so.1",)
DAEMON_START_LIMIT = 60.0
# Free disk the builds need under .cache/images (vfs copies every layer in full): the
# CPU builds took the data root to 12–15 GB, the GPU image 15 GB more (docs/deploy.md).
DISK_NEEDED = {"cpu": 20e9, "gpu": 20e9}


class Unavailable(RuntimeError):
    """Docker cannot run here (not root, no packages, the daemon does not start)."""


def log(message: str) -> None:
    print(f"images: {message}", file=sys.stderr, flush=True)


# --- what the Dockerfile pins ----------------------------------------------------------


def dockerfile_args() -> dict[str, str]:
    """The Dockerfile's global ARG defaults (before the first FROM), expanded."""
    args: dict[str, str] = {}
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("FROM "):
            break
        if match := re.match(r"ARG (\w+)=(.*)$", line.strip()):
            value = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m[1], m[0]), match[2])
            args[match[1]] = value.strip('"')
    return args


def torch_version() -> str:
    pinned = re.search(r'"torch==([\w.+]+)"', (ROOT / "pyproject.toml").read_text())
    assert pinned, "pyproject.toml pins torch in the builder extra"
    return pinned[1]


def runtime_requirements(variant: str) -> list[str]:
    """What the variant's runtime stage installs beside the service's own wheels
    (the same strings as its `pip install` in the Dockerfile; a test keeps them equal)."""
    args = dockerfile_args()
    if variant == "cpu":
        return [f"onnxruntime=={args['ORT_VERSION']}"]
    return [f"onnxruntime-gpu[cuda,cudnn]=={args['ORT_VERSION']}",
            f"nvidia-cublas~={args['CUDA_MAJOR']}.0"]  # fmt: skip


# --- the daemon ------------------------------------------------------------------------


def docker_client() -> str:
    """Debian's docker client: its BuildKit is built in (another client may need buildx)."""
    for candidate in (os.environ.get("DOCKER"), "/usr/bin/docker", shutil.which("docker")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise Unavailable("no docker client (as root: apt-get install docker.io)")


@dataclass
class Docker:
    client: str
    host: str  # DOCKER_HOST value

    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.host, "DOCKER_BUILDKIT": "1"}

    def run(self, *args: str, check: bool = True, timeout: float = 600,
            **kwargs: object) -> subprocess.CompletedProcess[str]:  # fmt: skip
        result = subprocess.run([self.client, *args], env=self.env(), capture_output=True,
                                text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]
        if check and result.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)}: exit {result.returncode}\n"
                               f"{result.stdout[-3000:]}{result.stderr[-3000:]}")  # fmt: skip
        return result

    def answers(self) -> bool:
        try:
            return self.run("version", "--format", "{{.Server.Version}}", check=False,
                            timeout=20).returncode == 0  # fmt: skip
        except subprocess.TimeoutExpired:
            return False

    def has_image(self, tag: str) -> bool:
        return self.run("image", "inspect", tag, check=False).returncode == 0

    def image_size(self, tag: str) -> int:
        return int(self.run("image", "inspect", "--format", "{{.Size}}", tag).stdout)


def unavailable_reason() -> str | None:
    """Why Docker cannot run here, in one line; None when it can."""
    if sys.platform != "linux":
        return "Docker images are built on Linux only"
    try:
        client = docker_client()
    except Unavailable as exc:
        return str(exc)
    for host in _existing_hosts():
        if Docker(client, host).answers():
            return None
    if os.geteuid() != 0:
        return "no Docker daemon answers and starting one needs root"
    missing = [p for p in ("dockerd", "debootstrap") if shutil.which(p, path=_sbin_path()) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (as root: `make deps-system`)"
    return None


def _sbin_path() -> str:
    return f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"


def _existing_hosts() -> list[str]:
    hosts = [os.environ["DOCKER_HOST"]] if os.environ.get("DOCKER_HOST") else []
    if Path("/var/run/docker.sock").is_socket():
        hosts.append("unix:///var/run/docker.sock")
    return hosts


@contextlib.contextmanager
def daemon() -> Iterator[Docker]:
    """A Docker daemon for the duration: an existing one, else a private dockerd."""
    client = docker_client()
    for host in _existing_hosts():
        docker = Docker(client, host)
        if docker.answers():
            yield docker
            return
    reason = unavailable_reason()
    if reason:
        raise Unavailable(reason)
    CACHE.mkdir(parents=True, exist_ok=True)
    # One private daemon per data root: a second `make images` or test run waits here.
    with (CACHE / "daemon.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        run_dir = Path(tempfile.mkdtemp(prefix="resnet-serve-docker-"))
        try:
            with _dockerd(client, run_dir) as docker:
                yield docker
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)


@contextlib.contextmanager
def _dockerd(client: str, run_dir: Path) -> Iterator[Docker]:
    config = run_dir / "daemon.json"
    config.write_text("{}\n")  # not the host's /etc/docker/daemon.json
    socket = run_dir / "docker.sock"
    command = [
        shutil.which("dockerd", path=_sbin_path()) or "dockerd",
        f"--config-file={config}", "--storage-driver=vfs",
        "--iptables=false", "--ip6tables=false", "--bridge=none",
        f"--data-root={CACHE / 'docker'}", f"--exec-root={run_dir / 'exec'}",
        f"--pidfile={run_dir / 'dockerd.pid'}", f"--host=unix://{socket}",
    ]  # fmt: skip
    log_path = run_dir / "dockerd.log"
    with log_path.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
    docker = Docker(client, f"unix://{socket}")
    try:
        deadline = time.monotonic() + DAEMON_START_LIMIT
        while not (socket.is_socket() and docker.answers()):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise Unavailable(f"dockerd did not start: {tail.strip().splitlines()[-1:]}")
            time.sleep(0.5)
        log(f"private dockerd running (DOCKER_HOST=unix://{socket})")
        yield docker
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# --- the base image --------------------------------------------------------------------


def debian_mirror() -> str:
    """The Debian mirror apt uses here (sources.list or deb822 .sources)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        with contextlib.suppress(OSError):
            for match in re.finditer(r"(?:^deb\s+(?:\[[^\]]*\]\s+)?|^URIs:\s*)(\S+/debian)/?\s",
                                     path.read_text(), re.MULTILINE):  # fmt: skip
                return match[1]
    return DEFAULT_MIRROR


def ensure_base(docker: Docker) -> str:
    """The debootstrapped base image, imported once; its rootfs tarball is cached too."""
    if docker.has_image(BASE_TAG):
        return BASE_TAG
    tarball = CACHE / "base" / f"{BASE_SUITE}-minbase.tar"
    if not tarball.exists():
        tarball.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="debootstrap-", dir=tarball.parent) as tmp:
            rootfs = Path(tmp) / "rootfs"
            mirror = debian_mirror()
            log(f"debootstrap {BASE_SUITE} minbase from {mirror}")
            started = time.monotonic()
            _run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                  BASE_SUITE, str(rootfs), mirror], what="debootstrap")  # fmt: skip
            for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for path in (rootfs / leftover).glob("*"):
                    if path.is_file():
                        path.unlink()
            python = (rootfs / "usr/bin/python3").resolve().name.removeprefix("python")
            (Path(tmp) / "python-version").write_text(python)
            partial = tarball.with_suffix(".partial")
            _run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), "."],
                 what="tar")  # fmt: skip
            partial.rename(tarball)
            tarball.with_suffix(".python").write_text(python)
            log(f"base rootfs in {time.monotonic() - started:.0f} s")
    python = tarball.with_suffix(".python").read_text().strip()
    with tarball.open("rb") as stream:
        docker.run("import", "--change", f"ENV PATH={BASE_PATH}", "--change", "ENV LANG=C.UTF-8",
                   "--change", f"LABEL org.resnet-serve.python={python}",
                   "-", BASE_TAG, stdin=stream)  # fmt: skip
    log(f"imported {BASE_TAG} (Python {python})")
    return BASE_TAG


def base_python(docker: Docker) -> str:
    out = docker.run("image", "inspect", "--format",
                     '{{index .Config.Labels "org.resnet-serve.python"}}', BASE_TAG)  # fmt: skip
    return out.stdout.strip()


def _run(command: Sequence[str], what: str, **kwargs: object) -> None:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed ({result.returncode}):\n"
                           f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")  # fmt: skip


# --- the wheelhouse --------------------------------------------------------------------


def fill_wheelhouse(variants: Sequence[str], python: str) -> None:
    """Download, for `python` on manylinux x86_64, every wheel the builder stage and the
    variants' runtime stages install. A stamp per variant skips it when nothing changed."""
    WHEELHOUSE.mkdir(exist_ok=True)
    for variant in variants:
        requirements = ["setuptools>=69", f"torch=={torch_version()}",
                        *runtime_requirements(variant)]  # fmt: skip
        stamp_text = json.dumps({
            "python": python, "requirements": requirements,
            "pyprojects": [hashlib.sha256(p.read_bytes()).hexdigest() for p in
                           (ROOT / "pyproject.toml", ROOT / "clients/python/pyproject.toml")],
        })  # fmt: skip
        stamp = WHEELHOUSE / f".filled-{variant}"
        if stamp.exists() and stamp.read_text() == stamp_text:
            continue
        log(f"wheelhouse: downloading the {variant} image's wheels for Python {python}")
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="local-wheels-") as tmp:
            # the two local projects as wheels, so pip resolves their dependencies by tags
            _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir",
                  tmp, str(ROOT / "clients/python"), str(ROOT)], what="pip wheel")  # fmt: skip
            (service,) = Path(tmp).glob("resnet_serve-*.whl")
            (client,) = Path(tmp).glob("resnet_serve_client-*.whl")
            platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
            _run([sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(WHEELHOUSE),
                  "--only-binary=:all:", "--implementation", "cp", "--python-version", python,
                  *platforms, f"{service}[builder,cpu]", str(client), *requirements],
                 what="pip download")  # fmt: skip
        for local in WHEELHOUSE.glob("resnet_serve*.whl"):
            local.unlink()  # the image builds its own from the sources
        torch = [w.name for w in WHEELHOUSE.glob("torch-*.whl")]
        if not any("+cpu" in name for name in torch) or list(WHEELHOUSE.glob("nvidia_nccl*")):
            raise RuntimeError(
                f"pip picked a CUDA build of torch ({torch}); point it at the CPU builds: "
                "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu"
            )
        stamp.write_text(stamp_text)
        log(f"wheelhouse: {variant} in {time.monotonic() - started:.0f} s")


# --- build and check -------------------------------------------------------------------


def image_tag(variant: str, suffix: str = "") -> str:
    return f"resnet-serve:{variant}{suffix}"


def build(docker: Docker, variant: str, tag: str, base: str, archs: str | None,
          log_path: Path | None = None) -> float:  # fmt: skip
    """`docker build` one variant from the wheelhouse only; returns the seconds it took."""
    command = ["build", "--network", "host", "--progress", "plain", "--target", TARGETS[variant],
               "--tag", tag, "--build-arg", f"PYTHON_IMAGE={base}",
               "--build-arg", "PIP_NO_INDEX=1", str(ROOT)]  # fmt: skip
    if archs:
        command[-1:-1] = ["--build-arg", f"ARCHS={archs}"]
    log(f"building {tag} (target {TARGETS[variant]})")
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(log_path.open("w")) if log_path else None
        result = subprocess.run([docker.client, *command], env=docker.env(), stdout=out,
                                stderr=subprocess.STDOUT if out else None, text=True)  # fmt: skip
    if result.returncode != 0:
        tail = log_path.read_text(errors="replace")[-6000:] if log_path else ""
        raise RuntimeError(f"docker build of {tag} failed ({result.returncode})\n{tail}")
    seconds = time.monotonic() - started
    log(f"{tag}: built in {seconds:.0f} s, {docker.image_size(tag) / 1e6:.0f} MB")
    return seconds


def unresolved_cuda_libraries(docker: Docker, tag: str) -> list[str]:
    """Libraries that ONNX Runtime's CUDA provider (and cuDNN, which it loads) link and the
    image's dynamic loader cannot find, less the driver's own."""
    script = (
        "set -e; cd /opt/venv/lib/python3*/site-packages; "
        "ldd onnxruntime/capi/libonnxruntime_providers_cuda.so; "
        "for lib in $(find nvidia -name 'libcudnn*.so.*'); do ldd \"$lib\"; done"
    )
    out = docker.run("run", "--rm", "--network", "none", "--entrypoint", "/bin/sh", tag,
                     "-c", script).stdout  # fmt: skip
    assert "libcublas" in out, f"ldd printed no CUDA library:\n{out}"
    missing = {line.split()[0] for line in out.splitlines() if "not found" in line}
    return sorted(missing - set(DRIVER_LIBRARIES))


def build_images(docker: Docker, variants: Sequence[str], archs: str | None = None,
                 suffix: str = "", log_dir: Path | None = None) -> dict[str, str]:  # fmt: skip
    """Everything `make images` does, given a daemon; returns {variant: tag}."""
    CACHE.mkdir(parents=True, exist_ok=True)
    free, needed = shutil.disk_usage(CACHE).free, sum(DISK_NEEDED[v] for v in variants)
    if free < needed:
        raise Unavailable(f"{free / 1e9:.0f} GB free under {CACHE}, the builds need about "
                           f"{needed / 1e9:.0f} GB (vfs storage copies every layer)")  # fmt: skip
    base = ensure_base(docker)
    fill_wheelhouse(variants, base_python(docker))
    tags = {}
    for variant in variants:
        tag = image_tag(variant, suffix)
        log_path = log_dir / f"build-{variant}{suffix}.log" if log_dir else None
        build(docker, variant, tag, base, archs, log_path)
        if variant == "gpu":
            missing = unresolved_cuda_libraries(docker, tag)
            if missing:
                raise RuntimeError(f"{tag}: CUDA provider libraries not found: {missing}")
            log(f"{tag}: every library the CUDA provider links resolves but "
                f"{', '.join(DRIVER_LIBRARIES)} (the driver's)")  # fmt: skip
        tags[variant] = tag
    return tags


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy/images.py", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_cmd = commands.add_parser("build", help="build the images (the default: both)")
    build_cmd.add_argument("--variant", action="append", choices=sorted(TARGETS),
                           help="cpu, gpu; repeatable (default: both)")
    build_cmd.add_argument("--archs", help="the ARCHS build argument (default: the Dockerfile's)")
    build_cmd.add_argument("--tag-suffix", default="", help="appended to each tag")
    commands.add_parser("daemon", help="start the private daemon and keep it up (Ctrl-C stops it)")
    args = parser.parse_args(argv)
    try:
        with daemon() as docker:
            if args.command == "daemon":
                print(f"export DOCKER_HOST={docker.host}", flush=True)
                # SIGTERM or SIGINT (ignored by default in a background job) stops it cleanly
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, lambda *_: sys.exit(0))
                signal.pause()
                return 0
            tags = build_images(docker, args.variant or ["cpu", "gpu"], args.archs,
                                args.tag_suffix)  # fmt: skip
            for tag in tags.values():
                print(f"{tag}\t{docker.image_size(tag) / 1e6:.0f} MB")
    except Unavailable as exc:
        log(f"cannot run Docker here: {exc}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
