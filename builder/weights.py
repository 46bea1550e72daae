"""Loading a torchvision-format checkpoint (.pth/.pt state dict, or .safetensors), strictly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from server.repository import sha256_file

_WRAPPER_KEYS = ("state_dict", "model")  # training scripts' {"state_dict": ...} / {"model": ...}
_DATA_PARALLEL_PREFIX = "module."
_LISTED = 20  # keys shown per category before "… and N more"


class WeightsError(ValueError):
    """The checkpoint cannot be read or does not fit the architecture."""


@dataclass(frozen=True)
class WeightsSource:
    path: Path
    sha256: str


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


def weights_source(path: Path) -> WeightsSource:
    """The checkpoint's absolute path and sha256, recorded so a version can be re-verified."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    return WeightsSource(path=path.resolve(), sha256=sha256_file(path))


def load_weights(model: nn.Module, path: Path, arch: str) -> None:
    """Load a checkpoint into ``model`` with ``strict=True``."""
    state = read_state_dict(path)
    check_state_dict(model, state, arch)
    own = model.state_dict()
    for key, value in own.items():
        if key.endswith(".num_batches_tracked"):
            state.setdefault(key, value)
    model.load_state_dict(state, strict=True)
