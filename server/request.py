"""The one protocol-neutral inference request: what every adapter decodes its wire format
into, and what the request path, validation and the engine see.

Plain data, no callbacks and no wire types: the images as the caller sent them
(encoded files or pixels) or the input tensors with their declared shapes and data
still as bytes or elements, what the caller wants back, its id and deadline. Nothing
here is checked against a model: `server.validation` does that once the model is known,
so a request that names an unknown model is NOT_FOUND whatever else is wrong with it.
What an adapter could not read at all travels as `Invalid` in the place it belongs, and
validation raises it there, in the order the checks of a request run.

The role of KServe's ``InferRequest`` and MLServer's types: an adapter is a
``from_wire`` (in `server.protocols`) and a ``to_wire`` of the `Result`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Invalid:
    """What an adapter could not read: the message `server.validation` raises (400)."""

    message: str


@dataclass(slots=True)
class Elements:
    """A tensor's elements as the protocol carried them (typed values, JSON numbers or
    strings; flat or nested, row-major), still to be read; ``where`` names what held them
    (``'data'``, ``'fp32_contents'``)."""

    values: Sequence[Any]
    where: str
    flat: bool = False  # one value per element (typed contents): counted before reading


@dataclass(frozen=True, slots=True)
class SharedRegion:
    """A tensor's bytes in a registered shared-memory region (Triton's system shared-memory
    extension): the region's name, and ``byte_size`` bytes at ``offset`` into it. Nothing is
    checked here: `server.validation` checks the reference against the table and the tensor
    (`server.shared_memory`) and reads it."""

    region: str
    offset: int
    byte_size: int


# A tensor's data: raw bytes (little-endian, row-major; BYTES length-prefixed), elements,
# a shared-memory region's range, or what the adapter could not read.
TensorData = bytes | memoryview | Elements | SharedRegion | Invalid


@dataclass(slots=True)
class Tensor:
    """One input tensor as declared: v2 datatype name (``FP32``, ``UINT8``, ``BYTES``...),
    shape, data, and the names of its parameters."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: TensorData
    parameters: frozenset[str] = frozenset()


@dataclass(slots=True)
class Pixels:
    """One image sent as pixels: ``uint8`` [height, width, 3] or ``float32`` [C, H, W] raw
    bytes; ``dtype`` "" when the caller set none."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes


# One image of a classify request: an encoded file (JPEG, PNG, ...) or pixels.
Image = bytes | Pixels | Invalid


@dataclass(slots=True)
class Output:
    """An output the caller asks for: its name, the classification extension's k (None:
    the tensor itself), whether it goes back as binary (HTTP), its parameter names, the
    shared-memory range it goes into (then the response carries no data), and what the
    adapter could not read of it."""

    name: str
    classes: Any = None  # an int >= 1 when valid; validation says what else came
    binary: bool = False
    parameters: frozenset[str] = field(default=frozenset(), compare=False)
    invalid: Invalid | None = field(default=None, compare=False)
    region: SharedRegion | None = field(default=None, compare=False)


@dataclass(slots=True)
class InferRequest:
    """One inference request. A classify request (v1 ``Classify``, HTTP ``classify``) has
    ``top_k`` and ``images``; a v2 request has ``inputs`` and ``outputs`` (none: the
    model's output as a tensor)."""

    model: str
    version: str = ""  # "" for the latest ready version
    id: str = ""  # "" to have one made
    deadline: float | None = None  # `time.monotonic()` value, None for no deadline
    images: tuple[Image, ...] = ()
    top_k: int | None = None
    inputs: tuple[Tensor, ...] = ()
    outputs: tuple[Output, ...] = ()

    @property
    def classify(self) -> bool:
        return self.top_k is not None

    def declared_images(self) -> int:
        """The images the request declares: a classify request's images, a v2 request's
        batch (its one input's first dimension); what the images counter adds on success."""
        if self.classify:
            return len(self.images)
        if len(self.inputs) == 1 and self.inputs[0].shape:
            return self.inputs[0].shape[0]
        return 0
