"""Safety figures for docs/safety.md: what the verdict rules do on real validation photos and on
generated photos of things that are not mushrooms.

    .venv/bin/python benchmarks/safety_eval.py --export RUN_DIR/export --shards SHARDS_DIR [serve.key=value ...]

Every photo goes through the serving path itself (decode_image → eval transform → model → calibration →
OOD score → verdict), batched. The OOD check is the one serving uses: the export's feature-distance score
(ood.safetensors) when present, else its logit score. Figures:
- toxic_as_edible: validation photos of poisonous/deadly species that got `edible_species` (goal 0);
- coverage: share of validation photos that get a species answer (any verdict but not_identified),
  and top-1 accuracy on those;
- ood_abstention: share of generated non-mushroom images (plain textures, drawn objects) answered
  `not_identified` (goal ≥ 90%); also with the OOD check off, to show what the score adds.
- rules_val / rules_ood: how many photos each safety rule fired on (every rule is evaluated and named in
  the verdict's reasons, so a photo can count under several);
- catalogue: classes with lookalikes, with a lookalike record, edibility disagreements.
Baselines in the same run: the same model with the OOD check off, with only the logit score (what
serving did before the feature score), and `baseline_without_lookalike_data`: the catalogue as it was
before the lookalike reference (no lookalikes, no records, `require_lookalike_record` off). `--feature-ood N` adds the comparison the feature score was chosen
by: features (pre-logits alone vs pre-logits + mean patch token) x score (Mahalanobis vs relative
Mahalanobis), fitted on N training photos, each at the threshold that keeps 95% of validation photos.
`--ood-seed` draws a different set of generated non-mushrooms (choose on one seed, report on another).
Last line: JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import io
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageDraw, ImageFilter

from mycodist.catalog import EDIBLE, TOXIC, Species
from mycodist.config import load_config
from mycodist.lookalikes import edibility_conflict
from mycodist.models import ood
from mycodist.serve.inference import Predictor, load_export
from mycodist.serve.preprocess import decode_image
from mycodist.verdict import EDIBLE_SPECIES, NOT_IDENTIFIED, SafetyRules


def val_samples(shards: Path, split: str = "val", limit: int | None = None) -> list[tuple[bytes, str]]:
    urls = sorted(glob.glob(str(shards / f"{split}-*.tar")))
    if not urls:
        sys.exit(f"no {split}-*.tar shards in {shards}")
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).to_tuple("jpg", "json")
    out = []
    for jpg, meta in ds:
        out.append((jpg, json.loads(meta)["label"]))
        if limit is not None and len(out) >= limit:
            break
    return out


def texture(rng: np.random.Generator, size: int = 256) -> Image.Image:
    """Plain textures: flat colour, noise, gradients, checkerboards, stripes, blurred blotches."""
    kind = rng.integers(6)
    if kind == 0:
        return Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
    if kind == 1:
        return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    if kind == 2:
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = np.linspace(0, 1, size)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, size)[:, None, None]
        return Image.fromarray(np.broadcast_to(a + (b - a) * t, (size, size, 3)).astype(np.uint8))
    if kind == 3:
        n = int(rng.integers(2, 16))
        board = (np.add.outer(np.arange(size) * n // size, np.arange(size) * n // size) % 2).astype(bool)
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        return Image.fromarray(np.where(board[..., None], a, b).astype(np.uint8))
    if kind == 4:
        period = int(rng.integers(4, 40))
        stripes = ((np.arange(size) // period) % 2).astype(bool)[None, :].repeat(size, 0)
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        img = Image.fromarray(np.where(stripes[..., None], a, b).astype(np.uint8))
        return img.rotate(float(rng.uniform(0, 180)), expand=False)
    blot = Image.fromarray(rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)).resize((size, size))
    return blot.filter(ImageFilter.GaussianBlur(float(rng.uniform(2, 10))))


def drawn_object(rng: np.random.Generator, size: int = 256) -> Image.Image:
    """Other objects: a house, a car-like box on wheels, a ball, a bottle, a grid of windows, text lines."""
    bg = tuple(int(c) for c in rng.integers(0, 256, 3))
    fg = tuple(int(c) for c in rng.integers(0, 256, 3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    kind = rng.integers(6)
    s = size
    if kind == 0:  # house
        d.rectangle((s * .25, s * .45, s * .75, s * .9), fill=fg)
        d.polygon([(s * .2, s * .45), (s * .5, s * .15), (s * .8, s * .45)], fill=tuple(255 - c for c in fg))
        d.rectangle((s * .45, s * .65, s * .55, s * .9), fill=bg)
    elif kind == 1:  # car
        d.rectangle((s * .1, s * .45, s * .9, s * .7), fill=fg)
        d.rectangle((s * .3, s * .3, s * .7, s * .45), fill=fg)
        for x in (.25, .75):
            d.ellipse((s * (x - .08), s * .62, s * (x + .08), s * .78), fill=(20, 20, 20))
    elif kind == 2:  # ball with a highlight
        d.ellipse((s * .2, s * .2, s * .8, s * .8), fill=fg)
        d.ellipse((s * .35, s * .3, s * .45, s * .4), fill=(255, 255, 255))
    elif kind == 3:  # bottle
        d.rectangle((s * .38, s * .35, s * .62, s * .9), fill=fg)
        d.rectangle((s * .45, s * .12, s * .55, s * .35), fill=fg)
    elif kind == 4:  # building facade
        d.rectangle((s * .1, s * .1, s * .9, s * .95), fill=fg)
        for i in range(4):
            for j in range(3):
                d.rectangle((s * (.18 + .2 * i), s * (.2 + .25 * j), s * (.3 + .2 * i), s * (.35 + .25 * j)), fill=bg)
    else:  # a page of text lines
        for i in range(12):
            w = float(rng.uniform(.4, .85))
            d.rectangle((s * .08, s * (.08 + .07 * i), s * (.08 + w), s * (.11 + .07 * i)), fill=fg)
    return img


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def batches(predictor: Predictor, images: list[bytes], batch: int = 32):
    tf = predictor.export.transform
    for i in range(0, len(images), batch):
        yield torch.stack([tf(decode_image(b, 10**9, tf)) for b in images[i:i + batch]])


def forward_all(predictor: Predictor, images: list[bytes]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits and (when the predictor uses it) the feature OOD score of every image, as serving computes them."""
    outs = [predictor.forward(x) for x in batches(predictor, images)]
    scores = None if outs[0][1] is None else torch.cat([sc for _, sc in outs])
    return torch.cat([lg for lg, _ in outs]), scores


