"""The three ways a step is distributed: Accelerate (DDP, or DeepSpeed through its plugin), DeepSpeed
itself (ZeRO 0-3, offload), and a bare torchrun DDP. The loop only sees `Engine`, so the same step
code runs under every launcher, and each engine owns the launcher's traps (docs/training.md).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, fields
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from mycodist.devices import set_local_cuda_device
from mycodist.errors import UsageError
from mycodist.train.checkpoint import MODEL_FILE
from mycodist.train.elastic import init_default_group, restart_prefix
from mycodist.train.watchdog import Watchdog, dist_timeout_s

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ENGINES = ("auto", "accelerate", "deepspeed", "torchrun-ddp", "fsdp")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class EngineSettings:
    """The `train` keys an engine reads, built once at the edge (`make_engine`): engines never see the whole
    config. Field names are the keys' own, so `train.<key>` and `settings.<key>` mean the same thing."""

    engine: str = "auto"
    precision: str = "auto"
    batch_size: int = 64
    grad_accum: int = 1
    clip_grad: float = 1.0
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.05
    zero_stage: int = 0
    offload: str = "none"
    deepspeed_config: str = ""
    ema_decay: float = 0.0
    fsdp_sharding: str = "full_shard"
    dist_timeout: float = 0.0

    @classmethod
    def from_config(cls, cfg: DictConfig) -> EngineSettings:
        t = cfg.train
        kw: dict[str, Any] = {}
        for f in fields(cls):
            value = t.get(f.name, f.default)
            kw[f.name] = tuple(float(x) for x in value) if f.name == "betas" else value
        return cls(**kw)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


def as_settings(cfg: DictConfig | EngineSettings) -> EngineSettings:
    """A whole config (tests, scripts) or settings already built → the engine's settings."""
    return cfg if isinstance(cfg, EngineSettings) else EngineSettings.from_config(cfg)


def launched_by() -> str:
    """Which launcher started this process, from the environment each one sets."""
    if any(k.startswith("ACCELERATE_") for k in os.environ) and "ACCELERATE_DYNAMO_BACKEND" in os.environ:
        return "accelerate"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "accelerate"
    if os.environ.get("MYCODIST_LAUNCHER") == "deepspeed" or "DS_LAUNCHER" in os.environ:
        return "deepspeed"
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchrun"
    return "none"


def configured_engine(cfg: DictConfig | EngineSettings) -> str:
    """The engine the config asks for: `train.engine`, or for `auto` DeepSpeed when ZeRO or a DeepSpeed
    template is asked for, else Accelerate. The one rule: `mycodist train` picks its launcher from it
    (LAUNCHER_OF) and every rank falls back on it when no launcher says otherwise (`choose_engine`)."""
    s = as_settings(cfg)
    engine = s.engine
    if engine not in ENGINES:
        raise UsageError(f"train.engine={engine!r} is not one of {', '.join(ENGINES)}")
    if engine != "auto":
        return engine
    if s.zero_stage > 0 or s.deepspeed_config:
        return "deepspeed"
    return "accelerate"


LAUNCHER_OF = {"accelerate": "accelerate", "deepspeed": "deepspeed", "torchrun-ddp": "torchrun", "fsdp": "torchrun"}


def choose_engine(cfg: DictConfig | EngineSettings) -> str:
    """`train.engine=auto` on a rank: follow the launcher that started it, else the configured engine."""
    s = as_settings(cfg)
    configured = configured_engine(cfg)
    if s.engine != "auto":
        return configured
    by = launched_by()
    if by == "accelerate":
        return "fsdp" if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" else "accelerate"
    if by == "deepspeed":
        return "deepspeed"
    return configured


def default_precision(device_type: str) -> str:
    """`train.precision=auto`: bf16 autocast on CUDA (fp16 on cards without bf16), fp32 on the CPU."""
    if device_type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


_LAUNCHER_PRECISION = {"no": "fp32", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}


