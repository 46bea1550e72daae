"""Images to model inputs on worker threads, with the transform of `server.repository.transform`.

Decoding runs in a thread pool (`Preprocessor`): Pillow releases the GIL in
decode and resize, and threads avoid copying every result between processes.
The pool's backlog is bounded (``max_decode_backlog`` images, server-wide: with front
ends, over all of them, `server.shm.Held`):
each call takes its place in the backlog as it is made, before anything is
awaited, and past the bound an image is refused at once with `QueueFull`
(RESOURCE_EXHAUSTED), so an overload of encoded images cannot pile up
unbounded waits and memory in front of the models' own bounded queues. The
place is given back when the image's future is done (or cancelled).
The transform's `ImageError` becomes `InvalidInput` (INVALID_ARGUMENT) here.

API for servicers (each call returns the image's future at once)::

    pre = Preprocessor(settings)
    chw = await pre.encoded(jpeg_bytes, model.config)   # InvalidInput on bad images
    chw = await pre.pixels(hwc_uint8_array, model.config)
    batch = await pre.read(reader)                      # a blocking reader, on a worker
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from server import threads
from server.config import Settings
from server.errors import InvalidInput, QueueFull
from server.repository import (
    ImageError,
    ImageLimits,
    ModelConfig,
    crop_only,
    prepare_encoded,
    prepare_pixels,
)
from server.shm import Held


class Preprocessor:
    """Runs decoding and transforms on a pool of worker threads, with a bounded backlog."""

    def __init__(self, settings: Settings, backlog: Held | None = None) -> None:
        self.limits = ImageLimits(settings.max_image_bytes, settings.max_image_pixels)
        self.max_backlog = settings.max_decode_backlog
        # images waiting for or in a worker (touched only on the event loop)
        self._backlog = backlog or Held()
        ceiling = Image.MAX_IMAGE_PIXELS
        if ceiling is not None and self.limits.max_image_pixels > ceiling:
            Image.MAX_IMAGE_PIXELS = self.limits.max_image_pixels  # keep Pillow's above ours
        self._pool = ThreadPoolExecutor(
            settings.decode_threads(),
            thread_name_prefix="decode",
            initializer=threads.name_current,
            initargs=("decode",),
        )

    def encoded(self, data: bytes, config: ModelConfig) -> asyncio.Future[np.ndarray]:
        return self._run(prepare_encoded, data, config, self.limits)

    def pixels(self, pixels: np.ndarray, config: ModelConfig) -> asyncio.Future[np.ndarray]:
        # a crop copies at most crop² × 3 bytes (~20 µs): cheaper on the event loop than
        # the two thread hand-overs of a worker
        cropped = crop_only(pixels, config)
        if cropped is not None:
            return resolved(cropped)
        return self._run(prepare_pixels, pixels, config)

    def read(self, function: Callable[[], np.ndarray]) -> asyncio.Future[np.ndarray]:
        """A tensor that takes work to read (v2 typed contents), read on a worker; it counts
        as one image of the backlog."""
        return self._run(function)

    def _run(
        self, function: Callable[..., np.ndarray], *args: object
    ) -> asyncio.Future[np.ndarray]:
        """`function` on a worker, its place in the backlog taken now (`QueueFull` when
        there is none) and given back when its future is done or cancelled."""
        if (backlog := self._backlog.total()) >= self.max_backlog:
            raise QueueFull(
                f"{backlog} images are waiting to be decoded (at most {self.max_backlog}); "
                f"retry later"
            )
        future = asyncio.get_running_loop().run_in_executor(
            self._pool, _image_errors, function, *args
        )
        self._backlog.add(1)
        future.add_done_callback(self._release)
        return future

    @property
    def backlog(self) -> int:
        """This process's images waiting for or in a worker."""
        return self._backlog.count

    def _release(self, _: asyncio.Future[np.ndarray]) -> None:
        self._backlog.add(-1)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def resolved(value: np.ndarray) -> asyncio.Future[np.ndarray]:
    """A future already holding `value` (an image that needs no worker)."""
    future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


def _image_errors(function: Callable[..., np.ndarray], *args: object) -> np.ndarray:
    """`function(*args)` on a worker, an `ImageError` raised as `InvalidInput`."""
    try:
        return function(*args)
    except ImageError as exc:
        raise InvalidInput(str(exc)) from None
