"""serve.runtime=onnxruntime: the ONNX graph against PyTorch, answers that name runtime and precision, and
int8 refused when its verdicts agree with fp32's too rarely. Real tiny ViTs, real ONNX Runtime sessions."""

from __future__ import annotations

import json

import aiohttp
import pytest
import torch
from safetensors.torch import load_file, save_file
from serve_util import CALIBRATED, LABELS, full_builder, logits_for, make_export, photo, run_client, tiny_builder

from mycodist.config import load_config
from mycodist.errors import UsageError
from mycodist.export import onnx as onnx_export
from mycodist.models import ood
from mycodist.serve.app import build_service_app
from mycodist.serve.inference import load_export

pytest.importorskip("onnxruntime")


def _images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g)


def _with_onnx(folder, int8: str = "dynamic", photos: int = 24):
    """Add the ONNX files to an export folder, from the very model the loader builds from it."""
    model = load_export(folder, builder=tiny_builder).model
    return onnx_export.write_onnx(folder, model, _images(photos), int8=int8)


def _app(export, *overrides):
    return build_service_app(export, load_config(None, list(overrides)), builder=tiny_builder)


def _form(data: bytes) -> aiohttp.FormData:
    f = aiohttp.FormData()
    f.add_field("image", data, filename="photo.jpg", content_type="image/jpeg")
    return f


@pytest.mark.parametrize("int8", ["dynamic", "static"])
def test_onnx_logits_and_features_match_torch(tmp_path, int8):
    """A random-weight ViT (non-zero head, so logits vary per photo): fp32 ONNX = PyTorch to 1e-4 on photos
    it was not checked on, at other batch sizes; the int8 graph is close and its record is filled in."""
    folder = make_export(tmp_path / "e", logits_for({"boletus_bonus": 0.5}))
    torch.manual_seed(1)
    state = load_file(str(folder / "model.safetensors"))
    state["head.weight"] = torch.randn_like(state["head.weight"])
    save_file(state, str(folder / "model.safetensors"))
    meta = _with_onnx(folder, int8)
    assert meta["fp32"]["max_abs_diff_logits"] <= 1e-4 and meta["fp32"]["max_abs_diff_features"] <= 1e-4
    assert meta["int8"]["method"] == int8 and 0.0 <= meta["int8"]["top1_agreement"] <= 1.0
    assert json.loads((folder / onnx_export.ONNX_META).read_text()) == meta

    model = load_export(folder, builder=tiny_builder).model
    fresh = _images(5, seed=7)
    with torch.inference_mode():
        feats, logits = ood.features_and_logits(model, fresh)
    assert logits.std(0).max() > 1e-3  # the photos really give different logits
    sess = onnx_export.session(folder / onnx_export.ONNX_FILE)
    for batch in (1, 5):
        z, f = onnx_export.run_onnx(sess, fresh, batch)
        assert (z - logits).abs().max() <= 1e-4 and (f - feats).abs().max() <= 1e-4
    z8, _ = onnx_export.run_onnx(onnx_export.session(folder / onnx_export.INT8_FILE), fresh, 5)
    corr = torch.corrcoef(torch.stack([z8.flatten(), logits.flatten()]))[0, 1]
    assert corr > 0.8, corr  # int8 approximates the same function (random weights: measured 0.87-0.9998)


def test_export_fails_when_onnx_differs_beyond_tolerance(tmp_path):
    folder = make_export(tmp_path / "e", logits_for({"boletus_bonus": 0.5}))
    model = load_export(folder, builder=tiny_builder).model
    with pytest.raises(UsageError, match="onnx_tolerance"):
        onnx_export.write_onnx(folder, model, _images(4), int8="none", tolerance=-1.0)
    assert not (folder / onnx_export.ONNX_META).exists()


def test_answers_name_runtime_and_precision(tmp_path):
    folder = make_export(tmp_path / "e", logits_for({"amanita_letalis": 0.97}), CALIBRATED)
    _with_onnx(folder)
    data = photo()
    seen = {}
    for runtime, precision in (("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")):
        async def body(client, runtime=runtime, precision=precision):
            r = await client.post("/api/v1/predict", data=_form(data))
            assert r.status == 200, await r.text()
            ans = await r.json()
            assert ans["model"]["runtime"] == runtime and ans["model"]["precision"] == precision
            seen[(runtime, precision)] = ans
            health = await (await client.get("/healthz")).json()
            assert health["model"]["runtime"] == runtime and health["model"]["precision"] == precision

        run_client(_app(folder, f"serve.runtime={runtime}", f"serve.precision={precision}"), body)
    codes = {k: a["verdict"]["code"] for k, a in seen.items()}
    assert set(codes.values()) == {"poisonous"}, codes
    p_torch = seen[("torch", "fp32")]["top_k"][0]["probability"]
    assert seen[("onnxruntime", "fp32")]["top_k"][0]["probability"] == pytest.approx(p_torch, abs=1e-5)


