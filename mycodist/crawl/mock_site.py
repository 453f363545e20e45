"""`mycodist mock-site`: a local copy of both mushroom sites serving synthetic species, with switchable
faults, so the crawler can be tested and demonstrated without the network. It counts requests per
Host header and reports the peak concurrency it saw (GET /_stats, and printed at exit)."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import html
import io
import json
import signal
import struct
import threading
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web
from omegaconf import DictConfig
from PIL import Image, ImageDraw

from mycodist.atomic import atomic_write_text
from mycodist.catalog import Species
from mycodist.errors import UsageError
from mycodist.lookalikes import write_reference

FAULTS = ("500", "429", "404", "truncated", "html", "slow", "redirect", "dup", "near", "bomb", "disallowed", "tiny",
          "noai")
WILD = "/wildfooduk/mushroom-guide/"
FAULTY_SPECIES = 3  # 500/429/slow hit photos of the first species only, so a big demo site stays quick


def simple_photo(label: str, i: int, size: int, seed: int) -> bytes:
    """A distinct, deterministic photo-like JPEG (own shapes on noise) for species `label`, index i."""
    h = int.from_bytes(hashlib.sha256(f"{seed}/{label}/{i}".encode()).digest()[:8], "big")
    rng = np.random.default_rng(h)
    w, ht = size, int(size * rng.uniform(0.7, 1.0))
    base = rng.integers(40, 200, size=3)
    arr = np.clip(base + rng.normal(0, 18, size=(ht, w, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(im)
    for _ in range(6):
        x, y = rng.integers(0, w), rng.integers(0, ht)
        r = int(rng.integers(size // 12, size // 4))
        d.ellipse((x - r, y - r // 2, x + r, y + r // 2), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def with_comment(jpg: bytes) -> bytes:
    """Same JPEG with a COM segment after SOI: other bytes, identical decoded pixels."""
    text = b"a copy with other bytes"
    return jpg[:2] + b"\xff\xfe" + struct.pack(">H", len(text) + 2) + text + jpg[2:]


def bomb_png(side: int = 100_000) -> bytes:
    """A tiny PNG whose header claims side x side pixels: only a header-first check stops it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")


def tiny_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 80, 40)).save(buf, "JPEG")
    return buf.getvalue()


def synthetic_species(n_species: int, per_species: int, size: int, seed: int = 0) -> list[tuple[Species, list[bytes]]]:
    """The species the site serves with their photos: mycodist.synth's catalogue and renderer (the
    embedded data set), or a fixed list with simple shapes where that generator is not installed."""
    try:
        from mycodist.synth.render import render_photo
        from mycodist.synth.species import make_catalogue
    except ImportError:
        levels = ("edible", "poisonous", "choice", "inedible", "deadly")
        return [(Species(label=f"mockus_species{i}", scientific_name=f"Mockus species{i}",
                         common_name=f"Mock mushroom {i}", family="Mockaceae", edibility=levels[i % len(levels)],
                         facts={"location": "Nowhere", "dimensions": f"cap {3 + i} cm"}),
                 [simple_photo(f"mockus_species{i}", j, size, seed) for j in range(per_species)])
                for i in range(n_species)]
    return [(s.species, [render_photo(s.traits, np.random.default_rng([seed, 7919, i, j]), size=size)
                         for j in range(per_species)])
            for i, s in enumerate(make_catalogue(n_species, seed))]


@dataclass
class SiteStats:
    in_flight: Counter[str] = field(default_factory=Counter)
    peak: Counter[str] = field(default_factory=Counter)
    requests: Counter[str] = field(default_factory=Counter)
    hits: Counter[str] = field(default_factory=Counter)  # per path, to see what was (not) requested

    def to_json(self) -> dict[str, Any]:
        return {"peak_concurrent_per_host": dict(self.peak), "requests_per_host": dict(self.requests),
                "disallowed_requests": sum(n for p, n in self.hits.items() if p.startswith("/private/")),
                "hits": dict(self.hits)}


