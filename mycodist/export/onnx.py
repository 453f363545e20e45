"""ONNX graphs of an exported model, for serving with ONNX Runtime: fp32 (checked against PyTorch) and int8.

Why: on CPU servers ONNX Runtime runs the same ViT in less time than PyTorch eager, and its int8
quantisation roughly halves the time again (docs/performance.md). What the export adds (`export.onnx=true`
or `mycodist export RUN_DIR --onnx`):

  model.onnx            fp32 graph, input `images` (B, 3, S, S) normalised, outputs `logits` (B, C) and
                        `features` (B, D), the OOD features of mycodist.models.ood, so serving keeps the
                        feature OOD check; batch axis dynamic. Attention is exported on the `math` path.
  model.int8.onnx       ONNX Runtime quantisation of it: `dynamic` (int8 weights, activations quantised
                        per batch at run time) or `static` (QDQ, activation ranges calibrated on the
                        validation photos); `export.int8`.
  onnx.json             what was checked: max |ONNX fp32 - PyTorch| of logits and features (the export fails
                        above `export.onnx_tolerance`), int8 top-1 agreement with fp32 and top-1 accuracy of
                        both on the validation photos, and `int8.verdicts`: how often int8's verdict equals
                        fp32's on them, counted with serving's own code (export/decision.py) under the run's
                        serve.* settings, with the `conditions` it was counted under. Serve refuses int8
                        below `serve.int8_min_agreement` by this rate.
  onnx_val.safetensors  fp32 and int8 logits and features of those photos (batched as served), so `serve`
                        can recount the rate when its serve.* thresholds differ from the recorded conditions.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from mycodist.atomic import atomic_write_json
from mycodist.errors import UsageError
from mycodist.export.artifact import INT8_FILE, MODEL_FILE, ONNX_FILE, ONNX_META, ONNX_VAL, file_sha256
from mycodist.export.decision import folder_decision, verdict_agreement
from mycodist.models import ood
from mycodist.models.attention import Attention
from mycodist.verdict import SafetyRules

log = logging.getLogger(__name__)


INPUT = "images"
OUTPUTS = ("logits", "features")
OPSET = 17
INT8_METHODS = ("dynamic", "static", "none")


class LogitsAndFeatures(torch.nn.Module):
    """The graph serving runs: one forward pass → (logits, OOD features), as Predictor.forward computes them."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats, logits = ood.features_and_logits(self.model, images)
        return logits, feats


def on_cpu(model: torch.nn.Module, backend: str | None = None) -> torch.nn.Module:
    """An fp32 CPU copy of `model` (export may run right after training, with the model on a GPU). With
    `backend`, every attention module runs it; without, the kernel is chosen per call for the CPU."""
    m = copy.deepcopy(model).cpu().float().eval()
    for mod in m.modules():
        if isinstance(mod, Attention):
            if backend is not None:
                mod.backend = backend
            if hasattr(mod, "kernel"):  # a kernel resolved once for the training device must not carry over
                mod.kernel = backend
    return m


def exportable(model: torch.nn.Module) -> LogitsAndFeatures:
    """A copy of `model` whose attention runs the plain `math` path: it exports to standard ONNX ops and
    never depends on flash-attn or FlexAttention, whatever backend the run trained with."""
    return LogitsAndFeatures(on_cpu(model, "math"))


def _batches(images: torch.Tensor, batch: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(images), batch):
        yield images[i:i + batch]


def export_fp32(model: torch.nn.Module, path: Path, img_size: int) -> None:
    """torch.onnx's TorchScript exporter with a dynamic batch axis (needs no onnxscript), written atomically."""
    net = exportable(model)
    dummy = torch.zeros(2, 3, img_size, img_size)
    tmp = path.with_name(f".tmp-{path.name}")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice and tracer warnings on shape checks
        torch.onnx.export(net, (dummy,), str(tmp), dynamo=False, opset_version=OPSET, input_names=[INPUT],
                          output_names=list(OUTPUTS),
                          dynamic_axes={n: {0: "batch"} for n in (INPUT, *OUTPUTS)})
    os.replace(tmp, path)


