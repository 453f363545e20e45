"""Decisions every rank must share, made once on rank 0 and broadcast.

Across nodes two ranks can see different files: a run folder that is not on a shared filesystem, a
checkpoint still being renamed when a slow node lists the folder, shards copied to local disks that
differ. Each rank deciding for itself then fails late and obscurely (a hang in the first collective, a
ZeRO shard missing, ranks training from different steps). So rank 0 decides, the others follow, and a
rank that cannot see what rank 0 sees fails at start-up with its node's name.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

from mycodist.errors import UsageError
from mycodist.train import checkpoint as ck
from mycodist.train.watchdog import node_name

TOKEN_DIR = ".rendezvous"
TOKEN_WAIT_S = 10.0  # how long a rank may wait for rank 0's token to show up (NFS attribute caches)


def shards_fingerprint(spec: Any) -> list[tuple[str, int, int]]:
    """Shard URL, sample count and (local files) byte size: equal on every rank iff they read the same data."""
    from mycodist.data.urls import is_local, local_path

    out = []
    for s in [*spec.train_shards, *spec.val_shards]:
        size = -1
        if is_local(s.url):
            try:
                size = os.path.getsize(local_path(s.url))
            except OSError:
                size = -2
        out.append((s.url, int(s.samples), size))
    return out


def check_shared_filesystem(engine: Any, run_dir: Path, spec: Any, wait_s: float = TOKEN_WAIT_S) -> None:
    """Rank 0 writes a token file into RUN_DIR; every rank must read it back within `wait_s` and see the same
    shards. Any rank that does not makes every rank fail with a UsageError naming that rank's node."""
    if engine.world_size == 1:
        return
    token = None
    if engine.is_main:
        token = uuid.uuid4().hex
        folder = Path(run_dir) / TOKEN_DIR
        folder.mkdir(parents=True, exist_ok=True)
        from mycodist.atomic import atomic_write_text

        atomic_write_text(folder / f"{token}.token", token)
    token = engine.broadcast_object(token)
    fingerprint = engine.broadcast_object(shards_fingerprint(spec) if engine.is_main else None)
    path = Path(run_dir) / TOKEN_DIR / f"{token}.token"
    problem = None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if path.read_text() == token:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            problem = (f"cannot read rank 0's token {path} after {wait_s:g} s: train.output_dir "
                       f"({Path(run_dir).resolve()}) is not the same folder as on rank 0")
            break
        time.sleep(0.1)
    if problem is None and shards_fingerprint(spec) != fingerprint:
        problem = f"data.shards ({spec.source}) differ from rank 0's (other files, sizes or sample counts)"
    problems = engine.all_gather_object(None if problem is None else f"rank {engine.rank} on {node_name()}: {problem}")
    if engine.is_main:
        path.unlink(missing_ok=True)
    bad = [p for p in problems if p]
    if bad:
        raise UsageError("the run folder and the shards must be on a filesystem every node shares (NFS, Lustre, "
                         "a cluster's shared home) and mounted at the same path on each:\n  " + "\n  ".join(bad))


def agree_on_resume(engine: Any, resume: str, run_dir: Path) -> Path | None:
    """Rank 0 resolves train.resume (auto: its newest complete checkpoint) and every rank loads exactly that
    one; a rank that cannot see it fails, naming its node, before anything is loaded."""
    choice: str | None = None
    error: str | None = None
    if engine.is_main:
        try:
            path = ck.resolve_resume(resume, run_dir)
            choice = None if path is None else str(path)
        except UsageError as e:
            error = str(e)
    choice, error = engine.broadcast_object((choice, error))
    if error:
        raise UsageError(error)
    missing = None
    if choice is not None and not (Path(choice) / ck.META).is_file():
        missing = f"rank {engine.rank} on {node_name()} cannot see checkpoint {choice} chosen by rank 0"
    missing_all = [m for m in engine.all_gather_object(missing) if m]
    if missing_all:
        raise UsageError("; ".join(missing_all) + " (is the run folder on a shared filesystem?)")
    return None if choice is None else Path(choice)