class MockSite:
    """The site's content and behaviour; `expected()` is what a correct crawl must end up with."""

    def __init__(self, n_species: int = 6, per_species: int = 4, size: int = 320, faults: tuple[str, ...] = (),
                 delay: float = 0.0, seed: int = 0) -> None:
        bad = [f for f in faults if f not in FAULTS]
        if bad:
            raise UsageError(f"unknown fault(s) {bad}; choose from {', '.join(FAULTS)} or 'all'")
        self.faults = set(faults)
        self.delay = delay
        served = synthetic_species(n_species, per_species, size, seed)
        self.species = [sp for sp, _ in served]
        self.photos: dict[str, list[bytes]] = {sp.label: photos for sp, photos in served}
        # name under /data/fungi/ → (bytes, photo index); transient faults hit the first FAULTY species only
        self.files: dict[str, tuple[bytes, int]] = {}
        for si, s in enumerate(self.species):
            for i, jpg in enumerate(self.photos[s.label]):
                self.files[self._name(s, i)] = (jpg, i if si < FAULTY_SPECIES else -1)
        s0 = self.species[0]
        self.extra: dict[str, tuple[bytes, dict[str, str]]] = {}  # fault files: name → (body, headers)
        if "dup" in self.faults:
            self.extra[f"copy-{s0.label}.jpg"] = (self.photos[s0.label][0], {})
            self.extra[f"recoded-{s0.label}.jpg"] = (with_comment(self.photos[s0.label][1]), {})
        if "near" in self.faults:  # the same photo scaled to 90% and saved again: other pixels, same picture
            with Image.open(io.BytesIO(self.photos[s0.label][2 % per_species])) as im:
                buf = io.BytesIO()
                im.resize((im.width * 9 // 10, im.height * 9 // 10), Image.Resampling.LANCZOS).save(buf, "JPEG", quality=70)
            self.extra[f"resized-{s0.label}.jpg"] = (buf.getvalue(), {})
        if "truncated" in self.faults:
            whole = simple_photo(s0.label, 1000, size, seed)
            self.extra[f"truncated-{s0.label}.jpg"] = (whole[: len(whole) // 2], {})
        if "html" in self.faults:
            self.extra[f"page-{s0.label}.jpg"] = (b"<html><body>Not a photo</body></html>", {})
        if "bomb" in self.faults:
            self.extra["bomb.png"] = (bomb_png(), {"Content-Type": "image/png"})
        if "tiny" in self.faults:
            self.extra[f"tiny-{s0.label}.jpg"] = (tiny_jpeg(), {})
        if "noai" in self.faults:
            self.extra[f"noai-{s0.label}.jpg"] = (simple_photo(s0.label, 1001, size, seed), {"X-Robots-Tag": "noai"})
        self.stats = SiteStats()
        self._failures: Counter[str] = Counter()

    @staticmethod
    def _name(s: Species, i: int) -> str:
        return f"{s.scientific_name.replace(' ', '')}-{i + 1}.jpg"

    def expected(self) -> dict[str, set[str]]:
        """label → sha256 of each valid unique photo (the served bytes of its first copy)."""
        return {s.label: {hashlib.sha256(b).hexdigest() for b in self.photos[s.label]} for s in self.species}

    def expected_species(self) -> dict[str, Species]:
        return {s.label: s for s in self.species}

    # -- markup ---------------------------------------------------------------------------------
    def _links(self, s: Species) -> list[str]:
        links = []
        for i in range(len(self.photos[s.label])):
            name = self._name(s, i)
            if "redirect" in self.faults and i == 3 % len(self.photos[s.label]):
                links.append(f"/r/2/data/fungi/{name}")
            else:
                links.append(f"data/fungi/{name}")
        if s is self.species[0]:
            links += [f"data/fungi/{n}" for n in self.extra]
            if "404" in self.faults:
                links.append(f"data/fungi/missing-{s.label}.jpg")
            if "redirect" in self.faults:
                links.append("/loop/0")
            if "disallowed" in self.faults:
                links.append(f"/private/{s.label}.jpg")
        return links

    def namelist(self) -> str:
        items = "".join(f'<div class="item"><a href="/show?n={s.scientific_name.replace(" ", "-")}">'
                        f"{html.escape(s.scientific_name)}</a></div>" for s in self.species)
        return f'<html><body><div id="name-list">{items}</div></body></html>'

    def species_page(self, s: Species) -> str:
        facts = [("Family", s.family), ("Location", s.facts.get("location", "")),
                 ("Dimensions", s.facts.get("dimensions", "")), ("Edibility", s.edibility)]
        rows = "".join(f'<div class="labelus">{k}:</div><div class="textus">{html.escape(str(v))}</div>' for k, v in facts)
        rows += (f'<div class="labelus">Description:</div>'
                 f'<div class="longtextus">{html.escape(str(s.facts.get("description", "")))}</div>')
        imgs = "".join(f'<div class="image"><a href="{u}" title="{html.escape(s.scientific_name)}">'
                       f'<img src="{u}"></a></div>' for u in self._links(s))
        return (f'<html><body><div class="caption"><b>{html.escape(s.scientific_name)}</b> '
                f'({html.escape(s.common_name)})</div>{rows}<div id="mushroom-list">{imgs}</div></body></html>')

    def wild_guide(self) -> str:
        cells = "".join(f'<td class="mushroom-image"><a href="{WILD}{s.label}/"><img src="x.png"></a></td>'
                        for s in self.species)
        return f'<html><body><div id="mushroom-guide"><table><tr>{cells}</tr></table></div></body></html>'

    def wild_page(self, s: Species) -> str:
        facts = f"<ul class='mushroom-facts'><li><strong>Latin name:</strong> {html.escape(s.scientific_name)}</li>"
        facts += f"<li><strong>Family:</strong> {html.escape(s.family)}</li>"
        facts += f"<li><strong>Edibility:</strong> {html.escape(s.edibility)}</li></ul>"
        thumbs = "".join(f'<a href="/wildfooduk/wp-content/uploads/2023/02/{self._name(s, i)}">'
                         f'<img src="/wildfooduk/wp-content/uploads/2023/02/{self._name(s, i)}"></a>'
                         for i in range(len(self.photos[s.label])))
        return (f'<html><body><div id="mushroom-title"><h1>{html.escape(s.common_name)}</h1></div>{facts}'
                f'<div id="thumblist">{thumbs}</div></body></html>')

    # -- the app --------------------------------------------------------------------------------
    def app(self) -> web.Application:
        @web.middleware
        async def count(request: web.Request, handler: Any) -> web.StreamResponse:
            if request.path == "/_stats":
                return await handler(request)
            host = request.host
            st = self.stats
            st.in_flight[host] += 1
            st.peak[host] = max(st.peak[host], st.in_flight[host])
            st.requests[host] += 1
            st.hits[request.path] += 1
            try:
                return await handler(request)
            finally:
                st.in_flight[host] -= 1

        app = web.Application(middlewares=[count])
        app.router.add_get("/_stats", lambda r: web.json_response(self.stats.to_json()))
        app.router.add_get("/robots.txt", lambda r: web.Response(text="User-agent: *\nDisallow: /private/\n"))
        app.router.add_get("/mushrooms/namelist", lambda r: web.Response(text=self.namelist(), content_type="text/html"))
        app.router.add_get("/show", self._show)
        app.router.add_get("/data/fungi/{name}", self._file)
        app.router.add_get("/wildfooduk/wp-content/uploads/2023/02/{name}", self._file)
        app.router.add_get(WILD, lambda r: web.Response(text=self.wild_guide(), content_type="text/html"))
        app.router.add_get(WILD + "{label}/", self._wild_species)
        app.router.add_get("/r/{n}/{rest:.*}", self._redirect)
        app.router.add_get("/loop/{n}", lambda r: web.HTTPFound(f"/loop/{int(r.match_info['n']) + 1}"))
        app.router.add_get("/private/{name}", self._file)
        return app

    async def _show(self, request: web.Request) -> web.Response:
        name = request.query.get("n", "").replace("-", " ")
        s = next((s for s in self.species if s.scientific_name == name), None)
        if s is None:
            raise web.HTTPNotFound()
        return web.Response(text=self.species_page(s), content_type="text/html")

    async def _wild_species(self, request: web.Request) -> web.Response:
        s = next((s for s in self.species if s.label == request.match_info["label"]), None)
        if s is None:
            raise web.HTTPNotFound()
        return web.Response(text=self.wild_page(s), content_type="text/html")

    async def _redirect(self, request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        rest = request.match_info["rest"]
        raise web.HTTPFound(f"/r/{n - 1}/{rest}" if n > 1 else f"/{rest}")

    async def _file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if self.delay:
            await asyncio.sleep(self.delay)
        if name in self.extra:
            body, headers = self.extra[name]
            return web.Response(body=body, headers={"Content-Type": "image/jpeg", **headers})
        if request.path.startswith("/private/"):
            return web.Response(body=self.photos[self.species[0].label][0], content_type="image/jpeg")
        if name not in self.files:
            raise web.HTTPNotFound()
        body, index = self.files[name]
        key = request.path
        if "500" in self.faults and index == 0 and self._failures[key] < 2:
            self._failures[key] += 1
            raise web.HTTPInternalServerError()
        if "429" in self.faults and index == 1 and self._failures[key] < 1:
            self._failures[key] += 1
            raise web.HTTPTooManyRequests(headers={"Retry-After": "1"})
        if "slow" in self.faults and index == 2:
            await asyncio.sleep(0.5)
        return web.Response(body=body, content_type="image/jpeg")

    # -- running --------------------------------------------------------------------------------
    def start_in_thread(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve from a background thread (tests); returns the base URL. Stop with `stop()`."""
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        async def start() -> None:
            self._runner = web.AppRunner(self.app(), access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, host, port)
            await site.start()
            self.port = self._runner.addresses[0][1]
            ready.set()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(start())
            self._loop.run_forever()
            self._loop.run_until_complete(self._runner.cleanup())

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("mock site did not start")
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)


def parse_faults(text: str) -> tuple[str, ...]:
    if not text:
        return ()
    if text == "all":
        return FAULTS
    return tuple(f.strip() for f in text.split(",") if f.strip())


def write_synth_reference(path: str | Path, n_species: int, seed: int = 0) -> None:
    """The served synthetic species' own lookalike pairs as a reference CSV: the site's pages, like
    mushroom.world's, name no lookalikes, so the demo's crawl gets them from this reference."""
    from mycodist.synth.species import make_catalogue, reference_rows

    write_reference(path, reference_rows(make_catalogue(n_species, seed)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--species", type=int, default=8, help="number of synthetic species served")
    parser.add_argument("--per-species", type=int, default=6, help="photos per species")
    parser.add_argument("--size", type=int, default=320, help="longest side of each photo, px")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each photo response")
    parser.add_argument("--faults", default="", help=f"comma list of {', '.join(FAULTS)}; or 'all'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ready-file", metavar="FILE", help="write the base URL here once listening (for scripts)")
    parser.add_argument("--reference-out", metavar="FILE",
                        help="write the served species' lookalike pairs as a reference CSV (for catalog.references)")


async def _serve(site: MockSite, host: str, port: int, ready_file: str | None) -> None:
    runner = web.AppRunner(site.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    base = f"http://{host}:{runner.addresses[0][1]}"
    print(f"mock-site: {base}/mushrooms/namelist (mushroomworld: crawl.base_url={base}) and {base}{WILD} "
          f"(wildfooduk); faults: {','.join(sorted(site.faults)) or 'none'}; Ctrl-C or SIGTERM stops", flush=True)
    if ready_file:
        atomic_write_text(ready_file, base + "\n")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(args: argparse.Namespace, cfg: DictConfig) -> int:
    if args.species < 1 or args.per_species < 1 or args.size < 32:
        raise UsageError("--species and --per-species must be >= 1 and --size >= 32")
    site = MockSite(args.species, args.per_species, args.size, parse_faults(args.faults), args.delay, args.seed)
    if args.reference_out:
        write_synth_reference(args.reference_out, args.species, args.seed)
    try:
        asyncio.run(_serve(site, args.host, args.port, args.ready_file))
    except OSError as e:
        raise UsageError(f"cannot listen on {args.host}:{args.port} ({e}); choose another --port") from None
    finally:
        print("mock-site: " + json.dumps({k: v for k, v in site.stats.to_json().items() if k != "hits"}), flush=True)
    return 0
