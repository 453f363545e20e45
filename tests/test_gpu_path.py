"""The GPU/NCCL rules of the training path, proven on the CPU (docs/training.md, "GPU checklist"):

- every tensor built in mycodist/train and mycodist/profile names its device (a static check);
- the collective helpers refuse a tensor off the engine's device, naming the caller, and issue the
  collective whenever a process group exists, also at world size 1 (where NCCL would reject a CPU tensor);
- the step loop reads nothing back to the host outside log, eval and checkpoint steps;
- compile comes after groups, EMA and the engine: clean names, strict loads;
- precision, TF32, device choice under CUDA_VISIBLE_DEVICES, offload optimizer, launcher configs;
- persistent loader workers follow epoch changes; compiled flex does not recompile per batch size.
"""

from __future__ import annotations

import ast
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

from mycodist.config import load_config
from mycodist.devices import pick_device_index
from mycodist.errors import UsageError
from mycodist.train import engines
from mycodist.train.engines import Engine, resolve_precision

REPO = Path(__file__).resolve().parents[1]
FACTORIES = {"zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint", "eye", "linspace",
             "logspace", "as_tensor", "empty_strided", "randperm", "scalar_tensor"}


# --- tensors name their device ------------------------------------------------------------------------
def factory_calls_without_device(path: Path) -> list[str]:
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        f = node.func
        if f.attr in FACTORIES and isinstance(f.value, ast.Name) and f.value.id == "torch":
            if not any(k.arg == "device" for k in node.keywords):
                bad.append(f"{path.relative_to(REPO)}:{node.lineno} torch.{f.attr}(...) has no device=")
    return bad


def test_every_tensor_built_in_train_and_profile_names_its_device():
    files = sorted((REPO / "mycodist" / "train").rglob("*.py")) + sorted((REPO / "mycodist" / "profile").rglob("*.py"))
    assert len(files) > 10
    bad = [b for f in files for b in factory_calls_without_device(f)]
    assert not bad, "\n".join(bad)


def test_the_static_check_catches_a_tensor_without_device(tmp_path):
    src = REPO / "mycodist" / "train" / "_probe_for_test.py"
    try:
        src.write_text("import torch\nx = torch.zeros(2)\ny = torch.zeros(2, device='cpu')\n")
        assert factory_calls_without_device(src) == ["mycodist/train/_probe_for_test.py:2 torch.zeros(...) has no device="]
    finally:
        src.unlink()


# --- collectives ------------------------------------------------------------------------------------------
def _engine(device: str) -> Engine:
    e = Engine.__new__(Engine)
    e.device = torch.device(device)
    return e


def test_collective_helper_refuses_a_tensor_off_the_engine_device_and_names_the_caller():
    e = _engine("cuda:0")  # never touches CUDA: the check runs before any collective

    def log_the_loss():
        e.all_reduce_sum(torch.zeros(2, device="cpu"))

    with pytest.raises(RuntimeError, match=r"log_the_loss \(test_gpu_path.py:\d+\).*needs tensors on cuda:0"):
        log_the_loss()


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_collectives_are_issued_at_world_size_one(one_rank_group, monkeypatch):
    """The shortcut that skipped them at one rank hid the CPU-tensor crash of every NCCL run."""
    calls = []
    real = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: (calls.append(t.device), real(t, *a, **k))[1])
    e = _engine("cpu")
    out = e.all_reduce_sum(torch.ones(2, dtype=torch.float64, device="cpu"))
    assert calls == [torch.device("cpu")] and out.tolist() == [1.0, 1.0]
    assert e.all_gather_object({"a": 1}) == [{"a": 1}]


# --- device, precision, optimizer, launcher configs --------------------------------------------------------
@pytest.mark.parametrize("local_rank,visible,expected", [(0, 1, 0), (3, 1, 0), (3, 8, 3), (7, 8, 7)])
def test_device_follows_visible_gpus_not_raw_local_rank(local_rank, visible, expected):
    assert pick_device_index(local_rank, visible) == expected


