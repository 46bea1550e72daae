"""How much CPU, /dev/shm and memory a server with front ends needs (docs/deploy.md,
"Processes in a pod"), and the quantities Kubernetes and Docker write those in.

With F front ends (``RESNET_SERVE_FRONTENDS``) of S bytes of shared memory each
(``RESNET_SERVE_FRONTEND_SHM_BYTES``):

- CPU: F + 1, a core per front end and one for the engine;
- /dev/shm: (F + 1) x S; the one segment more is a replaced front end's, which the engine
  keeps mapped until the batches reading it finish;
- memory: the engine's + F x `FRONTEND_MEMORY` + the /dev/shm above, since the pages
  written there count against the container's memory (a tmpfs, or a memory-backed emptyDir).
"""

from __future__ import annotations

import re

from server.config import Settings

# What one front end may hold besides its segment: measured at 105 MiB RSS (resnet20,
# two front ends, CPU); the rest is room for gRPC and HTTP buffers under load.
FRONTEND_MEMORY = 256 << 20
# What the manifests give the engine: the single process's request before the split
# (resnet50 on a GPU, ONNX Runtime and the CUDA libraries mapped).
ENGINE_MEMORY = 4 << 30


def default_segment() -> int:
    """`Settings.frontend_shm_bytes`'s default: a front end's segment when nothing sets it."""
    default = Settings.model_fields["frontend_shm_bytes"].default
    assert isinstance(default, int)
    return default


def auto_most() -> int:
    """The most front ends ``auto`` ever starts (a GPU node with many cores)."""
    return Settings(frontends="auto").frontend_count(cores=1024, gpu=True)


def frontends(value: str | None) -> int | None:
    """The count a ``RESNET_SERVE_FRONTENDS`` value sets: None for ``auto`` (or unset, whose
    default is ``auto``), which depends on the node."""
    chosen = Settings(frontends=value if value is not None else "auto").frontends
    return None if chosen == "auto" else int(chosen)


def shm_bytes(count: int, segment: int) -> int:
    """/dev/shm for `count` front ends of `segment` bytes each; none for one process."""
    return (count + 1) * segment if count else 0


def cpus(count: int) -> int:
    """CPUs for `count` front ends and the engine."""
    return count + 1


def memory(count: int, segment: int) -> int:
    """The least memory request (and limit) for `count` front ends."""
    return ENGINE_MEMORY + count * FRONTEND_MEMORY + shm_bytes(count, segment)


_K8S_SUFFIXES = {
    "": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
    "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
}  # fmt: skip


def k8s_quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity ("500m", "5", "320Mi", "8Gi") as a number."""
    match = re.fullmatch(r"([0-9.]+)(m|k|M|G|T|Ki|Mi|Gi|Ti)?", str(value).strip())
    assert match, f"not a Kubernetes quantity: {value!r}"
    return float(match[1]) * _K8S_SUFFIXES[match[2] or ""]


def docker_bytes(value: str | int) -> int:
    """A Docker size ("576m", "1g", "67108864"): b, k, m and g are powers of 1024."""
    match = re.fullmatch(r"(\d+)\s*([bkmg]?)b?", str(value).strip().lower())
    assert match, f"not a Docker size: {value!r}"
    return int(match[1]) << {"": 0, "b": 0, "k": 10, "m": 20, "g": 30}[match[2]]