def session(path: Path, threads: int = 0) -> Any:
    """An ONNX Runtime CPU session; `threads` > 0 sets its intra-op thread count."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads > 0:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(sess: Any, images: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, features) of `images`, run in batches of `batch` (as the micro-batcher would)."""
    logits, feats = [], []
    for x in _batches(images, batch):
        z, f = sess.run(list(OUTPUTS), {INPUT: x.numpy()})
        logits.append(torch.from_numpy(z))
        feats.append(torch.from_numpy(f))
    return torch.cat(logits), torch.cat(feats)


@torch.inference_mode()
def run_torch(model: torch.nn.Module, images: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    logits, feats = [], []
    for x in _batches(images, batch):
        f, z = ood.features_and_logits(model, x)
        logits.append(z)
        feats.append(f)
    return torch.cat(logits), torch.cat(feats)


def quantize(fp32: Path, out: Path, method: str, calibration: torch.Tensor, batch: int) -> None:
    """int8 with ONNX Runtime's quantisation tools (after its recommended pre-processing), atomically.
    `static` calibrates activation ranges on `calibration` (the validation photos)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{INPUT: x.numpy()} for x in _batches(calibration, batch)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    if method not in ("dynamic", "static"):
        raise UsageError(f"export.int8 must be one of {INT8_METHODS}, got {method!r}")
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        pre, q = Path(tmp) / "pre.onnx", Path(tmp) / "q.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        if method == "dynamic":
            quantize_dynamic(str(pre), str(q), weight_type=QuantType.QInt8)
        else:
            quantize_static(str(pre), str(q), Reader(), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                            op_types_to_quantize=["MatMul", "Gemm", "Conv"])  # norms and softmax stay fp32
        os.replace(q, out)


def _top1(logits: torch.Tensor, labels: torch.Tensor | None) -> float | None:
    if labels is None or len(labels) == 0:
        return None
    return float((logits.argmax(1) == labels).float().mean())


def int8_verdicts(out_dir: Path, outputs: dict[str, torch.Tensor], serve: Any = None
                  ) -> dict[str, Any] | None:
    """How often int8's verdict equals fp32's on the kept outputs, counted as serving would on this folder
    with the `serve` settings (the run's serve group; default: the defaults), and the conditions it was
    counted under; None when the folder has no class list (nothing to decide with)."""
    s = serve or {}
    rules = SafetyRules.from_config(s) if s else SafetyRules()
    decision = folder_decision(out_dir, rules, str(s.get("ood_score", "neg_energy")), float(s.get("ood_quantile", 0.05)),
                               bool(s.get("ood", True)), bool(s.get("ood_features", True)))
    if decision is None:
        log.warning("%s has no class list: int8's verdict agreement is not recorded (serve will count it)", out_dir)
        return None
    return {**verdict_agreement(decision, outputs), "conditions": decision.conditions()}


def write_onnx(out_dir: str | Path, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None,
               int8: str = "dynamic", tolerance: float = 1e-4, batch: int = 8,
               serve: Any = None) -> dict[str, Any]:
    """Write the ONNX files of `model` into the export folder `out_dir`; returns what onnx.json records.

    `images` are normalised validation photos (N, 3, S, S): the fp32 graph is checked on them, the static
    int8 graph calibrated on them, and both graphs' outputs on them kept. The folder's class list, catalogue
    and calibration (written before) decide the verdicts whose int8/fp32 agreement is recorded, under the
    `serve` settings (a serve config group; default: serving's defaults).
    """
    from safetensors.torch import save_file

    if int8 not in INT8_METHODS:
        raise UsageError(f"export.int8 must be one of {INT8_METHODS}, got {int8!r}")
    if images.ndim != 4 or len(images) == 0:
        raise UsageError("the ONNX export needs at least one validation photo to check the graph on")
    out = Path(out_dir)
    model = on_cpu(model)  # the reference: the model as `serve.runtime=torch` runs it on a CPU
    images = images.float().cpu().contiguous()
    export_fp32(model, out / ONNX_FILE, int(images.shape[-1]))
    ref_logits, ref_feats = run_torch(model, images, batch)
    logits32, feats32 = run_onnx(session(out / ONNX_FILE), images, batch)
    diff = float((logits32 - ref_logits).abs().max())
    diff_f = float((feats32 - ref_feats).abs().max())
    meta: dict[str, Any] = {
        "opset": OPSET, "exporter": "torch.onnx TorchScript (dynamo=False)", "torch": torch.__version__,
        "input": INPUT, "outputs": list(OUTPUTS), "img_size": int(images.shape[-1]), "photos": len(images),
        "batch": batch, "val_outputs": ONNX_VAL,
        "weights_sha256": file_sha256(out / MODEL_FILE) if (out / MODEL_FILE).is_file() else None,
        "fp32": {"file": ONNX_FILE, "sha256": file_sha256(out / ONNX_FILE), "max_abs_diff_logits": diff,
                 "max_abs_diff_features": diff_f, "tolerance": tolerance, "top1": _top1(logits32, labels)},
        "int8": None}
    if not diff <= tolerance:  # NaN fails too
        raise UsageError(f"the ONNX graph's logits differ from PyTorch's by {diff:.3g} > export.onnx_tolerance="
                         f"{tolerance:g}; the ONNX files were not kept")
    tensors = {"logits_fp32": logits32, "features_fp32": feats32}
    if labels is not None:
        tensors["labels"] = labels.long()
    if int8 != "none":
        quantize(out / ONNX_FILE, out / INT8_FILE, int8, images, batch)
        logits8, feats8 = run_onnx(session(out / INT8_FILE), images, batch)
        tensors.update(logits_int8=logits8, features_int8=feats8)
        top32, top8 = _top1(logits32, labels), _top1(logits8, labels)
        meta["int8"] = {"file": INT8_FILE, "sha256": file_sha256(out / INT8_FILE), "method": int8,
                        "top1_agreement": float((logits8.argmax(1) == logits32.argmax(1)).float().mean()),
                        "top1": top8, "top1_drop": None if top32 is None else top32 - top8,
                        "max_abs_diff_logits": float((logits8 - logits32).abs().max()),
                        "calibrated_on": "these validation photos" if int8 == "static" else None,
                        "verdicts": int8_verdicts(out, tensors, serve)}
    tmp = out / f".tmp-{ONNX_VAL}"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, out / ONNX_VAL)
    atomic_write_json(out / ONNX_META, meta)
    verdicts = meta["int8"] and meta["int8"]["verdicts"]
    log.info("ONNX export: fp32 max |diff| %.2g; int8 top-1 agreement %s, verdict agreement %s", diff,
             meta["int8"] and meta["int8"]["top1_agreement"], verdicts and verdicts["verdict_agreement"])
    return meta


def validation_images(cfg: DictConfig, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `limit` validation photos through the eval transform (as serving preprocesses), with labels."""
    from mycodist.data import make_eval_loader, normalize

    xs, ys, seen = [], [], 0
    for images, y, _ in make_eval_loader(cfg, 0, 1):
        if images.dtype == torch.uint8:
            images = normalize(images, tuple(cfg.data.mean), tuple(cfg.data.std))
        xs.append(images.float())
        ys.append(y.long())
        seen += len(y)
        if seen >= limit:
            break
    if not xs:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(xs)[:limit], torch.cat(ys)[:limit]


def write_for_run(out_dir: Path, model: torch.nn.Module, cfg: DictConfig) -> dict[str, Any]:
    """The hook `mycodist export` calls when `export.onnx` is on: the run's validation photos, its settings."""
    ex = cfg.export
    images, labels = validation_images(cfg, int(ex.onnx_photos))
    if len(images) == 0:
        raise UsageError("export.onnx=true needs validation photos (data.shards with a validation split) to "
                         "check the ONNX graph and measure int8 against fp32")
    return write_onnx(out_dir, model, images, labels, int8=str(ex.int8), tolerance=float(ex.onnx_tolerance),
                      batch=int(cfg.serve.max_batch), serve=cfg.serve)
