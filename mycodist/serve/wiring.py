"""The `serve` config group → a ready predictor: the one place `mycodist serve` and `mycodist predict` wire an
export to the safety rules, the calibration fail-safe and the runtime, so the two can never differ."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mycodist.errors import UsageError
from mycodist.serve.failsafe import allow_flag, require_calibrated
from mycodist.serve.inference import Predictor, load_export
from mycodist.serve.onnx_runtime import build_predictor
from mycodist.verdict import SafetyRules


def make_predictor(export_dir: str | Path, serve: Any, builder: Any = None, top_k: int | None = None) -> Predictor:
    """Validate every threshold first (before the model loads), then load the export, refuse an uncalibrated
    one unless allowed, and build the predictor `serve.runtime` / `serve.precision` ask for."""
    if int(serve.torch_threads) > 0:
        torch.set_num_threads(int(serve.torch_threads))
    device = str(serve.device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"serve.device={device} but no CUDA device is available; use serve.device=cpu")
    rules = SafetyRules.from_config(serve)
    export = load_export(export_dir, device=device, builder=builder, ood_score=str(serve.ood_score),
                         ood_quantile=float(serve.ood_quantile))
    require_calibrated(export.info, allow_flag(serve), export_dir)
    return build_predictor(export, export_dir, rules, serve, top_k=top_k)