def test_more_local_ranks_than_visible_gpus_is_a_clear_error():
    with pytest.raises(UsageError, match="LOCAL_RANK=4 but this process sees 2 GPUs"):
        pick_device_index(4, 2)


def test_precision_auto_is_bf16_on_cuda_fp32_on_cpu_and_follows_the_launcher(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda", "no") == "fp32"
    assert resolve_precision("auto", "cpu", "bf16") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", "cuda") == "fp16"


def test_an_explicit_precision_that_disagrees_with_the_launcher_warns():
    with pytest.warns(UserWarning, match="accelerate's mixed_precision asks for bf16 but train.precision=fp32"):
        assert resolve_precision("fp32", "cuda", "bf16", "accelerate's mixed_precision") == "fp32"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("bf16", "cuda", "bf16") == "bf16"
    with pytest.raises(UsageError, match="not one of auto, fp32, bf16, fp16"):
        resolve_precision("tf32", "cuda")


def test_deepspeed_template_precision_is_followed_by_auto_and_overruled_with_a_warning(tmp_path):
    tpl = tmp_path / "ds.json"
    tpl.write_text('{"bf16": {"enabled": true}, "zero_optimization": {"stage": 2}}')
    cfg = load_config(None, [f"train.deepspeed_config={tpl}"])
    assert engines.template_precision(cfg, "cpu") == "bf16"
    ds = engines.deepspeed_config(cfg, 2, "bf16")
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    cfg.train.precision = "fp32"
    with pytest.warns(UserWarning, match="asks for bf16 but train.precision=fp32"):
        assert engines.template_precision(cfg, "cpu") == "fp32"
    assert engines.deepspeed_config(cfg, 2, "fp32")["bf16"]["enabled"] is False


def test_zero_offload_on_cuda_steps_deepspeed_cpu_adam(monkeypatch):
    """The choice, without compiling DeepSpeed's op here: offload + CUDA asks for DeepSpeedCPUAdam."""
    import deepspeed.ops.adam as ds_adam

    made = []

    class Recorder:
        def __init__(self, groups, adamw_mode, **kw):
            made.append((adamw_mode, kw))

    monkeypatch.setattr(ds_adam, "DeepSpeedCPUAdam", Recorder)
    cfg = load_config(None, ["train.offload=cpu", "train.zero_stage=2"])
    ds = engines.deepspeed_config(cfg, 2, "bf16")
    assert engines.optimizer_offloaded(ds)
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))]}]
    assert isinstance(engines.make_optimizer(cfg, groups, True, "cuda"), Recorder) and made[0][0] is True
    assert isinstance(engines.make_optimizer(cfg, groups, True, "cpu"), torch.optim.AdamW)
    assert isinstance(engines.make_optimizer(cfg, groups, False, "cuda"), torch.optim.AdamW)


def test_accelerate_gpu_configs_leave_clipping_and_precision_to_our_keys():
    for path in sorted((REPO / "configs" / "accelerate").glob("*.yaml")):
        conf = yaml.safe_load(path.read_text())
        ds = conf.get("deepspeed_config") or {}
        assert "gradient_clipping" not in ds, f"{path.name} pins gradient_clipping: train.clip_grad would be ignored"
        if not conf.get("use_cpu") and conf.get("distributed_type") != "NO" and "cpu" not in path.name:
            assert conf.get("mixed_precision") == "bf16", path.name


# --- the step loop: no host read-backs outside log/eval/checkpoint steps ------------------------------------
READBACKS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


def _trainer(shards: Path, run_dir: Path, *overrides: str):
    from mycodist.train.trainer import Trainer

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_CPU"):
        os.environ.pop(k, None)
    cfg = load_config(None, [f"data.shards={shards}", f"train.output_dir={run_dir}", "model.img_size=32",
                             "train.batch_size=8", "data.workers=0", "train.tb=false", "train.export=false",
                             "train.resume=none", *overrides])
    return Trainer(cfg)


