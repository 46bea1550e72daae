"""The server's one configuration object.

Every field comes, in order of precedence, from a `resnet-serve serve` flag,
from an environment variable ``RESNET_SERVE_<FIELD>`` (``RESNET_SERVE_PORT``,
``RESNET_SERVE_MAX_IMAGE_BYTES`` …) or from the default below. The object is
built once in `server.serve` (or by a test) and handed to `server.app.start` and
from there to the constructors that need it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.repository import flags

ENV_PREFIX = "RESNET_SERVE_"


def available_cores() -> int:
    """CPU cores this process may run on (cgroup/affinity aware where the OS says)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


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
        None, gt=0, description="CUDA arena limit in bytes per session; unset: no limit"
    )
    io_binding: bool = Field(
        True, description="bind inputs/outputs with ONNX Runtime I/O binding on CUDA"
    )

    # CPU threads
    instances: int | None = Field(
        None, ge=1, description="sessions per model version; unset: each model's config.json"
    )
    intra_op_threads: int | None = Field(
        None,
        ge=1,
        description="ONNX Runtime threads per session; unset: config.json, else cores / instances",
    )
    allow_spinning: bool = Field(
        True,
        description="ONNX Runtime threads spin between parallel sections instead of sleeping",
    )
    spin_duration_us: int = Field(
        200,
        ge=0,
        description="how long an idle ONNX Runtime thread spins before it sleeps, so threads "
        "stay hot inside a run and sleep between requests; 0: ONNX Runtime's own default",
    )
    decode_workers: int | None = Field(
        None, ge=1, description="image decode threads; unset: one per core"
    )

    # limits
    max_image_bytes: int = Field(20 << 20, gt=0, description="encoded bytes per image")
    max_image_pixels: int = Field(
        40_000_000, gt=0, description="decoded pixels per image (width x height), from the header"
    )
    max_images_per_request: int = Field(64, gt=0, description="images in one request")
    max_message_bytes: int = Field(64 << 20, gt=0, description="gRPC message size, both directions")
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

    # lifecycle and observability
    grace_period: float = Field(
        30.0, ge=0, description="seconds to finish queued and in-flight calls after SIGTERM"
    )
    log_format: Literal["text", "json"] = Field("text", description="log line format")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")
    reflection: bool = Field(True, description="gRPC server reflection (grpcurl discovery)")

    # security of the gRPC port (docs/security.md)
    tls_cert: Path | None = Field(
        None, description="server certificate chain (PEM); with tls_key the gRPC port speaks TLS"
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

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
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

    def instances_for(self, configured: int) -> int:
        """Sessions per model version: flag/env, else the `configured` count of config.json."""
        return self.instances or configured

    def threads_per_session(self, instances: int, configured: int | None) -> int:
        """Intra-op threads for one session: flag/env, then config.json, then cores / instances.

        cores / instances keeps a model's sessions from competing for cores with each
        other. The decode workers share those cores too, which is why an idle ONNX
        Runtime thread spins only `spin_duration_us` (200 µs) before it sleeps, not
        ONNX Runtime's own, longer spin (`allow_spinning` is on by default, as in ONNX
        Runtime).
        """
        if self.intra_op_threads is not None:
            return self.intra_op_threads
        if configured is not None:
            return configured
        return max(1, available_cores() // instances)

    def decode_threads(self) -> int:
        return self.decode_workers or available_cores()


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