def _disagreeing_int8(folder, flipped: int, total: int, record: bool = True) -> None:
    """Rewrite the int8 outputs kept by the export so that exactly `flipped` of `total` photos get another top
    species than fp32: what a quantisation that harms the model looks like. With `record`, onnx.json gets
    the rate the export would then have recorded."""
    path = folder / onnx_export.ONNX_VAL
    t = load_file(str(path))
    assert len(t["logits_fp32"]) == total
    int8 = t["logits_fp32"].clone()
    int8[:flipped] = int8[:flipped].roll(1, dims=1)  # the confident death cap becomes another species
    t["logits_int8"] = int8
    save_file(t, str(path))
    if record:
        meta = json.loads((folder / onnx_export.ONNX_META).read_text())
        meta["int8"]["verdicts"] = onnx_export.int8_verdicts(folder, t)
        (folder / onnx_export.ONNX_META).write_text(json.dumps(meta))


def _health(app) -> dict:
    seen = {}

    async def body(client):
        seen.update(await (await client.get("/healthz")).json())

    run_client(app, body)
    return seen


def test_export_records_the_int8_verdict_agreement(tmp_path):
    """The export counts int8 against fp32 verdicts on its validation photos with serving's own decision code
    and the serve defaults, and records the rate with the conditions; serve, with the same settings, takes
    that figure as it is (no recount) and shows it in /healthz."""
    folder = make_export(tmp_path / "e", logits_for({"amanita_letalis": 0.97}), CALIBRATED)
    meta = _with_onnx(folder, photos=20)
    rec = meta["int8"]["verdicts"]
    assert rec["photos"] == 20 and 0.0 <= rec["verdict_agreement"] <= 1.0 and rec["agree"] == round(20 * rec["verdict_agreement"])
    assert rec["conditions"]["rules"]["min_confidence"] == 0.5 and rec["conditions"]["uncalibrated"] == ""
    assert json.loads((folder / onnx_export.ONNX_META).read_text())["int8"]["verdicts"] == rec

    _disagreeing_int8(folder, flipped=3, total=20)  # recorded: 17 of 20
    health = _health(_app(folder, "serve.runtime=onnxruntime", "serve.precision=int8", "serve.int8_min_agreement=0.8"))
    got = health["model"]["int8"]
    assert got["source"] == "onnx.json (export)" and got["verdict_agreement"] == pytest.approx(0.85)
    assert health["model"]["runtime"] == "onnxruntime" and health["model"]["precision"] == "int8"


def test_int8_is_refused_below_the_agreement_threshold(tmp_path):
    folder = make_export(tmp_path / "e", logits_for({"amanita_letalis": 0.97}), CALIBRATED)
    _with_onnx(folder, photos=20)
    _disagreeing_int8(folder, flipped=2, total=20)  # verdicts agree on 18 of 20 = 90%
    with pytest.raises(UsageError, match=r"int8 refused.*90\.00% of 20.*onnx\.json \(export\).*int8_min_agreement=0\.99"):
        _app(folder, "serve.runtime=onnxruntime", "serve.precision=int8")
    with pytest.raises(UsageError, match="int8 refused"):
        _app(folder, "serve.runtime=onnxruntime", "serve.precision=int8", "serve.int8_min_agreement=0.91")
    health = _health(_app(folder, "serve.runtime=onnxruntime", "serve.precision=int8", "serve.int8_min_agreement=0.9"))
    assert health["model"]["precision"] == "int8"
    fp32 = _app(folder, "serve.runtime=onnxruntime", "serve.precision=fp32")  # fp32 is never refused
    assert fp32 is not None