@pytest.mark.parametrize("engine", ["torchrun-ddp", "accelerate"])
def test_step_loop_reads_nothing_back_outside_log_eval_and_checkpoint_steps(shards, tmp_path, monkeypatch, engine):
    trainer = _trainer(shards, tmp_path / "run", f"train.engine={engine}", "train.max_steps=7", "train.log_every=3",
                       "train.ckpt_every=0", "train.eval_every=0", "train.epochs=100", "train.ema_decay=0.9")
    trainer.steps_per_epoch = 10**6  # no epoch-end eval/checkpoint inside the counted steps
    allowed = {"depth": 0}
    for name in ("log_step", "evaluate", "save_checkpoint"):
        real = getattr(trainer, name)

        def wrapped(*a, _real=real, **k):
            allowed["depth"] += 1
            try:
                return _real(*a, **k)
            finally:
                allowed["depth"] -= 1
        monkeypatch.setattr(trainer, name, wrapped)

    ours = str(REPO / "mycodist") + os.sep
    host_side = str(REPO / "mycodist" / "data") + os.sep  # the loader works on host tensors by design
    seen: dict[str, list] = {"loop": [], "allowed": []}
    for meth in READBACKS:
        real = getattr(torch.Tensor, meth)

        def patched(self, *a, _real=real, _meth=meth, **k):
            f = sys._getframe(1)
            path = f.f_code.co_filename
            if path.startswith(ours) and not path.startswith(host_side):
                where = "allowed" if allowed["depth"] else "loop"
                seen[where].append(f"step {trainer.step}: Tensor.{_meth} at {Path(path).name}:{f.f_lineno}")
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, meth, patched)
    try:
        trainer.train_loop()
    finally:
        monkeypatch.undo()
        trainer.close_loaders()
        trainer.engine.close()
    assert trainer.step == 7
    assert seen["loop"] == [], "\n".join(seen["loop"])
    # the counter sees real read-backs: the loss and grad norm at each log step (3, 6, 7), eval at the end
    assert sum("log" in s or "trainer.py" in s for s in seen["allowed"]) >= 3, seen["allowed"]


# --- compile after wrapping: clean names, strict loads ------------------------------------------------------
def test_compile_keeps_plain_names_for_groups_ema_and_engine(shards, tmp_path):
    trainer = _trainer(shards, tmp_path / "run", "train.engine=torchrun-ddp", "train.compile=true",
                       "train.ema_decay=0.99", "train.layer_decay=0.75", "train.max_steps=1")
    try:
        module = trainer.engine.module
        assert isinstance(trainer.engine.settings, engines.EngineSettings) and not hasattr(trainer.engine, "cfg")
        assert trainer.engine.settings.ema_decay == 0.99  # settings built at the edge, not the whole config
        names = list(module.state_dict())
        assert not any("_orig_mod" in n or n.startswith("module.") for n in names)
        assert list(trainer.ema.state_dict()) == names
        groups = trainer.engine.optimizer.param_groups
        no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
        for name in ("cls_token", "pos_embed", "norm.weight", "blocks.0.attn.qkv.bias"):
            assert id(module.get_parameter(name)) in no_decay, name
        assert id(module.get_parameter("blocks.0.attn.qkv.weight")) not in no_decay
        scales = sorted({g["lr_scale"] for g in groups})
        assert len(scales) == len(module.blocks) + 2, scales  # embed, each block, head: distinct layer ids
        assert all(blk._compiled_call_impl is not None for blk in module.blocks)  # compiled in place
        assert all(blk.attn.kernel == "sdpa" for blk in module.blocks)  # resolved once, before compile
    finally:
        trainer.close_loaders()
        trainer.engine.close()


