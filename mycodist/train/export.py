"""`mycodist export RUN_DIR`: the folder predict and serve load, and nothing else.

RUN_DIR/export/ = model.safetensors (one consolidated fp32 state dict with the model's own names, also
from ZeRO shards), config.yaml (the run's resolved config), class_indices.json, species.json and
calibration.json (temperature fitted on validation, ECE before/after, OOD-score quantiles). Runs in one
process from the newest complete checkpoint, so it works the same after any engine and any world size.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from mycodist.atomic import atomic_write_json
from mycodist.catalog import CLASS_INDICES, SPECIES
from mycodist.config import CONFIG_FILENAME, load_config, save_config
from mycodist.errors import UsageError
from mycodist.train import checkpoint as ck

EXPORT_DIR = "export"
MODEL_FILE = "model.safetensors"
CALIBRATION = "calibration.json"
_PREFIXES = ("module.", "_orig_mod.")


def _strip(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return name


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a checkpoint of any engine (DeepSpeed: from the fp32 optimizer partitions)."""
    meta = ck.read_meta(ckpt)
    if meta.get("uses_deepspeed"):
        # accelerate's DeepSpeed plugin saves under <ckpt>/pytorch_model; our DeepSpeed engine under <ckpt>
        tag_root, tag = (ckpt, "pytorch_model") if meta["engine"] == "accelerate" else (ckpt.parent, ckpt.name)
        if meta.get("zero_stage", 0) == 0:
            states = torch.load(tag_root / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
            sd = states["module"]
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_root), tag=tag)
    else:
        from safetensors.torch import load_file

        sd = load_file(str(ckpt / MODEL_FILE))
    return {_strip(k): (v.float() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def export_weights(ckpt: Path, cfg: DictConfig) -> tuple[dict[str, torch.Tensor], str]:
    """EMA weights when the run kept them (they are what was evaluated last), else the model's."""
    weights = consolidated_state_dict(ckpt)
    if cfg.train.ema_decay > 0:
        state = torch.load(ck.trainer_state_file(ckpt, 0), map_location="cpu", weights_only=False)
        if state.get("ema"):
            weights.update({k: v.float() for k, v in state["ema"].items()})
            return weights, "ema"
    return weights, "model"


@torch.no_grad()
def validation_logits(model: torch.nn.Module, cfg: DictConfig) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from mycodist.data import DataSpec, make_eval_loader

    spec = DataSpec.from_config(cfg)
    logits, labels, keys = [], [], []
    for images, y, k in make_eval_loader(cfg, 0, 1, spec=spec):
        if images.dtype == torch.uint8:
            from mycodist.data import normalize

            images = normalize(images, tuple(cfg.data.mean), tuple(cfg.data.std))
        logits.append(model(images.float()).float())
        labels.append(y.long())
        keys.extend(k)
    if not logits:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), []
    return torch.cat(logits), torch.cat(labels), keys


def export_run(run_dir: Path, ckpt: Path | None = None, cfg: DictConfig | None = None) -> Path:
    """Write RUN_DIR/export from `ckpt` (default: the newest complete checkpoint); returns the folder."""
    from safetensors.torch import save_file

    from mycodist.models import build_model
    from mycodist.train.metrics import calibration_summary

    run_dir = Path(run_dir)
    if cfg is None:
        cfg = load_config(run_dir / CONFIG_FILENAME)
    if ckpt is None:
        done = ck.complete_checkpoints(run_dir)
        if not done:
            raise UsageError(f"'{run_dir}' has no complete checkpoint under {ck.CKPT_DIR}/; train first")
        ckpt = done[-1]
    labels_file = run_dir / CLASS_INDICES
    from mycodist.catalog import load_class_indices

    labels = load_class_indices(labels_file)
    weights, which = export_weights(ckpt, cfg)
    model = build_model(cfg.model, len(labels))
    model.load_state_dict(weights, strict=True)
    model.eval()
    logits, y, _ = validation_logits(model, cfg)
    calibration: dict[str, Any] = calibration_summary(logits, y) if len(y) else {"temperature": 1.0}
    calibration.update({"weights": which, "checkpoint": str(ckpt), "step": ck.read_meta(ckpt)["step"]})

    out = run_dir / EXPORT_DIR
    tmp = run_dir / f".tmp-{EXPORT_DIR}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / MODEL_FILE),
              metadata={"format": "pt", "model": str(cfg.model.name), "num_classes": str(len(labels))})
    save_config(cfg, tmp)
    for name in (CLASS_INDICES, SPECIES):
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, tmp / name)
    atomic_write_json(tmp / CALIBRATION, calibration)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a training run folder (train.output_dir)")
    parser.add_argument("--checkpoint", help="a checkpoint folder to export instead of the newest complete one")


def main(args: argparse.Namespace, cfg: DictConfig) -> int:
    run_dir = Path(args.run_dir)
    if not (run_dir / CONFIG_FILENAME).is_file():
        raise UsageError(f"'{run_dir}' is not a training run folder (no {CONFIG_FILENAME}); "
                         "pass the train.output_dir of a run")
    run_cfg = load_config(run_dir / CONFIG_FILENAME, args.overrides)
    ckpt = None
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
        if not (ckpt / ck.META).is_file():
            raise UsageError(f"--checkpoint '{ckpt}' is not a complete checkpoint folder (no {ck.META})")
    out = export_run(run_dir, ckpt, run_cfg)
    print(out)
    return 0