@torch.inference_mode()
def features_of(predictor: Predictor, images: list[bytes]) -> torch.Tensor:
    """The feature-OOD features (pre-logits + mean patch token) of every image."""
    return torch.cat([ood.features_and_logits(predictor.export.model, x)[0] for x in batches(predictor, images)])


def forward_cost(with_score: Predictor, without: Predictor, images: list[bytes], batch: int, rounds: int = 5) -> dict:
    """Per-photo time of Predictor.forward with the feature score vs the plain model (same pre-decoded
    batches, one warm-up round, then alternating order, median of rounds so background load hits both
    alike), and the time of the score alone on those batches' features, which other load distorts less."""
    xs = list(batches(with_score, images, batch))
    times: dict[str, list[float]] = {"feature_ood": [], "plain": [], "score_only": []}
    with torch.inference_mode():
        feats = [ood.features_and_logits(with_score.export.model, x)[0] for x in xs]
    for r in range(rounds + 1):
        order = (("feature_ood", with_score), ("plain", without))
        for name, pred in order if r % 2 else order[::-1]:
            t0 = time.perf_counter()
            for x in xs:
                pred.forward(x)
            times[name].append((time.perf_counter() - t0) * 1000 / len(images))
        t0 = time.perf_counter()
        for f in feats:
            with_score.feature_ood.scores(f)
        times["score_only"].append((time.perf_counter() - t0) * 1000 / len(images))
    f, b, sc = (statistics.median(times[k][1:]) for k in ("feature_ood", "plain", "score_only"))
    return {"batch": batch, "photos": len(images), "ms_per_photo_feature_ood": round(f, 3),
            "ms_per_photo_plain": round(b, 3), "ms_per_photo_score_only": round(sc, 4),
            "score_share_of_plain_forward": round(sc / b, 4)}


