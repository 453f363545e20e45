"""The JSON API end to end, in process: one real export per verdict, real uploads, real aiohttp server."""

from __future__ import annotations

import asyncio
import json
import re
import tempfile
import threading

import aiohttp
import pytest
from serve_util import (
    CALIBRATED,
    LABELS,
    full_builder,
    logits_for,
    make_export,
    photo,
    png_bomb,
    run_client,
    tiny_builder,
)

from mycodist.config import load_config
from mycodist.errors import UsageError
from mycodist.serve.app import build_service_app
from mycodist.verdict import WARNING

VERDICT_CASES = {
    "not_identified": {"boletus_bonus": 0.4, "agaricus_similis": 0.35},
    "poisonous": {"amanita_letalis": 0.97},
    "do_not_eat": {"boletus_bonus": 0.95, "hebeloma_toxicum": 0.04},
    "inedible": {"tylopilus_amarus": 0.999},
    "edible_species": {"boletus_bonus": 0.999999},
}


def app_for(export, **serve):
    cfg = load_config(None, [f"serve.{k}={v}" for k, v in serve.items()])
    return build_service_app(export, cfg, builder=tiny_builder)


def form(data: bytes, field: str = "image", ctype: str = "image/jpeg") -> aiohttp.FormData:
    f = aiohttp.FormData()
    f.add_field(field, data, filename="photo.jpg", content_type=ctype)
    return f


@pytest.mark.parametrize("code", list(VERDICT_CASES))
def test_each_verdict_through_the_api(export_factory, code):
    export = export_factory(code, VERDICT_CASES[code])

    async def body(client):
        r = await client.post("/api/v1/predict", data=form(photo()))
        assert r.status == 200, await r.text()
        ans = await r.json()
        assert ans["verdict"]["code"] == code
        assert ans["warning"] == WARNING
        assert len(ans["top_k"]) == 5
        probs = [t["probability"] for t in ans["top_k"]]
        assert probs == sorted(probs, reverse=True)
        top_label = max(VERDICT_CASES[code], key=VERDICT_CASES[code].get)
        assert ans["top_k"][0]["label"] == top_label
        assert ans["top_k"][0]["probability"] == pytest.approx(VERDICT_CASES[code][top_label], rel=1e-3)
        assert set(ans["top_k"][0]) >= {"label", "scientific_name", "common_name", "probability", "edibility"}
        assert ans["model"]["id"] and ans["model"]["version"]
        assert ans["image"] == {"width": 96, "height": 64}

    run_client(app_for(export), body)


def test_raw_body_species_health_openapi_and_form_page(export_factory):
    export = export_factory("edible_species", VERDICT_CASES["edible_species"])

    async def body(client):
        r = await client.post("/api/v1/predict", data=photo(fmt="PNG"), headers={"Content-Type": "image/png"})
        assert r.status == 200 and (await r.json())["verdict"]["code"] == "edible_species"
        sp = await (await client.get("/api/v1/species")).json()
        assert [s["label"] for s in sp["species"]] == LABELS and sp["warning"] == WARNING
        h = await client.get("/healthz")
        assert h.status == 200 and (await h.json())["status"] == "ok"
        doc = await (await client.get("/api/v1/openapi.json")).json()
        assert doc["openapi"].startswith("3.")
        assert {"/api/v1/predict", "/api/v1/species", "/healthz"} <= set(doc["paths"])
        codes = doc["components"]["schemas"]["Prediction"]["properties"]["verdict"]["properties"]["code"]["enum"]
        assert "edible_species" in codes and "not_identified" in codes
        page = await client.get("/")
        html = await page.text()
        assert page.status == 200 and 'accept="image/*"' in html and "capture" in html
        assert WARNING in " ".join(html.split())  # the static page carries the very same warning
        refs = re.findall(r'"\$ref": "#/([^"]+)"', json.dumps(doc))
        for ref in refs:  # every schema reference in the OpenAPI document resolves
            node = doc
            for part in ref.split("/"):
                node = node[part]
        assert page.headers["X-Content-Type-Options"] == "nosniff"
        # the no-JavaScript path: the form posts to / and gets an HTML answer
        r = await client.post("/", data=form(photo()))
        text = await r.text()
        assert r.status == 200 and "Edible species" in text and "No photo identification" in text

    run_client(app_for(export), body)


