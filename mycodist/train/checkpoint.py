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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mycodist.atomic import atomic_write_json
from mycodist.errors import UsageError

CKPT_DIR = "ckpt"
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
