"""Build RUN_DIR/export from a training run folder: the weights (consolidated from any engine's checkpoint,
EMA when the run kept one), the model config, the catalogue, and what serving's safety checks need:
calibration.json (temperature fitted on validation, ECE before/after, OOD-score quantiles) and
ood.safetensors (class means and a shared precision matrix of the model's features on the TRAIN split,
mycodist.models.ood; its threshold, chosen on validation, is calibration.json's `feature_ood`). Runs in one
process from the newest complete checkpoint, on a GPU when there is one; the layout is artifact.py's.
With `--onnx` (export.onnx=true) also model.onnx, model.int8.onnx, onnx.json and onnx_val.safetensors
(mycodist/export/onnx.py).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from mycodist.atomic import atomic_write_json
from mycodist.catalog import CLASS_INDICES, SPECIES, load_species, save_species
from mycodist.config import CONFIG_FILENAME, load_config, save_config
from mycodist.errors import UsageError
from mycodist.export import artifact
from mycodist.lookalikes import merge_catalogue, reference_from_config
from mycodist.models import ood
from mycodist.preprocess import EvalPreprocess
from mycodist.train import checkpoint as ck

log = logging.getLogger(__name__)

OOD_SCORE = "mahalanobis"  # chosen by measurement over relative_mahalanobis (docs/safety.md)
OOD_SHRINKAGE = 0.1
OOD_KEEP_VAL = 0.95  # threshold = the score that keeps 95% of validation photos answered
OOD_MAX_TRAIN = 50_000  # photos the statistics are fitted on; more adds export time, not precision


def export_weights(ckpt: Path, cfg: DictConfig) -> tuple[dict[str, torch.Tensor], str]:
    """EMA weights when the run kept them (they are what was evaluated last), else the model's."""
    weights = ck.consolidated_state_dict(ckpt)
    if cfg.train.ema_decay > 0:
        state = torch.load(ck.trainer_state_file(ckpt, 0), map_location="cpu", weights_only=False)
        if state.get("ema"):
            ema = {ck.strip_wrapper_prefixes(k): v for k, v in state["ema"].items()}
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
    meta = {"file": artifact.OOD_FILE, "score": OOD_SCORE, "features": ood.FEATURES, "threshold": threshold,
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

    from mycodist.catalog import load_class_indices
    from mycodist.models import build_model, model_config
    from mycodist.train.metrics import calibration_summary

    run_dir = Path(run_dir)
    if cfg is None:
        cfg = load_config(run_dir / CONFIG_FILENAME)
    if ckpt is None:
        done = ck.complete_checkpoints(run_dir)
        if not done:
            raise UsageError(f"'{run_dir}' has no complete checkpoint under {ck.CKPT_DIR}/; train first")
        ckpt = done[-1]
    labels = load_class_indices(run_dir / CLASS_INDICES)
    reference = reference_from_config(cfg)  # a bad catalog.references fails here, before the model work
    weights, which = export_weights(ckpt, cfg)
    dev = export_device(device)
    cfg = runnable_attention(cfg, dev)
    model = build_model(cfg.model, len(labels))
    model.load_state_dict(weights, strict=True)
    model.to(dev).eval()
    model.resolve_attention(dev.type, torch.float32)  # once, for the export's fp32 forwards
    val_feats, logits, y = split_outputs(model, cfg, "val")
    calibration: dict[str, Any] = calibration_summary(logits, y) if len(y) else {"temperature": 1.0}
    calibration.update({"weights": which, "checkpoint": str(ckpt), "step": ck.read_meta(ckpt)["step"]})
    feature_ood = fit_feature_ood(model, cfg, val_feats, len(labels))

    def write_files(tmp: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(tmp / artifact.MODEL_FILE),
                  metadata={"format": "pt", "model": str(cfg.model.name), "num_classes": str(len(labels))})
        save_config(cfg, tmp, artifact.CONFIG_FILE)
        if feature_ood is not None:
            stats, meta = feature_ood
            ood.save_feature_gaussians(tmp / artifact.OOD_FILE, stats,
                                       {"score": meta["score"], "threshold": meta["threshold"]})
            calibration["feature_ood"] = meta
        atomic_write_json(tmp / artifact.CALIBRATION, calibration)
        if (run_dir / SPECIES).is_file():  # joined with the lookalike reference once more (docs/lookalikes.md)
            save_species(tmp / SPECIES, merge_catalogue(load_species(run_dir / SPECIES), reference).values())
        if bool(cfg.export.onnx):  # model.onnx + model.int8.onnx for ONNX Runtime (mycodist/export/onnx.py)
            from mycodist.export.onnx import write_for_run

            if (run_dir / CLASS_INDICES).is_file():  # int8's verdicts are counted on the folder as served
                shutil.copyfile(run_dir / CLASS_INDICES, tmp / CLASS_INDICES)
            write_for_run(tmp, model, cfg)

    manifest = {"model_name": str(cfg.model.name), "model_config": model_config(cfg.model, len(labels)).to_dict(),
                "preprocess": EvalPreprocess.from_config(cfg).to_dict(), "weights": which, "step": calibration["step"]}
    return artifact.write_export(run_dir, write_files, manifest)