def test_temperature_and_ood_from_calibration(tmp_path):
    logits = logits_for({"boletus_bonus": 0.9})
    # T = 4 flattens 0.9 → below min_confidence; the export's quantile table supplies the OOD threshold
    soft = make_export(tmp_path / "soft", logits, {**CALIBRATED, "temperature": 4.0})
    ood = make_export(tmp_path / "ood", logits_for({"boletus_bonus": 0.999999}),
                      {"temperature": 1.0, "ood_scores_on_val": {"neg_energy": {"q05": 1e6}}})

    async def soft_body(client):
        ans = await (await client.post("/api/v1/predict", data=form(photo()))).json()
        assert ans["top_k"][0]["probability"] < 0.5
        assert ans["verdict"]["code"] == "not_identified"

    async def ood_body(client):
        ans = await (await client.post("/api/v1/predict", data=form(photo()))).json()
        assert ans["ood"]["out_of_distribution"] is True
        assert ans["verdict"]["code"] == "not_identified" and "does not look like" in ans["verdict"]["message"]

    async def ood_off_body(client):
        ans = await (await client.post("/api/v1/predict", data=form(photo()))).json()
        assert ans["ood"] is None and ans["verdict"]["code"] == "edible_species"

    run_client(app_for(soft), soft_body)
    run_client(app_for(ood), ood_body)
    run_client(app_for(ood, ood="false"), ood_off_body)


