"""A front end's request as the engine holds it (`server.engine.Request`) over a real
batcher: answered once, in the callback that settles its last item, with what its items
came to."""

from __future__ import annotations

import asyncio
import gc
import weakref

import numpy as np

from server.core.instances import Item
from server.engine import Request
from tests.server.core.test_batcher import FakeRunner, _blocked, _images, _started


class Answers:
    """Stands for the engine's `Link`: records each request answered and what was settled
    by then."""

    def __init__(self) -> None:
        self.answered: list[tuple[Request, np.ndarray | BaseException]] = []
        self.done = asyncio.Event()

    def answer(self, request: Request) -> None:
        self.answered.append((request, request.outcome()))
        self.done.set()


def _request(answers: Answers) -> Request:
    return Request(answers, 0, 0, 0)  # type: ignore[arg-type]


async def test_a_request_of_several_batches_is_answered_once_with_every_row_in_order() -> None:
    runner, answers = FakeRunner(), Answers()
    batcher = await _started(runner, max_batch_size=2)
    request = _request(answers)
    request.items = batcher.enqueue(_images(1, 2, 3, 4, 5), on_done=request.item_done)
    await asyncio.wait_for(answers.done.wait(), 10)
    await asyncio.sleep(0.05)  # nothing more comes
    assert len(answers.answered) == 1
    rows = answers.answered[0][1]
    assert isinstance(rows, np.ndarray)
    assert rows[:, 0].tolist() == [1, 2, 3, 4, 5]
    await batcher.close()


async def test_a_failing_item_fails_the_request_and_its_queued_siblings_are_not_computed() -> None:
    runner, answers = FakeRunner(), Answers()
    batcher = await _started(runner, max_batch_size=1)
    request = _request(answers)
    request.items = batcher.enqueue(_images(1, -1, 2, 3), on_done=request.item_done)
    await asyncio.wait_for(answers.done.wait(), 10)
    await asyncio.sleep(0.05)
    assert len(answers.answered) == 1
    error = answers.answered[0][1]
    assert isinstance(error, RuntimeError), error  # the failure, not the siblings' cancel
    assert "bad input" in str(error)
    assert runner.batches == [1, 1]  # the last two never ran
    assert [item.future.cancelled() for item in request.items] == [False, False, True, True]
    await batcher.close()


async def test_a_cancelled_request_is_answered_at_once_and_dropped_before_compute() -> None:
    runner, answers = FakeRunner(), Answers()
    batcher = await _started(runner, max_batch_size=1)
    busy = await _blocked(runner, batcher)
    request = _request(answers)
    request.items = batcher.enqueue(_images(1, 2, 3), on_done=request.item_done)
    assert len(request.items) == 3
    request.cancel()
    assert len(answers.answered) == 1  # in the call that cancelled it
    assert isinstance(answers.answered[0][1], asyncio.CancelledError)
    runner.gate.set()
    await busy
    await asyncio.sleep(0.05)
    assert runner.batches == [1]  # only the request that held the instance
    assert len(answers.answered) == 1
    await batcher.close()


async def test_on_done_runs_as_the_item_is_settled_before_any_loop_callback() -> None:
    runner = FakeRunner()
    batcher = await _started(runner, max_batch_size=8)
    order: list[str] = []

    def on_done(item: Item) -> None:
        assert item.future.done()
        order.append("on_done")

    items = batcher.enqueue(_images(7), on_done=on_done)
    items[0].future.add_done_callback(lambda _: order.append("future callback"))
    assert (await items[0].future)[0, 0] == 7
    assert order == ["on_done", "future callback"]
    await batcher.close()


async def test_an_answer_that_raises_is_logged_and_the_batch_goes_on(caplog) -> None:  # type: ignore[no-untyped-def]
    runner = FakeRunner()
    batcher = await _started(runner, max_batch_size=8)
    busy = await _blocked(runner, batcher)

    def broken(item: Item) -> None:
        raise ValueError("cannot answer")

    first = batcher.enqueue(_images(1), on_done=broken)
    second = batcher.enqueue(_images(2))
    runner.gate.set()
    await busy
    assert (await first[0].future)[0, 0] == 1
    assert (await second[0].future)[0, 0] == 2
    assert runner.batches == [1, 2]  # one batch of both, both answered
    assert "answering request" in caplog.text and "cannot answer" in caplog.text
    assert (await batcher.submit(_images(3)))[0, 0] == 3  # the instance is free again
    await batcher.close()


async def test_an_answered_request_is_freed_without_the_garbage_collector() -> None:
    """Once answered, a request and its items hold no cycle: their inputs (views of a
    front end's shared-memory segment) go as soon as the answer is out, and a dead front
    end's segment is unmapped without waiting for a collection."""
    runner = FakeRunner()
    batcher = await _started(runner, max_batch_size=1)
    answered = asyncio.Event()

    class Link:
        def answer(self, request: Request) -> None:
            answered.set()

    gc.disable()
    try:
        inputs = _images(1, 2).copy()  # each item's inputs are a view of it, as of a segment
        request = Request(Link(), 0, 0, 0)  # type: ignore[arg-type]
        request.items = batcher.enqueue(inputs, on_done=request.item_done)
        freed = weakref.ref(inputs)
        del request, inputs
        await asyncio.wait_for(answered.wait(), 10)
        await asyncio.sleep(0.05)
        assert freed() is None
    finally:
        gc.enable()
    await batcher.close()
