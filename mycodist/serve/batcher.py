"""Micro-batching: concurrent requests share one forward pass, run off the event loop.

One consumer task gathers a batch and runs it in a single worker thread, so the event loop keeps
accepting uploads while the model computes, and gathers the next batch meanwhile:
- while the model is busy, requests collect until it is free (or `max_batch`), and then go at once:
  the model never idles while requests wait. (The first version gathered only after a batch had
  finished and then waited up to `max_wait_ms` for more: with clients in a closed loop, the model sat idle
  for that wait after every batch.)
- when the model is idle, the first request waits at most `max_wait_ms` for others to join it.
The queue is bounded: when it is full, `submit` raises `Overloaded` at once and the caller answers 503
with Retry-After instead of queueing forever.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Overloaded(RuntimeError):
    """The queue is full; try again after `retry_after` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the server is busy; retry after {retry_after} s")
        self.retry_after = retry_after


class MicroBatcher(Generic[T, R]):
    def __init__(self, run_batch: Callable[[list[T]], Sequence[R]], max_batch: int = 8, max_wait_ms: float = 5.0,
                 queue_size: int = 64) -> None:
        if max_batch < 1 or queue_size < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and queue_size must be ≥ 1 and max_wait_ms ≥ 0")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.queue_size = queue_size
        self._queue: asyncio.Queue[tuple[T, asyncio.Future]] | None = None
        self._task: asyncio.Task | None = None
        self._running: asyncio.Task | None = None  # the batch on the model thread
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.batches = 0
        self.items = 0
        self._last_batch_s = 0.05

    async def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.queue_size)
        self._task = asyncio.get_running_loop().create_task(self._consume())

    async def stop(self) -> None:
        for task in (self._task, self._running):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._queue is not None:
            while not self._queue.empty():
                _, fut = self._queue.get_nowait()
                if not fut.done():
                    fut.set_exception(Overloaded(1))
        await asyncio.to_thread(self._executor.shutdown, True)  # a batch still computing ends first

    @property
    def pending(self) -> int:
        return 0 if self._queue is None else self._queue.qsize()

    def retry_after(self) -> int:
        """Seconds until the current queue has likely drained (at least 1)."""
        batches = self.pending / self.max_batch + 1
        return max(1, int(batches * self._last_batch_s + 0.999))

    async def submit(self, item: T) -> R:
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not awaited")
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((item, fut))
        except asyncio.QueueFull:
            raise Overloaded(self.retry_after()) from None
        return await fut

    async def _gather(self, busy: asyncio.Task | None) -> list[tuple[T, asyncio.Future]]:
        """The next batch: while `busy` (the batch on the model thread) runs, everything that arrives, up to
        `max_batch`, until it ends; on an idle model, the first item and whatever joins it within max_wait."""
        assert self._queue is not None
        batch = [await self._queue.get()]
        try:
            return await self._gather_more(batch, busy)
        except asyncio.CancelledError:  # stop(): what was taken from the queue is answered, not dropped
            _fail(batch, Overloaded(1))
            raise

    async def _gather_more(self, batch: list[tuple[T, asyncio.Future]],
                           busy: asyncio.Task | None) -> list[tuple[T, asyncio.Future]]:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        deadline = None if busy is not None and not busy.done() else loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            if deadline is None:  # the model is busy: collect until it is free
                assert busy is not None
                if busy.done():
                    break
                getter = asyncio.ensure_future(self._queue.get())
                try:
                    done, _ = await asyncio.wait({getter, busy}, return_when=asyncio.FIRST_COMPLETED)
                except asyncio.CancelledError:  # stop(): a getter still waiting takes nothing once cancelled
                    if not getter.cancel() and not getter.cancelled() and getter.exception() is None:
                        batch.append(getter.result())  # it had taken one: answered with the rest
                    raise
                if getter in done:
                    batch.append(getter.result())
                else:  # a pending Queue.get takes nothing when cancelled; one that got in first keeps its item
                    getter.cancel()
                    await asyncio.wait({getter})  # never raises the getter's cancellation, only our own
                    if not getter.cancelled():
                        batch.append(getter.result())
                    break
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except asyncio.TimeoutError:
                break
        return batch

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather(self._running)
            try:
                if self._running is not None:
                    await self._running  # at most one batch on the model thread and one gathering
            except asyncio.CancelledError:
                _fail(batch, Overloaded(1))
                raise
            self._running = loop.create_task(self._run(batch))

    async def _run(self, batch: list[tuple[T, asyncio.Future]]) -> None:
        loop = asyncio.get_running_loop()
        live = [(x, f) for x, f in batch if not f.done()]  # skip clients that already went away
        if not live:
            return
        t0 = loop.time()
        try:
            results = await loop.run_in_executor(self._executor, self.run_batch, [x for x, _ in live])
        except asyncio.CancelledError:  # stop(): the server is going away
            _fail(live, Overloaded(1))
            raise
        except Exception as e:  # a model failure fails this batch's requests, not the server
            _fail(live, e)
            return
        self._last_batch_s = 0.8 * self._last_batch_s + 0.2 * (loop.time() - t0)
        self.batches += 1
        self.items += len(live)
        if len(results) != len(live):  # a broken run_batch fails its requests, never the consumer
            _fail(live, RuntimeError(f"the model returned {len(results)} results for {len(live)} inputs"))
            return
        for (_, f), r in zip(live, results, strict=True):
            if not f.done():
                f.set_result(r)


def _fail(batch: list[tuple[Any, asyncio.Future]], error: BaseException) -> None:
    for _, f in batch:
        if not f.done():
            f.set_exception(error)


def stats(batcher: MicroBatcher[Any, Any]) -> dict[str, float]:
    return {"batches": batcher.batches, "items": batcher.items, "queued": batcher.pending,
            "mean_batch": batcher.items / batcher.batches if batcher.batches else 0.0}
