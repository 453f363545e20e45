"""FSDP2 (`torch.distributed.fsdp.fully_shard`): parameters, gradients and optimizer state sharded per rank,
each transformer block its own unit (all-gathered just before its forward and again for its backward,
gradients reduce-scattered), then the root.

Launched by torchrun (`train.engine=fsdp`) or by `accelerate launch` with an FSDP config
(configs/accelerate/8gpu_fsdp.yaml, cpu2_fsdp.yaml): accelerate's launcher turns the config into FSDP_*
variables, which this engine reads (FSDP_VERSION must be 2; FSDP_RESHARD_AFTER_FORWARD false =
shard-grad-op). The sharding itself is torch's `fully_shard` — the call accelerate's own FSDP2 plugin
makes — because accelerate 1.15's Accelerator never selects FSDP on a CPU process group (it makes
MULTI_CPU and silently wraps DDP: docs/training.md), and one code path on CPU and CUDA is one path tested.

Checkpoints are sharded (torch.distributed.checkpoint, one file per rank under `model/` and `optim/`);
export consolidates them into one fp32 state dict without a process group.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from mycodist.errors import UsageError
from mycodist.train.elastic import init_default_group
from mycodist.train.engines import (
    Engine,
    EngineSettings,
    _backend,
    _pick_device,
    check_world,
    make_optimizer,
    resolve_precision,
)

SHARDINGS = ("full_shard", "shard_grad_op")
MODEL_DIR, OPTIM_DIR = "model", "optim"


def fsdp_sharding(cfg: DictConfig | EngineSettings) -> str:
    """accelerate's FSDP config when it launched us (FSDP_RESHARD_AFTER_FORWARD), else `train.fsdp_sharding`."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        version = os.environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise UsageError(f"accelerate's FSDP config has fsdp_version {version}: mycodist runs FSDP2 only "
                             "(set fsdp_version: 2, see configs/accelerate/8gpu_fsdp.yaml)")
        reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower()
        return "shard_grad_op" if reshard in ("false", "0", "shard_grad_op") else "full_shard"
    group = cfg.train if hasattr(cfg, "train") else cfg  # a whole config, or the engine's settings
    sharding = str(group.get("fsdp_sharding", "full_shard"))
    if sharding not in SHARDINGS:
        raise UsageError(f"train.fsdp_sharding={sharding!r} is not one of {', '.join(SHARDINGS)}")
    return sharding


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("true", "1", "yes")


