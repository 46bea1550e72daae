"""The one request path: a protocol's request in, per-image logits (or a domain error) out.

Every inference RPC (``Classify``, ``ClassifyStream``, v2 ``ModelInfer``,
``ModelStreamInfer``) is a thin adapter in `server.protocols` that turns its
message into a `Request`, calls `RequestPath.infer`, and turns the `Result`
into its response. Here, in order:

1. the request id (the caller's or a new one) is set in `REQUEST_ID` for the logs; a
   caller's id is echoed in the answer as Triton does, so one that is not 1 to
   `MAX_REQUEST_ID` visible ASCII characters (no spaces, no control characters) is
   refused with INVALID_ARGUMENT, never silently replaced;
2. the model version is looked up (NOT_FOUND and UNAVAILABLE before anything is counted);
3. from then on the request is counted by `Metrics.track_request`, with the caller's
   deadline, so a call cancelled at its deadline counts as DEADLINE_EXCEEDED; a request
   without one gets ``default_timeout`` and fails with DEADLINE_EXCEEDED when it passes;
4. limits are checked before any work: the images the message declares
   (`Request.images`), at most ``max_images_per_request``;
5. the adapter reads its message against the model version (`Request.read`), doing no
   work beyond the declared images (a v2 tensor's shape is checked before its data is
   read); then at least one image, at most ``max_images_per_request``, as read;
6. the images are prepared concurrently on the preprocessing pool (encoded files decoded
   here, a protocol's own per-image tensors by the reader it gave), each error naming the
   image's index, and the time is observed in the preprocess histogram; a request that
   sent the graph's own batch skips this step (a batch still `Unread` is read on the
   preprocessing pool, off the event loop); the first image that fails cancels the
   others, so their decodes still waiting for a worker never start;
7. with ``reject_non_finite``, a float tensor the caller sent (not one decoded here)
   holding NaN or Inf is refused; otherwise it is computed, as Triton does;
8. the model version's batcher computes the logits.

Errors leave as `server.errors` exceptions (the handler wrapper, or `server.protocols.calls`
for a stream's messages, maps them to status codes). No protobuf message is imported here.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from server.config import Settings
from server.errors import DeadlineExceeded, InvalidInput
from server.logs import REQUEST_ID
from server.metrics import Metrics
from server.models import ModelRegistry, ModelVersion
from server.preprocess import Preprocessor

MAX_REQUEST_ID = 128
_REQUEST_ID = re.compile(rf"[\x21-\x7e]{{1,{MAX_REQUEST_ID}}}")


def check_request_id(request_id: str) -> str:
    """The caller's request id as given, or `InvalidInput` saying what is allowed."""
    if _REQUEST_ID.fullmatch(request_id) is None:
        raise InvalidInput(
            f"request id of {len(request_id)} characters is not allowed: send 1 to "
            f"{MAX_REQUEST_ID} visible ASCII characters (letters, digits, punctuation; no "
            f"spaces or control characters), or none to have one made"
        )
    return request_id


# One image of a request: an encoded file (JPEG, PNG, ...), or a protocol's reader of
# the tensor it sent for that image, giving the model's input for it.
Image = bytes | Callable[[], Awaitable[np.ndarray]]

# What an adapter read from its message besides the images (v1: top_k; v2: the outputs).
Parsed = TypeVar("Parsed")


@dataclass(frozen=True, slots=True)
class Unread:
    """The graph's own batch of `images`, checked against its declared shape but still to be
    read by the blocking `read` (v2 typed contents: about 0.1 s per million values), which
    runs on the preprocessing pool."""

    images: int
    read: Callable[[], np.ndarray]


@dataclass(frozen=True, slots=True)
class Inputs:
    """The images of one request: prepared one by one, or the graph's own batch as sent."""

    images: Sequence[Image] = ()
    tensor: np.ndarray | Unread | None = None

    def __len__(self) -> int:
        if isinstance(self.tensor, Unread):
            return self.tensor.images
        return len(self.tensor) if self.tensor is not None else len(self.images)


