"""Checkpoints that a `kill -9` can never leave half-readable.

Layout: RUN_DIR/ckpt/step-00000120/ holds the engine's own files (Accelerate state or DeepSpeed shards),
one `trainer-rank{r}.pt` per rank (loader position, RNG states, EMA, counters) and `meta.json`. Every
rank writes into `.tmp-step-*`; after a barrier rank 0 writes meta.json and renames the folder, so a
folder named `step-*` with meta.json is complete by construction, and resume takes the newest one.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mycodist.atomic import atomic_write_json
from mycodist.errors import UsageError

CKPT_DIR = "ckpt"
MODEL_FILE = "model.safetensors"  # the torchrun-ddp engine's weights inside a checkpoint folder
META = "meta.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def trainer_state_file(ckpt: Path, rank: int) -> Path:
    return ckpt / f"trainer-rank{rank}.pt"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / META).is_file()]
    return [p for _, p in sorted(found)]


def read_meta(ckpt: Path) -> dict[str, Any]:
    return json.loads((Path(ckpt) / META).read_text())


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """`auto` → newest complete checkpoint or None; `none` → None; else a checkpoint folder that must exist."""
    if resume in ("none", "", "false"):
        return None
    if resume == "auto":
        done = complete_checkpoints(run_dir)
        return done[-1] if done else None
    path = Path(resume)
    if not (path / META).is_file():
        raise UsageError(f"train.resume={resume!r} is not a complete checkpoint folder (no {META}); "
                         f"use train.resume=auto or a folder like {run_dir}/{CKPT_DIR}/step-00000100")
    return path


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def begin_save(run_dir: Path, step: int) -> Path:
    """The temporary folder every rank writes into (created by all; exist_ok makes the race harmless)."""
    tmp = Path(run_dir) / CKPT_DIR / f".tmp-{step_dir_name(step)}"
    tmp.mkdir(parents=True, exist_ok=True)
    return tmp


def finish_save(tmp: Path, meta: dict[str, Any], keep_last: int) -> Path:
    """Rank 0 only, after every rank has written: mark complete, publish by rename, prune old ones."""
    final = tmp.parent / tmp.name.removeprefix(".tmp-")
    atomic_write_json(tmp / META, meta)
    if final.exists():  # a re-save of the same step after a resume
        shutil.rmtree(final)
    tmp.rename(final)
    if keep_last > 0:
        for old in complete_checkpoints(tmp.parent.parent)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    for stale in tmp.parent.glob(".tmp-step-*"):  # left by a killed run
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


_RUNTIME_KEYS = {"attention", "sdpa_kernel", "flex_compile"}  # how attention runs: free to change on resume


def model_config_diff(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """`model.key: old → new` for every architecture key that differs (renamed keys compared under their
    new names; the attention runtime may differ)."""
    from mycodist.config import RENAMED

    def norm(d: dict[str, Any]) -> dict[str, Any]:
        return {RENAMED.get(f"model.{k}", f"model.{k}").removeprefix("model."): v for k, v in d.items()
                if k not in _RUNTIME_KEYS}

    a, b = norm(saved), norm(now)
    return [f"model.{k}: {a.get(k)!r} → {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


class Checkpointer:
    """Save and resume one run's complete state (engine files, loader position, RNG, EMA) on every rank."""

    def __init__(self, trainer: Any) -> None:
        self.t = trainer

    def save(self) -> None:
        from omegaconf import OmegaConf

        t, e = self.t, self.t.engine
        tmp = begin_save(t.run_dir, t.step)
        e.barrier()
        e.save(tmp)
        state = {"step": t.step, "rng": rng_state(), "loader": t.train_loader.state_dict(),
                 "ema": t.ema.state_dict() if t.ema else None}
        torch.save(state, trainer_state_file(tmp, e.rank))
        e.barrier()
        if e.is_main:
            meta = {"step": t.step, "epoch": t.step / t.steps_per_epoch, "engine": e.name,
                    "zero_stage": e.zero_stage, "world_size": e.world_size, "precision": e.precision,
                    "uses_deepspeed": e.name == "deepspeed" or getattr(e, "uses_deepspeed", False),
                    "num_classes": t.num_classes, "model": OmegaConf.to_container(t.cfg.model, resolve=True),
                    "vit_config": t.vit_config.to_dict(), "time": time.time()}
            finish_save(tmp, meta, int(t.cfg.train.keep_last))
        e.barrier()

    def resume(self) -> dict[str, Any] | None:
        """Load `train.resume` into the engine, EMA and RNGs; returns the checkpoint's trainer state (step,
        loader position) or None when starting afresh."""
        from omegaconf import OmegaConf

        t, e = self.t, self.t.engine
        from mycodist.train.consensus import agree_on_resume

        path = agree_on_resume(e, str(t.cfg.train.resume), t.run_dir)  # rank 0 decides, every rank loads it
        if path is None:
            return None
        meta = read_meta(path)
        if meta["world_size"] != e.world_size or meta["engine"] != e.name:
            raise UsageError(f"checkpoint {path} was written by {meta['world_size']} rank(s) of engine "
                             f"{meta['engine']}; this run has {e.world_size} of {e.name}. Resume with the same "
                             "launch, or start afresh with train.resume=none")
        saved_model = meta.get("model")  # older checkpoints did not record it
        if saved_model is not None:
            diff = model_config_diff(saved_model, OmegaConf.to_container(t.cfg.model, resolve=True))
            if diff:
                raise UsageError(f"checkpoint {path} was made with another model config ({', '.join(diff)}); use "
                                 "a new train.output_dir, or train.resume=none to start afresh in this one")
        e.load(path)
        state = torch.load(trainer_state_file(path, e.rank), map_location="cpu", weights_only=False)
        if t.ema and state["ema"] is not None:
            t.ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        if e.is_main:
            print(f"resumed from {path} at step {int(state['step'])}", flush=True)
        return state


_PREFIXES = ("module.", "_orig_mod.")


def strip_wrapper_prefixes(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return name


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a checkpoint of any engine (DeepSpeed: from the fp32 optimizer partitions)."""
    meta = read_meta(ckpt)
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
    return {strip_wrapper_prefixes(k): (v.float() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
