"""`mycodist serve --model EXPORT_DIR`: the web page and JSON API (aiohttp).

Request path: per-client cap → upload slot + streamed, capped read of the body within a deadline
(mycodist.serve.limits) → admission (bounded in-flight count) → decode + preprocess in a thread pool →
micro-batched forward pass in the model thread → verdict.
Bad input is answered 4xx with a one-line reason; nothing is ever written to disk (the multipart
reader is used directly because `request.post()` spools file fields to temporary files).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from aiohttp import MultipartReader, web
from omegaconf import DictConfig

from mycodist.errors import UsageError
from mycodist.serve.batcher import MicroBatcher, Overloaded, stats
from mycodist.serve.inference import Predictor
from mycodist.serve.limits import UploadGate, UploadLimits
from mycodist.serve.openapi import openapi_document
from mycodist.serve.page import render_error_page, render_result_page
from mycodist.serve.preprocess import BadImage, decode_image, original_size
from mycodist.serve.wiring import make_predictor
from mycodist.verdict import WARNING

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
RAW_TYPES = ("application/octet-stream",)
MULTIPART_SLACK = 64 * 1024  # boundaries and part headers around the image
CHUNK = 64 * 1024
# The server never inflates request bodies: a Content-Encoding is refused (415), so a gzip bomb is never
# expanded, and the size cap counts the bytes that really arrive.
# A body left unread after an answer (429, 408, 413) is drained for at most 2 s, then the connection closes.
RUNNER_KWARGS: dict[str, Any] = {"access_log": None, "auto_decompress": False, "lingering_time": 2.0}
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
                               "script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
}


@dataclass(frozen=True)
class ServeSettings:
    max_upload_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 64_000_000
    max_batch: int = 8
    max_wait_ms: float = 5.0
    queue_size: int = 64
    decode_threads: int = 2

    @classmethod
    def from_config(cls, serve_cfg: Any) -> ServeSettings:
        s = cls(max_upload_bytes=int(serve_cfg.max_upload_bytes), max_pixels=int(serve_cfg.max_pixels),
                max_batch=int(serve_cfg.max_batch), max_wait_ms=float(serve_cfg.max_wait_ms),
                queue_size=int(serve_cfg.queue_size), decode_threads=int(serve_cfg.decode_threads))
        for key in ("max_upload_bytes", "max_pixels", "max_batch", "queue_size", "decode_threads"):
            if getattr(s, key) < 1:
                raise UsageError(f"serve.{key} must be at least 1, got {getattr(s, key)}")
        if s.max_wait_ms < 0:
            raise UsageError(f"serve.max_wait_ms must be ≥ 0, got {s.max_wait_ms}")
        return s


class Service:
    """Everything one request needs: the predictor, the batcher, the decode pool and the admission count."""

    def __init__(self, predictor: Predictor, settings: ServeSettings, limits: UploadLimits | None = None) -> None:
        self.predictor = predictor
        self.settings = settings
        self.gate = UploadGate(limits or UploadLimits())
        self.batcher: MicroBatcher[torch.Tensor, dict[str, Any]] = MicroBatcher(
            predictor.predict, settings.max_batch, settings.max_wait_ms, settings.queue_size)
        self.decoder = ThreadPoolExecutor(max_workers=settings.decode_threads, thread_name_prefix="decode")
        self.in_flight = 0
        # Complete uploads being decoded or waiting also hold memory: at most a queue's worth beyond the queue.
        # Uploads still being read are bounded by the gate's own cap, so they never hold these slots.
        self.max_in_flight = settings.queue_size + settings.max_batch + settings.decode_threads

    def _prepare(self, data: bytes) -> tuple[torch.Tensor, tuple[int, int]]:
        tf = self.predictor.export.transform
        img = decode_image(data, self.settings.max_pixels, tf)
        return tf(img), original_size(img)

    async def assess(self, data: bytes) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        tensor, (w, h) = await loop.run_in_executor(self.decoder, self._prepare, data)
        answer = dict(await self.batcher.submit(tensor))
        answer["image"] = {"width": w, "height": h}
        return answer


SERVICE: web.AppKey[Service] = web.AppKey("service", Service)


def _json_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"status": status, "message": message}, "warning": WARNING},
                             status=status, headers=headers)


def _is_api(request: web.Request) -> bool:
    return request.path.startswith("/api/") or request.path == "/healthz"


@web.middleware
async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
    """Security headers on every answer; API errors as JSON; an unexpected failure never leaks a trace."""
    try:
        resp = await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        if _is_api(request):
            resp = _json_error(e.status, e.text or e.reason, {k: v for k, v in e.headers.items()
                                                               if k in ("Retry-After", "Allow")})
            if e.status == 408:
                resp.force_close()  # a timed-out upload's connection is not kept alive
        else:
            e.headers.update(SECURITY_HEADERS)
            if e.status == 408:
                e.force_close()
            raise
    except Exception:
        log.exception("unexpected failure on %s %s", request.method, request.path)
        resp = _json_error(500, "internal error") if _is_api(request) else web.Response(
            status=500, text="internal error")
    resp.headers.update(SECURITY_HEADERS)
    return resp


async def read_upload(request: web.Request, cap: int) -> bytes:
    """The image bytes from a multipart field `image` or a raw image/* body, never more than `cap` bytes."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise web.HTTPUnsupportedMediaType(text=f"Content-Encoding {encoding!r} is not accepted; send the file as is")
    if request.content_length is not None and request.content_length > cap + MULTIPART_SLACK:
        raise web.HTTPRequestEntityTooLarge(max_size=cap, actual_size=request.content_length,
                                            text=f"the upload is larger than {cap:,} bytes")
    # the header as sent (aiohttp maps a missing or unparsable one to application/octet-stream)
    ctype = request.headers.get("Content-Type", "application/octet-stream").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return await _read_multipart(request, cap)
    if (ctype.startswith("image/") and len(ctype) > len("image/")) or ctype in RAW_TYPES:
        return await _read_capped(request.content, cap)
    raise web.HTTPUnsupportedMediaType(
        text=f"Content-Type {ctype!r} is not accepted; send multipart/form-data with a field 'image' or an image/* body")


async def _read_capped(stream: Any, cap: int) -> bytes:
    buf = bytearray()
    while chunk := await stream.read(CHUNK):
        buf += chunk
        if len(buf) > cap:
            raise web.HTTPRequestEntityTooLarge(max_size=cap, actual_size=len(buf),
                                                text=f"the upload is larger than {cap:,} bytes")
    return bytes(buf)


async def _read_multipart(request: web.Request, cap: int) -> bytes:
    image: bytes | None = None
    total = 0
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if isinstance(part, MultipartReader):
                raise web.HTTPBadRequest(text="nested multipart is not accepted")
            buf = bytearray()
            keep = part.name == "image" and image is None
            while chunk := await part.read_chunk(CHUNK):
                total += len(chunk)
                if total > cap + MULTIPART_SLACK or (keep and len(buf) + len(chunk) > cap):
                    raise web.HTTPRequestEntityTooLarge(max_size=cap, actual_size=total,
                                                        text=f"the upload is larger than {cap:,} bytes")
                if keep:
                    buf += chunk
            if keep:
                image = bytes(buf)
    except web.HTTPException:
        raise
    except Exception as e:  # aiohttp's parser raises several types on a malformed body
        raise web.HTTPBadRequest(text=f"malformed multipart body ({type(e).__name__}); "
                                      "send multipart/form-data with a field 'image'") from None
    if image is None:
        raise web.HTTPBadRequest(text="the multipart body has no field named 'image'")
    return image


async def _assess_request(request: web.Request) -> dict[str, Any]:
    svc = request.app[SERVICE]
    with svc.gate.client(request.remote):
        async with svc.gate.reading_body(svc.batcher.retry_after()):
            data = await svc.gate.within_deadline(read_upload(request, svc.settings.max_upload_bytes))
        if svc.in_flight >= svc.max_in_flight:
            raise web.HTTPServiceUnavailable(text="the server is busy; retry shortly",
                                             headers={"Retry-After": str(svc.batcher.retry_after())})
        svc.in_flight += 1
        try:
            return await svc.assess(data)
        except BadImage as e:
            cls = web.HTTPRequestEntityTooLarge if e.status == 413 else web.HTTPBadRequest
            kwargs = {"max_size": svc.settings.max_upload_bytes, "actual_size": 0} if e.status == 413 else {}
            raise cls(text=str(e), **kwargs) from None
        except Overloaded as e:
            raise web.HTTPServiceUnavailable(text=str(e), headers={"Retry-After": str(e.retry_after)}) from None
        finally:
            svc.in_flight -= 1


async def predict(request: web.Request) -> web.Response:
    return web.json_response(await _assess_request(request))


async def page_predict(request: web.Request) -> web.Response:
    """The same assessment for the page's plain HTML form (browsers without JavaScript)."""
    try:
        answer = await _assess_request(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return web.Response(text=render_error_page(e.text or e.reason), status=e.status,
                            content_type="text/html", headers={k: v for k, v in e.headers.items() if k == "Retry-After"})
    return web.Response(text=render_result_page(answer), content_type="text/html")


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html")


async def species(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    ex = svc.predictor.export
    items = []
    for lab in ex.labels:
        s = ex.species.get(lab)
        items.append({"label": lab, "scientific_name": s.scientific_name if s else "",
                      "common_name": s.common_name if s else "", "family": s.family if s else "",
                      "edibility": s.edibility if s else "unknown", "lookalikes": list(s.lookalikes) if s else []})
    return web.json_response({"species": items, "warning": WARNING, "model": _model_json(svc)})


def _model_json(svc: Service) -> dict[str, Any]:
    return svc.predictor.model_json()


async def healthz(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    int8 = svc.predictor.export.info.get("int8")  # the verdict agreement int8 was admitted on
    return web.json_response({"status": "ok", "model": {**_model_json(svc), **({"int8": int8} if int8 else {})},
                              "queue": {**stats(svc.batcher), "in_flight": svc.in_flight},
                              "uploads": svc.gate.stats()})


async def openapi(request: web.Request) -> web.Response:
    s = request.app[SERVICE].settings
    return web.json_response(openapi_document(s.max_upload_bytes, s.max_pixels))


def create_app(predictor: Predictor, settings: ServeSettings, limits: UploadLimits | None = None) -> web.Application:
    """The aiohttp application; the batcher starts with the app and stops with it."""
    app = web.Application(middlewares=[guard], client_max_size=settings.max_upload_bytes + MULTIPART_SLACK)
    service = Service(predictor, settings, limits)
    app[SERVICE] = service

    async def start(_: web.Application) -> None:
        await service.batcher.start()

    async def stop(_: web.Application) -> None:
        await service.batcher.stop()
        service.decoder.shutdown(wait=False, cancel_futures=True)

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_get("/", index)
    app.router.add_post("/", page_predict)
    app.router.add_post("/api/v1/predict", predict)
    app.router.add_get("/api/v1/species", species)
    app.router.add_get("/api/v1/openapi.json", openapi)
    app.router.add_get("/healthz", healthz)
    app.router.add_static("/static/", STATIC_DIR, show_index=False, follow_symlinks=False)
    return app


def build_service_app(export_dir: str | Path, cfg: DictConfig, builder: Any = None) -> web.Application:
    """Load the export once and wire it to the `serve` config group (serve/wiring.py, shared with predict)."""
    serve = cfg.serve
    predictor = make_predictor(export_dir, serve, builder=builder)
    return create_app(predictor, ServeSettings.from_config(serve), UploadLimits.from_config(serve))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="EXPORT_DIR", help="export folder (`mycodist export`)")
    parser.add_argument("--host", help="address to listen on (default serve.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default serve.port, 8080; 0 = any free port)")


def main(args: argparse.Namespace, cfg: DictConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host = args.host or str(cfg.serve.host)
    port = int(cfg.serve.port if args.port is None else args.port)
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be 0..65535, got {port}")
    app = build_service_app(args.model, cfg)
    asyncio.run(serve_forever(app, host, port))
    return 0


async def serve_forever(app: web.Application, host: str, port: int) -> None:
    """Run until SIGINT/SIGTERM; print the real address first (port 0 picks a free one)."""
    runner = web.AppRunner(app, **RUNNER_KWARGS)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as e:
            raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}; choose another --port") from None
        bound = runner.addresses[0][1]
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        print(f"mycodist serve: open http://{shown}:{bound}/ in a browser "
              "(API: /api/v1/openapi.json); Ctrl-C stops", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
