"""One training run on one rank: engine, model, data and state set up once, then the step loop.

The loop (`Trainer.train_loop`) reads top to bottom in one screen, as nanoGPT's: per step, `grad_accum`
micro-batches of data → forward → backward, then the optimizer step; then log, evaluate, checkpoint. Its
collaborators are small: `PhaseClock` (timing.py: CUDA events on a GPU), `RunLog` (run_log.py: the JSON
log, TensorBoard, the bar), `Evaluator` (evaluation.py), `Checkpointer` (checkpoint.py) and the collective
profiler (profiling.py), which wraps the step since it must be open while the collectives run. Nothing in
the loop reads a device value back to the host except at log, eval and checkpoint steps
(docs/training.md, "GPU checklist"). Export is its own stage (mycodist.export), run after training by mycodist.rank_entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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
from mycodist.train.checkpoint import Checkpointer, complete_checkpoints
from mycodist.train.consensus import check_shared_filesystem
from mycodist.train.ema import WeightEma
from mycodist.train.engines import Engine, make_engine
from mycodist.train.evaluation import Evaluator
from mycodist.train.profiling import close_profiler, make_profiler
from mycodist.train.run_log import RunLog, memory_gb
from mycodist.train.schedule import make_schedule
from mycodist.train.timing import PHASES, PhaseClock

StepHook = Callable[[int, dict[str, float]], None]  # (step, {"total": host seconds of the step})


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


class Trainer:
    def __init__(self, cfg: DictConfig, engine: Engine | None = None) -> None:
        from mycodist.data import DataSpec, make_train_loader
        from mycodist.models import build_model, model_config

        self.cfg, t = cfg, cfg.train
        self.run_dir = Path(t.output_dir)
        self.engine = e = engine or make_engine(cfg)
        self.step_hooks: list[StepHook] = []
        self.spec = DataSpec.from_config(cfg)
        self.labels = list(self.spec.labels)
        self.num_classes = len(self.labels)
        if self.spec.num_train == 0:
            raise UsageError(f"data.shards={cfg.data.shards!r} has no training samples")
        check_shared_filesystem(e, self.run_dir, self.spec)  # every rank sees rank 0's run folder and shards

        seed_all(int(cfg.seed))  # same init on every rank
        self.vit_config = model_config(cfg.model, self.num_classes)
        model = build_model(cfg.model, self.num_classes)
        model.resolve_attention(e.device.type, e.compute_dtype)  # once, here: never inside a compiled forward
        # groups, EMA and the engine see the plain module's names; compile comes after wrapping
        groups = build_param_groups(model, cfg)
        # before prepare: ZeRO-3 partitions the parameters in place (numel 0 afterwards)
        param_numels = [p.numel() for p in model.parameters() if p.requires_grad]
        group_numels = [sum(p.numel() for p in g["params"] if p.requires_grad) for g in groups]
        e.prepare(model, groups)
        self.ema = WeightEma(e.module, float(t.ema_decay), e.zero_stage) if t.ema_decay > 0 else None
        if t.compile:
            e.compile()
        self.profiler = make_profiler(cfg, e, self.run_dir, param_numels, group_numels)
        seed_all(int(cfg.seed) + 1000 * (e.rank + 1))  # drop-path / augmentation differ per rank

        self.train_loader = make_train_loader(cfg, e.rank, e.world_size, spec=self.spec,
                                              pin_memory=e.device.type == "cuda")
        self.steps_per_epoch = len(self.train_loader) // e.grad_accum
        if self.steps_per_epoch == 0:
            raise UsageError(f"an epoch has {len(self.train_loader)} batch(es) per rank, fewer than "
                             f"train.grad_accum={e.grad_accum}; lower train.batch_size or grad_accum")
        self.total_steps = int(t.max_steps) if t.max_steps > 0 else int(t.epochs) * self.steps_per_epoch
        self.global_batch = int(t.batch_size) * e.grad_accum * e.world_size
        self.schedule = make_schedule(cfg, self.global_batch, self.steps_per_epoch, self.total_steps)
        self.step = 0
        self._resume_loader_state: dict | None = None
        self.run_log = RunLog(self.run_dir, e.is_main, bool(t.tb))
        self.evaluate = Evaluator(self)
        self.checkpoints = Checkpointer(self)
        if e.is_main:
            self._write_run_files()

    def _write_run_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir)
        save_class_indices(self.run_dir / CLASS_INDICES, self.labels)
        save_species(self.run_dir / SPECIES, [self.spec.species[lab] for lab in self.labels
                                              if lab in self.spec.species])

    # --- data onto the device ------------------------------------------------------------------------
    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        """A loader batch on the device in the engine's input dtype; uint8 batches (data.output=uint8, the
        default on CUDA: 4x less to copy) are normalised here, on the device, after the (pinned) copy."""
        e = self.engine
        images = images.to(e.device, non_blocking=True)
        if images.dtype == torch.uint8:
            from mycodist.data import normalize

            images = normalize(images, tuple(self.cfg.data.mean), tuple(self.cfg.data.std))
        return images.to(e.input_dtype)

    def next_batch(self, batches: Iterator) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = next(batches)[:2]
        return self.model_input(images), targets.to(self.engine.device, non_blocking=True)

    def epoch_batches(self, epoch: int) -> Iterator:
        """Batches of `epoch`; continues mid-epoch from a resumed loader state."""
        self.train_loader.set_epoch(epoch)
        state, self._resume_loader_state = self._resume_loader_state, None
        if state is not None:
            self.train_loader.load_state_dict(state)
        return iter(self.train_loader)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """One timed phase of the step: the loop's clock, and the collective profiler's phase."""
        self.clock.mark(name)
        with self.profiler.phase(name if name != "step" else "optimizer"), self.engine.watch_phase(name, self.step):
            yield

    # --- the step loop ---------------------------------------------------------------------------------
    def train_loop(self) -> None:
        e, t = self.engine, self.cfg.train
        model, smoothing = e.model, float(t.label_smoothing)
        log_every, ckpt_every, eval_every = max(1, t.log_every), int(t.ckpt_every), int(t.eval_every)
        self.clock = PhaseClock(e.device)
        self.loss_sum = torch.zeros(2, dtype=torch.float64, device=e.device)  # (sum of micro losses, count)
        self.images_seen, epoch, batches, grad_norm, lr = 0, -1, iter(()), None, 0.0
        self.run_log.open_bar(self.step, self.total_steps)
        model.train()
        while self.step < self.total_steps:
            t_start = time.perf_counter()
            with self.profiler.step(self.step):  # a null context outside profiling windows
                for micro in range(e.grad_accum):
                    with self.phase("data"):
                        if self.step // self.steps_per_epoch != epoch:  # epoch boundary (equal on all ranks)
                            epoch = self.step // self.steps_per_epoch
                            batches = self.epoch_batches(epoch)
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
                    grad_norm = e.step()  # a device tensor: read back at log steps only
                    if self.ema:
                        self.ema.update(e.module, self.step)
                self.clock.stop()
            self.step += 1
            for hook in self.step_hooks:
                hook(self.step, {"total": time.perf_counter() - t_start})

            last, epoch_end = self.step == self.total_steps, self.step % self.steps_per_epoch == 0
            if self.step % log_every == 0 or last:
                self.log_step(lr, grad_norm)
            self.run_log.advance()
            if (eval_every and self.step % eval_every == 0) or epoch_end or last:
                self.evaluate(final=last)
                model.train()
            if last or epoch_end or (ckpt_every and self.step % ckpt_every == 0):
                self.save_checkpoint()
        self.run_log.close_bar()

    def log_step(self, lr: float, grad_norm: torch.Tensor | float | None) -> None:
        """The only place the step loop reads device values back: the global mean loss (one all-reduce of a
        device tensor), the grad norm and the phase clock's window (CUDA events)."""
        e = self.engine
        total, count = e.all_reduce_sum(self.loss_sum.clone()).tolist()
        loss = total / max(1.0, count)
        window = self.clock.window()
        secs = max(window["total"], 1e-9)
        record = {"step": self.step, "epoch": self.step / self.steps_per_epoch, "loss": loss, "lr": lr,
                  "grad_norm": None if grad_norm is None else float(grad_norm),
                  "images_per_s": self.images_seen / secs, "data_wait_frac": window["data"] / secs,
                  "mem_gb": memory_gb(e.device),
                  "bad_samples": sum(getattr(self.train_loader, "bad_samples", {}).values())}
        self.loss_sum.zero_()
        self.images_seen = 0
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {self.step}; lower train.lr or use bf16/fp32")
        steps = max(1, self.cfg.train.log_every)
        self.run_log.train_step(record, {k: window[k] / steps for k in PHASES})

    def save_checkpoint(self) -> None:
        self.checkpoints.save()

    def maybe_resume(self) -> None:
        state = self.checkpoints.resume()
        if state is not None:
            self.step = int(state["step"])
            if self.step % self.steps_per_epoch:  # mid-epoch: continue where the loader stood
                self._resume_loader_state = state["loader"]

    def close_loaders(self) -> None:
        """Stop the persistent loader workers (train and eval) before export or exit."""
        self.train_loader.close()
        self.evaluate.close()

    # --- consistency ---------------------------------------------------------------------------------
    def parameter_digest(self) -> str:
        """sha256 over every full parameter: equal on all ranks iff the ranks really trained together."""
        e = self.engine
        h = hashlib.sha256()
        with e.full_parameters():
            for name, p in e.module.named_parameters():
                h.update(name.encode())
                h.update(p.detach().float().cpu().contiguous().clone().numpy().tobytes())  # FSDP re-shards after
        return h.hexdigest()

    def write_rank_report(self, wall_s: float) -> dict[str, Any]:
        e = self.engine
        digest = self.parameter_digest()
        digests = e.all_gather_object(digest)
        report = {"rank": e.rank, "world_size": e.world_size, "engine": e.name, "zero_stage": e.zero_stage,
                  "precision": e.precision, "param_sha256": digest, "all_ranks_equal": len(set(digests)) == 1,
                  "grad_checkpointing": bool(getattr(e.module, "grad_checkpointing", False)),
                  "steps": self.step, "wall_s": wall_s}
        atomic_write_json(self.run_dir / "ranks" / f"rank{e.rank}.json", report)
        if len(set(digests)) != 1:
            raise RuntimeError(f"parameters differ across ranks after training: {digests}")
        return report

    # --- whole run -----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        start, e = time.time(), self.engine
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
            close_profiler(self.profiler, e.is_main, self.run_dir)
        elif not complete_checkpoints(self.run_dir):
            self.save_checkpoint()
        wall = time.time() - start
        report = self.write_rank_report(wall)
        if e.is_main:
            last_eval = self.evaluate.last
            final = last_eval.get("ema") or last_eval.get("model") or {}
            board = self.run_log.board
            board.hparams({k: v for k, v in _flat(OmegaConf.to_container(self.cfg, resolve=True)).items()
                           if k.startswith(("train.", "model."))},
                          {f"hparam/{k}": float(v) for k, v in final.items() if isinstance(v, (int, float))})
            board.close()
            atomic_write_json(self.run_dir / "summary.json", {"steps": self.step, "wall_s": wall,
                                                              "world_size": e.world_size, "engine": e.name,
                                                              "final_eval": last_eval})
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


@dataclass(frozen=True)
class TrainingOutcome:
    is_main: bool
    device: torch.device  # where this rank trained: the export stage runs there on rank 0


def run_training(cfg: DictConfig) -> TrainingOutcome:
    """Entry on every rank: train and tear down cleanly (the caller, mycodist.rank_entry, exports)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    trainer = Trainer(cfg)
    engine = trainer.engine
    outcome = TrainingOutcome(engine.is_main, engine.device)
    try:
        trainer.run()
    except BaseException:
        engine.close(clean=False)  # no barrier: the other ranks may be gone
        raise
    finally:
        trainer.close_loaders()
    engine.close()
    return outcome
