"""`mycodist export RUN_DIR`: the folder predict and serve load, and nothing else.

RUN_DIR/export/ = model.safetensors (one consolidated fp32 state dict with the model's own names, also
from ZeRO shards), config.yaml (the run's resolved config), class_indices.json, species.json and
calibration.json (temperature fitted on validation, ECE before/after, OOD-score quantiles) and
ood.safetensors (class means and a shared precision matrix of the model's features on the TRAIN split,
mycodist.models.ood; its threshold, chosen on validation, is calibration.json's `feature_ood`). Runs in one
process from the newest complete checkpoint, so it works the same after any engine and any world size.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from mycodist.atomic import atomic_write_json
from mycodist.catalog import CLASS_INDICES, SPECIES
from mycodist.config import CONFIG_FILENAME, load_config, save_config
from mycodist.errors import UsageError
from mycodist.models import ood
from mycodist.train import checkpoint as ck

log = logging.getLogger(__name__)

EXPORT_DIR = "export"
MODEL_FILE = "model.safetensors"
CALIBRATION = "calibration.json"
OOD_FILE = "ood.safetensors"
OOD_SCORE = "mahalanobis"  # chosen by measurement over relative_mahalanobis (docs/safety.md)
OOD_SHRINKAGE = 0.1
OOD_KEEP_VAL = 0.95  # threshold = the score that keeps 95% of validation photos answered
OOD_MAX_TRAIN = 50_000  # photos the statistics are fitted on; more adds export time, not precision
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
    elif meta["engine"] == "fsdp":
        from mycodist.train.fsdp import consolidated_fsdp_weights

        sd = consolidated_fsdp_weights(ckpt)
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
            ema = {_strip(k): v for k, v in state["ema"].items()}
            if set(ema) != set(weights):
                raise UsageError(f"checkpoint {ckpt}: its EMA weights do not name the model's parameters "
                                 f"(e.g. {sorted(set(ema) ^ set(weights))[:3]}); export with train.ema_decay=0 "
                                 "to take the model's own weights")
            return {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in ema.items()}, "ema"
    return weights, "model"


def export_device(requested: str | torch.device | None = None) -> torch.device:
    """Where export runs its forwards: the training device when given (rank 0's GPU right after training),
    else a GPU when there is one: fitting the OOD statistics means a forward over up to OOD_MAX_TRAIN photos."""
    if requested is not None:
        return torch.device(requested)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def runnable_attention(cfg: DictConfig, device: torch.device) -> DictConfig:
    """The model config with an attention backend that can run on `device` in fp32 (export's forwards, and
    the serving machine, which may have no GPU): a backend that cannot run there falls back to `auto`, with a
    log line. The kernel is a runtime choice; masks (the model's semantics) are kept."""
    from omegaconf import OmegaConf

    from mycodist.models.attention import why_unavailable

    backend = str(cfg.model.attention)
    if backend == "auto":
        return cfg
    # export runs in fp32 (the weights' own precision): flash-attn, which needs fp16/bf16 on CUDA, never can
    reason = why_unavailable(backend, device.type, torch.float32, 64, False, None)
    if reason is None:
        return cfg
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    cfg.model.attention = "auto"
    log.warning("export: model.attention=%s cannot run here (%s); exporting with model.attention=auto (same "
                "results: the kernel is chosen where the model runs)", backend, reason)
    return cfg


@torch.no_grad()
def split_outputs(model: torch.nn.Module, cfg: DictConfig, split: str = "val",
                  limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(OOD features, logits, labels) of one split through the EVAL transform, in manifest order.

    The train split goes through the validation stream with its shards swapped in: the OOD statistics
    must describe photos as serving sees them (centre crop, no augmentation).
    """
    from mycodist.data import DataSpec, make_eval_loader, normalize

    spec = DataSpec.from_config(cfg)
    if split == "train":
        spec = dataclasses.replace(spec, val_shards=list(spec.train_shards))
    feats, logits, labels, seen = [], [], [], 0
    device = next(model.parameters()).device
    loader = make_eval_loader(cfg, 0, 1, spec=spec, pin_memory=device.type == "cuda")
    for images, y, _ in loader:
        images = images.to(device, non_blocking=True)
        if images.dtype == torch.uint8:
            images = normalize(images, tuple(cfg.data.mean), tuple(cfg.data.std))
        f, z = ood.features_and_logits(model, images.float())
        feats.append(f.float().cpu())
        logits.append(z.float().cpu())
        labels.append(y.long())
        seen += len(y)
        if limit is not None and seen >= limit:
            break
    loader.close()
    if not logits:
        empty = torch.zeros(0, 0, device="cpu")
        return empty, empty, torch.zeros(0, dtype=torch.long, device="cpu")
    return torch.cat(feats), torch.cat(logits), torch.cat(labels)


def validation_logits(model: torch.nn.Module, cfg: DictConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of the validation split (what the temperature is fitted on)."""
    _, logits, y = split_outputs(model, cfg, "val")
    return logits, y


def fit_feature_ood(model: torch.nn.Module, cfg: DictConfig, val_feats: torch.Tensor,
                    num_classes: int) -> tuple[ood.FeatureGaussians, dict[str, Any]] | None:
    """Fit the feature statistics on train photos and choose the threshold on validation photos.

    None (with a warning) when a split is missing: serving then falls back to the logit-based check.
    """
    if len(val_feats) == 0:
        log.warning("no validation photos: the export gets no feature OOD statistics (serving falls back)")
        return None
    train_feats, _, train_y = split_outputs(model, cfg, "train", limit=OOD_MAX_TRAIN)
    if len(train_feats) < 2:
        log.warning("fewer than 2 train photos: the export gets no feature OOD statistics (serving falls back)")
        return None
    stats = ood.fit_feature_gaussians(train_feats, train_y, num_classes, OOD_SHRINKAGE)
    val_scores = stats.score(val_feats, OOD_SCORE)
    threshold = ood.threshold_keeping(val_scores, OOD_KEEP_VAL)
    meta = {"file": OOD_FILE, "score": OOD_SCORE, "features": ood.FEATURES, "threshold": threshold,
            "keep_val": OOD_KEEP_VAL, "rule": f"score > threshold → out of distribution; threshold = the "
            f"q{round(OOD_KEEP_VAL * 100)} of the score on validation photos",
            "shrinkage": OOD_SHRINKAGE, "train_photos": len(train_feats), "val_photos": len(val_feats),
            "val_quantiles": ood.quantiles(val_scores),
            "train_quantiles": ood.quantiles(stats.score(train_feats, OOD_SCORE))}
    return stats, meta


def export_run(run_dir: Path, ckpt: Path | None = None, cfg: DictConfig | None = None,
               device: str | torch.device | None = None) -> Path:
    """Write RUN_DIR/export from `ckpt` (default: the newest complete checkpoint); returns the folder.
    The forwards (calibration, OOD statistics) run on `device` (default: a GPU when there is one)."""
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
    dev = export_device(device)
    cfg = runnable_attention(cfg, dev)
    model = build_model(cfg.model, len(labels))
    model.load_state_dict(weights, strict=True)
    model.to(dev).eval()
    val_feats, logits, y = split_outputs(model, cfg, "val")
    calibration: dict[str, Any] = calibration_summary(logits, y) if len(y) else {"temperature": 1.0}
    calibration.update({"weights": which, "checkpoint": str(ckpt), "step": ck.read_meta(ckpt)["step"]})
    feature_ood = fit_feature_ood(model, cfg, val_feats, len(labels))

    out = run_dir / EXPORT_DIR
    tmp = run_dir / f".tmp-{EXPORT_DIR}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / MODEL_FILE),
              metadata={"format": "pt", "model": str(cfg.model.name), "num_classes": str(len(labels))})
    save_config(cfg, tmp)
    for name in (CLASS_INDICES, SPECIES):
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, tmp / name)
    if feature_ood is not None:
        stats, meta = feature_ood
        ood.save_feature_gaussians(tmp / OOD_FILE, stats, {"score": meta["score"], "threshold": meta["threshold"]})
        calibration["feature_ood"] = meta
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
