"""The default process group, made so that `torchrun --max-restarts N` restarts actually reconnect.

torchrun's agent hosts the TCPStore its workers rendezvous through (`TORCHELASTIC_USE_AGENT_STORE=True`: always
with a static rendezvous, and by default with c10d since torch 2.5) and keeps it across restarts. The gloo/NCCL
bootstrap keys of the attempt that died stay in it, so a restarted worker can read a dead peer's address and
fail to connect ("Gloo connectFullMesh failed ... Connection refused"; pytorch/pytorch#135712): measured here
with plain torch 2.13, 1 clean restart in 3. The fix, applied by every engine through `init_default_group`:

- one agent (a single-node run): the workers' keys go under a prefix per attempt,
  `TORCHELASTIC_RESTART_COUNT`, which all workers of one agent share. 12 restarts in 12 here.
- several agents (multi-node) with restarts: each agent counts its own restarts, so the counts can differ and
  no per-attempt prefix is safe. Those runs must give every attempt a fresh store, which torchrun does with a
  c10d rendezvous and `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` in its environment (`mycodist train --nnodes N
  --max-restarts K` and launch/slurm.sbatch do); anything else is refused at start-up with that advice rather
  than left to fail at the first restart.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from mycodist.errors import UsageError

NO_SHARED_STORE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def _int_env(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def restart_prefix() -> str | None:
    """The store prefix this attempt's workers use, or None when torch's own env:// set-up is already right
    (no torchrun, no restarts allowed, or a store that is fresh each attempt)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or _int_env("TORCHELASTIC_MAX_RESTARTS", 0) <= 0:
        return None
    if _int_env("GROUP_WORLD_SIZE", 1) > 1:
        raise UsageError(
            "torchrun --max-restarts on several nodes with torchrun's shared rendezvous store: a restarted worker can "
            "read a dead peer's address from the previous attempt and fail to connect (pytorch/pytorch#135712). "
            f"Use --rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id ID and set {NO_SHARED_STORE}=1 in "
            "torchrun's environment on every node (`mycodist train --nnodes N --max-restarts K` prints such a "
            "command), or drop --max-restarts")
    return f"mycodist/attempt_{_int_env('TORCHELASTIC_RESTART_COUNT', 0)}"


def init_default_group(backend: str, timeout_s: float, device: torch.device | None = None) -> None:
    """`dist.init_process_group` from the launcher's environment, restart-safe (module docstring)."""
    timeout = timedelta(seconds=timeout_s)
    kwargs: dict = {"backend": backend, "timeout": timeout,
                    "device_id": device if device is not None and device.type == "cuda" else None}
    prefix = restart_prefix()
    if prefix is not None:
        agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                    timeout=timeout)
        kwargs.update(store=dist.PrefixStore(prefix, agent_store), rank=int(os.environ["RANK"]),
                      world_size=int(os.environ["WORLD_SIZE"]))
    dist.init_process_group(**kwargs)
