"""Load from a second process: N concurrent clients against `mycodist serve` running as its own process."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from serve_util import photo

CLIENTS = 8
REQUESTS_PER_CLIENT = 20


@pytest.mark.slow
def test_concurrent_clients_get_zero_errors(served):
    images = [photo(size=(320 + 16 * i, 240), colour=(30 * i % 256, 90, 40)) for i in range(CLIENTS)]

    async def client(session: aiohttp.ClientSession, i: int) -> list[tuple[int, str]]:
        out = []
        for _ in range(REQUESTS_PER_CLIENT):
            form = aiohttp.FormData()
            form.add_field("image", images[i], filename="p.jpg", content_type="image/jpeg")
            async with session.post(served + "api/v1/predict", data=form) as r:
                ans = await r.json()
                out.append((r.status, ans.get("verdict", {}).get("code", "")))
        return out

    async def main() -> dict:
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            results = await asyncio.gather(*(client(session, i) for i in range(CLIENTS)))
            async with session.get(served + "healthz") as r:
                health = await r.json()
        flat = [x for res in results for x in res]
        assert len(flat) == CLIENTS * REQUESTS_PER_CLIENT
        assert all(s == 200 and code == "poisonous" for s, code in flat), [x for x in flat if x[0] != 200][:5]
        return health

    health = asyncio.run(main())
    queue = health["queue"]
    assert queue["items"] >= CLIENTS * REQUESTS_PER_CLIENT
    assert queue["batches"] < queue["items"], "8 concurrent clients never shared a forward pass"
    assert queue["queued"] == 0 and queue["in_flight"] == 0
