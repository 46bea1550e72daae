"""What validation returns: the request's accepted inputs and what goes back, and the
server's limits on one request."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from server.request import Output

DEFAULT_TOP_K = 5


@dataclass(frozen=True)
class Limits:
    """The server's limits on one request (from `server.config.Settings`)."""

    max_images: int
    max_image_pixels: int
    reject_non_finite: bool = False


@dataclass(frozen=True, slots=True)
class Unread:
    """The graph's own batch of `images`, checked against its declared shape but still to be
    read by the blocking `read` (typed elements: about 0.1 s per million values), which
    runs on the preprocessing pool."""

    images: int
    read: Callable[[], np.ndarray]


# One accepted image: an encoded file, uint8 pixels [H, W, 3] to resize, or a float32
# [C, H, W] tensor of the model's size.
Accepted = bytes | np.ndarray


@dataclass(slots=True)
class Inputs:
    """The images of one request, accepted: prepared one by one, or the graph's own batch."""

    images: Sequence[Accepted] = ()
    tensor: np.ndarray | Unread | None = None

    def __len__(self) -> int:
        if isinstance(self.tensor, Unread):
            return self.tensor.images
        return len(self.tensor) if self.tensor is not None else len(self.images)

    @property
    def sent_tensors(self) -> bool:
        """Whether the caller sent tensors (the graph's batch or pixels), not files."""
        return self.tensor is not None or not all(isinstance(i, bytes) for i in self.images)


@dataclass(slots=True)
class Checked:
    """A request as the model accepts it: its inputs, and what goes back (the top-k of a
    classify request; a v2 request's outputs, the model's output when none was asked)."""

    inputs: Inputs
    top_k: int = DEFAULT_TOP_K
    outputs: tuple[Output, ...] = ()