def accelerate_fsdp_options() -> dict[str, bool]:
    """The rest of accelerate's FSDP config, so no option is silently ignored: activation checkpointing is
    honoured (each block recomputed in backward: the model's own `grad_checkpointing`); parameter offload and
    activation offload are refused (not built: FSDP2's CPUOffloadPolicy moves the optimizer step and the
    gradient-norm collective to host tensors, which this engine cannot run or test without a GPU; DeepSpeed's
    `train.offload=cpu` is the tested offload)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() != "true":
        return {"activation_checkpointing": False}
    for name, key in (("FSDP_OFFLOAD_PARAMS", "fsdp_offload_params"),
                      ("FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD", "fsdp_activation_checkpointing_offload")):
        if _env_true(name):
            raise UsageError(f"accelerate's FSDP config sets {key}: true, which mycodist's FSDP2 engine does not "
                             "support; set it to false, or offload with DeepSpeed (train.zero_stage=3 train.offload=cpu)")
    return {"activation_checkpointing": _env_true("FSDP_ACTIVATION_CHECKPOINTING")}


def _padded(p: torch.Tensor, n: int) -> int:
    """Elements FSDP2 moves for a parameter: dim 0 padded up to a multiple of n."""
    if p.dim() == 0:
        return -(-1 // n) * n
    return -(-p.shape[0] // n) * n * (p.numel() // max(p.shape[0], 1))


class FSDPEngine(Engine):
    """FSDP2 per transformer block and on the root; bf16 parameters with fp32 gradient reduction on CUDA."""

    name = "fsdp"

    def __init__(self, cfg: EngineSettings | DictConfig) -> None:
        super().__init__(cfg)
        self.device, self.local_rank = _pick_device()
        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
        self.precision = resolve_precision(str(self.settings.precision), self.device.type, launcher,
                                           "accelerate's mixed_precision")
        if self.precision == "fp16":
            raise UsageError("train.precision=fp16 is not supported with FSDP2 here; use bf16 (or fp32)")
        if float(self.settings.ema_decay) > 0:
            raise UsageError("train.ema_decay > 0 with FSDP: the EMA needs whole weights on each rank; turn it off")
        self.sharding = fsdp_sharding(cfg)
        self.options = accelerate_fsdp_options()
        if not dist.is_initialized():
            init_default_group(_backend(self.device), self.dist_timeout, self.device)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        check_world(self.world_size)

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the mixed-precision policy casts parameters and inputs itself

    def prepare(self, model: torch.nn.Module, param_groups: list[dict]) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        model.to(self.device)
        if self.options["activation_checkpointing"] and hasattr(model, "set_grad_checkpointing"):
            model.set_grad_checkpointing(True)  # per block, inside the block's FSDP unit: no extra all-gather
        names = {id(p): n for n, p in model.named_parameters()}
        group_names = [[names[id(p)] for p in g["params"]] for g in param_groups]
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if self.precision == "bf16" else MixedPrecisionPolicy())
        reshard = self.sharding == "full_shard"
        for block in getattr(model, "blocks", []):
            fully_shard(block, reshard_after_forward=reshard, mp_policy=mp)
        fully_shard(model, reshard_after_forward=reshard, mp_policy=mp)
        sharded = dict(model.named_parameters())  # fully_shard swapped in DTensor parameters: regroup by name
        groups = [{**g, "params": [sharded[n] for n in ns]} for g, ns in zip(param_groups, group_names, strict=True)]
        self.model = self.module = model
        self.optimizer = make_optimizer(self.settings, groups)

    def micro_step(self, is_last: bool) -> contextlib.AbstractContextManager:
        self.model.set_requires_gradient_sync(is_last)  # no reduce-scatter before the last micro-batch
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, is_last: bool) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> torch.Tensor:
        max_norm = self.clip_grad if self.clip_grad > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a device tensor, read at log steps

    def phase_waits_on(self, phase: str) -> str | None:
        return {"forward": "forward (FSDP parameter all-gather)",
                "backward": "backward (FSDP all-gather / gradient reduce-scatter)",
                "step": "optimizer step (FSDP grad-norm all-reduce)"}.get(phase)

    @property
    def forward_gathers(self) -> bool:
        return True

    def compile(self) -> None:
        for m in (getattr(self.module, "blocks", None) or [self.module]):
            m.compile()  # in place after fully_shard: names and FSDP hooks kept

    @contextlib.contextmanager
    def full_parameters(self) -> Iterator[None]:
        """Every rank holds every parameter in full: all-gather each FSDP unit, then shard again."""
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in self.module.modules() if isinstance(m, FSDPModule)]
        with self.waiting("FSDP all-gather of the full parameters"):
            for m in units:
                m.unshard()
        try:
            yield
        finally:
            for m in units:
                m.reshard()

    def comm_profile(self) -> dict[str, Any]:
        """FSDP2 sends every parameter padded along dim 0 (shapes, not counts); FULL_SHARD keeps only the
        root's own parameters gathered from forward into backward, SHARD_GRAD_OP keeps all of them."""
        n = self.world_size
        params = [p for p in self.module.parameters() if p.requires_grad]
        in_blocks = {id(p) for p in getattr(self.module, "blocks", torch.nn.Module()).parameters()}
        kept = params if self.sharding == "shard_grad_op" else [p for p in params if id(p) not in in_blocks]
        return {"engine": "fsdp", "dtype_bytes": 2 if self.precision == "bf16" else 4, "reduce_bytes": 4,
                "persistence_threshold": 0,  # gradients reduce-scatter in fp32 (the MixedPrecisionPolicy in prepare)
                "param_shapes": [tuple(p.shape) for p in params], "resident_numel": sum(_padded(p, n) for p in kept),
                "ddp": None}

    def save(self, ckpt_dir: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        with self.waiting(f"sharded checkpoint save of {ckpt_dir.name}"):
            dcp.save({"model": model_sd}, checkpoint_id=str(ckpt_dir / MODEL_DIR))
            dcp.save({"optim": optim_sd}, checkpoint_id=str(ckpt_dir / OPTIM_DIR))

    def load(self, ckpt_dir: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd}
        dcp.load(state, checkpoint_id=str(ckpt_dir / MODEL_DIR))
        ostate = {"optim": optim_sd}
        dcp.load(ostate, checkpoint_id=str(ckpt_dir / OPTIM_DIR))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=ostate["optim"])


def consolidated_fsdp_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a sharded FSDP checkpoint, in one process and without a process group."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.pt"
        dcp_to_torch_save(str(Path(ckpt) / MODEL_DIR), str(out))
        state = torch.load(out, map_location="cpu", weights_only=False)
    return state["model"]