def resolve_precision(requested: str, device_type: str, launcher: str | None = None,
                      launcher_name: str = "the launcher") -> str:
    """One precision for the run. `auto` follows the launcher's own setting when it has one (accelerate's
    `mixed_precision`, a DeepSpeed template's bf16/fp16 `enabled`), else the device default; an explicit
    `train.precision` wins over the launcher, with a warning when the two disagree (never silently)."""
    if requested not in PRECISIONS:
        raise UsageError(f"train.precision={requested!r} is not one of {', '.join(PRECISIONS)}")
    theirs = _LAUNCHER_PRECISION.get(str(launcher).lower()) if launcher else None
    if requested == "auto":
        return theirs or default_precision(device_type)
    if theirs is not None and theirs != requested:
        warnings.warn(f"{launcher_name} asks for {theirs} but train.precision={requested}: training in "
                      f"{requested} (set train.precision=auto to follow {launcher_name})", UserWarning, stacklevel=2)
    return requested


def check_precision(cfg: DictConfig | EngineSettings) -> str:
    """The run's precision, resolved for the device this process will train on."""
    s = as_settings(cfg)
    return resolve_precision(str(s.precision), "cuda" if torch.cuda.is_available() else "cpu")


def enable_tf32(device: torch.device) -> None:
    """What stays fp32 on CUDA (fp32 runs, the loss, the optimizer) uses TF32 tensor cores: on Hopper plain
    fp32 matmuls would run at ~1/15 of the TF32 rate. A no-op on the CPU."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True


def _caller() -> str:
    """`function (file:line)` of whoever called the collective helper that calls this."""
    f = sys._getframe(2)
    return f"{f.f_code.co_name} ({Path(f.f_code.co_filename).name}:{f.f_lineno})"


def check_world(world_size: int) -> None:
    """Trap 2 of docs/training.md: a launcher that started N processes which each think they are alone."""
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != expected:
        raise RuntimeError(
            f"the launcher set WORLD_SIZE={expected} but the process group has {world_size} rank(s); "
            "on CPU use `mycodist train --nproc N` or set ACCELERATE_USE_CPU=true with --multi_gpu"
        )


class Engine:
    """What the loop needs from a distributed backend; subclasses fill in the backend's calls."""

    name = "base"

    def __init__(self, cfg: EngineSettings | DictConfig) -> None:
        self.settings = s = as_settings(cfg)
        self.precision = check_precision(s)  # subclasses may follow their launcher's setting
        self.grad_accum = max(1, int(s.grad_accum))
        self.clip_grad = float(s.clip_grad)
        self.zero_stage = 0
        self.model: Any = None  # what forward is called on (wrapped)
        self.module: torch.nn.Module | None = None  # the bare module (its parameters may be ZeRO-3 partitions)
        self.optimizer: Any = None
        # every engine's process group gets it (a stalled peer: docs/training.md, "Multi-node")
        self.dist_timeout = dist_timeout_s(s, "cuda" if torch.cuda.is_available() else "cpu")

    # --- process facts -------------------------------------------------------------
    rank = 0
    world_size = 1
    local_rank = 0
    device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def input_dtype(self) -> torch.dtype:
        """DeepSpeed bf16/fp16 keeps the weights in low precision and does not autocast the inputs."""
        return torch.float32

    @property
    def forward_gathers(self) -> bool:
        """Whether a forward issues collectives (ZeRO-3, FSDP weight all-gathers): evaluation then runs in
        lockstep on every rank."""
        return self.zero_stage == 3

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the model's matmuls and attention run in (autocast or low-precision weights)."""
        return DTYPES[self.precision]

    # --- setup ---------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module, param_groups: list[dict]) -> None:
        raise NotImplementedError

    # --- the step --------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision])

    def micro_step(self, is_last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward+backward; skips the gradient all-reduce unless `is_last`."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, is_last: bool) -> None:
        raise NotImplementedError

    def step(self) -> torch.Tensor | float | None:
        """Clip, optimizer step, zero grads; returns the global grad norm before clipping when known, left
        where it is (a device tensor): the loop reads it back only at log steps."""
        raise NotImplementedError

    def compile(self) -> None:
        """torch.compile after the engine has wrapped the model: every parameter group, the EMA and the
        engine already hold the plain module's names. DDP engines compile each transformer block in place
        (`nn.Module.compile` keeps state-dict names; per-block graphs keep DDP's bucketed overlap)."""
        compile_in_place(self.module)

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

    # --- waiting on the peers (the watchdog's record) ------------------------------------
    @property
    def watchdog(self) -> Watchdog:
        wd = getattr(self, "_watchdog", None)
        if wd is None:
            wd = self._watchdog = Watchdog(getattr(self, "dist_timeout", 300.0), self.rank)
        return wd

    def waiting(self, what: str) -> contextlib.AbstractContextManager:
        """Brackets a wait on the peers: a stalled one becomes the watchdog's line (no-op without a group)."""
        if dist.is_available() and dist.is_initialized():
            return self.watchdog.watch(what)
        return contextlib.nullcontext()

    def phase_waits_on(self, phase: str) -> str | None:
        """What a step phase waits on the peers for; None when it has no collective. DDP all-reduces the
        gradients inside backward (its forward and clipping are local)."""
        return "backward (DDP gradient all-reduce)" if phase == "backward" else None

    def watch_phase(self, phase: str, step: int) -> contextlib.AbstractContextManager:
        """The step loop's record: `step` is the 0-based loop counter, shown 1-based like train_log.jsonl."""
        self.watchdog.step = step + 1
        what = self.phase_waits_on(phase)
        return self.waiting(what) if what else contextlib.nullcontext()

    # --- collectives -----------------------------------------------------------------
    # Rule: a collective's tensor lives on the engine's device (NCCL rejects CPU tensors), and a collective is
    # issued whenever a process group exists, also at world size 1, so a one-GPU run exercises the same path.
    def check_on_device(self, t: torch.Tensor, caller: str | None = None) -> None:
        if t.device.type != self.device.type or (t.device.index or 0) != (self.device.index or 0):
            raise RuntimeError(f"{caller or _caller()}: a collective got a tensor on {t.device}, but this engine's "
                               f"process group ({_backend(self.device)}) needs tensors on {self.device}; build it with "
                               f"device=engine.device")

    def barrier(self) -> None:
        if dist.is_available() and dist.is_initialized():
            with self.waiting(f"barrier from {_caller()}"):
                dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        caller = _caller()
        self.check_on_device(t, caller)
        if dist.is_available() and dist.is_initialized():
            with self.waiting(f"all_reduce from {caller}"):
                dist.all_reduce(t)
        return t

    def all_gather_object(self, obj: Any) -> list[Any]:
        if dist.is_available() and dist.is_initialized():
            out: list[Any] = [None] * dist.get_world_size()
            with self.waiting(f"all_gather_object from {_caller()}"):
                dist.all_gather_object(out, obj)  # pickles through tensors on the current CUDA device (NCCL) itself
            return out
        return [obj]

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s `obj` on every rank (one decision shared by all, e.g. which checkpoint to load)."""
        if dist.is_available() and dist.is_initialized():
            box = [obj if self.rank == src else None]
            with self.waiting(f"broadcast_object from {_caller()}"):
                dist.broadcast_object_list(box, src=src)  # like all_gather_object: the current CUDA device (NCCL)
            return box[0]
        return obj

    @contextlib.contextmanager
    def full_parameters(self) -> Iterator[None]:
        """Inside, every rank holds every parameter in full (a no-op except under ZeRO-3, where only
        DeepSpeed — direct or through Accelerate's plugin — partitions them)."""
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters())):
                yield
        else:
            yield

    # --- profiling -------------------------------------------------------------------
    def comm_profile(self) -> dict[str, Any]:
        """What the profiler's byte theory needs about this engine's traffic (mycodist.profile.theory):
        `engine` (ddp | zero0-3), `dtype_bytes` on the wire, the ZeRO-3 persistence threshold, and `ddp`,
        the DistributedDataParallel wrapper whose buckets the profiler must see (None when there is none)."""
        return _ddp_comm_profile(self.model, self.module)

    # --- checkpoints -----------------------------------------------------------------
    def save(self, ckpt_dir: Path) -> None:
        raise NotImplementedError

    def load(self, ckpt_dir: Path) -> None:
        raise NotImplementedError

    def close(self, clean: bool = True) -> None:
        """Clean teardown: barrier, drop references, then destroy the group (trap 5: abort at exit)."""
        import gc

        if clean:
            self.barrier()
        self.model = self.module = self.optimizer = None
        gc.collect()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _ddp_comm_profile(model: Any, module: torch.nn.Module | None) -> dict[str, Any]:
    """DDP all-reduces the gradients in the parameters' dtype: fp32 under autocast (bf16/fp16 only in compute)."""
    ddp = model if isinstance(model, torch.nn.parallel.DistributedDataParallel) else None
    param = next((p for p in module.parameters() if p.requires_grad), None) if module is not None else None
    return {"engine": "ddp", "dtype_bytes": param.element_size() if param is not None else 4,
            "persistence_threshold": 0, "ddp": ddp}