def test_bad_uploads_get_clear_4xx(export_factory):
    export = export_factory("edible_species", VERDICT_CASES["edible_species"])
    good = photo()

    async def body(client):
        async def post(data, status, match, **kw):
            r = await client.post("/api/v1/predict", data=data, **kw)
            ans = await r.json()
            assert r.status == status, ans
            assert match in ans["error"]["message"], ans
            assert ans["warning"] == WARNING

        await post(form(b""), 400, "empty")
        await post(form(b"not an image at all"), 400, "not an image")
        await post(form(good[: len(good) // 2]), 400, "truncated")
        await post(form(good, field="photo"), 400, "no field named 'image'")
        await post(form(b"x" * 30_000), 413, "larger than")
        await post(b"x" * 30_000, 413, "larger than", headers={"Content-Type": "image/jpeg"})
        await post(b"hello", 415, "Content-Type", headers={"Content-Type": "text/plain"})
        await post(good, 415, "Content-Encoding", headers={"Content-Type": "image/jpeg", "Content-Encoding": "gzip"})
        await post(form(b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>',
                        ctype="image/svg+xml"), 400, "SVG")
        # a 100,000 x 100,000 PNG header: refused from the header, before any decoding
        await post(form(png_bomb(100_000, 100_000)), 400, "pixels")
        assert (await client.get("/healthz")).status == 200

    run_client(app_for(export, max_upload_bytes=20_000), body)


def test_exif_orientation_is_honoured(export_factory):
    export = export_factory("edible_species", VERDICT_CASES["edible_species"])
    exif = __import__("PIL.Image", fromlist=["Exif"]).Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait (rotate 90°)

    async def body(client):
        ans = await (await client.post("/api/v1/predict", data=form(photo(size=(96, 64), exif=exif)))).json()
        assert ans["image"] == {"width": 64, "height": 96}

    run_client(app_for(export), body)


def test_static_files_do_not_traverse(export_factory):
    export = export_factory("edible_species", VERDICT_CASES["edible_species"])

    async def body(client):
        assert (await client.get("/static/style.css")).status == 200
        for path in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py", "/static/%2e%2e%2fapp.py",
                     "/static/../../../../etc/passwd", "/static//etc/passwd", "/static/", "/static/..\\app.py"):
            r = await client.get(path, allow_redirects=False)
            text = await r.text()
            assert r.status in (400, 403, 404), (path, r.status)
            assert "build_service_app" not in text and "root:" not in text

    run_client(app_for(export), body)


def test_nothing_is_written_to_disk(export_factory, tmp_path, monkeypatch):
    export = export_factory("edible_species", VERDICT_CASES["edible_species"])
    spool = tmp_path / "tmp"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    monkeypatch.chdir(tmp_path)
    big = photo(size=(1200, 900), quality=95)  # large enough that a spooling parser would use a file

    async def body(client):
        for _ in range(3):
            assert (await client.post("/api/v1/predict", data=form(big))).status == 200

    run_client(app_for(export), body)
    assert list(spool.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]


def test_full_queue_answers_503_with_retry_after(tmp_path):
    gate = threading.Event()

    def gated_builder(model_cfg, n):
        model = tiny_builder(model_cfg, n)
        forward = model.forward

        def slow_forward(x):
            gate.wait(30)
            return forward(x)

        model.forward = slow_forward
        return model

    export = make_export(tmp_path / "gated", logits_for({"boletus_bonus": 0.999999}), builder=tiny_builder)
    cfg = load_config(None, ["serve.queue_size=1", "serve.max_batch=1", "serve.decode_threads=1"])
    app = build_service_app(export, cfg, builder=gated_builder)
    data = photo()

    async def body(client):
        async def one():
            r = await client.post("/api/v1/predict", data=form(data))
            return r.status, r.headers.get("Retry-After"), await r.json()

        tasks = [asyncio.ensure_future(one()) for _ in range(6)]
        done_first, _ = await asyncio.wait(tasks, timeout=20, return_when=asyncio.FIRST_COMPLETED)
        assert done_first, "no request was turned away while the model was busy"
        gate.set()
        results = await asyncio.gather(*tasks)
        statuses = sorted(s for s, _, _ in results)
        assert 503 in statuses and 200 in statuses, statuses
        assert set(statuses) <= {200, 503}
        for s, retry, ans in results:
            if s == 503:
                assert int(retry) >= 1 and "busy" in ans["error"]["message"]
        assert (await client.get("/healthz")).status == 200

    run_client(app, body)


def test_default_builder_loads_the_real_architecture(tmp_path):
    """The production path (mycodist.models.build_model from config.yaml), not the narrowed test ViT."""
    export = make_export(tmp_path / "real", logits_for({"amanita_letalis": 0.9}), builder=full_builder)
    cfg = load_config()
    app = build_service_app(export, cfg)  # no builder: the default one

    async def body(client):
        ans = await (await client.post("/api/v1/predict", data=form(photo()))).json()
        assert ans["verdict"]["code"] == "poisonous"

    run_client(app, body)


@pytest.mark.parametrize("calibration", [None, {"temperature": 1.0}, {"ood": CALIBRATED["ood"]}])
def test_uncalibrated_export_is_refused_or_capped_at_do_not_eat(tmp_path, calibration):
    """No calibration.json, no OOD statistics, or no temperature: serve refuses to start; allowed
    explicitly, a confident edible answer becomes do_not_eat and says why."""
    export = make_export(tmp_path / "e", logits_for({"boletus_bonus": 0.999999}), calibration)
    with pytest.raises(UsageError, match="allow_uncalibrated"):
        app_for(export)

    async def body(client):
        ans = await (await client.post("/api/v1/predict", data=form(photo()))).json()
        assert ans["verdict"]["code"] == "do_not_eat"
        assert "uncalibrated" in ans["verdict"]["rules"]
        assert any(r.startswith("uncalibrated: the model is uncalibrated") for r in ans["verdict"]["reasons"])

    run_client(app_for(export, allow_uncalibrated="true"), body)


def test_answer_names_every_rule_and_shows_the_lookalikes(export_factory):
    """An edible top with its deadly lookalike at 2%: the API lists the rules that fired and the
    lookalike with its probability; the server-rendered page shows the same table."""
    export = export_factory("lookalike", {"agaricus_similis": 0.97, "amanita_letalis": 0.02})

    async def body(client):
        ans = await (await client.post("/api/v1/predict", data=form(photo()))).json()
        v = ans["verdict"]
        assert v["code"] == "do_not_eat"
        assert {"toxic_lookalike", "poison_mass"} <= set(v["rules"]), v["reasons"]
        (look,) = v["lookalikes"]
        assert look["label"] == "amanita_letalis" and look["edibility"] == "deadly"
        assert look["probability"] == pytest.approx(0.02, rel=1e-3) and look["in_classes"] is True
        r = await client.post("/", data=form(photo()))
        text = await r.text()
        assert 'id="lookalikes"' in text and "Amanita letalis" in text and "toxic_lookalike:" in text

    run_client(app_for(export), body)


@pytest.mark.parametrize("override", ["poison_mass=5", "lookalike_mass=-0.1", "min_confidence=nan",
                                      "require_lookalike_record=1"])
def test_bad_thresholds_are_refused(export_factory, override):
    export = export_factory("edible_species", VERDICT_CASES["edible_species"])
    with pytest.raises(UsageError, match=override.split("=")[0]):
        app_for(export, **dict([override.split("=")]))
