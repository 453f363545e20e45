"""Upload admission: a deadline on the body, a cap on uploads in flight, a cap per client address.

Why: an upload that trickles in (2 bytes of a declared 1 MB body) costs the attacker nothing and, without
a deadline, holds its slot for ever; when uploads shared the model's admission count, 64 such
connections turned every other user away with 503. So:

- the whole body must arrive within `serve.body_timeout` seconds, else 408 and the connection is closed;
- uploads being read are bounded by `serve.max_uploads`, a cap of their own, so a slow upload never
  holds one of the model's slots (admission to the model's queue happens once a body is complete);
- one peer address may hold at most `serve.max_uploads_per_client` requests (upload, decode and
  inference together); past it, 429. Behind a reverse proxy every request has the proxy's address:
  raise this cap there and let the proxy limit per client (docs/serving.md).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

from mycodist.errors import UsageError

T = TypeVar("T")


@dataclass(frozen=True)
class UploadLimits:
    body_timeout: float = 30.0
    max_uploads: int = 128
    max_uploads_per_client: int = 16

    @classmethod
    def from_config(cls, serve_cfg: Any) -> UploadLimits:
        s = cls(body_timeout=float(serve_cfg.body_timeout), max_uploads=int(serve_cfg.max_uploads),
                max_uploads_per_client=int(serve_cfg.max_uploads_per_client))
        if not s.body_timeout > 0:
            raise UsageError(f"serve.body_timeout must be > 0 seconds, got {s.body_timeout}")
        for key in ("max_uploads", "max_uploads_per_client"):
            if getattr(s, key) < 1:
                raise UsageError(f"serve.{key} must be at least 1, got {getattr(s, key)}")
        return s


class UploadGate:
    """Counts uploads being read (global) and requests per peer address; the answers past each cap."""

    def __init__(self, limits: UploadLimits) -> None:
        self.limits = limits
        self.reading = 0
        self.per_client: dict[str, int] = {}
        self.timed_out = 0
        self.refused_client = 0
        self.cut_off = 0

    @contextlib.contextmanager
    def client(self, peer: str | None) -> Any:
        """Hold one of this peer's request slots for the whole request; 429 past the per-client cap."""
        key = peer or "unknown"
        held = self.per_client.get(key, 0)
        if held >= self.limits.max_uploads_per_client:
            self.refused_client += 1
            raise web.HTTPTooManyRequests(
                text=f"too many requests in progress from this address (at most "
                     f"{self.limits.max_uploads_per_client}); wait for an answer before sending more",
                headers={"Retry-After": "1"})
        self.per_client[key] = held + 1
        try:
            yield
        finally:
            left = self.per_client[key] - 1
            if left:
                self.per_client[key] = left
            else:
                del self.per_client[key]  # no entry per address that ever connected: nothing grows

    @contextlib.asynccontextmanager
    async def reading_body(self, retry_after: int) -> AsyncIterator[None]:
        """Hold an upload slot while a body is read; 503 when every upload slot is taken."""
        if self.reading >= self.limits.max_uploads:
            raise web.HTTPServiceUnavailable(text="the server is busy; retry shortly",
                                             headers={"Retry-After": str(retry_after)})
        self.reading += 1
        try:
            yield
        finally:
            self.reading -= 1

    async def within_deadline(self, read: Awaitable[T]) -> T:
        """`read` (the whole body), or 408 when it takes longer than `body_timeout`; a client that hangs up
        mid-upload is counted, not logged as a server failure (an attacker could flood the log so)."""
        try:
            return await asyncio.wait_for(read, self.limits.body_timeout)
        except ConnectionResetError:
            self.cut_off += 1
            raise web.HTTPBadRequest(text="the upload was cut off before its end") from None
        except asyncio.TimeoutError:
            self.timed_out += 1
            raise web.HTTPRequestTimeout(
                text=f"the upload did not arrive within {self.limits.body_timeout:g} s; "
                     "send the photo again on a better connection, or a smaller one") from None

    def stats(self) -> dict[str, int]:
        return {"uploads_reading": self.reading, "clients": len(self.per_client),
                "timed_out": self.timed_out, "refused_per_client": self.refused_client, "cut_off": self.cut_off}
