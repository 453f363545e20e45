"""Helpers for the training tests: tiny shards from `mycodist synth`, launching `mycodist train --nproc 2`,
and reading what a run leaves behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# 4 species told apart by colour (learnable in a dozen steps, so "loss goes down" is a real check),
# 80 photos at 48 px → 64 train / 16 val, and a ViT-Tiny at 32 px: 4 steps per epoch at 8 images per
# rank on 2 ranks. Written by `mycodist ingest folder`, i.e. the real shard writer and manifest.
COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]
TINY = ["model.img_size=32", "train.batch_size=8", "train.lr=0.001", "train.lr_base_batch=0",
        "train.warmup_steps=2", "train.log_every=1", "train.tb_images=4", "data.workers=0"]


def make_shards(out: Path, per_class: int = 20, size: int = 48) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folders = out.parent / (out.name + "-folders")
    for c, colour in enumerate(COLOURS):
        d = folders / f"species_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            px = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 60, (size, size, 3)), 0, 255)
            Image.fromarray(px.astype(np.uint8)).save(d / f"{i:03d}.jpg", quality=90)
    subprocess.run([sys.executable, "-m", "mycodist", "ingest", "folder", str(folders), "--out", str(out), "--quiet",
                    "shards.ingest_workers=1", "shards.val_fraction=0.2"], check=True, cwd=REPO, capture_output=True)
    return out


def train(shards: Path, run_dir: Path, *overrides: str, nproc: int = 2, launcher: str | None = None,
          timeout: float = 240, check: bool = True) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "mycodist", "train", "--nproc", str(nproc)]
    if launcher:
        argv += ["--launcher", launcher]
    argv += [f"data.shards={shards}", f"train.output_dir={run_dir}", *TINY, *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def train_losses(run_dir: Path) -> dict[int, float]:
    """step → global mean loss; a step logged twice (a resumed run re-logs nothing, but be safe) keeps the last."""
    out: dict[int, float] = {}
    for line in (run_dir / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            out[rec["step"]] = rec["loss"]
    return out


def rank_reports(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "ranks").glob("rank*.json"))]


def assert_trained_together(run_dir: Path, world_size: int = 2) -> None:
    """World size really N (trap 2: N lone rank-0s) and identical full parameters on every rank."""
    reports = rank_reports(run_dir)
    assert sorted(r["rank"] for r in reports) == list(range(world_size)), reports
    assert all(r["world_size"] == world_size for r in reports), reports
    assert len({r["param_sha256"] for r in reports}) == 1, reports


def export_logits(run_dir: Path) -> tuple[list[str], torch.Tensor]:
    """Load RUN_DIR/export the way predict/serve do, and run it over the validation split."""
    from safetensors.torch import load_file

    from mycodist.catalog import load_class_indices
    from mycodist.config import load_config
    from mycodist.data import DataSpec, make_eval_loader
    from mycodist.models import build_model

    exp = run_dir / "export"
    cfg = load_config(exp / "config.yaml")
    labels = load_class_indices(exp / "class_indices.json")
    model = build_model(cfg.model, len(labels))
    model.load_state_dict(load_file(str(exp / "model.safetensors")), strict=True)
    model.eval()
    keys, logits = [], []
    with torch.no_grad():
        for images, _, k in make_eval_loader(cfg, 0, 1, spec=DataSpec.from_config(cfg)):
            logits.append(model(images))
            keys.extend(k)
    return keys, torch.cat(logits)


def assert_export_matches_live(run_dir: Path, atol: float) -> None:
    live = torch.load(run_dir / "eval" / "final_logits.pt", weights_only=False)
    keys, logits = export_logits(run_dir)
    assert sorted(keys) == sorted(live["keys"]) and len(keys) > 0
    by_key = dict(zip(live["keys"], live["logits"], strict=True))
    expected = torch.stack([by_key[k] for k in keys])
    assert torch.allclose(logits, expected, atol=atol, rtol=0), (logits - expected).abs().max()
    calib = json.loads((run_dir / "export" / "calibration.json").read_text())
    assert calib["temperature"] > 0 and calib["val_samples"] == len(keys)


def fake_run(tmp_path: Path, per_class: int = 20) -> tuple[Path, Path]:
    """A run folder with one complete checkpoint of a fresh ViT-Tiny at 32 px over real shards: what export
    needs, without training. Returns (shards, run)."""
    import shutil

    from safetensors.torch import save_file

    from mycodist.catalog import CLASS_INDICES, SPECIES, load_class_indices
    from mycodist.config import load_config, save_config
    from mycodist.models import build_model
    from mycodist.train import checkpoint as ck

    shards = make_shards(tmp_path / "shards", per_class=per_class)
    run = tmp_path / "run"
    cfg = load_config(None, [f"data.shards={shards}", f"train.output_dir={run}", "model.img_size=32",
                             "data.workers=0", "train.batch_size=8"])
    run.mkdir()
    save_config(cfg, run)
    for name in (CLASS_INDICES, SPECIES):
        shutil.copyfile(shards / name, run / name)
    labels = load_class_indices(run / CLASS_INDICES)
    torch.manual_seed(0)
    model = build_model(cfg.model, len(labels)).eval()
    tmp = ck.begin_save(run, 3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / ck.MODEL_FILE))
    ck.finish_save(tmp, {"step": 3, "engine": "accelerate", "uses_deepspeed": False}, keep_last=0)
    return shards, run