def _deepspeed_comm_profile(ds_engine: Any) -> dict[str, Any]:
    """ZeRO stage N sends its `communication_data_type` (bf16/fp16 runs: the 16-bit type, i.e. gradients are
    reduced and parameters gathered in 16 bit; fp32 runs: fp32). ZeRO-3 keeps parameters of at most
    `stage3_param_persistence_threshold` elements whole on every rank; with `stage3_max_reuse_distance` > 0
    it may keep gathered parameters from forward into backward (the theory assumes it does not)."""
    stage = int(ds_engine.zero_optimization_stage())
    dtype = ds_engine.communication_data_type
    return {"engine": f"zero{stage}", "dtype_bytes": torch.empty(0, dtype=dtype, device="cpu").element_size(),
            "persistence_threshold": int(ds_engine.zero_param_persistence_threshold()) if stage == 3 else 0,
            "max_reuse_distance": int(ds_engine.zero_max_reuse_distance()) if stage == 3 else 0, "ddp": None}


def _zero_phase_waits_on(stage: int, phase: str) -> str | None:
    """DeepSpeed's collectives per step phase: ZeRO-3 gathers weights in forward and backward; every stage
    reduces gradients in backward; the optimizer step all-reduces the grad norm (and gathers ZeRO-1/2 weights)."""
    return {"forward": "forward (ZeRO-3 parameter all-gather)" if stage == 3 else None,
            "backward": f"backward (ZeRO-{stage} gradient reduction)",
            "step": f"optimizer step (ZeRO-{stage} grad-norm all-reduce / parameter all-gather)"}.get(phase)


