"""Safety figures for docs/safety.md: what the verdict rules do on real validation photos and on
generated photos of things that are not mushrooms.

    .venv/bin/python benchmarks/safety_eval.py --export RUN_DIR/export --shards SHARDS_DIR [serve.key=value ...]

Every photo goes through the serving path itself (decode_image → eval transform → model → calibration →
OOD score → verdict), batched. Figures:
- toxic_as_edible: validation photos of poisonous/deadly species that got `edible_species` (goal 0);
- coverage: share of validation photos that get a species answer (any verdict but not_identified),
  and top-1 accuracy on those;
- ood_abstention: share of generated non-mushroom images (plain textures, drawn objects) answered
  `not_identified` (goal ≥ 90%); also with the OOD check off, to show what the score adds.
Baseline in the same run: the same model with the OOD check off. `--feature-ood N` adds an experiment:
a Mahalanobis feature-distance OOD score fitted on N training photos (serving does not have it).
Last line: JSON.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageDraw, ImageFilter

from mycodist.catalog import EDIBLE, TOXIC
from mycodist.config import load_config
from mycodist.serve.inference import Predictor, load_export
from mycodist.serve.preprocess import decode_image
from mycodist.serve.verdict import EDIBLE_SPECIES, NOT_IDENTIFIED, SafetyRules


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


def logits_of(predictor: Predictor, images: list[bytes], batch: int = 32) -> torch.Tensor:
    tf = predictor.export.transform
    out = []
    for i in range(0, len(images), batch):
        x = torch.stack([tf(decode_image(b, 10**9, tf)) for b in images[i:i + batch]])
        out.append(predictor.logits(x))
    return torch.cat(out)


def features_of(predictor: Predictor, images: list[bytes], batch: int = 32) -> torch.Tensor:
    """The head's input (timm's pre-logits features), captured with a forward hook."""
    grabbed: list[torch.Tensor] = []
    hook = predictor.export.model.head.register_forward_hook(lambda m, inp, out: grabbed.append(inp[0].float().cpu()))
    try:
        logits_of(predictor, images, batch)
    finally:
        hook.remove()
    return torch.cat(grabbed)


def mahalanobis_fit(feats: torch.Tensor, labels: list[int], classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means and one shared, shrunk precision matrix (Lee et al. 2018, without input noise)."""
    y = torch.tensor(labels)
    means = torch.stack([feats[y == c].mean(0) if (y == c).any() else feats.mean(0) for c in range(classes)])
    centred = feats - means[y]
    cov = centred.T @ centred / max(1, len(feats) - 1)
    cov = 0.9 * cov + 0.1 * torch.eye(cov.shape[0]) * cov.diagonal().mean()
    return means, torch.linalg.inv(cov.double()).float()


