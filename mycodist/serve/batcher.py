"""Micro-batching: concurrent requests share one forward pass, run off the event loop.

One consumer task takes the first waiting item, gathers more for at most `max_wait_ms` (or until
`max_batch`), and runs the batch in a single worker thread, so the event loop keeps accepting
uploads while the model computes. The queue is bounded: when it is full, `submit` raises
`Overloaded` at once and the caller answers 503 with Retry-After instead of queueing forever.
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
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.batches = 0
        self.items = 0
        self._last_batch_s = 0.05

    async def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.queue_size)
        self._task = asyncio.get_running_loop().create_task(self._consume())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._queue is not None:
            while not self._queue.empty():
                _, fut = self._queue.get_nowait()
                if not fut.done():
                    fut.set_exception(Overloaded(1))
        self._executor.shutdown(wait=True)

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

    async def _gather(self) -> list[tuple[T, asyncio.Future]]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
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
            batch = await self._gather()
            live = [(x, f) for x, f in batch if not f.done()]  # skip clients that already went away
            if not live:
                continue
            t0 = loop.time()
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, [x for x, _ in live])
            except Exception as e:  # a model failure fails this batch's requests, not the server
                for _, f in live:
                    if not f.done():
                        f.set_exception(e)
                continue
            self._last_batch_s = 0.8 * self._last_batch_s + 0.2 * (loop.time() - t0)
            self.batches += 1
            self.items += len(live)
            for (_, f), r in zip(live, results, strict=True):
                if not f.done():
                    f.set_result(r)


def stats(batcher: MicroBatcher[Any, Any]) -> dict[str, float]:
    return {"batches": batcher.batches, "items": batcher.items, "queued": batcher.pending,
            "mean_batch": batcher.items / batcher.batches if batcher.batches else 0.0}
