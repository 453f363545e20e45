"""The micro-batcher's policy: the model never idles while requests wait; an idle model waits max_wait for company.

The model here is a function that blocks on events the test controls, so every assertion is about which
requests share a forward pass and whether a batch starts, never about how long anything takes. A huge
max_wait_ms makes "waited for max_wait" show up as a test that does not finish (its timeout), not as a timing.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from mycodist.serve.batcher import MicroBatcher, Overloaded, stats

FOREVER_MS = 600_000.0  # a wait that would show up as a timeout


class Model:
    """run_batch for the batcher: records each batch, and holds it until the test releases it."""

    def __init__(self, hold: bool = True) -> None:
        self.batches: list[list[int]] = []
        self.started = threading.Semaphore(0)
        self.release = threading.Semaphore(0)
        self.hold = hold
        self.fail_on: int | None = None

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.started.release()
        if self.hold:
            self.release.acquire()
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"model failed on {self.fail_on}")
        return [x * 10 for x in items]


async def started(model: Model, timeout: float = 20.0) -> None:
    """Until the model thread has picked up one more batch."""
    ok = await asyncio.get_running_loop().run_in_executor(None, model.started.acquire, True, timeout)
    assert ok, "the model never got the next batch"


def test_requests_arriving_while_the_model_is_busy_go_the_moment_it_is_free():
    async def main():
        model = Model()
        b = MicroBatcher(model, max_batch=8, max_wait_ms=FOREVER_MS)
        await b.start()
        first = asyncio.create_task(b.submit(1))
        await asyncio.sleep(0)
        # an idle model and one request: it would wait max_wait for company, so give it a full batch instead
        rest = [asyncio.create_task(b.submit(i)) for i in range(2, 9)]
        await started(model)
        assert model.batches == [[1, 2, 3, 4, 5, 6, 7, 8]]
        waiting = [asyncio.create_task(b.submit(i)) for i in (11, 12, 13)]  # while the model is busy
        await asyncio.sleep(0.05)
        model.release.release()  # the first batch ends: the three must go now, not after max_wait
        await started(model)
        assert model.batches[1] == [11, 12, 13]
        model.release.release()
        assert await asyncio.gather(first, *rest) == [10 * i for i in range(1, 9)]
        assert await asyncio.gather(*waiting) == [110, 120, 130]
        assert stats(b)["batches"] == 2 and stats(b)["items"] == 11
        await b.stop()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_max_batch_holds_while_the_model_is_busy():
    async def main():
        model = Model()
        b = MicroBatcher(model, max_batch=4, max_wait_ms=0)
        await b.start()
        futs = [asyncio.create_task(b.submit(0))]
        await started(model)
        futs += [asyncio.create_task(b.submit(i)) for i in range(1, 11)]
        await asyncio.sleep(0.05)
        for _ in range(4):
            model.release.release()
        assert await asyncio.gather(*futs) == [10 * i for i in range(11)]
        assert [len(x) for x in model.batches] == [1, 4, 4, 2]
        await b.stop()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_an_idle_model_waits_max_wait_for_company():
    async def main():
        model = Model(hold=False)
        b = MicroBatcher(model, max_batch=8, max_wait_ms=FOREVER_MS / 100)  # 6 s: ample for the others to join
        await b.start()
        futs = [asyncio.create_task(b.submit(1))]
        await asyncio.sleep(0.2)  # the model is idle: request 1 waits for others to join it
        futs += [asyncio.create_task(b.submit(i)) for i in (2, 3)]
        await asyncio.sleep(0.2)
        futs += [asyncio.create_task(b.submit(i)) for i in range(4, 9)]  # the eighth fills the batch: it goes
        assert await asyncio.gather(*futs) == [10 * i for i in range(1, 9)]
        assert model.batches == [[1, 2, 3, 4, 5, 6, 7, 8]]
        await b.stop()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_failing_or_broken_batch_fails_its_requests_and_the_next_batch_runs():
    async def main():
        model = Model(hold=False)
        model.fail_on = 2
        b = MicroBatcher(model, max_batch=2, max_wait_ms=FOREVER_MS / 100)
        await b.start()
        bad = [asyncio.create_task(b.submit(i)) for i in (1, 2)]
        results = await asyncio.gather(*bad, return_exceptions=True)
        assert all(isinstance(r, ValueError) for r in results)
        assert await asyncio.gather(b.submit(3), b.submit(4)) == [30, 40]

        b.run_batch = lambda items: [0]  # a run_batch returning the wrong number of results
        results = await asyncio.gather(b.submit(5), b.submit(6), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) and "2 inputs" in str(r) for r in results)
        b.run_batch = model
        assert await asyncio.gather(b.submit(7), b.submit(8)) == [70, 80]
        await b.stop()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_stop_fails_queued_and_running_requests_instead_of_leaving_them_hanging():
    async def main():
        model = Model()
        b = MicroBatcher(model, max_batch=2, max_wait_ms=0, queue_size=4)
        await b.start()
        running = [asyncio.create_task(b.submit(i)) for i in (1, 2)]
        await started(model)
        gathering = [asyncio.create_task(b.submit(i)) for i in (3, 4)]
        await asyncio.sleep(0.05)  # the consumer takes them into the next batch
        queued = [asyncio.create_task(b.submit(i)) for i in (5, 6, 7, 8)]
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded):  # 3 and 4 gathered, 5-8 queued (queue_size 4): the ninth is refused
            await b.submit(9)
        stopping = asyncio.create_task(b.stop())
        await asyncio.sleep(0.05)
        model.release.release()  # the model thread finishes; stop() waits for it
        await stopping
        for fut in running + gathering + queued:
            assert isinstance(fut.exception(), Overloaded), fut
        assert model.batches == [[1, 2]]

    asyncio.run(asyncio.wait_for(main(), 60))


def test_clients_that_went_away_are_not_computed():
    async def main():
        model = Model()
        b = MicroBatcher(model, max_batch=4, max_wait_ms=0)
        await b.start()
        first = asyncio.create_task(b.submit(1))
        await started(model)
        gone = [asyncio.create_task(b.submit(i)) for i in (2, 3)]
        kept = asyncio.create_task(b.submit(4))
        await asyncio.sleep(0.05)
        for fut in gone:
            fut.cancel()
        await asyncio.sleep(0.05)
        model.release.release()
        await started(model)
        model.release.release()
        assert await first == 10 and await kept == 40
        assert model.batches == [[1], [4]]
        await b.stop()

    asyncio.run(asyncio.wait_for(main(), 60))