def test_int8_refusal_reads_the_recorded_rate(tmp_path):
    """The rate serve judges by is the one the export recorded: a record of 90% is refused although the kept
    outputs agree fully; the same record is ignored (recounted, 100%) once serve's thresholds differ from
    the ones it was counted under, since it then describes other verdicts."""
    folder = make_export(tmp_path / "e", logits_for({"amanita_letalis": 0.97}), CALIBRATED)
    _with_onnx(folder, photos=20)
    meta = json.loads((folder / onnx_export.ONNX_META).read_text())
    meta["int8"]["verdicts"].update(verdict_agreement=0.9, agree=18)
    (folder / onnx_export.ONNX_META).write_text(json.dumps(meta))
    with pytest.raises(UsageError, match=r"90\.00% of 20 validation photos \(onnx\.json \(export\)\)"):
        _app(folder, "serve.runtime=onnxruntime", "serve.precision=int8")
    health = _health(_app(folder, "serve.runtime=onnxruntime", "serve.precision=int8", "serve.min_confidence=0.6"))
    got = health["model"]["int8"]
    assert got["verdict_agreement"] == 1.0 and got["source"].startswith("recounted at start-up: serve's rules")
    # and the recount refuses too when the kept outputs disagree under serve's own thresholds
    _disagreeing_int8(folder, flipped=2, total=20, record=False)
    with pytest.raises(UsageError, match=r"90\.00% of 20 validation photos \(recounted at start-up"):
        _app(folder, "serve.runtime=onnxruntime", "serve.precision=int8", "serve.min_confidence=0.6")
    # an edited catalogue (say an edibility corrected in species.json) changes verdicts: recounted too
    species = json.loads((folder / "species.json").read_text())
    first = next(iter(species)) if isinstance(species, dict) else 0
    species[first]["edibility"] = "deadly" if species[first].get("edibility") != "deadly" else "poisonous"
    (folder / "species.json").write_text(json.dumps(species))
    with pytest.raises(UsageError, match=r"recounted at start-up: serve's catalogue_sha256 differ"):
        _app(folder, "serve.runtime=onnxruntime", "serve.precision=int8")  # the kept outputs disagree (above)
    # an export made before the rate was recorded: counted at start-up
    del meta["int8"]["verdicts"]
    (folder / onnx_export.ONNX_META).write_text(json.dumps(meta))
    with pytest.raises(UsageError, match="recorded no verdict agreement"):
        _app(folder, "serve.runtime=onnxruntime", "serve.precision=int8")


def test_runtime_and_precision_usage_errors(tmp_path):
    folder = make_export(tmp_path / "e", logits_for({"boletus_bonus": 0.5}))
    with pytest.raises(UsageError, match="--onnx"):
        _app(folder, "serve.runtime=onnxruntime")
    with pytest.raises(UsageError, match="ONNX Runtime only"):
        _app(folder, "serve.precision=int8")
    with pytest.raises(UsageError, match="serve.runtime must be one of"):
        _app(folder, "serve.runtime=tensorrt")
    with pytest.raises(UsageError, match="int8_min_agreement"):
        _app(folder, "serve.int8_min_agreement=1.5")
    _with_onnx(folder, int8="none", photos=4)
    with pytest.raises(UsageError, match="model.int8.onnx' is missing"):
        _app(folder, "serve.runtime=onnxruntime", "serve.precision=int8")
    # ONNX graphs of other weights than model.safetensors are stale: refused, not served
    state = load_file(str(folder / "model.safetensors"))
    state["head.bias"] = torch.tensor(logits_for({"lepista_tuta": 0.9}))
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(UsageError, match="other weights"):
        _app(folder, "serve.runtime=onnxruntime")
    assert len(LABELS) == load_export(folder, builder=tiny_builder).info["classes"]


def test_predict_cli_runs_the_chosen_runtime(tmp_path, capsys):
    from mycodist.cli import main as cli

    folder = make_export(tmp_path / "e", logits_for({"amanita_letalis": 0.97}), CALIBRATED,
                         builder=full_builder)
    model = load_export(folder).model
    onnx_export.write_onnx(folder, model, _images(4), int8="dynamic")
    img = tmp_path / "p.jpg"
    img.write_bytes(photo())
    assert cli(["predict", "--model", str(folder), str(img), "serve.runtime=onnxruntime",
                "serve.precision=int8"]) == 0
    ans = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ans["model"]["runtime"] == "onnxruntime" and ans["model"]["precision"] == "int8"
    assert ans["verdict"]["code"] == "poisonous"