def verdicts(predictor: Predictor, logits: torch.Tensor, scores: torch.Tensor | None = None) -> list[dict]:
    return predictor.answers(logits, scores)


def without_lookalike_data(species: dict[str, Species]) -> dict[str, Species]:
    """The catalogue as crawled before the lookalike reference existed: no links, notes or records."""
    out = {}
    for lab, sp in species.items():
        d = sp.to_json()
        d.update(lookalikes=[], lookalike_notes={}, lookalike_record="")
        out[lab] = Species.from_json(lab, d)
    return out


def catalogue_figures(species: dict[str, Species], labels: list[str]) -> dict:
    classes = [species[lab] for lab in labels if lab in species]
    return {"classes": len(labels), "with_lookalikes": sum(bool(s.lookalikes) for s in classes),
            "with_lookalike_record": sum(bool(s.lookalike_record) for s in classes),
            "lookalike_links_between_classes": sum(lk in labels for s in classes for lk in s.lookalikes) // 2,
            "edibility_disagreements": {s.label: edibility_conflict(s) for s in classes if edibility_conflict(s)}}


def auroc(in_dist: torch.Tensor, out: torch.Tensor) -> float:
    """P(an OOD image scores higher than an in-distribution one); ties count half."""
    diff = out.double()[:, None] - in_dist.double()[None, :]
    return float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())