def compile_in_place(module: torch.nn.Module) -> None:
    """Compile each transformer block (or the whole module when it has no `blocks`) in place."""
    blocks = getattr(module, "blocks", None)
    for m in (blocks if blocks is not None else [module]):
        m.compile()


def make_optimizer(cfg: DictConfig | EngineSettings, param_groups: list[dict], cpu_offload: bool = False,
                   device_type: str = "cpu") -> torch.optim.Optimizer:
    """AdamW over our groups. With ZeRO optimizer offload on CUDA the step runs on the host: DeepSpeed's
    vectorised CPU Adam there (torch AdamW on the CPU is several times slower); on a CPU-only machine
    torch AdamW avoids compiling DeepSpeed's op (~35 s, 2 GB) for no gain."""
    s = as_settings(cfg)
    kw = dict(lr=float(s.lr), betas=tuple(s.betas), weight_decay=float(s.weight_decay))
    if cpu_offload and device_type == "cuda":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(param_groups, adamw_mode=True, **kw)
    return torch.optim.AdamW(param_groups, **kw)


def optimizer_offloaded(ds: dict) -> bool:
    """Whether a DeepSpeed config offloads the optimizer to the CPU."""
    off = ds.get("zero_optimization", {}).get("offload_optimizer") or {}
    return str(off.get("device", "none")).lower() == "cpu"


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _pick_device() -> tuple[torch.device, int]:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        index = set_local_cuda_device()
        device = torch.device("cuda", index)
        enable_tf32(device)
        return device, local_rank
    return torch.device("cpu"), local_rank


class TorchDDPEngine(Engine):
    """Bare `torch.nn.parallel.DistributedDataParallel` under torchrun: the fewest moving parts."""

    name = "torchrun-ddp"

    def __init__(self, cfg: EngineSettings | DictConfig) -> None:
        super().__init__(cfg)
        self.device, self.local_rank = _pick_device()
        # under a launcher (MASTER_ADDR set) the group exists at any world size, one rank included: a one-GPU
        # run then issues the same NCCL collectives as an 8-GPU one (and fails the same way if one is wrong)
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or "MASTER_ADDR" in os.environ
        if launched and not dist.is_initialized():
            init_default_group(_backend(self.device), self.dist_timeout, self.device)
        if dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        check_world(self.world_size)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def prepare(self, model: torch.nn.Module, param_groups: list[dict]) -> None:
        model.to(self.device)
        self.module = model
        self.optimizer = make_optimizer(self.settings, param_groups)
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        else:
            self.model = model

    def micro_step(self, is_last: bool) -> contextlib.AbstractContextManager:
        if is_last or self.world_size == 1:
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, loss: torch.Tensor, is_last: bool) -> None:
        self.scaler.scale(loss / self.grad_accum).backward()

    def step(self) -> float | None:
        self.scaler.unscale_(self.optimizer)
        max_norm = self.clip_grad if self.clip_grad > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def save(self, ckpt_dir: Path) -> None:
        if self.is_main:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()},
                      str(ckpt_dir / MODEL_FILE))
            torch.save({"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()},
                       ckpt_dir / "optimizer.pt")

    def load(self, ckpt_dir: Path) -> None:
        from safetensors.torch import load_file

        self.module.load_state_dict(load_file(str(ckpt_dir / MODEL_FILE), device=str(self.device)))
        state = torch.load(ckpt_dir / "optimizer.pt", map_location=self.device, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])


