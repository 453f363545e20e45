"""Polite HTTP: one aiohttp session, a global and a per-host concurrency cap, an optional per-host
rate, robots.txt and X-Robots-Tag, Retry-After, exponential backoff with jitter, at most 5 redirects
(each hop checked against robots.txt), timeouts and a body-size cap enforced while streaming."""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
import urllib.robotparser
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
from multidict import CIMultiDict

REDIRECTS = (301, 302, 303, 307, 308)
NO_AI_TAGS = ("noai", "noimageai")


class FetchError(Exception):
    """A URL that cannot be had; `reason` is the short tag counted in crawl_report.json."""

    def __init__(self, reason: str, detail: str = "", retry_after: float | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.retry_after = retry_after

    @property
    def disallowed(self) -> bool:
        return self.reason in ("robots_disallowed", "x_robots_tag")


@dataclass
class FetchSettings:
    user_agent: str
    concurrency: int = 64
    per_host: int = 4
    rps_per_host: float = 0.0  # 0 = no rate limit beyond the concurrency cap
    retries: int = 3
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    max_retry_after: float = 120.0
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    total_timeout: float = 60.0
    max_bytes: int = 20_000_000
    max_redirects: int = 5
    respect_robots: bool = True

    @classmethod
    def from_config(cls, c: Any) -> FetchSettings:
        return cls(user_agent=c.user_agent, concurrency=c.concurrency, per_host=c.per_host,
                   rps_per_host=c.rps_per_host, retries=c.retries, backoff_base=c.backoff_base,
                   backoff_max=c.backoff_max, max_retry_after=c.max_retry_after,
                   connect_timeout=c.connect_timeout, read_timeout=c.read_timeout, total_timeout=c.total_timeout,
                   max_bytes=c.max_bytes, max_redirects=c.max_redirects, respect_robots=c.respect_robots)


@dataclass
class Response:
    url: str  # the final URL, after redirects
    status: int
    headers: Mapping[str, str]
    body: bytes
    attempts: int = 1


@dataclass
class _Host:
    sem: asyncio.Semaphore
    next_time: float = 0.0  # earliest start of the next request (rate limit, Retry-After, crawl-delay)
    interval: float = 0.0
    robots: urllib.robotparser.RobotFileParser | None = None
    robots_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    robots_loaded: bool = False
    robots_failed: bool = False  # robots.txt unreachable or 5xx: nothing allowed, but a failure to replay


class Fetcher:
    """Use as `async with Fetcher(settings) as f: resp = await f.get(url)`."""

    def __init__(self, settings: FetchSettings) -> None:
        self.s = settings
        self.stats: Counter[str] = Counter()
        self._hosts: dict[str, _Host] = {}
        self._global = asyncio.Semaphore(settings.concurrency)
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Fetcher:
        timeout = aiohttp.ClientTimeout(total=self.s.total_timeout, sock_connect=self.s.connect_timeout,
                                        sock_read=self.s.read_timeout)
        connector = aiohttp.TCPConnector(limit=self.s.concurrency, limit_per_host=self.s.per_host,
                                         ttl_dns_cache=600)
        self.session = aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=True,
                                             headers={"User-Agent": self.s.user_agent})
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()

    def _host(self, url: str) -> _Host:
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}".lower()
        host = self._hosts.get(origin)
        if host is None:
            interval = 1.0 / self.s.rps_per_host if self.s.rps_per_host > 0 else 0.0
            host = self._hosts[origin] = _Host(asyncio.Semaphore(self.s.per_host), interval=interval)
        return host

    # -- robots.txt ---------------------------------------------------------------------------
    async def allowed(self, url: str) -> bool:
        """robots.txt of the URL's host, fetched once: 4xx = everything allowed, 5xx or unreachable
        = nothing allowed (RFC 9309), honouring Crawl-delay as a minimum interval."""
        if not self.s.respect_robots:
            return True
        host = self._host(url)
        if not host.robots_loaded:
            async with host.robots_lock:
                if not host.robots_loaded:
                    host.robots = await self._load_robots(url, host)
                    host.robots_loaded = True
        assert host.robots is not None
        return host.robots.can_fetch(self.s.user_agent, url)

    async def _load_robots(self, url: str, host: _Host) -> urllib.robotparser.RobotFileParser:
        parts = urlsplit(url)
        robots_url = f"{parts.scheme}://{parts.netloc}/robots.txt"
        rp = urllib.robotparser.RobotFileParser(robots_url)
        try:
            resp = await self._get(robots_url, check_robots=False, max_bytes=500_000, accept_status=True)
        except FetchError:
            self.stats["robots_unreachable"] += 1
            rp.disallow_all = host.robots_failed = True
            return rp
        if resp.status >= 500:
            rp.disallow_all = host.robots_failed = True
        elif resp.status >= 400:
            rp.allow_all = True
        else:
            rp.parse(resp.body.decode("utf-8", "replace").splitlines())
            delay = rp.crawl_delay(self.s.user_agent)
            if delay:
                host.interval = max(host.interval, float(delay))
        return rp

    # -- requests -----------------------------------------------------------------------------
    async def get(self, url: str, *, max_bytes: int | None = None, refuse_noai: bool = False) -> Response:
        """GET with every politeness rule; raises FetchError with a reason.

        `refuse_noai`: an X-Robots-Tag `noai`/`noimageai` answer is refused from its headers, before
        the body is read (for photos; pages carrying the tag are still read for their facts)."""
        return await self._get(url, check_robots=True, max_bytes=max_bytes or self.s.max_bytes,
                               refuse_noai=refuse_noai)

    async def _get(self, url: str, *, check_robots: bool, max_bytes: int, accept_status: bool = False,
                   refuse_noai: bool = False) -> Response:
        attempt = 0
        while True:
            attempt += 1
            try:
                resp = await self._follow(url, check_robots, max_bytes, accept_status, refuse_noai)
                resp.attempts = attempt
                return resp
            except FetchError as e:
                retryable = e.reason.startswith("http_5") or e.reason in ("http_429", "timeout", "connection")
                if not retryable or attempt > self.s.retries:
                    raise
                self.stats["retries"] += 1
                if e.retry_after is not None:
                    if e.retry_after > self.s.max_retry_after:
                        raise FetchError(e.reason, f"Retry-After {e.retry_after:.0f}s exceeds crawl.max_retry_after") from None
                    delay = e.retry_after
                    host = self._host(url)  # the whole host asked us to wait, not only this URL
                    host.next_time = max(host.next_time, time.monotonic() + delay)
                else:
                    delay = min(self.s.backoff_max, self.s.backoff_base * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
                await asyncio.sleep(delay)

    async def _follow(self, url: str, check_robots: bool, max_bytes: int, accept_status: bool,
                      refuse_noai: bool = False) -> Response:
        for _ in range(self.s.max_redirects + 1):
            if urlsplit(url).scheme not in ("http", "https"):
                raise FetchError("bad_url", url)
            if check_robots and not await self.allowed(url):
                raise FetchError("robots_unreachable" if self._host(url).robots_failed else "robots_disallowed", url)
            status, headers, body = await self._request(url, max_bytes, refuse_noai)
            if status in REDIRECTS and "Location" in headers:
                url = urljoin(url, headers["Location"])
                self.stats["redirects"] += 1
                continue
            if accept_status or status == 200:
                return Response(url, status, headers, body)
            retry_after = _retry_after(headers.get("Retry-After")) if status in (429, 503) else None
            raise FetchError(f"http_{status}", url, retry_after)
        raise FetchError("too_many_redirects", url)

    async def _request(self, url: str, max_bytes: int, refuse_noai: bool = False) -> tuple[int, Mapping[str, str], bytes]:
        assert self.session is not None, "use Fetcher as an async context manager"
        host = self._host(url)
        async with host.sem, self._global:
            if host.interval or host.next_time:
                now = time.monotonic()
                start = max(now, host.next_time)
                host.next_time = start + host.interval
                if start > now:
                    await asyncio.sleep(start - now)
            self.stats["requests"] += 1
            try:
                async with self.session.get(url, allow_redirects=False) as r:
                    headers = CIMultiDict(r.headers)
                    if r.status != 200:
                        return r.status, headers, b""
                    if refuse_noai and no_ai(headers):
                        raise FetchError("x_robots_tag", url)
                    length = r.content_length
                    if length is not None and length > max_bytes:
                        raise FetchError("too_large", f"{length} bytes > crawl.max_bytes")
                    chunks, n = [], 0
                    async for chunk in r.content.iter_chunked(1 << 16):
                        n += len(chunk)
                        if n > max_bytes:
                            raise FetchError("too_large", f"over {max_bytes} bytes")
                        chunks.append(chunk)
                    self.stats["bytes"] += n
                    return r.status, headers, b"".join(chunks)
            except asyncio.TimeoutError:
                raise FetchError("timeout", url) from None
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
                raise FetchError("connection", f"{url}: {e}") from None
            except aiohttp.ClientResponseError as e:
                raise FetchError("connection", f"{url}: {e}") from None
            except aiohttp.InvalidURL:
                raise FetchError("bad_url", url) from None


def no_ai(headers: Mapping[str, str]) -> bool:
    """True when X-Robots-Tag forbids AI use of the image (`noai` / `noimageai`, any user agent)."""
    tokens = {t.strip().lower() for t in headers.get("X-Robots-Tag", "").replace(":", ",").split(",")}
    return any(t in tokens for t in NO_AI_TAGS)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
