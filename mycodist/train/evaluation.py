"""Evaluation of the live model (and its EMA): every validation photo exactly once across ranks, the
classification report, its log lines and TensorBoard figures, and the final logits export checks against."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mycodist.preprocess import resolve_img_size
from mycodist.train.board import confusion_figure, prediction_grid
from mycodist.train.metrics import classification_report

EVAL_DIR = "eval"
FINAL_LOGITS = "final_logits.pt"
_SCALARS = ("loss", "top1", "top5", "macro_f1", "ece")


class Evaluator:
    def __init__(self, trainer: Any) -> None:
        self.t = trainer  # reads engine, cfg, spec, labels, ema, step, run_log
        self._loader: Any = None  # built once, at the first evaluation (its workers then stay alive)
        self.last: dict[str, Any] = {}

    def close(self) -> None:
        if self._loader is not None:
            self._loader.close()

    @torch.no_grad()
    def predict_split(self, forward: Callable[[torch.Tensor], torch.Tensor], lockstep: bool) -> dict[str, Any]:
        """Logits for every validation sample exactly once, gathered on every rank.

        With `lockstep` (ZeRO-3: each forward all-gathers weights), a rank that ran out of batches keeps
        running a dummy forward until every rank is done, so no collective is left hanging."""
        from mycodist.data import make_eval_loader

        t, e = self.t, self.t.engine
        if self._loader is None:
            self._loader = make_eval_loader(t.cfg, e.rank, e.world_size, spec=t.spec, pin_memory=e.device.type == "cuda")
        it = iter(self._loader)
        size = resolve_img_size(t.cfg)
        dummy = torch.zeros(1, 3, size, size, device=e.device)
        logits, labels, keys, grid = [], [], [], None
        while True:
            batch = next(it, None)
            if lockstep:
                more = e.all_reduce_sum(torch.tensor([0.0 if batch is None else 1.0], device=e.device))
                if more.item() == 0:
                    break
            elif batch is None:
                break
            images = dummy if batch is None else batch[0]
            with e.autocast():
                out = forward(t.model_input(images)).float().cpu()
            if batch is not None:
                logits.append(out)
                labels.append(batch[1].long().cpu())
                keys.extend(batch[2])
                if grid is None:
                    grid = images[: int(t.cfg.train.tb_images)].cpu()
        local = {"logits": torch.cat(logits) if logits else torch.zeros(0, t.num_classes, device="cpu"),
                 "labels": torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device="cpu"),
                 "keys": keys}
        parts = e.all_gather_object(local)
        return {"logits": torch.cat([p["logits"] for p in parts]), "labels": torch.cat([p["labels"] for p in parts]),
                "keys": [k for p in parts for k in p["keys"]], "grid": grid}

    def ema_module(self) -> torch.nn.Module:
        """A fresh model holding the EMA weights (loaded strictly: the EMA has the model's own names)."""
        from mycodist.models import build_model

        t, e = self.t, self.t.engine
        m = build_model(t.cfg.model, t.num_classes).to(e.device)
        m.resolve_attention(e.device.type, e.compute_dtype)
        m.load_state_dict(t.ema.state_dict(), strict=True)
        return m.to(e.input_dtype).eval()

    def __call__(self, final: bool = False) -> dict[str, Any]:
        t, e = self.t, self.t.engine
        e.model.eval()
        lockstep = e.forward_gathers  # ZeRO-3/FSDP forwards gather weights: call the engine, in step on all ranks
        forward = e.model if lockstep else e.module  # else the bare module: no wrapper collectives at all
        forward.eval()
        results = {"model": self.predict_split(forward, lockstep=lockstep)}
        if t.ema:
            results["ema"] = self.predict_split(self.ema_module(), lockstep=False)
        report = {name: classification_report(res["logits"], res["labels"], t.num_classes)
                  for name, res in results.items()}
        if e.is_main:
            self._publish(results, report, final)
        self.last = {name: {k: v for k, v in rep.items() if k not in ("confusion", "per_class_acc")}
                     for name, rep in report.items()}
        return report

    def _publish(self, results: dict[str, Any], report: dict[str, Any], final: bool) -> None:
        t = self.t
        log, step, epoch = t.run_log, t.step, t.step / t.steps_per_epoch
        for name, rep in report.items():
            prefix = "eval" if name == "model" else "eval_ema"
            log.board.scalars(step, {f"{prefix}/{k}": rep[k] for k in _SCALARS})
            log.line({"kind": prefix, "step": step, "epoch": epoch, **{k: rep[k] for k in ("samples", *_SCALARS)},
                      "per_class_acc": dict(zip(t.labels, rep["per_class_acc"], strict=False))})
            print(f"step {step}: {prefix} top1 {rep['top1']:.3f} top5 {rep['top5']:.3f} "
                  f"loss {rep['loss']:.3f} ({rep['samples']} images)", flush=True)
        main = results["model"]
        log.board.figure("eval/confusion", confusion_figure(report["model"]["confusion"], t.labels), step)
        if main["grid"] is not None and len(main["grid"]):
            n = len(main["grid"])
            conf, pred = main["logits"][:n].softmax(dim=1).max(dim=1)
            log.board.figure("eval/predictions", prediction_grid(
                main["grid"], main["labels"][:n].tolist(), pred.tolist(), conf.tolist(), t.labels), step)
        if final:
            chosen = "ema" if t.ema else "model"
            (t.run_dir / EVAL_DIR).mkdir(exist_ok=True)
            torch.save({"which": chosen, "step": step, "keys": results[chosen]["keys"],
                        "labels": results[chosen]["labels"], "logits": results[chosen]["logits"]},
                       t.run_dir / EVAL_DIR / FINAL_LOGITS)
