"""The polite fetcher against a real aiohttp server on 127.0.0.1 (no mocks): retries, Retry-After,
redirect limit, body cap, robots.txt (also across redirects), timeouts, per-host cap, rate limit."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
from aiohttp import web

from mycodist.crawl.fetch import Fetcher, FetchError, FetchSettings, no_ai


class Server:
    def __init__(self, robots: str | int = "User-agent: *\nDisallow: /private/\n") -> None:
        self.hits: Counter[str] = Counter()
        self.times: dict[str, list[float]] = {}
        self.in_flight = self.peak = 0
        self.robots = robots

    def app(self) -> web.Application:
        @web.middleware
        async def count(request, handler):
            self.hits[request.path] += 1
            self.times.setdefault(request.path, []).append(time.monotonic())
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            try:
                return await handler(request)
            finally:
                self.in_flight -= 1

        async def robots(request):
            if isinstance(self.robots, int):
                return web.Response(status=self.robots)
            return web.Response(text=self.robots)

        async def status(request):
            code = int(request.match_info["code"])
            if code == 429 and self.hits[request.path] == 1:
                return web.Response(status=429, headers={"Retry-After": "1"})
            if code == 429:
                return web.Response(body=b"ok")
            return web.Response(status=code)

        async def redirect(request):
            n = int(request.match_info["n"])
            raise web.HTTPFound(f"/redirect/{n - 1}" if n > 0 else "/ok")

        async def big(request):
            if request.query.get("stream"):
                resp = web.StreamResponse()
                await resp.prepare(request)
                for _ in range(40):
                    await resp.write(b"x" * 65536)
                return resp
            return web.Response(body=b"x" * 2_000_000)

        async def slow(request):
            await asyncio.sleep(float(request.query.get("s", "0.1")))
            return web.Response(body=b"slow")

        app = web.Application(middlewares=[count])
        app.router.add_get("/robots.txt", robots)
        app.router.add_get("/status/{code}", status)
        app.router.add_get("/redirect/{n}", redirect)
        app.router.add_get("/to-private", lambda r: web.HTTPFound("/private/x.jpg"))
        app.router.add_get("/private/{x}", lambda r: web.Response(body=b"secret"))
        app.router.add_get("/ok", lambda r: web.Response(body=b"ok", headers={"X-Robots-Tag": "noimageai"}))
        app.router.add_get("/big", big)
        app.router.add_get("/slow", slow)
        return app


def fetch_all(server: Server, paths: list[str], refuse_noai: bool = False, **settings) -> list[bytes | FetchError]:
    async def go():
        runner = web.AppRunner(server.app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        s = FetchSettings(user_agent="mycodist-test", backoff_base=0.01, **settings)
        try:
            async with Fetcher(s) as f:
                async def one(p):
                    try:
                        return (await f.get(base + p, refuse_noai=refuse_noai)).body
                    except FetchError as e:
                        return e
                return await asyncio.gather(*(one(p) for p in paths))
        finally:
            await runner.cleanup()

    return asyncio.run(go())


def test_5xx_retried_4xx_not():
    srv = Server()
    r500, r404 = fetch_all(srv, ["/status/500", "/status/404"], retries=3)
    assert isinstance(r500, FetchError) and r500.reason == "http_500" and srv.hits["/status/500"] == 4
    assert isinstance(r404, FetchError) and r404.reason == "http_404" and srv.hits["/status/404"] == 1


def test_retry_after_is_waited_out():
    srv = Server()
    (body,) = fetch_all(srv, ["/status/429"], retries=2)
    assert body == b"ok"
    first, second = srv.times["/status/429"]
    assert second - first >= 0.9  # Retry-After: 1 (a lower bound: honoured, not a speed figure)


def test_redirect_limit():
    srv = Server()
    five, six = fetch_all(srv, ["/redirect/4", "/redirect/5"], max_redirects=5)
    assert five == b"ok"  # 5 hops: /redirect/4 → 3 → 2 → 1 → 0 → /ok
    assert isinstance(six, FetchError) and six.reason == "too_many_redirects"


def test_body_cap_with_and_without_content_length():
    srv = Server()
    a, b = fetch_all(srv, ["/big", "/big?stream=1"], max_bytes=1_000_000)
    assert isinstance(a, FetchError) and a.reason == "too_large"
    assert isinstance(b, FetchError) and b.reason == "too_large"


def test_robots_disallow_also_across_redirects():
    srv = Server()
    a, b = fetch_all(srv, ["/private/a.jpg", "/to-private"])
    assert a.reason == b.reason == "robots_disallowed"
    assert not [p for p in srv.hits if p.startswith("/private/")]
    assert srv.hits["/robots.txt"] == 1


@pytest.mark.parametrize("status, allowed", [(404, True), (503, False)])
def test_robots_status_rules(status, allowed):
    srv = Server(robots=status)
    (r,) = fetch_all(srv, ["/slow?s=0"], retries=0)
    assert r == b"slow" if allowed else r.reason == "robots_unreachable"
    assert srv.hits["/slow"] == int(allowed)


def test_timeout_is_retried_then_reported():
    srv = Server()
    (r,) = fetch_all(srv, ["/slow?s=0.6"], retries=1, read_timeout=0.2, total_timeout=5)
    assert isinstance(r, FetchError) and r.reason == "timeout" and srv.hits["/slow"] == 2


def test_per_host_cap_and_rate():
    srv = Server()
    fetch_all(srv, ["/slow?s=0.05"] * 24, per_host=3, concurrency=64)
    assert 2 <= srv.peak <= 3
    srv = Server()
    fetch_all(srv, ["/slow?s=0"] * 6, per_host=4, rps_per_host=10)
    ts = srv.times["/slow"]
    assert max(ts) - min(ts) >= 0.45  # 6 requests at 10/s span at least 0.5 s


def test_no_ai_header():
    assert no_ai({"X-Robots-Tag": "noai"}) and no_ai({"X-Robots-Tag": "otherbot: noimageai, noindex"})
    assert not no_ai({"X-Robots-Tag": "noindex"}) and not no_ai({})


def test_noai_photo_refused_from_headers_pages_still_read():
    srv = Server()
    (refused,) = fetch_all(srv, ["/ok"], refuse_noai=True)
    assert isinstance(refused, FetchError) and refused.reason == "x_robots_tag" and refused.disallowed
    assert fetch_all(srv, ["/ok"]) == [b"ok"]