@dataclass(frozen=True, slots=True)
class Request(Generic[Parsed]):
    model: str
    version: str  # "" for the latest ready version
    request_id: str  # "" to have one made
    deadline: float | None  # `time.monotonic()` value, None for no deadline
    # as the message declares them, checked against the limit before `read`; what the
    # images counter adds on success
    images: int
    # The adapter's reading of its message once the model version is known; it does no work
    # beyond `images` images (the limits are checked before it runs).
    read: Callable[[ModelVersion], tuple[Inputs, Parsed]]


@dataclass(frozen=True, slots=True)
class Result(Generic[Parsed]):
    served: ModelVersion
    request_id: str
    logits: np.ndarray  # [images, classes]
    parsed: Parsed


class RequestPath:
    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        preprocessor: Preprocessor,
        metrics: Metrics,
    ) -> None:
        self._max_images = settings.max_images_per_request
        self._reject_non_finite = settings.reject_non_finite
        self._default_timeout = settings.default_timeout
        self._registry = registry
        self._preprocessor = preprocessor
        self._metrics = metrics

    async def infer(self, request: Request[Parsed]) -> Result[Parsed]:
        given = request.request_id
        request_id = check_request_id(given) if given else uuid.uuid4().hex
        REQUEST_ID.set(request_id)
        served = self._registry.get(request.model, request.version)
        if request.deadline is not None:  # gRPC cancels the call when it passes
            return await self._infer(request, request_id, served, request.deadline)
        deadline = time.monotonic() + self._default_timeout
        try:
            async with asyncio.timeout(self._default_timeout):
                return await self._infer(request, request_id, served, deadline)
        except TimeoutError:
            raise DeadlineExceeded(
                f"no answer within {self._default_timeout:g} s, the server's timeout for "
                f"calls without a deadline (default_timeout); set a deadline on the call"
            ) from None

    async def _infer(
        self, request: Request[Parsed], request_id: str, served: ModelVersion, deadline: float
    ) -> Result[Parsed]:
        # held until answered: a version being unloaded finishes the requests it let in
        with served.hold(), self._metrics.version(served.name, served.version).track_request(
            request.images, deadline
        ):
            self._check_limit(request.images)
            inputs, parsed = request.read(served)
            self._check_count(inputs)
            batch = inputs.tensor
            if isinstance(batch, Unread):
                batch = await self._preprocessor.read(batch.read)
            elif batch is None:
                batch = await self._prepare(inputs.images, served)
            if self._reject_non_finite and _sent_tensors(inputs):
                _check_finite(batch)
            logits = await served.infer(batch, deadline=deadline, request_id=request_id)
        return Result(served, request_id, logits, parsed)

    def _check_count(self, inputs: Inputs) -> None:
        count = len(inputs)
        if inputs.tensor is None and count == 0:
            raise InvalidInput(f"request has no images; send 1 to {self._max_images}")
        self._check_limit(count)

    def _check_limit(self, count: int) -> None:
        if count > self._max_images:
            raise InvalidInput(
                f"request has {count} images; at most {self._max_images} are allowed"
            )

    async def _prepare(self, images: Sequence[Image], served: ModelVersion) -> np.ndarray:
        started = time.perf_counter()
        tasks = [
            asyncio.ensure_future(self._prepare_one(i, image, served))
            for i, image in enumerate(images)
        ]
        try:
            inputs = await asyncio.gather(*tasks)
        except BaseException:
            # the first image that fails (or the caller's cancel) stops its siblings: a
            # decode still waiting for a worker is never started
            for task in tasks:
                task.cancel()
            raise
        self._metrics.version(served.name, served.version).preprocess_duration.observe(
            time.perf_counter() - started
        )
        return np.stack(inputs)

    async def _prepare_one(self, index: int, image: Image, served: ModelVersion) -> np.ndarray:
        try:
            if isinstance(image, bytes):
                return await self._preprocessor.encoded(image, served.config)
            return await image()
        except InvalidInput as exc:
            raise InvalidInput(f"image {index}: {exc}") from None


def _sent_tensors(inputs: Inputs) -> bool:
    """Whether the request sent tensors (the graph's batch or per-image ones), not files."""
    return inputs.tensor is not None or not all(isinstance(i, bytes) for i in inputs.images)


def _check_finite(batch: np.ndarray) -> None:
    if batch.dtype.kind == "f" and not np.isfinite(batch).all():
        raise InvalidInput(
            "input holds NaN or Inf values; this server takes only finite values "
            "(reject_non_finite)"
        )