def mahalanobis_score(feats: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Negative distance to the nearest class mean: high = familiar, like the other scores."""
    d = feats[:, None, :] - means[None]
    return -torch.einsum("nci,ij,ncj->nc", d, precision, d).min(dim=1).values


def verdicts(predictor: Predictor, logits: torch.Tensor) -> list[dict]:
    return [predictor.answer(row) for row in logits]


def feature_ood(pred: Predictor, shards: Path, n_train: int, val: list[tuple[bytes, str]], ood_imgs: list[bytes],
                n_tex: int, quantile: float, rules: SafetyRules) -> dict:
    """What a Mahalanobis feature-distance OOD check would do (not part of serving yet): fitted on train
    photos, threshold = the `quantile` of the score on validation photos, combined with the configured rules."""
    index = {lab: i for i, lab in enumerate(pred.export.labels)}
    train = val_samples(shards, "train", n_train)
    means, precision = mahalanobis_fit(features_of(pred, [b for b, _ in train]), [index[lab] for _, lab in train],
                                       len(index))
    val_score = mahalanobis_score(features_of(pred, [b for b, _ in val]), means, precision)
    ood_score = mahalanobis_score(features_of(pred, ood_imgs), means, precision)
    threshold = float(torch.quantile(val_score, quantile))
    val_codes = [a["verdict"]["code"] for a in verdicts(pred, logits_of(pred, [b for b, _ in val]))]
    ood_codes = [a["verdict"]["code"] for a in verdicts(pred, logits_of(pred, ood_imgs))]
    val_final = [NOT_IDENTIFIED if sc < threshold else c for sc, c in zip(val_score.tolist(), val_codes, strict=True)]
    ood_final = [NOT_IDENTIFIED if sc < threshold else c for sc, c in zip(ood_score.tolist(), ood_codes, strict=True)]
    return {"train_photos": len(train), "threshold": threshold,
            "coverage": round(sum(c != NOT_IDENTIFIED for c in val_final) / max(1, len(val_final)), 4),
            "ood_abstention": round(ood_final.count(NOT_IDENTIFIED) / max(1, len(ood_final)), 4),
            "ood_abstention_textures": round(ood_final[:n_tex].count(NOT_IDENTIFIED) / max(1, n_tex), 4),
            "ood_abstention_objects": round(ood_final[n_tex:].count(NOT_IDENTIFIED) / max(1, len(ood_final) - n_tex), 4),
            "ood_flagged_by_score_alone": round(float((ood_score < threshold).float().mean()), 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--export", required=True, type=Path)
    p.add_argument("--shards", required=True, type=Path, help="data set folder with val-*.tar shards")
    p.add_argument("--ood-images", type=int, default=400, help="generated non-mushroom images (half textures)")
    p.add_argument("--feature-ood", type=int, default=0, metavar="N",
                   help="also try a feature-distance OOD score (Mahalanobis, fitted on N train photos); 0 = off")
    p.add_argument("overrides", nargs="*", help="serve.key=value (e.g. serve.min_confidence=0.6)")
    args = p.parse_args()
    cfg = load_config(None, args.overrides)
    s = cfg.serve
    export = load_export(args.export, ood_score=str(s.ood_score), ood_quantile=float(s.ood_quantile))
    rules = SafetyRules.from_config(s)
    configured = Predictor(export, rules, top_k=int(s.top_k), use_ood=bool(s.ood))
    without_ood = Predictor(export, rules, top_k=int(s.top_k), use_ood=False)

    samples = val_samples(args.shards)
    truth = [lab for _, lab in samples]
    val_logits = logits_of(configured, [b for b, _ in samples])
    rng = np.random.default_rng(0)
    n_tex = args.ood_images // 2
    ood_imgs = [jpeg(texture(rng)) for _ in range(n_tex)] + [jpeg(drawn_object(rng)) for _ in range(args.ood_images - n_tex)]
    ood_logits = logits_of(configured, ood_imgs)

    def edib(label: str) -> str:
        sp = export.species.get(label)
        return sp.edibility if sp else "unknown"

    def summarise(pred: Predictor) -> dict:
        val = verdicts(pred, val_logits)
        codes = [a["verdict"]["code"] for a in val]
        top1 = [a["top_k"][0]["label"] for a in val]
        covered = [i for i, c in enumerate(codes) if c != NOT_IDENTIFIED]
        toxic = [i for i, lab in enumerate(truth) if edib(lab) in TOXIC]
        edible = [i for i, lab in enumerate(truth) if edib(lab) in EDIBLE]
        ood = [a["verdict"]["code"] for a in verdicts(pred, ood_logits)]
        tex, obj = ood[:n_tex], ood[n_tex:]
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
        }

    result = {"benchmark": "safety_eval", "export": str(args.export), "model": export.info["id"],
              "temperature": export.temperature, "ood_rule": export.info["ood"],
              "rules": {k: getattr(rules, k) for k in ("min_confidence", "poison_mass", "lookalike_mass",
                                                       "unknown_is_toxic")},
              "configured": summarise(configured), "baseline_without_ood": summarise(without_ood)}
    if args.feature_ood:
        result["feature_ood"] = feature_ood(configured, args.shards, args.feature_ood, samples, ood_imgs, n_tex,
                                            float(s.ood_quantile), rules)
    w, b = result["configured"], result["baseline_without_ood"]
    result["ratio"] = round(w["ood_abstention"] / b["ood_abstention"], 3) if b["ood_abstention"] else None
    print(f"toxic→edible {w['toxic_as_edible']}/{w['toxic_photos']}, coverage {w['coverage']:.1%}, "
          f"OOD abstention {w['ood_abstention']:.1%} (without the OOD check {b['ood_abstention']:.1%})", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
