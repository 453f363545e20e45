"""`data plan`: run the real loaders for W simulated ranks and check what each epoch would deliver.

Each rank runs in its own process with its own DataLoader workers, exactly as in training, only
without a model; crops are decoded at a tiny size (draft mode makes that cheap) so undecodable
samples are still found. The checks are the loader's promises: equal batches on every rank, no
sample twice in a train epoch (drop policy), every val sample exactly once across ranks.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mycodist.data.loaders import make_eval_loader, make_train_loader, resolve_workers
from mycodist.data.spec import DataSpec


def simulate_rank(cfg_yaml: str, rank: int, world_size: int, epochs: int, spec: DataSpec) -> dict[str, Any]:
    """One rank's view: per epoch its batch count and keys; its eval keys; bad-sample counts."""
    cfg = OmegaConf.create(cfg_yaml)
    train = make_train_loader(cfg, rank, world_size, spec=spec)
    out: dict[str, Any] = {"rank": rank, "epochs": [], "bad": {}, "padded": 0}
    for epoch in range(epochs):
        train.set_epoch(epoch)
        keys: list[str] = []
        batches, padded_before = 0, train.padded
        for _ in train:
            keys += train.last_keys
            batches += 1
        out["epochs"].append({"epoch": epoch, "len": len(train), "batches": batches, "keys": keys,
                              "padded": train.padded - padded_before})
    out["bad"], out["padded"] = dict(train.bad_samples), train.padded
    if spec.val_shards:
        ev = make_eval_loader(cfg, rank, world_size, spec=spec)
        out["val_keys"] = [k for _, _, keys in ev for k in keys]
        out["val_batches"] = len(ev)
        out["val_bad"] = dict(ev.bad_samples)
    return out


def run_plan(cfg: DictConfig, spec: DataSpec, world_size: int, epochs: int = 1,
             parallel: int | None = None) -> dict[str, Any]:
    """Simulate all ranks (at most `parallel` processes at once) and summarise against the manifest."""
    cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    parallel = max(1, min(parallel or os.cpu_count() or 1, world_size))
    # fork: the rank processes inherit the imported modules instead of importing torch again (no torch op
    # has run in this process yet, so forking is safe); spawn where fork does not exist
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(parallel, mp_context=mp.get_context(method)) as pool:
        futures = [pool.submit(simulate_rank, cfg_yaml, r, world_size, epochs, spec) for r in range(world_size)]
        ranks = [f.result() for f in futures]
    return summarise(cfg, spec, world_size, ranks)


def summarise(cfg: DictConfig, spec: DataSpec, world_size: int, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    workers, batch = resolve_workers(int(cfg.data.workers)), int(cfg.train.batch_size)
    warnings: list[str] = []
    epochs = []
    for e in range(len(ranks[0]["epochs"])):
        per_rank = [r["epochs"][e] for r in ranks]
        seen = Counter(k for r in per_rank for k in r["keys"])
        batches = sorted({r["batches"] for r in per_rank})
        epochs.append({
            "epoch": e,
            "batches_per_rank": batches[0] if len(batches) == 1 else batches,
            "equal_batches": len(batches) == 1 and batches[0] == per_rank[0]["len"],
            "samples_seen": sum(seen.values()),
            "distinct": len(seen),
            "padded": sum(r["padded"] for r in per_rank),  # repeats that stand in for lost samples
            "duplicates": max(0, sum(seen.values()) - len(seen) - sum(r["padded"] for r in per_rank)),
            "misses": spec.num_train - len(seen),
        })
    bad = Counter()
    for r in ranks:
        bad.update(r["bad"])
    result: dict[str, Any] = {
        "shards": spec.source, "world_size": world_size, "workers": workers, "batch_size": batch,
        "epoch_remainder": str(cfg.data.epoch_remainder),
        "train_samples": spec.num_train, "train_shards": len(spec.train_shards),
        "per_rank": [{"rank": r["rank"], "batches": [ep["batches"] for ep in r["epochs"]],
                      "samples": sum(len(ep["keys"]) for ep in r["epochs"]), "bad": sum(r["bad"].values()),
                      "padded": r["padded"]} for r in ranks],
        "epochs": epochs, "bad_samples": dict(bad), "padded": sum(r["padded"] for r in ranks),
    }
    if spec.val_shards:
        val = Counter(k for r in ranks for k in r.get("val_keys", []))
        result["val"] = {"samples": spec.num_val, "distinct": len(val),
                         "duplicates": sum(n - 1 for n in val.values()), "misses": spec.num_val - len(val),
                         "batches_per_rank": sorted({r["val_batches"] for r in ranks}),
                         "bad": sum(sum(r.get("val_bad", {}).values()) for r in ranks)}
    slots = world_size * max(workers, 1)
    if len(spec.train_shards) < slots:
        warnings.append(f"{len(spec.train_shards)} train shards < {world_size} ranks x {max(workers, 1)} workers: "
                        f"several workers read into the same shard and skip to their start (extra reading); "
                        f"write more, smaller shards (>= {slots}, ideally 4x that)")
    if any(not ep["equal_batches"] for ep in epochs):
        warnings.append("ranks yield different batch counts: DDP would hang at the last all-reduce")
    if str(cfg.data.epoch_remainder) == "drop" and any(ep["duplicates"] for ep in epochs):
        warnings.append("a train sample was delivered twice within an epoch")
    if bad:
        warnings.append(f"{sum(bad.values())} bad samples skipped ({dict(bad)}); run `mycodist verify`")
    if "val" in result and (result["val"]["duplicates"] or result["val"]["misses"] > result["val"]["bad"]):
        warnings.append("validation is not exactly-once")
    if "val" in result and len(result["val"]["batches_per_rank"]) > 1:
        warnings.append("ranks get different numbers of eval batches")
    result["warnings"] = warnings
    result["ok"] = not any(("hang" in w or "twice" in w or "exactly-once" in w or "different numbers" in w)
                           for w in warnings)
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = [f"data plan: {result['train_samples']} train samples in {result['train_shards']} shards, "
             f"{result['world_size']} ranks x {result['workers']} workers, batch {result['batch_size']} per rank, "
             f"remainder={result['epoch_remainder']}",
             f"{'rank':>6} {'batches/epoch':>14} {'samples':>9} {'bad':>6} {'padded':>7}"]
    for r in result["per_rank"]:
        b = r["batches"]
        lines.append(f"{r['rank']:>6} {str(b[0]) if len(set(b)) == 1 else str(b):>14} {r['samples']:>9} "
                     f"{r['bad']:>6} {r['padded']:>7}")
    for ep in result["epochs"]:
        lines.append(f"epoch {ep['epoch']}: {ep['batches_per_rank']} batches on every rank"
                     f"{'' if ep['equal_batches'] else ' (UNEQUAL)'}; {ep['distinct']} distinct samples, "
                     f"{ep['duplicates']} duplicates, {ep['misses']} not seen, {ep['padded']} padded")
    if "val" in result:
        v = result["val"]
        lines.append(f"val: {v['distinct']} of {v['samples']} samples, {v['duplicates']} duplicates, "
                     f"{v['misses']} missed, {v['bad']} bad, batches per rank {v['batches_per_rank']}")
    lines += [f"warning: {w}" for w in result["warnings"]]
    return "\n".join(lines)
