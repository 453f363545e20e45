"""≥ 500 malformed or hostile uploads from a seeded generated corpus: only 4xx, never a 5xx, and the
server answers a real photo correctly afterwards."""

from __future__ import annotations

import asyncio
import io
import random
from dataclasses import dataclass, field

import aiohttp
from PIL import Image
from serve_util import photo, png_bomb, run_client
from test_serve_api import VERDICT_CASES, app_for

CAP = 200_000


@dataclass
class Case:
    kind: str
    body: bytes | aiohttp.FormData
    headers: dict[str, str] = field(default_factory=dict)
    may_decode: bool = False  # a mutated image that may still be a valid image: 200 is then correct


def _form(data: bytes, name: str = "image", ctype: str = "image/jpeg", filename: str = "p.jpg") -> aiohttp.FormData:
    f = aiohttp.FormData()
    f.add_field(name, data, filename=filename, content_type=ctype)
    return f


def _sof_bomb(jpeg: bytes, w: int, h: int) -> bytes:
    """A real JPEG whose frame header claims w x h."""
    i = jpeg.index(b"\xff\xc0")
    return jpeg[:i + 5] + h.to_bytes(2, "big") + w.to_bytes(2, "big") + jpeg[i + 9:]


def _gif_bomb(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("P", (4, 4)).save(buf, "GIF")
    g = bytearray(buf.getvalue())
    g[6:10] = w.to_bytes(2, "little") + h.to_bytes(2, "little")
    return bytes(g)


def corpus(seed: int = 8) -> list[Case]:
    rng = random.Random(seed)
    cases: list[Case] = []
    samples = {"JPEG": photo(size=(120, 90)), "PNG": photo(size=(60, 40), fmt="PNG"),
               "WEBP": photo(size=(60, 40), fmt="WEBP"), "GIF": photo(size=(40, 30), fmt="GIF"),
               "BMP": photo(size=(30, 20), fmt="BMP")}
    for i in range(150):  # random bytes, raw and multipart, with image-ish magic numbers half of the time
        junk = rng.randbytes(rng.randint(0, 4000))
        if i % 2:
            junk = rng.choice([b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"RIFF\0\0\0\0WEBP", b"BM"]) + junk
        ctype = rng.choice(["image/jpeg", "image/png", "application/octet-stream", "image/webp"])
        cases.append(Case("random", _form(junk, ctype=ctype) if i % 3 else junk, {} if i % 3 else {"Content-Type": ctype}))
    for i in range(125):  # truncated images of every format
        fmt, data = rng.choice(list(samples.items()))
        cut = rng.randint(0, int(len(data) * 0.6))
        cases.append(Case(f"truncated-{fmt}", _form(data[:cut]) if i % 2 else data[:cut],
                          {} if i % 2 else {"Content-Type": "image/jpeg"}))
    for _ in range(60):  # bit flips: may still decode, must never crash
        fmt, data = rng.choice(list(samples.items()))
        b = bytearray(data)
        for _ in range(rng.randint(1, 20)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        cases.append(Case(f"flipped-{fmt}", _form(bytes(b)), may_decode=True))
    for _ in range(60):  # decompression bombs: huge declared sizes, tiny files
        w, h = rng.randint(9_000, 65_535), rng.randint(9_000, 65_535)
        data = rng.choice([png_bomb(w * 3, h * 3), _sof_bomb(samples["JPEG"], w, h), _gif_bomb(w, h)])
        cases.append(Case("bomb", _form(data)))
    for _ in range(40):  # wrong content types around a valid photo
        ctype = rng.choice(["text/plain", "text/html", "application/json", "application/x-www-form-urlencoded",
                            "video/mp4", "multipart/mixed; boundary=x", "image", ""])
        cases.append(Case("content-type", samples["JPEG"], {"Content-Type": ctype} if ctype else
                          {"Content-Type": "application/xml"}))
    for i in range(30):  # multipart without the field, empty, nested, broken boundaries
        if i % 3 == 0:
            f = aiohttp.FormData()
            f.add_field("file", samples["JPEG"], filename="a.jpg", content_type="image/jpeg")
            f.add_field("note", "hello")
            cases.append(Case("no-field", f))
        elif i % 3 == 1:
            cases.append(Case("bad-boundary", b"--zzz\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\n"
                              + rng.randbytes(200), {"Content-Type": "multipart/form-data; boundary=other"}))
        else:
            cases.append(Case("no-boundary", rng.randbytes(100), {"Content-Type": "multipart/form-data"}))
    for i in range(20):  # SVG with script, as a file and raw, with and without an XML prolog
        svg = (b"<?xml version=\"1.0\"?>" if i % 2 else b"") + b"<svg xmlns='http://www.w3.org/2000/svg'>" \
            b"<script>fetch('/healthz')</script><rect width='9' height='9'/></svg>"
        cases.append(Case("svg", _form(svg, ctype="image/svg+xml", filename="x.svg") if i % 2 else svg,
                          {} if i % 2 else {"Content-Type": "image/svg+xml"}))
    for i in range(10):  # path traversal in the filename, oversize, content-encoding
        cases.append(Case("traversal-name", _form(rng.randbytes(300), filename="../../../../tmp/pwned.jpg")))
        cases.append(Case("oversize", rng.randbytes(CAP + 1 + i), {"Content-Type": "image/jpeg"}))
        cases.append(Case("encoding", samples["JPEG"], {"Content-Type": "image/jpeg",
                                                         "Content-Encoding": rng.choice(["gzip", "br", "deflate"])}))
    for i in range(10):  # huge headers
        cases.append(Case("huge-header", samples["JPEG"], {"Content-Type": "image/jpeg", "X-Junk": "a" * (9000 + i)}))
    return cases


RAW_REQUESTS = [  # malformed HTTP, written straight to the socket
    b"POST /api/v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /api/v1/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Type: image/jpeg\r\n\r\nzz\r\n",
    b"POST /api/v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nContent-Length: 20\r\n\r\n0123456789",
    b"GARBAGE\r\n\r\n",
    b"POST /api/v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 1000000000\r\n\r\nabc",
    b"GET /static/../../../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
]


def test_hostile_uploads_get_4xx_and_the_server_stays_healthy(export_factory, tmp_path, monkeypatch):
    export = export_factory("edible_species", VERDICT_CASES["edible_species"])
    monkeypatch.chdir(tmp_path)
    cases = corpus()
    assert len(cases) + len(RAW_REQUESTS) >= 500

    async def body(client):
        statuses: dict[str, set[int]] = {}
        for case in cases:
            try:
                r = await client.post("/api/v1/predict", data=case.body, headers=case.headers)
                status = r.status
                await r.read()
            except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
                status = 499  # the server refused the request by closing (e.g. a huge header); never a crash
            statuses.setdefault(case.kind, set()).add(status)
            ok = {200} if case.may_decode else set()
            assert status in ok or 400 <= status < 500, (case.kind, status)
        for raw in RAW_REQUESTS:
            reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
            writer.write(raw)
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 10)
            writer.close()
            assert line == b"" or 400 <= int(line.split()[1]) < 500, (raw[:40], line)
        assert statuses["bomb"] == {400} and statuses["oversize"] == {413} and statuses["encoding"] == {415}
        good = await client.post("/api/v1/predict", data=_form(photo()))
        assert good.status == 200 and (await good.json())["verdict"]["code"] == "edible_species"
        assert (await client.get("/healthz")).status == 200

    run_client(app_for(export, max_upload_bytes=CAP), body)
    assert list(tmp_path.iterdir()) == []
