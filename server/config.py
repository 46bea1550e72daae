"""The server's one configuration object.

Every field comes, in order of precedence, from a `resnet-serve serve` flag,
from an environment variable ``RESNET_SERVE_<FIELD>`` (``RESNET_SERVE_PORT``,
``RESNET_SERVE_MAX_IMAGE_BYTES`` …) or from the default below. The object is
built once in `server.serve` (or by a test) and handed to `server.app.start` and
from there to the constructors that need it.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from server.repository import flags
from server.repository.flags import Flag

ENV_PREFIX = "RESNET_SERVE_"


CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _v2_quota(directory: Path) -> float | None:
    """CPUs allowed by ``cpu.max`` ("<quota> <period>" or "max <period>") in `directory`."""
    text = _read(directory / "cpu.max")
    if text is None:
        return None
    quota, _, period = text.partition(" ")
    try:
        return None if quota == "max" else int(quota) / int(period or 100_000)
    except (ValueError, ZeroDivisionError):
        return None


def _v1_quota(root: Path) -> float | None:
    """CPUs allowed by cgroup v1's CFS quota (``cpu.cfs_quota_us`` -1: none)."""
    for controller in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        quota, period = (_read(root / controller / f"cpu.cfs_{f}_us") for f in ("quota", "period"))
        if quota is None or period is None:
            continue
        try:
            q, p = int(quota), int(period)
        except ValueError:
            return None
        return q / p if q > 0 and p > 0 else None
    return None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The CPUs this process's cgroup quota allows (4.0 for a pod with ``limits.cpu: 4``), or
    None without a quota.

    cgroup v2: the smallest ``cpu.max`` from the process's own cgroup (``/proc/self/cgroup``,
    ``0::/path``) up to `root`; inside a container `root` is that cgroup itself. cgroup v1:
    ``cpu.cfs_quota_us / cpu.cfs_period_us`` of the ``cpu`` controller mounted under `root`.
    """
    own = root
    for line in (_read(proc_cgroup) or "").splitlines():
        if line.startswith("0::"):
            candidate = root / line[3:].lstrip("/")
            if candidate.is_dir():
                own = candidate
    limits = []
    directory = own
    while True:
        if (quota := _v2_quota(directory)) is not None:
            limits.append(quota)
        if directory == root or root not in directory.parents:
            break
        directory = directory.parent
    if limits:
        return min(limits)
    return _v1_quota(root)


def available_cores(cgroup: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """CPU cores this process may use: those it may run on (affinity), capped by the cgroup
    CPU quota (rounded down, at least 1), so a 4-CPU pod on a 64-core node counts 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_limit(cgroup, proc_cgroup)
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return cores


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    # where and what
    repo: Path = Field(Path("models"), description="model repository directory")
    host: str = Field("0.0.0.0", description="address the gRPC and HTTP servers bind")
    port: int = Field(8001, ge=0, le=65535, description="gRPC port (all services)")
    http_port: int = Field(
        8000,
        ge=0,
        le=65535,
        description="HTTP/REST port (v2 protocol, health, image classify) on the same host; "
        "0: no HTTP port",
    )
    metrics_host: str = Field("0.0.0.0", description="address the /metrics HTTP server binds")
    metrics_port: int = Field(8002, ge=0, le=65535, description="Prometheus /metrics port")

    # execution provider
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="auto: CUDA when a session really comes up on it, else CPU"
    )
    cuda_device_id: int = Field(0, ge=0, description="CUDA device ordinal")
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = Field(
        "HEURISTIC",
        description="cuDNN convolution algorithm search; EXHAUSTIVE re-searches per batch shape",
    )
    cuda_arena_extend_strategy: Literal["kNextPowerOfTwo", "kSameAsRequested"] = Field(
        "kNextPowerOfTwo", description="how the CUDA memory arena grows"
    )
    cuda_mem_limit: int | None = Field(
        None,
        gt=0,
        description="CUDA arena limit in bytes per session; unset: 0.8 of the GPU's memory "
        "divided between every session the repository's config.json files ask for",
    )
    io_binding: bool = Field(
        True, description="bind inputs/outputs with ONNX Runtime I/O binding on CUDA"
    )
    pinned_memory: bool = Field(
        True,
        description="with io_binding: join each batch straight into page-locked host memory "
        "(one buffer per image shape, reused, its rows the next power of two a batch needs), "
        "for a faster copy to the GPU; where "
        "onnxruntime offers none, a log line says why and batches go as when off; off: ONNX "
        "Runtime copies from the batch's own (pageable) memory (bind_cpu_input)",
    )
    tensorrt_cache_dir: Path | None = Field(
        None,
        description="where TensorRT engines are cached for models whose config.json opts in "
        "to TensorRT; unset: resnet-serve-tensorrt in the system's temporary directory",
    )

    # CPU threads
    instances: int | None = Field(
        None, ge=1, description="sessions per model version; unset: each model's config.json"
    )
    intra_op_threads: int | None = Field(
        None,
        ge=1,
        description="ONNX Runtime threads per session; unset: config.json, else cores / "
        "instances, cores capped by the container's cgroup CPU quota",
    )
    allow_spinning: bool = Field(
        True,
        description="ONNX Runtime threads spin between parallel sections instead of sleeping",
    )
    spin_duration_us: int = Field(
        20,
        ge=0,
        description="how long an idle ONNX Runtime thread spins before it sleeps, so threads "
        "stay hot inside a run and sleep between requests; 0: ONNX Runtime's own default",
    )
    decode_workers: int | None = Field(
        None, ge=1, description="image decode threads (of each front end); unset: one per core "
        "(cgroup quota aware), divided among the front ends"
    )

    # limits
    max_image_bytes: int = Field(20 << 20, gt=0, description="encoded bytes per image")
    max_image_pixels: int = Field(
        40_000_000, gt=0, description="decoded pixels per image (width x height), from the header"
    )
    max_images_per_request: int = Field(64, gt=0, description="images in one request")
    max_message_bytes: int = Field(
        40 << 20,
        gt=0,
        description="gRPC message size, both directions: 40 MiB holds the largest request the "
        "other limits allow, 64 float32 224x224 images as a tensor (36.75 MiB), with room to "
        "spare; raise it with max_images_per_request or larger inputs (an HTTP body too)",
    )
    max_concurrent_calls: int = Field(
        512,
        gt=0,
        description="calls being answered at once, server-wide (an open stream is one call; "
        "probes are not counted); more are answered RESOURCE_EXHAUSTED at once",
    )
    max_streams_per_connection: int = Field(
        128,
        gt=0,
        description="HTTP/2 streams (calls) one client connection may have open at once; a "
        "client's further calls wait on its side until one ends",
    )
    reject_non_finite: bool = Field(
        False,
        description="refuse float tensors holding NaN or Inf with INVALID_ARGUMENT; off: "
        "computed like any other input, as Triton does (docs/security.md)",
    )
    max_decode_backlog: int = Field(
        128,
        gt=0,
        description="images waiting for or in a decode worker, server-wide; more are refused "
        "with RESOURCE_EXHAUSTED at once (at least max_images_per_request)",
    )

    default_timeout: float = Field(
        60.0, gt=0, description="seconds a call that carries no deadline may take (each message "
        "of a stream without one); then DEADLINE_EXCEEDED, so nothing waits forever",
    )
    max_failed_batches: int = Field(
        5, ge=1, description="session runs of a model version that fail in a row (no success "
        "between) before the version stops serving: UNAVAILABLE, health NOT_SERVING",
    )
    session_run_timeout: float = Field(
        120.0, gt=0, description="seconds one session run may take; past it the model version "
        "stops serving (UNAVAILABLE, health NOT_SERVING) while that run goes on",
    )

    # connections (HTTP/2 keepalive and connection age)
    keepalive_time: float = Field(
        60.0, gt=0, description="seconds a connection may be quiet before the server pings the "
        "client to see it is still there",
    )
    keepalive_timeout: float = Field(
        20.0, gt=0, description="seconds to wait for the answer to that ping before the "
        "connection is closed and its calls cancelled (a dead peer)",
    )
    min_ping_interval: float = Field(
        10.0, gt=0, description="the shortest interval at which a client may ping, with or "
        "without calls (the SDK pings every 60 s; more often gets GOAWAY too_many_pings)",
    )
    max_connection_age: float = Field(
        600.0, ge=0, description="seconds after which a connection is asked to close (GOAWAY), "
        "so clients behind an L4 load balancer reconnect and spread onto new replicas; 0: never",
    )
    max_connection_age_grace: float = Field(
        60.0, ge=0, description="seconds the calls of a connection asked to close may still "
        "take before they are cancelled",
    )

    # the HTTP port's connections and bodies (docs/security.md)
    http_keepalive_timeout: float = Field(
        75.0, gt=0, description="seconds an HTTP connection may go without a whole request "
        "line and headers, from its start or its last answer: an idle connection, and one "
        "whose headers arrive slowly (slowloris), is closed then. Above the 60 s idle "
        "timeout of common load balancers, so they close first",
    )
    http_body_timeout: float = Field(
        60.0, gt=0, description="seconds an HTTP request's body may take to arrive once its "
        "headers are in; then 408 and the connection closed. The body is read before the "
        "call counts against max_concurrent_calls",
    )
    http_max_body_reads: int = Field(
        512, gt=0, description="HTTP request bodies being read at once, server-wide (each at "
        "most max_message_bytes, decompressed); more are answered 503 at once",
    )
    shared_memory_regions: int = Field(
        64,
        ge=0,
        description="system shared-memory regions registered at once, server-wide (Triton's "
        "extension: tensors read from and written to /dev/shm); 0 turns the extension off",
    )
    shared_memory_bytes: int = Field(
        4 << 30,
        gt=0,
        description="bytes of system shared memory registered at once, server-wide (the sum "
        "of the regions' byte_size; the server maps none of it, it reads what a request names)",
    )

    # processes
    frontends: Annotated[int | Literal["auto"], Flag(read=str, metavar="N|auto")] = Field(
        "auto",
        description="front-end processes sharing the gRPC and HTTP ports, beside one engine "
        "process that runs the models; 0: one process does everything; auto: where the "
        "models run on a GPU, one per core left once the engine has one (at most 8), "
        "else 0",
    )
    frontend_shm_bytes: int = Field(
        64 << 20,
        ge=1 << 20,
        description="shared memory per front end for the tensors of its requests in flight "
        "(in /dev/shm)",
    )

    # lifecycle and observability
    grace_period: float = Field(
        30.0, ge=0, description="seconds to finish queued and in-flight calls after SIGTERM"
    )
    model_control_mode: Literal["none", "poll", "explicit"] = Field(
        "none",
        description="none: the models found at start serve until exit; poll: the repository "
        "is rescanned every repository_poll_secs and new, removed and changed versions load "
        "and unload without a restart; explicit: v2 RepositoryModelLoad and "
        "RepositoryModelUnload load and unload models (behind the bearer token)",
    )
    load_model: Annotated[list[str], NoDecode, Flag(metavar="NAME")] = Field(
        [],
        description="with model_control_mode explicit, the models loaded at start (repeat "
        "the flag for more; * alone: every model; the env var a comma-separated list); the "
        "others stay unloaded until RepositoryModelLoad. Unset: none. Refused in the other "
        "modes, which load every model",
    )
    repository_poll_secs: float = Field(
        15.0, gt=0, description="seconds between rescans of the repository in poll mode"
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="log line format; json lines carry the trace_id while tracing is on"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")
    reflection: bool = Field(True, description="gRPC server reflection (grpcurl discovery)")
    trace_endpoint: str = Field(
        "",
        description="OTLP/gRPC endpoint (http://collector:4317) the spans of every call are "
        "exported to; unset: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else "
        "OTEL_EXPORTER_OTLP_ENDPOINT, else tracing is off. The other OTEL_* variables "
        "(sampler, batch processor, service name, headers) apply as usual (docs/deploy.md)",
    )

    # security of the gRPC port (docs/security.md)
    tls_cert: Path | None = Field(
        None,
        description="server certificate chain (PEM); with tls_key the gRPC and HTTP ports "
        "speak TLS",
    )
    tls_key: Path | None = Field(None, description="private key (PEM) of tls_cert")
    tls_client_ca: Path | None = Field(
        None,
        description="CA certificates (PEM) that client certificates must chain to: mutual TLS",
    )
    auth_token: SecretStr | None = Field(
        None,
        description="a bearer token every call but health checks must carry; prefer the env "
        "var to the flag, which the process list shows",
    )
    auth_token_file: Path | None = Field(
        None, description="file of accepted bearer tokens, one per line (# starts a comment)"
    )

    @field_validator("port", "metrics_port", mode="before")
    @classmethod
    def _not_a_service_link(cls, value: object, info: ValidationInfo) -> object:
        """A Kubernetes Service named ``resnet-serve`` makes the kubelet inject
        ``RESNET_SERVE_PORT=tcp://<cluster-ip>:8001`` into every pod of its namespace (and
        ``resnet-serve-metrics`` would inject ``RESNET_SERVE_METRICS_PORT``): say so, rather
        than a bare "not an integer"."""
        if isinstance(value, str) and "://" in value:
            name = env_var(info.field_name or "port")
            raise ValueError(
                f"{value!r} is not a port number; it looks like the service link a Kubernetes "
                f"Service injects as {name}. Set enableServiceLinks: false in the pod spec, "
                f"or {name} to the port number"
            )
        return value

    @field_validator("frontends", mode="before")
    @classmethod
    def _frontend_count(cls, value: object) -> object:
        """``auto`` or a whole number ≥ 0, refused in one error (not one per member of the
        union, and never a negative count that would start an engine without front ends)."""
        text = str(value).strip()
        if text == "auto":
            return text
        if isinstance(value, bool) or not text.isascii() or not text.isdigit():
            raise ValueError(
                f"frontends must be auto or a whole number >= 0 (0: one process), not {value!r}"
            )
        return int(text)

    @field_validator("load_model", mode="before")
    @classmethod
    def _model_names(cls, value: object) -> object:
        """``RESNET_SERVE_LOAD_MODEL=a,b``: a comma-separated list (the flag: one name each)."""
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.load_model and self.model_control_mode != "explicit":
            raise ValueError(
                f"load_model ({', '.join(self.load_model)}) needs model_control_mode explicit, "
                f"not {self.model_control_mode}: the {self.model_control_mode} mode loads every "
                "model of the repository at start"
            )
        if "*" in self.load_model and len(self.load_model) > 1:
            raise ValueError(
                "load_model * (every model) goes alone; give it once, without other names"
            )
        if self.max_decode_backlog < self.max_images_per_request:
            raise ValueError(
                f"max_decode_backlog ({self.max_decode_backlog}) must be at least "
                f"max_images_per_request ({self.max_images_per_request}), or the largest "
                "request could never be decoded"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        return self

    def grpc_connection_options(self) -> list[tuple[str, int]]:
        """The gRPC server options for keepalive and connection age (milliseconds)."""

        def ms(seconds: float) -> int:
            return int(seconds * 1000)

        options = [
            ("grpc.keepalive_time_ms", ms(self.keepalive_time)),
            ("grpc.keepalive_timeout_ms", ms(self.keepalive_timeout)),
            # gRPC waits for a ping's answer this long (default a minute), whatever the above
            ("grpc.http2.ping_timeout_ms", ms(self.keepalive_timeout)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", ms(self.min_ping_interval)),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        if self.max_connection_age:
            options += [
                ("grpc.max_connection_age_ms", ms(self.max_connection_age)),
                ("grpc.max_connection_age_grace_ms", ms(self.max_connection_age_grace)),
            ]
        return options

    def instances_for(self, configured: int) -> int:
        """Sessions per model version: flag/env, else the `configured` count of config.json."""
        return self.instances or configured

    def threads_per_session(
        self, instances: int, configured: int | None, cores: int | None = None
    ) -> int:
        """Intra-op threads for one session: flag/env, then config.json, then cores / instances
        (`cores`: `available_cores()`, the cgroup CPU quota where there is one).

        cores / instances keeps a model's sessions from competing for cores with each
        other. The decode workers share those cores too, which is why an idle ONNX
        Runtime thread spins only `spin_duration_us` (20 µs) before it sleeps, not
        ONNX Runtime's own, longer spin (`allow_spinning` is on by default, as in ONNX
        Runtime).
        """
        if self.intra_op_threads is not None:
            return self.intra_op_threads
        if configured is not None:
            return configured
        return max(1, (cores or available_cores()) // instances)

    def frontend_count(self, gpu: bool, cores: int | None = None) -> int:
        """Front-end processes: flag/env, else ``auto``: where the sessions run on a GPU
        (`gpu`: `server.providers.serves_on_gpu`) one per core left once the engine has
        one, at most 8; on a CPU node none (one process), since every core a front end
        takes is one ONNX Runtime does not get (docs/decisions/0012)."""
        if self.frontends != "auto":
            return int(self.frontends)
        if not gpu:
            return 0
        return max(1, min(8, (cores or available_cores()) - 1))

    def decode_threads(self, cores: int | None = None, frontends: int = 0) -> int:
        """Decode workers of one process: flag/env, else one per usable core
        (`available_cores()`), shared out among `frontends` front ends where there are any
        (each its own pool: they would otherwise take every core each)."""
        if self.decode_workers:
            return self.decode_workers
        usable = cores or available_cores()
        return max(1, usable // frontends) if frontends else usable


def env_var(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _env_and_default(name: str, field: FieldInfo) -> str:
    return f" [env {env_var(name)}, default {field.default}]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field (``--metrics-port``); an unset flag leaves env/default in charge."""
    flags.add_arguments(parser, Settings, _env_and_default)


def from_arguments(args: argparse.Namespace) -> Settings:
    """Flags given on the command line override env vars, which override defaults."""
    return Settings(**flags.given(args, Settings))
