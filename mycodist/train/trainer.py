"""One training run on one rank: set up engine, model, data and state; the step loop; evaluation;
checkpoints; the last checkpoint and the export. Started on every rank by launch/train.py.

The step loop (`Trainer.train_loop`) has four timed phases — data wait, forward, backward, optimizer
step — measured by a `PhaseClock` (CUDA events on a GPU) and read, with the loss and the grad norm, only at
log steps: no host sync in the other steps (docs/training.md, "GPU checklist"). The collective profiler
(mycodist.profile, `profile.*` keys) wraps the step itself, since it must be open while the collectives run;
outside its windows it hands back shared null contexts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from mycodist.atomic import atomic_write_json
from mycodist.catalog import CLASS_INDICES, SPECIES, save_class_indices, save_species
from mycodist.config import save_config
from mycodist.errors import UsageError
from mycodist.profile import Profiler
from mycodist.train import checkpoint as ck
from mycodist.train.board import Board, confusion_figure, prediction_grid
from mycodist.train.consensus import agree_on_resume, check_shared_filesystem
from mycodist.train.ema import WeightEma
from mycodist.train.engines import Engine, make_engine
from mycodist.train.metrics import classification_report
from mycodist.train.schedule import make_schedule
from mycodist.train.timing import PHASES, PhaseClock

StepHook = Callable[[int, dict[str, float]], None]  # (step, {"total": host seconds})
LOG_FILE = "train_log.jsonl"
EVAL_DIR = "eval"
FINAL_LOGITS = "final_logits.pt"


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def build_param_groups(model: torch.nn.Module, cfg: DictConfig) -> list[dict]:
    """AdamW groups: no decay on norms/biases/pos-embeddings/tokens; `lr_scale` per layer when layer_decay."""
    from mycodist.models import param_groups_layer_decay

    decay = float(cfg.train.layer_decay)
    if not 0 <= decay <= 1:
        raise UsageError(f"train.layer_decay={decay} must be in (0, 1] (or 0 = off)")
    return param_groups_layer_decay(model, weight_decay=float(cfg.train.weight_decay),
                                    layer_decay=decay if decay > 0 else 1.0)


def soft_or_hard_loss(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Hard labels get label smoothing here; soft (mixup/cutmix) targets arrive already smoothed."""
    logits = logits.float()
    if targets.ndim == 2:
        return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, targets, label_smoothing=smoothing)


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Trainer:
    def __init__(self, cfg: DictConfig, engine: Engine | None = None) -> None:
        from mycodist.data import DataSpec, make_train_loader
        from mycodist.models import build_model

        self.cfg = cfg
        self.run_dir = Path(cfg.train.output_dir)
        self.engine = engine or make_engine(cfg)
        e = self.engine
        self.step_hooks: list[StepHook] = []
        self.spec = DataSpec.from_config(cfg)
        self.labels = list(self.spec.labels)
        self.num_classes = len(self.labels)
        if self.spec.num_train == 0:
            raise UsageError(f"data.shards={cfg.data.shards!r} has no training samples")
        check_shared_filesystem(e, self.run_dir, self.spec)  # multi-node: every rank sees rank 0's files

        seed_all(int(cfg.seed))  # same init on every rank
        model = build_model(cfg.model, self.num_classes)
        model.resolve_attention(e.device.type, e.compute_dtype)  # once, here: never inside a compiled forward
        # groups, EMA and the engine see the plain module's names; compile comes after wrapping
        groups = build_param_groups(model, cfg)
        # before prepare: ZeRO-3 partitions the parameters in place (numel 0 afterwards)
        param_numels = [p.numel() for p in model.parameters() if p.requires_grad]
        group_numels = [sum(p.numel() for p in g["params"] if p.requires_grad) for g in groups]
        e.prepare(model, groups)
        self.ema = WeightEma(e.module, float(cfg.train.ema_decay), e.zero_stage) if cfg.train.ema_decay > 0 else None
        if cfg.train.compile:
            e.compile()
        self.profiler = self._make_profiler(param_numels, group_numels)
        seed_all(int(cfg.seed) + 1000 * (e.rank + 1))  # drop-path / augmentation differ per rank

        self.train_loader = make_train_loader(cfg, e.rank, e.world_size, spec=self.spec,
                                              pin_memory=e.device.type == "cuda")
        self._eval_loader: Any = None  # built once, at the first evaluation (its workers then stay alive)
        self.steps_per_epoch = len(self.train_loader) // e.grad_accum
        if self.steps_per_epoch == 0:
            raise UsageError(f"an epoch has {len(self.train_loader)} batch(es) per rank, fewer than "
                             f"train.grad_accum={e.grad_accum}; lower train.batch_size or grad_accum")
        t = cfg.train
        self.total_steps = int(t.max_steps) if t.max_steps > 0 else int(t.epochs) * self.steps_per_epoch
        self.global_batch = int(t.batch_size) * e.grad_accum * e.world_size
        self.schedule = make_schedule(cfg, self.global_batch, self.steps_per_epoch, self.total_steps)
        self.step = 0
        self._resume_loader_state: dict | None = None
        self.board = Board(self.run_dir / "tb" if e.is_main and t.tb else None)
        self.last_eval: dict[str, Any] = {}
        if e.is_main:
            self._write_run_files()

    def _make_profiler(self, param_numels: list[int], group_numels: list[int]) -> Profiler:
        """The engine says what it sends (engine kind, bytes per element, ZeRO-3 persistence): the theory
        column of RUN_DIR/profile/summary.json follows the run's engine and precision."""
        e = self.engine
        facts = e.comm_profile() if self.cfg.profile.enabled else {"engine": "ddp", "dtype_bytes": 4}
        extra: dict[str, Any] = {}
        if facts["engine"] in ("zero1", "zero2", "zero3"):
            extra["group_numels"] = group_numels  # padding (ZeRO-1/2) and one small all-reduce per group
        if facts["engine"] == "zero3":
            extra["max_reuse_distance"] = facts["max_reuse_distance"]
        if facts["engine"] == "fsdp":  # FSDP2 pads dim 0 of each parameter: the theory needs shapes
            param_numels, extra["resident_numel"] = facts["param_shapes"], facts["resident_numel"]
        prof = Profiler(self.cfg.profile, self.run_dir, e.rank, e.world_size, engine=facts["engine"],
                        param_numels=param_numels, dtype_bytes=facts["dtype_bytes"],
                        persistence_threshold=facts.get("persistence_threshold", 0),
                        device="cuda" if e.device.type == "cuda" else "cpu", **extra)
        if facts.get("ddp") is not None:
            prof.attach_ddp(facts["ddp"])  # before the first forward: DDP takes a comm hook only then
        reuse = facts.get("max_reuse_distance", 0)
        if self.cfg.profile.enabled and e.is_main and 0 < reuse < 2 * sum(param_numels):
            print(f"profile: ZeRO-3 stage3_max_reuse_distance={reuse} keeps only some parameters gathered from "
                  "forward into backward; the theory's all-gather bytes are an upper bound (docs/profiling.md)",
                  flush=True)
        return prof

    # --- files -------------------------------------------------------------------------------------
    def _write_run_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir)
        save_class_indices(self.run_dir / CLASS_INDICES, self.labels)
        save_species(self.run_dir / SPECIES, [self.spec.species[lab] for lab in self.labels
                                              if lab in self.spec.species])

    def log_line(self, record: dict[str, Any]) -> None:
        """train_log.jsonl: one JSON object per logged step/eval (rank 0), what tests and plots read."""
        if self.engine.is_main:
            with open(self.run_dir / LOG_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")

    # --- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        e = self.engine
        tmp = ck.begin_save(self.run_dir, self.step)
        e.barrier()
        e.save(tmp)
        state = {"step": self.step, "rng": ck.rng_state(), "loader": self.train_loader.state_dict(),
                 "ema": self.ema.state_dict() if self.ema else None}
        torch.save(state, ck.trainer_state_file(tmp, e.rank))
        e.barrier()
        if e.is_main:
            meta = {"step": self.step, "epoch": self.step / self.steps_per_epoch, "engine": e.name,
                    "zero_stage": e.zero_stage, "world_size": e.world_size, "precision": e.precision,
                    "uses_deepspeed": e.name == "deepspeed" or getattr(e, "uses_deepspeed", False),
                    "num_classes": self.num_classes, "model": OmegaConf.to_container(self.cfg.model, resolve=True),
                    "time": time.time()}
            ck.finish_save(tmp, meta, int(self.cfg.train.keep_last))
        e.barrier()

    def maybe_resume(self) -> None:
        e = self.engine
        path = agree_on_resume(e, str(self.cfg.train.resume), self.run_dir)  # rank 0 decides, all load it
        if path is None:
            return
        meta = ck.read_meta(path)
        if meta["world_size"] != e.world_size or meta["engine"] != e.name:
            raise UsageError(f"checkpoint {path} was written by {meta['world_size']} rank(s) of engine "
                             f"{meta['engine']}; this run has {e.world_size} of {e.name}. Resume with the same "
                             "launch, or start afresh with train.resume=none")
        saved_model = meta.get("model")  # older checkpoints did not record it
        if saved_model is not None:
            now = OmegaConf.to_container(self.cfg.model, resolve=True)
            diff = sorted(k for k in set(saved_model) | set(now) if saved_model.get(k) != now.get(k))
            if diff:
                shown = ", ".join(f"model.{k}: {saved_model.get(k)!r} → {now.get(k)!r}" for k in diff)
                raise UsageError(f"checkpoint {path} was made with another model config ({shown}); use a new "
                                 "train.output_dir, or train.resume=none to start afresh in this one")
        e.load(path)
        state = torch.load(ck.trainer_state_file(path, e.rank), map_location="cpu", weights_only=False)
        self.step = int(state["step"])
        if self.step % self.steps_per_epoch:  # mid-epoch: continue where the loader stood
            self._resume_loader_state = state["loader"]
        if self.ema and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        ck.set_rng_state(state["rng"])
        if e.is_main:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        """A loader batch on the device in the engine's input dtype; uint8 batches (data.output=uint8, the
        default on CUDA: 4x less to copy) are normalised here, on the device, after the (pinned) copy."""
        e = self.engine
        images = images.to(e.device, non_blocking=True)
        if images.dtype == torch.uint8:
            from mycodist.data import normalize

            images = normalize(images, tuple(self.cfg.data.mean), tuple(self.cfg.data.std))
        return images.to(e.input_dtype)

    def next_batch(self, batches: Any) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = next(batches)[:2]
        return self.model_input(images), targets.to(self.engine.device, non_blocking=True)

    @contextlib.contextmanager
    def phase(self, name: str) -> Any:
        """One timed phase of the step: the loop's clock, and the collective profiler's phase."""
        self.clock.mark(name)
        with self.profiler.phase(name if name != "step" else "optimizer"), self.engine.watch_phase(name, self.step):
            yield

    # --- the step loop ----------------------------------------------------------------------------
    def train_loop(self) -> None:
        """Run optimizer steps until total_steps: per step, grad_accum micro-batches of
        data wait → forward → backward, then the optimizer step; log, evaluate, checkpoint.

        Nothing here reads a device value back to the host except at log, eval and checkpoint steps:
        the loss is summed on the device and the grad norm stays a device tensor until `log_step`."""
        e, t = self.engine, self.cfg.train
        model = e.model
        model.train()
        log_every, ckpt_every, eval_every = max(1, t.log_every), int(t.ckpt_every), int(t.eval_every)
        smoothing = float(t.label_smoothing)
        bar = self._progress_bar()
        epoch, batches = -1, iter(())
        self.clock = PhaseClock(e.device)
        self.loss_sum = torch.zeros(2, dtype=torch.float64, device=e.device)  # (sum of micro losses, count)
        self.images_seen = 0
        grad_norm, lr = None, 0.0
        while self.step < self.total_steps:
            t_start = time.perf_counter()
            with self.profiler.step(self.step):  # a null context outside profiling windows
                for micro in range(e.grad_accum):
                    with self.phase("data"):
                        if self.step // self.steps_per_epoch != epoch:  # epoch boundary (equal on all ranks)
                            epoch = self.step // self.steps_per_epoch
                            batches = self._epoch_iterator(epoch)
                        images, targets = self.next_batch(batches)
                    is_last = micro == e.grad_accum - 1
                    with e.micro_step(is_last):
                        with self.phase("forward"):
                            with e.autocast():
                                logits = model(images)
                            loss = soft_or_hard_loss(logits, targets, smoothing)
                        with self.phase("backward"):
                            e.backward(loss, is_last)
                    self.loss_sum += torch.stack([loss.detach().double(), self.loss_sum.new_ones(())])
                    self.images_seen += images.shape[0] * e.world_size
                with self.phase("step"):
                    lr = self.schedule.lr(self.step)
                    e.set_lr(lr)
                    grad_norm = e.step()
                    if self.ema:
                        self.ema.update(e.module, self.step)
                self.clock.stop()
            self.step += 1
            for hook in self.step_hooks:
                hook(self.step, {"total": time.perf_counter() - t_start})

            at_epoch_end = self.step % self.steps_per_epoch == 0
            if self.step % log_every == 0 or self.step == self.total_steps:
                self.log_step(lr, grad_norm, bar)
            if bar is not None:
                bar.update(1)
            if (eval_every and self.step % eval_every == 0) or at_epoch_end or self.step == self.total_steps:
                self.evaluate(final=self.step == self.total_steps)
                model.train()
            if self.step == self.total_steps or at_epoch_end or (ckpt_every and self.step % ckpt_every == 0):
                self.save_checkpoint()
        if bar is not None:
            bar.close()

    def _close_profiler(self) -> None:
        """Rank 0 writes RUN_DIR/profile/ (summary.json, PNGs); the scalars go into the run's TensorBoard."""
        summary = self.profiler.close()
        if summary is None or not self.engine.is_main:
            return
        measured, theory = summary["measured_bytes_per_step"]["total"], summary.get("theory_bytes_per_step")
        line = f"profile: {len(summary['profiled_steps'])} step(s), {measured / 1e6:.3f} MB/step measured"
        if theory:
            line += f", {theory['total'] / 1e6:.3f} MB theory ({summary['engine']}, ratio {summary['measured_over_theory']:.4f})"
        exposed = summary["step_breakdown"]["mean"]["exposed_fraction"]
        print(f"{line}; exposed comm {exposed:.1%} of the step; {self.run_dir / 'profile'}", flush=True)

    def _epoch_iterator(self, epoch: int) -> Any:
        """Batches of `epoch`; continues mid-epoch from a resumed loader state."""
        self.train_loader.set_epoch(epoch)
        state, self._resume_loader_state = self._resume_loader_state, None
        if state is not None:
            self.train_loader.load_state_dict(state)
        return iter(self.train_loader)

    def _progress_bar(self) -> Any:
        if not self.engine.is_main or self.step >= self.total_steps:
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                    file=sys.stderr, mininterval=1.0)

    def log_step(self, lr: float, grad_norm: torch.Tensor | float | None, bar: Any) -> None:
        """The only place the step loop reads device values back: the global mean loss (one all-reduce of a
        device tensor), the grad norm and the phase clock's window (CUDA events)."""
        e = self.engine
        total, count = e.all_reduce_sum(self.loss_sum.clone()).tolist()
        loss = total / max(1.0, count)
        grad = None if grad_norm is None else float(grad_norm)
        window = self.clock.window()
        secs = max(window["total"], 1e-9)
        record = {"step": self.step, "epoch": self.step / self.steps_per_epoch, "loss": loss, "lr": lr,
                  "grad_norm": grad, "images_per_s": self.images_seen / secs,
                  "data_wait_frac": window["data"] / secs, "mem_gb": memory_gb(e.device),
                  "bad_samples": sum(getattr(self.train_loader, "bad_samples", {}).values())}
        self.loss_sum.zero_()
        self.images_seen = 0
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {self.step}; lower train.lr or use bf16/fp32")
        self.log_line({"kind": "train", **record})
        steps = max(1, self.cfg.train.log_every)
        self.board.scalars(self.step, {
            "train/loss": loss, "train/lr": lr, "train/grad_norm": grad,
            "perf/images_per_s": record["images_per_s"], "perf/data_wait_frac": record["data_wait_frac"],
            "perf/mem_gb": record["mem_gb"], "data/bad_samples": record["bad_samples"],
            **{f"perf/{k}_s": window[k] / steps for k in PHASES},
        })
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", refresh=False)

    # --- evaluation --------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_eval_split(self, forward: Callable[[torch.Tensor], torch.Tensor], lockstep: bool) -> dict[str, Any]:
        """Logits for every validation sample exactly once, gathered on every rank.

        With `lockstep` (ZeRO-3: each forward all-gathers weights), a rank that ran out of batches keeps
        running a dummy forward until every rank is done, so no collective is left hanging."""
        from mycodist.data import make_eval_loader

        e = self.engine
        if self._eval_loader is None:
            self._eval_loader = make_eval_loader(self.cfg, e.rank, e.world_size, spec=self.spec,
                                                 pin_memory=e.device.type == "cuda")
        it = iter(self._eval_loader)
        size = int(self.cfg.model.img_size)
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
                out = forward(self.model_input(images)).float().cpu()
            if batch is not None:
                logits.append(out)
                labels.append(batch[1].long().cpu())
                keys.extend(batch[2])
                if grid is None:
                    grid = images[: int(self.cfg.train.tb_images)].cpu()
        local = {"logits": torch.cat(logits) if logits else torch.zeros(0, self.num_classes, device="cpu"),
                 "labels": torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device="cpu"),
                 "keys": keys}
        parts = e.all_gather_object(local)
        return {"logits": torch.cat([p["logits"] for p in parts]), "labels": torch.cat([p["labels"] for p in parts]),
                "keys": [k for p in parts for k in p["keys"]], "grid": grid}

    def _ema_module(self) -> torch.nn.Module:
        from mycodist.models import build_model

        m = build_model(self.cfg.model, self.num_classes).to(self.engine.device)
        m.resolve_attention(self.engine.device.type, self.engine.compute_dtype)
        m.load_state_dict(self.ema.state_dict(), strict=True)
        return m.to(self.engine.input_dtype).eval()

    def evaluate(self, final: bool = False) -> dict[str, Any]:
        e = self.engine
        e.model.eval()
        lockstep = e.forward_gathers  # ZeRO-3/FSDP forwards gather weights: call the engine, in step on all ranks
        forward = e.model if lockstep else e.module  # else the bare module: no wrapper collectives at all
        forward.eval()
        results = {"model": self.predict_eval_split(forward, lockstep=lockstep)}
        if self.ema:
            results["ema"] = self.predict_eval_split(self._ema_module(), lockstep=False)
        report: dict[str, Any] = {}
        for name, res in results.items():
            rep = classification_report(res["logits"], res["labels"], self.num_classes)
            prefix = "eval" if name == "model" else "eval_ema"
            report[name] = rep
            if e.is_main:
                scalars = {f"{prefix}/{k}": rep[k] for k in ("loss", "top1", "top5", "macro_f1", "ece")}
                self.board.scalars(self.step, scalars)
                self.log_line({"kind": prefix, "step": self.step, "epoch": self.step / self.steps_per_epoch,
                               **{k: rep[k] for k in ("samples", "loss", "top1", "top5", "macro_f1", "ece")},
                               "per_class_acc": dict(zip(self.labels, rep["per_class_acc"], strict=False))})
                print(f"step {self.step}: {prefix} top1 {rep['top1']:.3f} top5 {rep['top5']:.3f} "
                      f"loss {rep['loss']:.3f} ({rep['samples']} images)", flush=True)
        if e.is_main:
            main = results["model"]
            self.board.figure("eval/confusion", confusion_figure(report["model"]["confusion"], self.labels), self.step)
            if main["grid"] is not None and len(main["grid"]):
                n = len(main["grid"])
                probs = main["logits"][:n].softmax(dim=1)
                conf, pred = probs.max(dim=1)
                self.board.figure("eval/predictions", prediction_grid(
                    main["grid"], main["labels"][:n].tolist(), pred.tolist(), conf.tolist(), self.labels), self.step)
            if final:
                chosen = "ema" if self.ema else "model"
                (self.run_dir / EVAL_DIR).mkdir(exist_ok=True)
                buf = {"which": chosen, "step": self.step, "keys": results[chosen]["keys"],
                       "labels": results[chosen]["labels"], "logits": results[chosen]["logits"]}
                torch.save(buf, self.run_dir / EVAL_DIR / FINAL_LOGITS)
        self.last_eval = {name: {k: v for k, v in rep.items() if k not in ("confusion", "per_class_acc")}
                          for name, rep in report.items()}
        return report

    def close_loaders(self) -> None:
        """Stop the persistent loader workers (train and eval) before export or exit."""
        for loader in (self.train_loader, self._eval_loader):
            if loader is not None and hasattr(loader, "close"):
                loader.close()

    # --- consistency -------------------------------------------------------------------------------
    def parameter_digest(self) -> str:
        """sha256 over every full parameter: equal on all ranks iff the ranks really trained together."""
        e = self.engine
        h = hashlib.sha256()
        with e.full_parameters():
            for name, p in e.module.named_parameters():
                h.update(name.encode())
                h.update(p.detach().float().cpu().contiguous().clone().numpy().tobytes())  # a copy: FSDP frees p after
        return h.hexdigest()

    def write_rank_report(self, wall_s: float) -> dict[str, Any]:
        e = self.engine
        digest = self.parameter_digest()
        digests = e.all_gather_object(digest)
        report = {"rank": e.rank, "world_size": e.world_size, "engine": e.name, "zero_stage": e.zero_stage,
                  "precision": e.precision, "param_sha256": digest, "all_ranks_equal": len(set(digests)) == 1,
                  "steps": self.step, "wall_s": wall_s}
        atomic_write_json(self.run_dir / "ranks" / f"rank{e.rank}.json", report)
        if len(set(digests)) != 1:
            raise RuntimeError(f"parameters differ across ranks after training: {digests}")
        return report

    # --- whole run ---------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        start = time.time()
        e = self.engine
        if e.is_main:
            print(f"mycodist train: engine {e.name}, {e.world_size} rank(s), ZeRO {e.zero_stage}, "
                  f"{e.precision}, global batch {self.global_batch}, {self.total_steps} steps "
                  f"({self.steps_per_epoch}/epoch), peak lr {self.schedule.peak_lr:.3g}", flush=True)
            print(f"TensorBoard: tensorboard --logdir {self.run_dir / 'tb'} --host 127.0.0.1 --port 6006", flush=True)
        self.maybe_resume()
        if self.step < self.total_steps:
            try:
                self.train_loop()
            finally:
                self.profiler.recorder.stop()  # a failed step must not leave torch.distributed wrapped
            self._close_profiler()
        elif not ck.complete_checkpoints(self.run_dir):
            self.save_checkpoint()
        wall = time.time() - start
        report = self.write_rank_report(wall)
        if e.is_main:
            final = self.last_eval.get("ema") or self.last_eval.get("model") or {}
            self.board.hparams({k: v for k, v in _flat(OmegaConf.to_container(self.cfg, resolve=True)).items()
                                if k.startswith(("train.", "model."))},
                               {f"hparam/{k}": float(v) for k, v in final.items() if isinstance(v, (int, float))})
            self.board.close()
            atomic_write_json(self.run_dir / "summary.json", {"steps": self.step, "wall_s": wall,
                                                              "world_size": e.world_size, "engine": e.name,
                                                              "final_eval": self.last_eval})
        return report


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def run_training(cfg: DictConfig) -> int:
    """Entry on every rank: train, tear down cleanly, then rank 0 writes RUN_DIR/export."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    trainer = Trainer(cfg)
    engine = trainer.engine
    is_main, device = engine.is_main, engine.device
    try:
        trainer.run()
    except BaseException:
        engine.close(clean=False)  # no barrier: the other ranks may be gone
        raise
    finally:
        trainer.close_loaders()
    engine.close()
    if is_main and cfg.train.export:
        from mycodist.train.export import export_run

        out = export_run(Path(cfg.train.output_dir), device=device)  # rank 0's GPU, not its CPU
        print(f"exported {out}", flush=True)
        print(f"TensorBoard: tensorboard --logdir {Path(cfg.train.output_dir) / 'tb'} --host 127.0.0.1 --port 6006",
              flush=True)
    return 0