# --- the loader: persistent workers follow the epoch ---------------------------------------------------------
def test_persistent_workers_follow_epoch_changes_and_resume(shards):
    from mycodist.data import make_train_loader

    cfg = load_config(None, [f"data.shards={shards}", "model.img_size=32", "train.batch_size=8", "data.workers=2"])

    def keys(loader, epoch, skip_state=None):
        loader.set_epoch(epoch)
        if skip_state:
            loader.load_state_dict(skip_state)
        out = []
        for _ in loader:
            out.append(list(loader.last_keys))
        return out

    kept = make_train_loader(cfg, 0, 1)
    try:
        e0, e1 = keys(kept, 0), keys(kept, 1)
        dl = kept._loader
        e2 = keys(kept, 2)
        assert kept._loader is dl and dl.persistent_workers  # same workers, no respawn
    finally:
        kept.close()
    for epoch, got in ((0, e0), (1, e1), (2, e2)):
        fresh = make_train_loader(cfg, 0, 1)
        try:
            assert keys(fresh, epoch) == got, epoch
        finally:
            fresh.close()
    assert e0 != e1
    # mid-epoch resume through the same persistent workers
    resumed = make_train_loader(cfg, 0, 1)
    try:
        keys(resumed, 0)
        state = {**resumed.state_dict(), "epoch": 1, "batches": 2}
        assert keys(resumed, 1, state) == e1[2:]
    finally:
        resumed.close()


def test_loader_workers_auto_and_pinned_memory_on_cuda(monkeypatch):
    from mycodist.data.loaders import StreamParams, resolve_workers

    assert resolve_workers(-1, cuda=False) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(128)))
    assert resolve_workers(-1, cuda=True) == 15
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert resolve_workers(-1, cuda=True) == 1
    assert resolve_workers(3, cuda=True) == 3
    with pytest.raises(UsageError, match="data.workers=-2"):
        resolve_workers(-2)
    cfg = load_config(None, [])
    assert StreamParams.from_config(cfg, pin_memory=True).pin_memory


# --- attention: chosen once, compiled flex does not recompile per batch size ---------------------------------
def test_attention_kernel_is_resolved_once_and_forward_does_not_choose(monkeypatch):
    from mycodist.models import attention, create_model

    model = create_model("vit_tiny_patch16", num_classes=3, img_size=32)
    assert model.resolve_attention("cpu", torch.float32) == "sdpa"

    def no_choosing(*a, **k):
        raise AssertionError("choose_backend called inside forward")

    monkeypatch.setattr(attention, "choose_backend", no_choosing)
    model(torch.randn(2, 3, 32, 32))


def test_compiled_flex_recompiles_at_most_once_for_new_batch_sizes():
    from torch._dynamo.utils import counters
    from torch.nn.attention.flex_attention import flex_attention

    from mycodist.models.attention import FLEX_COMPILE

    torch._dynamo.reset()
    counters.clear()
    fn = torch.compile(flex_attention, backend="eager", **FLEX_COMPILE)  # the kernel's settings, cheap backend
    for b in (8, 7, 5, 3, 6, 2):
        q = torch.randn(b, 2, 16, 8)
        fn(q, q, q)
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    torch._dynamo.reset()


# --- export on the training device, with a backend that can run there ------------------------------------------
def test_export_falls_back_to_auto_when_the_training_backend_cannot_run(caplog):
    from mycodist.export.build import export_device, runnable_attention

    cfg = load_config(None, ["model.attention=flash_attn"])
    with caplog.at_level("WARNING"):
        out = runnable_attention(cfg, torch.device("cpu"))
    assert out.model.attention == "auto" and cfg.model.attention == "flash_attn"
    assert "model.attention=flash_attn cannot run here" in caplog.text
    assert runnable_attention(load_config(None, ["model.attention=sdpa"]), torch.device("cpu")).model.attention == "sdpa"
    assert export_device("cpu") == torch.device("cpu")


def test_phase_clock_sums_phases_and_skips_untimed_gaps():
    import time

    from mycodist.train.timing import PhaseClock

    clock = PhaseClock(torch.device("cpu"))
    for _ in range(2):
        clock.mark("data")
        time.sleep(0.02)
        clock.mark("forward")
        time.sleep(0.01)
        clock.stop()
        time.sleep(0.05)  # log/eval/checkpoint time: not part of any phase
    w = clock.window()
    assert 0.035 <= w["data"] < 0.2 and 0.015 <= w["forward"] < 0.2
    assert w["backward"] == 0.0 and w["total"] == pytest.approx(w["data"] + w["forward"])
    assert w["total"] < 0.25 and clock.window()["total"] == 0.0  # the gap is excluded; a window resets
