"""`serve.runtime`: the model's forward pass in PyTorch or in ONNX Runtime (fp32 or int8), one interface.

The ONNX files come from `mycodist export RUN_DIR --onnx` (mycodist/export/onnx.py describes them).
Everything after the forward pass (temperature, OOD check, safety rules, JSON) is the torch Predictor's,
so the micro-batcher, limits and verdict path are the same whichever runtime computes the logits.

int8 changes the numbers a little; it is allowed only when, on the export's validation photos, its
verdicts equal fp32's at least `serve.int8_min_agreement` of the time. The export records that rate in
onnx.json (`int8.verdicts`), counted with serving's own decision code (export/decision.py) under the run's
serve.* settings, and with the conditions it was counted under. Serve uses the recorded rate when its own
conditions (safety thresholds, OOD rule and threshold, temperature) are the same; when they differ (say
serve.min_confidence was raised), the recorded rate is about other verdicts, so serve recounts it on the
outputs the export kept (onnx_val.safetensors) under the rules in force, and says so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from mycodist.errors import UsageError
from mycodist.export.artifact import INT8_FILE, ONNX_FILE, ONNX_META, ONNX_VAL
from mycodist.export.decision import verdict_agreement
from mycodist.serve.inference import Export, Predictor
from mycodist.verdict import SafetyRules

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnxruntime")
PRECISIONS = ("fp32", "int8")
FILES = {"fp32": ONNX_FILE, "int8": INT8_FILE}
REEXPORT = "make them with `mycodist export RUN_DIR --onnx`"


class OnnxPredictor(Predictor):
    """A Predictor whose forward pass is an ONNX Runtime session of the export's graph (logits + features)."""

    runtime = "onnxruntime"

    def __init__(self, export: Export, rules: SafetyRules, session: Any, precision: str, top_k: int = 5,
                 use_ood: bool = True, use_feature_ood: bool = True) -> None:
        super().__init__(export, rules, top_k=top_k, use_ood=use_ood, device="cpu", use_feature_ood=use_feature_ood)
        self.session = session
        self.precision = precision

    def outputs(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, feats = self.session.run(["logits", "features"], {"images": batch.float().contiguous().numpy()})
        return torch.from_numpy(logits), torch.from_numpy(feats)

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits, feats = self.outputs(batch)
        return logits, self.feature_scores(feats)

    def feature_scores(self, feats: torch.Tensor) -> torch.Tensor | None:
        return None if self.feature_ood is None else self.feature_ood.scores(feats)


def read_onnx_meta(export_dir: Path) -> dict[str, Any]:
    path = export_dir / ONNX_META
    if not path.is_file():
        raise UsageError(f"serve.runtime=onnxruntime: '{export_dir}' has no ONNX graphs ({ONNX_META}); {REEXPORT}")
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read '{path}': {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("fp32"), dict):
        raise UsageError(f"'{path}' is not an ONNX export record; {REEXPORT}")
    return meta


def ort_session(path: Path, threads: int) -> Any:
    """An ONNX Runtime CPU session; threads > 0 sets its intra-op threads (serve.torch_threads)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UsageError("serve.runtime=onnxruntime needs the onnxruntime package: pip install 'mycodist[onnx]'") from None
    opts = ort.SessionOptions()
    if threads > 0:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    # The model thread shares the cores with the decode threads and the event loop: idle pool threads
    # sleep instead of spinning for work, so they do not take CPU from the next batch's decoding.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own error types for a corrupt or foreign graph
        raise UsageError(f"ONNX Runtime cannot load '{path}': {str(e).splitlines()[0][:300]}") from None


def recount_agreement(predictor: Predictor, export_dir: Path) -> dict[str, Any]:
    """int8 vs fp32 verdicts on the outputs the export kept (onnx_val.safetensors), under `predictor`'s
    decision (its safety rules, OOD rule, temperature)."""
    from safetensors.torch import load_file

    path = export_dir / ONNX_VAL
    try:
        t = load_file(str(path))
    except Exception as e:
        raise UsageError(f"serve.precision=int8 needs '{path}' (validation outputs): {e}; {REEXPORT}") from None
    if "logits_int8" not in t or "logits_fp32" not in t:
        raise UsageError(f"'{path}' has no int8 outputs (exported with export.int8=none?); {REEXPORT}")
    return verdict_agreement(predictor.decision, t)


def int8_agreement(predictor: Predictor, export_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The int8/fp32 verdict agreement that applies to `predictor`: the export's recorded rate when it was
    counted under the same conditions, else a recount on the kept outputs; `source` says which."""
    recorded = (meta.get("int8") or {}).get("verdicts")
    conditions = predictor.decision.conditions()
    if isinstance(recorded, dict) and recorded.get("conditions") == conditions:
        return {**{k: v for k, v in recorded.items() if k != "conditions"}, "source": f"{ONNX_META} (export)"}
    if isinstance(recorded, dict) and isinstance(recorded.get("conditions"), dict):
        changed = sorted(k for k in conditions if recorded["conditions"].get(k) != conditions[k])
        why = f"serve's {', '.join(changed)} differ from those the export counted under"
    else:
        why = "the export recorded no verdict agreement (made before it did)"
    counted = recount_agreement(predictor, export_dir)
    log.info("int8 verdict agreement recounted at start-up: %s", why)
    return {**counted, "source": f"recounted at start-up: {why}"}


def build_predictor(export: Export, export_dir: str | Path, rules: SafetyRules, serve_cfg: Any,
                    top_k: int | None = None) -> Predictor:
    """The predictor `serve.runtime` / `serve.precision` ask for; int8 refused below `serve.int8_min_agreement`."""
    runtime, precision = str(serve_cfg.runtime), str(serve_cfg.precision)
    if runtime not in RUNTIMES:
        raise UsageError(f"serve.runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if precision not in PRECISIONS:
        raise UsageError(f"serve.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    min_agree = float(serve_cfg.int8_min_agreement)
    if not 0.0 <= min_agree <= 1.0:
        raise UsageError(f"serve.int8_min_agreement must lie in [0, 1], got {min_agree}")
    k = int(serve_cfg.top_k if top_k is None else top_k)
    common = {"top_k": k, "use_ood": bool(serve_cfg.ood), "use_feature_ood": bool(serve_cfg.ood_features)}
    if runtime == "torch":
        if precision != "fp32":
            raise UsageError("serve.precision=int8 runs on ONNX Runtime only; add serve.runtime=onnxruntime")
        return Predictor(export, rules, device=str(serve_cfg.device), **common)
    if str(serve_cfg.device) != "cpu":
        raise UsageError(f"serve.runtime=onnxruntime runs on the CPU here; set serve.device=cpu (got {serve_cfg.device})")
    d = Path(export_dir)
    meta = read_onnx_meta(d)
    weights = meta.get("weights_sha256")
    if weights and weights != export.info.get("sha256"):
        raise UsageError(f"'{d}': the ONNX graphs were made from other weights than model.safetensors; {REEXPORT}")
    path = d / FILES[precision]
    if not path.is_file():
        raise UsageError(f"serve.precision={precision}: '{path}' is missing; {REEXPORT}")
    predictor = OnnxPredictor(export, rules, ort_session(path, int(serve_cfg.torch_threads)), precision, **common)
    if precision == "int8":
        agreement = int8_agreement(predictor, d, meta)
        rate = agreement["verdict_agreement"]
        if not rate >= min_agree:
            raise UsageError(f"serve.precision=int8 refused: its verdicts equal fp32's on {rate:.2%} of "
                             f"{agreement['photos']} validation photos ({agreement['source']}), below "
                             f"serve.int8_min_agreement={min_agree:g}; serve fp32 (serve.precision=fp32), or "
                             "re-export with export.int8=static/dynamic")
        log.info("int8 verdicts equal fp32's on %.2f%% of %d validation photos (top-1 drop %s; %s)",
                 100 * rate, agreement["photos"], agreement["top1_drop"], agreement["source"])
        export.info["int8"] = agreement
    return predictor