def feature_ood(pred: Predictor, shards: Path, n_train: int, val: list[tuple[bytes, str]], ood_imgs: list[bytes],
                n_tex: int, keep: float, val_codes: list[str], ood_codes: list[str]) -> dict:
    """The candidates the serving score was chosen from, each fitted on `n_train` train photos, threshold =
    the `keep` quantile of its score on validation photos, combined with the rules' verdicts without OOD."""
    index = {lab: i for i, lab in enumerate(pred.export.labels)}
    train = val_samples(shards, "train", n_train)
    head_dim = int(pred.export.model.head.in_features)
    f_train, f_val, f_ood = (features_of(pred, imgs) for imgs in
                             ([b for b, _ in train], [b for b, _ in val], ood_imgs))
    y = torch.tensor([index[lab] for _, lab in train])
    out: dict = {"train_photos": len(train), "keep_val": keep}
    for space, cols in (("pre_logits", slice(0, head_dim)), (ood.FEATURES, slice(None))):
        stats = ood.fit_feature_gaussians(f_train[:, cols], y, len(index), 0.1)
        for score in ood.SCORES:
            sv, so = stats.score(f_val[:, cols], score), stats.score(f_ood[:, cols], score)
            t = ood.threshold_keeping(sv, keep)
            val_final = [NOT_IDENTIFIED if v > t else c for v, c in zip(sv.tolist(), val_codes, strict=True)]
            ood_final = [NOT_IDENTIFIED if v > t else c for v, c in zip(so.tolist(), ood_codes, strict=True)]
            out[f"{space}/{score}"] = {
                "auroc": round(auroc(sv, so), 4),
                "flagged_by_score_alone": round(float((so > t).double().mean()), 4),
                "ood_abstention": round(ood_final.count(NOT_IDENTIFIED) / max(1, len(ood_final)), 4),
                "ood_abstention_textures": round(ood_final[:n_tex].count(NOT_IDENTIFIED) / max(1, n_tex), 4),
                "ood_abstention_objects": round(ood_final[n_tex:].count(NOT_IDENTIFIED)
                                                / max(1, len(ood_final) - n_tex), 4),
                "coverage": round(sum(c != NOT_IDENTIFIED for c in val_final) / max(1, len(val_final)), 4)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--export", required=True, type=Path)
    p.add_argument("--shards", required=True, type=Path, help="data set folder with val-*.tar shards")
    p.add_argument("--ood-images", type=int, default=400, help="generated non-mushroom images (half textures)")
    p.add_argument("--ood-seed", type=int, default=0, help="seed of the generated non-mushroom images")
    p.add_argument("--feature-ood", type=int, default=0, metavar="N",
                   help="also compare feature-distance OOD variants fitted on N train photos; 0 = off")
    p.add_argument("overrides", nargs="*", help="serve.key=value (e.g. serve.min_confidence=0.6)")
    args = p.parse_args()
    cfg = load_config(None, args.overrides)
    s = cfg.serve
    export = load_export(args.export, ood_score=str(s.ood_score), ood_quantile=float(s.ood_quantile))
    rules = SafetyRules.from_config(s)
    configured = Predictor(export, rules, top_k=int(s.top_k), use_ood=bool(s.ood),
                           use_feature_ood=bool(s.ood_features))
    logit_ood = Predictor(export, rules, top_k=int(s.top_k), use_ood=bool(s.ood), use_feature_ood=False)
    without_ood = Predictor(export, rules, top_k=int(s.top_k), use_ood=False)
    bare = dataclasses.replace(export, species=without_lookalike_data(export.species))
    no_lookalikes = Predictor(bare, dataclasses.replace(rules, require_lookalike_record=False), top_k=int(s.top_k),
                              use_ood=bool(s.ood), use_feature_ood=bool(s.ood_features))

    samples = val_samples(args.shards)
    truth = [lab for _, lab in samples]
    val_logits, val_scores = forward_all(configured, [b for b, _ in samples])
    rng = np.random.default_rng(args.ood_seed)
    n_tex = args.ood_images // 2
    ood_imgs = [jpeg(texture(rng)) for _ in range(n_tex)] + [jpeg(drawn_object(rng)) for _ in range(args.ood_images - n_tex)]
    ood_logits, ood_scores = forward_all(configured, ood_imgs)

    def edib(label: str) -> str:
        sp = export.species.get(label)
        return sp.edibility if sp else "unknown"

    def summarise(pred: Predictor) -> dict:
        uses_scores = pred.feature_ood is not None
        val = verdicts(pred, val_logits, val_scores if uses_scores else None)
        codes = [a["verdict"]["code"] for a in val]
        top1 = [a["top_k"][0]["label"] for a in val]
        covered = [i for i, c in enumerate(codes) if c != NOT_IDENTIFIED]
        toxic = [i for i, lab in enumerate(truth) if edib(lab) in TOXIC]
        edible = [i for i, lab in enumerate(truth) if edib(lab) in EDIBLE]
        ood_answers = verdicts(pred, ood_logits, ood_scores if uses_scores else None)
        ood = [a["verdict"]["code"] for a in ood_answers]
        tex, obj = ood[:n_tex], ood[n_tex:]
        edible_top = [i for i, a in enumerate(val) if a["top_k"][0]["edibility"] in EDIBLE]
        return {
            "val_photos": len(codes),
            "top1": round(sum(t == y for t, y in zip(top1, truth, strict=True)) / max(1, len(truth)), 4),
            "coverage": round(len(covered) / max(1, len(codes)), 4),
            "top1_on_covered": round(sum(top1[i] == truth[i] for i in covered) / max(1, len(covered)), 4),
            "toxic_photos": len(toxic),
            "toxic_as_edible": sum(codes[i] == EDIBLE_SPECIES for i in toxic),
            "toxic_called_poisonous": sum(codes[i] == "poisonous" for i in toxic),
            "edible_photos": len(edible),
            "edible_as_edible_species": sum(codes[i] == EDIBLE_SPECIES for i in edible),
            "verdicts_val": dict(Counter(codes)),
            "ood_images": len(ood),
            "ood_abstention": round(ood.count(NOT_IDENTIFIED) / max(1, len(ood)), 4),
            "ood_abstention_textures": round(tex.count(NOT_IDENTIFIED) / max(1, len(tex)), 4),
            "ood_abstention_objects": round(obj.count(NOT_IDENTIFIED) / max(1, len(obj)), 4),
            "ood_as_edible": ood.count(EDIBLE_SPECIES),
            "verdicts_ood": dict(Counter(ood)),
            "rules_val": dict(sorted(Counter(r for a in val for r in a["verdict"]["rules"]).items())),
            "rules_ood": dict(sorted(Counter(r for a in ood_answers for r in a["verdict"]["rules"]).items())),
            "edible_top_photos": len(edible_top),
            "edible_top_verdicts": dict(Counter(codes[i] for i in edible_top)),
        }

    result = {"benchmark": "safety_eval", "export": str(args.export), "model": export.info["id"],
              "temperature": export.temperature, "ood_seed": args.ood_seed,
              "ood_rule": (export.info["feature_ood"] if configured.feature_ood is not None
                           else export.info["ood"] if configured.ood is not None else None),
              "rules": {k: getattr(rules, k) for k in ("min_confidence", "poison_mass", "lookalike_mass",
                                                       "unknown_is_toxic", "require_lookalike_record")},
              "uncalibrated": export.info.get("uncalibrated", ""),
              "catalogue": catalogue_figures(export.species, export.labels),
              "configured": summarise(configured), "baseline_without_ood": summarise(without_ood),
              "baseline_logit_ood_only": summarise(logit_ood),
              "baseline_without_lookalike_data": summarise(no_lookalikes)}
    if configured.feature_ood is not None and logit_ood.ood is not None:
        # both checks at once: the logit rule's verdicts, turned into not_identified where the feature score fires
        t = configured.feature_ood.threshold
        lv = [a["verdict"]["code"] for a in verdicts(logit_ood, val_logits)]
        lo = [a["verdict"]["code"] for a in verdicts(logit_ood, ood_logits)]
        both_v = [NOT_IDENTIFIED if sc > t else c for sc, c in zip(val_scores.tolist(), lv, strict=True)]
        both_o = [NOT_IDENTIFIED if sc > t else c for sc, c in zip(ood_scores.tolist(), lo, strict=True)]
        result["feature_and_logit_ood"] = {
            "coverage": round(sum(c != NOT_IDENTIFIED for c in both_v) / max(1, len(both_v)), 4),
            "ood_abstention": round(both_o.count(NOT_IDENTIFIED) / max(1, len(both_o)), 4)}
    if configured.feature_ood is not None:
        result["forward_cost"] = forward_cost(configured, without_ood, [b for b, _ in samples[:96]], int(s.max_batch))
    if args.feature_ood:
        plain = [[a["verdict"]["code"] for a in verdicts(without_ood, lg)] for lg in (val_logits, ood_logits)]
        result["feature_ood_candidates"] = feature_ood(configured, args.shards, args.feature_ood, samples, ood_imgs,
                                                       n_tex, 1.0 - float(s.ood_quantile), *plain)
    w, b = result["configured"], result["baseline_without_ood"]
    result["ratio"] = round(w["ood_abstention"] / b["ood_abstention"], 3) if b["ood_abstention"] else None
    print(f"toxic→edible {w['toxic_as_edible']}/{w['toxic_photos']}, coverage {w['coverage']:.1%}, "
          f"OOD abstention {w['ood_abstention']:.1%} (without the OOD check {b['ood_abstention']:.1%}, "
          f"logit score only {result['baseline_logit_ood_only']['ood_abstention']:.1%})", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