def _skip_transformers_weakref() -> None:
    """Accelerate's DeepSpeed plugin imports `transformers` only to register a ZeRO-3 init weakref for HF
    models; without transformers installed it dies. Our models never need it, so make it a no-op then."""
    from accelerate.utils import DeepSpeedPlugin, is_transformers_available

    if not is_transformers_available():
        DeepSpeedPlugin.set_deepspeed_weakref = lambda self: None  # type: ignore[method-assign]


def _skip_shm_op() -> None:
    """On CPU, `deepspeed.init_distributed` compiles a shared-memory comm op (~21 s, 1.6 GB) training does
    not use; gloo does the collectives. The dotted import hands back torch, hence importlib."""
    if torch.cuda.is_available() or os.environ.get("MYCODIST_DS_SHM_OP") == "1":
        return
    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
    ds_comm_torch.build_shm_op = lambda: None


class AccelerateEngine(Engine):
    """`accelerate launch` (DDP, or DeepSpeed when its config says so) and torchrun with ACCELERATE_USE_CPU."""

    name = "accelerate"

    def __init__(self, cfg: EngineSettings | DictConfig) -> None:
        super().__init__(cfg)
        s = self.settings
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        cpu = not torch.cuda.is_available()
        self.precision = resolve_precision(str(s.precision), "cpu" if cpu else "cuda",
                                           os.environ.get("ACCELERATE_MIXED_PRECISION"), "accelerate's mixed_precision")
        self.uses_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
        if self.uses_deepspeed:
            if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
                raise UsageError("ACCELERATE_USE_CPU=true makes accelerate ignore its DeepSpeed config; "
                                 "unset it (DeepSpeed runs on CPU by itself)")
            _skip_transformers_weakref()
            _skip_shm_op()
        elif cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            os.environ.setdefault("ACCELERATE_USE_CPU", "true")  # else N lone rank-0s (trap 2)
        # train.dist_timeout for the group accelerate will make: on CUDA when a launcher set LOCAL_RANK, on CPU with
        # several ranks. Never for a lone process: accelerate refuses a backend it would not pick itself
        world = int(os.environ.get("WORLD_SIZE", "1"))
        launched = world > 1 if cpu else "LOCAL_RANK" in os.environ
        kwargs = [InitProcessGroupKwargs(backend="gloo" if cpu else "nccl",
                                         timeout=timedelta(seconds=self.dist_timeout))] if launched else []
        if launched and restart_prefix() is not None and not dist.is_initialized():  # accelerate keeps it
            init_default_group("gloo" if cpu else "nccl", self.dist_timeout)  # accelerate binds the device later
        self.accelerator = Accelerator(
            mixed_precision="no" if self.precision == "fp32" else self.precision,
            gradient_accumulation_steps=self.grad_accum,
            kwargs_handlers=kwargs,
        )
        acc = self.accelerator
        self.rank, self.world_size, self.local_rank = acc.process_index, acc.num_processes, acc.local_process_index
        self.device = acc.device  # accelerate maps local rank → visible GPU itself (modulo the visible count)
        enable_tf32(self.device)
        check_world(self.world_size)
        if self.uses_deepspeed:
            plugin = acc.state.deepspeed_plugin
            ds = plugin.deepspeed_config
            self.zero_stage = int(ds.get("zero_optimization", {}).get("stage", 0))
            ds["train_micro_batch_size_per_gpu"] = int(s.batch_size)
            ds["gradient_accumulation_steps"] = self.grad_accum
            ds["train_batch_size"] = int(s.batch_size) * self.grad_accum * self.world_size
            pinned = ds.get("gradient_clipping", "auto")
            if pinned not in ("auto", None) and float(pinned) != self.clip_grad:
                warnings.warn(f"accelerate's DeepSpeed config pins gradient_clipping={pinned}; train.clip_grad="
                              f"{self.clip_grad} is what this run uses (drop the key from the accelerate config to "
                              f"silence this)", UserWarning, stacklevel=2)
            ds["gradient_clipping"] = self.clip_grad
            ds["steps_per_print"] = 1 << 30

    @property
    def input_dtype(self) -> torch.dtype:
        return DTYPES[self.precision] if self.uses_deepspeed else torch.float32

    def phase_waits_on(self, phase: str) -> str | None:
        return _zero_phase_waits_on(self.zero_stage, phase) if self.uses_deepspeed else super().phase_waits_on(phase)

    def prepare(self, model: torch.nn.Module, param_groups: list[dict]) -> None:
        offload = self.uses_deepspeed and optimizer_offloaded(self.accelerator.state.deepspeed_plugin.deepspeed_config)
        optimizer = make_optimizer(self.settings, param_groups, offload, self.device.type)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.module = self.accelerator.unwrap_model(self.model)

    def compile(self) -> None:
        if self.uses_deepspeed:
            self.model.compile()  # DeepSpeedEngine.compile: in place on its module, ZeRO hooks handled
        else:
            compile_in_place(self.module)

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.accelerator.autocast()

    def micro_step(self, is_last: bool) -> contextlib.AbstractContextManager:
        return self.accelerator.accumulate(self.model)

    def backward(self, loss: torch.Tensor, is_last: bool) -> None:
        self.accelerator.backward(loss)

    def step(self) -> float | None:
        norm = None
        if self.clip_grad > 0 or not self.uses_deepspeed:
            max_norm = self.clip_grad if self.clip_grad > 0 else float("inf")
            norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def comm_profile(self) -> dict[str, Any]:
        if self.uses_deepspeed:
            return _deepspeed_comm_profile(self.model)
        return _ddp_comm_profile(self.model, self.module)

    def save(self, ckpt_dir: Path) -> None:
        self.accelerator.save_state(str(ckpt_dir))

    def load(self, ckpt_dir: Path) -> None:
        self.accelerator.load_state(str(ckpt_dir))

    def close(self, clean: bool = True) -> None:
        if clean:
            self.barrier()
        self.model = self.module = self.optimizer = None
        import gc

        gc.collect()
        if clean:
            self.accelerator.end_training()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _read_template(cfg: DictConfig | EngineSettings) -> dict:
    s = as_settings(cfg)
    path = Path(s.deepspeed_config)
    if not path.is_file():
        raise UsageError(f"train.deepspeed_config: no such file '{path}' (see configs/deepspeed/)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"train.deepspeed_config '{path}' is not valid JSON: {e}") from None


def template_precision(cfg: DictConfig | EngineSettings, device_type: str) -> str:
    """The run's precision under a DeepSpeed template: an explicit bf16/fp16 `enabled` in the template is the
    launcher's setting (followed by `auto`, overruled with a warning by an explicit train.precision)."""
    s = as_settings(cfg)
    theirs = None
    if s.deepspeed_config:
        ds = _read_template(cfg)
        flags = {name: ds.get(name, {}).get("enabled", "auto") for name in ("bf16", "fp16")}
        if any(v not in ("auto", None) for v in flags.values()):
            theirs = next((name for name, v in flags.items() if v is True), "fp32")
    return resolve_precision(str(s.precision), device_type, theirs, f"{s.deepspeed_config}")


def deepspeed_config(cfg: DictConfig | EngineSettings, world_size: int, precision: str | None = None) -> dict:
    """Our keys → a DeepSpeed config; a template (train.deepspeed_config) may fix anything, "auto" fields
    in it are filled from ours so the two never disagree silently."""
    s = as_settings(cfg)
    t = s
    precision = precision or check_precision(cfg)
    ds: dict[str, Any] = _read_template(cfg) if t.deepspeed_config else {}
    if t.offload not in ("none", "cpu"):
        raise UsageError(f"train.offload={t.offload!r} must be none or cpu")
    if t.zero_stage not in (0, 1, 2, 3):
        raise UsageError(f"train.zero_stage={t.zero_stage} must be 0, 1, 2 or 3")

    def fill(d: dict, key: str, value: Any) -> None:
        if d.get(key, "auto") == "auto":
            d[key] = value

    fill(ds, "train_micro_batch_size_per_gpu", int(t.batch_size))
    fill(ds, "gradient_accumulation_steps", max(1, int(t.grad_accum)))
    ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world_size
    fill(ds, "gradient_clipping", float(t.clip_grad))
    fill(ds, "steps_per_print", 1 << 30)
    zero = ds.setdefault("zero_optimization", {})
    fill(zero, "stage", int(t.zero_stage))
    if t.offload == "cpu" and "offload_optimizer" not in zero:
        zero["offload_optimizer"] = {"device": "cpu"}
        if zero["stage"] == 3:
            zero["offload_param"] = {"device": "cpu"}
    # with offload on CUDA our optimizer is DeepSpeedCPUAdam (make_optimizer); on a CPU-only machine it is torch
    # AdamW, which DeepSpeed accepts with offload only when told
    ds.setdefault("zero_force_ds_cpu_optimizer", False)
    for name in ("bf16", "fp16"):
        ds.setdefault(name, {})["enabled"] = precision == name  # resolved: template_precision warned if it differed
    if ds["fp16"]["enabled"]:
        fill(ds["fp16"], "loss_scale", 0)
    return ds


class DeepSpeedEngine(Engine):
    """`deepspeed.initialize` under the deepspeed launcher or torchrun: ZeRO 0-3, bf16/fp16, offload."""

    name = "deepspeed"

    def __init__(self, cfg: EngineSettings | DictConfig) -> None:
        super().__init__(cfg)
        import deepspeed

        _skip_shm_op()
        self.device, self.local_rank = _pick_device()
        if restart_prefix() is not None and not dist.is_initialized():  # DeepSpeed keeps a group that exists
            init_default_group(_backend(self.device), self.dist_timeout, self.device)
        deepspeed.init_distributed(dist_backend=_backend(self.device), timeout=timedelta(seconds=self.dist_timeout))
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        check_world(self.world_size)
        self.precision = template_precision(cfg, self.device.type)
        self.ds_config = deepspeed_config(cfg, self.world_size, self.precision)
        self.zero_stage = int(self.ds_config["zero_optimization"]["stage"])
        self.grad_accum = int(self.ds_config["gradient_accumulation_steps"])

    @property
    def input_dtype(self) -> torch.dtype:
        return DTYPES[self.precision]

    def phase_waits_on(self, phase: str) -> str | None:
        return _zero_phase_waits_on(self.zero_stage, phase)

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the weights themselves are in the training dtype

    def prepare(self, model: torch.nn.Module, param_groups: list[dict]) -> None:
        import deepspeed

        optimizer = make_optimizer(self.settings, param_groups, optimizer_offloaded(self.ds_config), self.device.type)
        # device_rank: DeepSpeed would otherwise pick cuda:LOCAL_RANK, wrong with one GPU per task
        args = SimpleNamespace(device_rank=self.device.index) if self.device.type == "cuda" else None
        self.model, self.optimizer, _, _ = deepspeed.initialize(args=args, model=model, optimizer=optimizer,
                                                                config=self.ds_config)
        self.module = self.model.module

    def compile(self) -> None:
        self.model.compile()  # DeepSpeedEngine.compile: in place on its module, ZeRO hooks handled

    def backward(self, loss: torch.Tensor, is_last: bool) -> None:
        self.model.backward(loss)
        if not is_last:
            self.model.step()  # advances DeepSpeed's micro-step counter; no update before the boundary

    def step(self) -> float | None:
        self.model.step()
        return self.model.get_global_grad_norm()

    def comm_profile(self) -> dict[str, Any]:
        return _deepspeed_comm_profile(self.model)

    def save(self, ckpt_dir: Path) -> None:
        self.model.save_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name, save_latest=False)

    def load(self, ckpt_dir: Path) -> None:
        path, _ = self.model.load_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name,
                                             load_lr_scheduler_states=False)
        if path is None:
            raise UsageError(f"DeepSpeed found no checkpoint in {ckpt_dir}")


def make_engine(cfg: DictConfig) -> Engine:
    """The run's engine, handed only its settings (the `train` group), never the whole config."""
    settings = EngineSettings.from_config(cfg)
    name = choose_engine(settings)
    if name == "fsdp":
        from mycodist.train.fsdp import FSDPEngine

        return FSDPEngine(settings)
    cls = {"accelerate": AccelerateEngine, "deepspeed": DeepSpeedEngine, "torchrun-ddp": TorchDDPEngine}[name]
    return cls(settings)
