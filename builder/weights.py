"""Where a build's weights come from, and loading a torchvision-format checkpoint (.pth/.pt
state dict, or .safetensors), strictly.

``--weights`` takes a file, a URL (``https://``, ``file://``: fetched once into the torch hub
cache, as torchvision does, its name's hash prefix checked), or ``torchvision``: that
architecture's ImageNet checkpoint from torchvision, found in the torch hub cache
(``$TORCH_HOME/hub/checkpoints``) or fetched into it from torchvision's URL.
"""

from __future__ import annotations

import re
import sys
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.hub
from torch import nn

from server.repository import sha256_file

_WRAPPER_KEYS = ("state_dict", "model")  # training scripts' {"state_dict": ...} / {"model": ...}
_DATA_PARALLEL_PREFIX = "module."
_LISTED = 20  # keys shown per category before "… and N more"


class WeightsError(ValueError):
    """The checkpoint cannot be read or does not fit the architecture."""


TORCHVISION = "torchvision"
TORCHVISION_URL = "https://download.pytorch.org/models/"
# torchvision's ImageNet checkpoints per architecture: its DEFAULT first (IMAGENET1K_V2 where
# there is one), then the older IMAGENET1K_V1; the names are those of torchvision's URLs.
TORCHVISION_CHECKPOINTS: dict[str, tuple[str, ...]] = {
    "resnet18": ("resnet18-f37072fd.pth",),
    "resnet34": ("resnet34-b627a593.pth",),
    "resnet50": ("resnet50-11ad3fa6.pth", "resnet50-0676ba61.pth"),
    "resnet101": ("resnet101-cd907fc2.pth", "resnet101-63fe2227.pth"),
    "resnet152": ("resnet152-f82ba261.pth", "resnet152-394f9c45.pth"),
    "resnext50_32x4d": ("resnext50_32x4d-1a0047aa.pth", "resnext50_32x4d-7cdf4587.pth"),
    "resnext101_32x8d": ("resnext101_32x8d-110c445d.pth", "resnext101_32x8d-8ba56ff5.pth"),
    "wide_resnet50_2": ("wide_resnet50_2-9ba9bcbe.pth", "wide_resnet50_2-95faca4d.pth"),
    "wide_resnet101_2": ("wide_resnet101_2-d733dc28.pth", "wide_resnet101_2-32ee1156.pth"),
}


@dataclass(frozen=True)
class WeightsSource:
    path: Path
    sha256: str
    origin: str = ""  # what --weights said, resolved: "torchvision <url>", a URL, or the file


def resolve_weights(spec: str | Path, arch: str) -> WeightsSource:
    """The local checkpoint that ``--weights SPEC`` names for ``arch`` (see the module)."""
    if isinstance(spec, Path):
        return weights_source(spec)
    if spec == TORCHVISION:
        return _torchvision(arch)
    if "://" in spec:
        return weights_source(fetch(spec), origin=spec)
    return weights_source(Path(spec))


def hub_checkpoints() -> Path:
    """torch's download cache for checkpoints (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def fetch(url: str) -> Path:
    """The file at ``url`` in the torch hub cache, fetched there unless it already is."""
    name = Path(urlparse(url).path).name
    if not name:
        raise WeightsError(f"weights URL {url} names no file")
    target = hub_checkpoints() / name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    found = re.search(torch.hub.HASH_REGEX, name)
    try:
        torch.hub.download_url_to_file(
            url, str(target), hash_prefix=found.group(1) if found else None,
            progress=sys.stderr.isatty(),
        )  # fmt: skip
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        raise WeightsError(f"cannot fetch weights from {url}: {exc}") from None
    return target


def _torchvision(arch: str) -> WeightsSource:
    names = TORCHVISION_CHECKPOINTS.get(arch)
    if names is None:
        raise WeightsError(
            f"torchvision has no ImageNet checkpoint for {arch}; it has them for "
            f"{', '.join(TORCHVISION_CHECKPOINTS)}"
        )
    cached = [hub_checkpoints() / n for n in names if (hub_checkpoints() / n).is_file()]
    path = cached[0] if cached else fetch(TORCHVISION_URL + names[0])
    return weights_source(path, origin=f"{TORCHVISION} {TORCHVISION_URL}{path.name}")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint, unwrapped from a training script's dict if needed."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt file makes the unpicklers raise almost anything
        kind = "safetensors file" if path.suffix == ".safetensors" else "PyTorch checkpoint"
        raise WeightsError(f"{path} is not a readable {kind}: {exc}") from None
    if isinstance(state, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise WeightsError(
            f"{path} does not hold a state dict (a mapping of parameter names to tensors, "
            f"possibly under one of the keys {', '.join(_WRAPPER_KEYS)})"
        )
    if state and all(k.startswith(_DATA_PARALLEL_PREFIX) for k in state):
        state = {k.removeprefix(_DATA_PARALLEL_PREFIX): v for k, v in state.items()}
    return state


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_LISTED]
    more = f"\n    … and {len(items) - _LISTED} more" if len(items) > _LISTED else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {item}" for item in shown) + more


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], arch: str) -> None:
    """Raise :class:`WeightsError` listing missing, unexpected and wrongly shaped keys."""
    expected = model.state_dict()
    # torchvision's older checkpoints predate BatchNorm's num_batches_tracked buffer.
    missing = [k for k in expected if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k}: checkpoint {tuple(state[k].shape)}, {arch} expects {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        parts = [
            _listing(title, items)
            for title, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("wrongly shaped keys", wrong_shape),
            )
            if items
        ]
        raise WeightsError(f"the checkpoint does not fit {arch}:\n" + "\n".join(parts))


def weights_source(path: Path, origin: str = "") -> WeightsSource:
    """The checkpoint's absolute path and sha256, recorded so a version can be re-verified."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    resolved = path.resolve()
    return WeightsSource(path=resolved, sha256=sha256_file(path), origin=origin or str(resolved))


def load_weights(model: nn.Module, path: Path, arch: str) -> None:
    """Load a checkpoint into ``model`` with ``strict=True``."""
    state = read_state_dict(path)
    check_state_dict(model, state, arch)
    own = model.state_dict()
    for key, value in own.items():
        if key.endswith(".num_batches_tracked"):
            state.setdefault(key, value)
    model.load_state_dict(state, strict=True)
