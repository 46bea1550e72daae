"""The one request path: a neutral `InferRequest` in, per-image logits (or a domain error)
out.

Every inference RPC (``Classify``, ``ClassifyStream``, v2 ``ModelInfer``,
``ModelStreamInfer``, HTTP ``infer`` and ``classify``) is a thin adapter in
`server.protocols` that decodes its message into an `InferRequest` (`server.request`),
calls `RequestPath.infer`, and encodes the `Result` as its response. Here, in order:

1. the request id (the caller's or a new one) is set in `REQUEST_ID` for the logs; a
   caller's id is echoed in the answer as Triton does, so one that is not 1 to
   `MAX_REQUEST_ID` visible ASCII characters (no spaces, no control characters) is
   refused with INVALID_ARGUMENT, never silently replaced;
2. the model version is looked up (NOT_FOUND and UNAVAILABLE before anything is counted);
3. from then on the request is counted by `Metrics.track_request`, with the caller's
   deadline, so a call cancelled at its deadline counts as DEADLINE_EXCEEDED; a request
   without one gets ``default_timeout`` and fails with DEADLINE_EXCEEDED when it passes;
4. `server.validation.accept` checks it against the model, limits before any work;
5. the images are prepared concurrently on the preprocessing pool (encoded files decoded,
   pixels resized), each error naming the image's index, and the time is observed in the
   preprocess histogram; a request with images to prepare first asks the model's queue
   for room, so a call that could not be queued costs no decode; float32 tensors of the
   model's size need nothing, and a request of only those reaches the batcher in the
   loop step that admitted it; a request that sent the graph's own batch skips this step
   (a batch still `Unread` is read on the preprocessing pool, off the event loop); the
   first image that fails cancels the others, so their decodes still waiting for a
   worker never start;
6. with ``reject_non_finite``, a float tensor the caller sent (not one decoded here)
   holding NaN or Inf is refused; otherwise it is computed, as Triton does;
7. the model version's batcher computes the logits.

With tracing on (`server.tracing`), steps 4 to 6 are the call's ``preprocess`` span.

Errors leave as `server.errors` exceptions (the handler wrapper, or `server.protocols.calls`
for a stream's messages, maps them to status codes). No protobuf message is imported here.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from server import tracing
from server.config import Settings
from server.core.registry import ModelRegistry, ModelVersion
from server.errors import DeadlineExceeded, InvalidInput
from server.logs import REQUEST_ID
from server.metrics import Metrics
from server.preprocess import Preprocessor, resolved
from server.request import InferRequest
from server.shared_memory import SharedMemory
from server.validation import (
    Accepted,
    Checked,
    Limits,
    Unread,
    accept,
    check_finite,
    check_request_id,
)

# The id of a request that brings none: 128 random bits, 32 hex digits like a uuid4's, from
# a generator seeded once from the system's entropy (no system call per request, a fifth
# of uuid4's cost). An id tells nothing of the process or of how many calls it has served.
_ids = random.Random()

# `Timeouts`: the calls of one tick share a timer; a tick is a 64th of the timeout, at most
# a quarter of a second (the default 60 s gives a call 60 to 60.25 s).
TIMEOUT_TICKS = 64
MAX_TIMEOUT_TICK = 0.25


def new_request_id() -> str:
    return f"{_ids.getrandbits(128):032x}"


@dataclass(frozen=True, slots=True)
class Result:
    served: ModelVersion
    request_id: str
    logits: np.ndarray  # [images, classes]
    checked: Checked  # what the caller asked back: top-k or the outputs


class RequestPath:
    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        preprocessor: Preprocessor,
        metrics: Metrics,
        shared_memory: SharedMemory | None = None,
    ) -> None:
        self._shared_memory = shared_memory  # the regions a v2 tensor may refer to
        self._limits = Limits(
            max_images=settings.max_images_per_request,
            max_image_pixels=settings.max_image_pixels,
            reject_non_finite=settings.reject_non_finite,
        )
        self._timeouts = Timeouts(settings.default_timeout)
        self._registry = registry
        self._preprocessor = preprocessor
        self._metrics = metrics

    async def infer(self, request: InferRequest) -> Result:
        given = request.id
        request_id = check_request_id(given) if given else new_request_id()
        REQUEST_ID.set(request_id)
        served = self._registry.get(request.model, request.version)
        if request.deadline is not None:  # gRPC cancels the call when it passes
            return await self._infer(request, request_id, served, request.deadline)
        task = asyncio.current_task()
        assert task is not None
        deadline = self._timeouts.start(task)
        try:
            return await self._infer(request, request_id, served, deadline)
        except asyncio.CancelledError:
            if not self._timeouts.expired(task):
                raise
            raise DeadlineExceeded(
                f"no answer within {self._timeouts.seconds:g} s, the server's timeout for "
                f"calls without a deadline (default_timeout); set a deadline on the call"
            ) from None
        finally:
            self._timeouts.stop(task, deadline)

    async def _infer(
        self, request: InferRequest, request_id: str, served: ModelVersion, deadline: float
    ) -> Result:
        # held until answered: a version being unloaded finishes the requests it let in
        with (
            served.hold(),
            self._metrics.version(served.name, served.version).track_request(
                request.declared_images(), deadline
            ),
        ):
            with tracing.step(tracing.PREPROCESS):  # a no-op unless tracing is on
                checked = accept(request, served.config, self._limits, self._shared_memory)
                inputs = checked.inputs
                batch = inputs.tensor
                if isinstance(batch, Unread):
                    batch = await self._preprocessor.read(batch.read)
                elif batch is None:
                    batch = await self._prepare(inputs.images, served)
                if self._limits.reject_non_finite and inputs.sent_tensors:
                    check_finite(batch)
            logits = await served.infer(batch, deadline=deadline, request_id=request_id)
        return Result(served, request_id, logits, checked)

    async def _prepare(self, images: Sequence[Accepted], served: ModelVersion) -> np.ndarray:
        started = time.perf_counter()
        if all(_ready(image) for image in images):
            # nothing to prepare: no wait, so the batcher takes (or refuses) the request in
            # the loop step that admitted it
            inputs: Sequence[np.ndarray] = images  # type: ignore[assignment]
        else:
            # a full model queue refuses the call before any of its images is decoded
            served.scheduler().check_room(len(images))
            # each image takes its place in the decode backlog here, before anything is
            # awaited: past the bound the call is refused in the step that admitted it
            futures: list[asyncio.Future[np.ndarray]] = []
            try:
                for image in images:
                    futures.append(self._start(image, served))
                inputs = await asyncio.gather(*futures)
            except BaseException as exc:
                # the first image that fails (or the caller's cancel) stops its siblings: a
                # decode still waiting for a worker is never started
                for future in futures:
                    future.cancel()
                failed = next((
                    i for i, future in enumerate(futures)
                    if future.done() and not future.cancelled() and future.exception() is exc
                ), None)  # fmt: skip
                if isinstance(exc, InvalidInput) and failed is not None:
                    raise InvalidInput(f"image {failed}: {exc}") from None
                raise
        self._metrics.version(served.name, served.version).observe_preprocess(
            time.perf_counter() - started
        )
        if len(inputs) == 1:  # one image: the batch is a view of it, not a copy
            return inputs[0][np.newaxis]
        return np.stack(inputs)

    def _start(self, image: Accepted, served: ModelVersion) -> asyncio.Future[np.ndarray]:
        """`image` prepared: an encoded file decoded, uint8 pixels of any size resized as a
        decoded file is, on the pool; a float32 tensor as it stands."""
        if isinstance(image, bytes):
            return self._preprocessor.encoded(image, served.config)
        if not _ready(image):
            return self._preprocessor.pixels(image, served.config)
        return resolved(image)


class Timeouts:
    """The server's timeout for calls without a deadline (``default_timeout``), kept for
    all of them by a timer per tick rather than one per call: the calls that start within
    one tick share a deadline, the tick's end plus the timeout, and one timer cancels those
    still running then. A call so gets between ``seconds`` and ``seconds + tick``. A timer
    per call (`asyncio.timeout`) cost several microseconds of the event loop's thread per
    call; this costs a set's insert and removal (docs/decisions/0012)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._tick = min(seconds / TIMEOUT_TICKS, MAX_TIMEOUT_TICK)
        self._running: dict[float, set[asyncio.Task[object]]] = {}  # deadline: its calls
        self._expired: set[asyncio.Task[object]] = set()

    def start(self, task: asyncio.Task[Any]) -> float:
        """Count `task` in: the `time.monotonic()` deadline it was given."""
        now = time.monotonic()
        deadline = (now // self._tick + 1) * self._tick + self.seconds
        calls = self._running.get(deadline)
        if calls is None:
            calls = self._running[deadline] = set()
            asyncio.get_running_loop().call_at(deadline, self._expire, deadline)
        calls.add(task)
        return deadline

    def stop(self, task: asyncio.Task[Any], deadline: float) -> None:
        """`task` is answered (or has failed): no timer cancels it any more."""
        calls = self._running.get(deadline)
        if calls is not None:
            calls.discard(task)
        self._expired.discard(task)

    def expired(self, task: asyncio.Task[Any]) -> bool:
        """Whether a cancel of `task` was its timeout's (and no one else's): then the
        cancel is taken back, and the call answers DEADLINE_EXCEEDED."""
        if task not in self._expired:
            return False
        self._expired.discard(task)
        return task.uncancel() == 0

    def _expire(self, deadline: float) -> None:
        for task in self._running.pop(deadline, ()):
            if not task.done():
                self._expired.add(task)
                task.cancel()


def _ready(image: Accepted) -> bool:
    """An accepted image that is the model's input as it stands (a float32 tensor of its
    size); encoded files and uint8 pixels are prepared on the pool."""
    return not isinstance(image, bytes) and image.dtype != np.uint8
