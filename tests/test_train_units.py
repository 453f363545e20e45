"""The training plumbing that needs no second process: schedule, metrics and calibration, checkpoint
bookkeeping, the DeepSpeed config, the launch commands (the CPU traps) and the CLI errors."""

from __future__ import annotations

import json
import random

import pytest
import torch

from mycodist.cli import main as cli_main
from mycodist.config import load_config
from mycodist.errors import UsageError
from mycodist.train import checkpoint as ck
from mycodist.train.cli import launch_command
from mycodist.train.engines import choose_engine, deepspeed_config
from mycodist.train.metrics import (
    calibration_summary,
    classification_report,
    expected_calibration_error,
    fit_temperature,
)
from mycodist.train.schedule import make_schedule, scaled_lr


def cfg(*overrides: str):
    return load_config(None, list(overrides))


# --- schedule ---------------------------------------------------------------------------------------
def test_lr_scales_with_global_batch_and_follows_warmup_then_cosine():
    c = cfg("train.lr=0.001", "train.lr_base_batch=512", "train.warmup_steps=10", "train.min_lr=0.00001")
    assert scaled_lr(c, 1024) == pytest.approx(0.002)
    s = make_schedule(c, 1024, steps_per_epoch=50, total_steps=110)
    assert s.lr(0) == pytest.approx(0.002 / 10)
    assert s.lr(9) == pytest.approx(0.002)
    assert s.lr(60) == pytest.approx((0.002 + 0.00001) / 2)  # half way through the cosine
    assert s.lr(110) == pytest.approx(0.00001) and s.lr(109) < 0.00002
    lrs = [s.lr(i) for i in range(10, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_warmup_epochs_used_when_steps_zero():
    c = cfg("train.warmup_steps=0", "train.warmup_epochs=2.0", "train.lr_base_batch=0")
    s = make_schedule(c, 64, steps_per_epoch=7, total_steps=100)
    assert s.warmup_steps == 14 and s.peak_lr == pytest.approx(0.001)


# --- metrics ----------------------------------------------------------------------------------------
def test_classification_report_counts_exactly():
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    labels = torch.tensor([0, 1, 2, 2])
    rep = classification_report(logits, labels, 3)
    assert rep["top1"] == pytest.approx(0.75)
    assert rep["per_class_acc"] == pytest.approx([1.0, 1.0, 0.5])
    # class 1: precision 1/2, recall 1 → F1 2/3; class 2: precision 1, recall 1/2 → 2/3; class 0: 1
    assert rep["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert rep["confusion"].tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


def test_temperature_fixes_overconfident_logits():
    g = torch.Generator().manual_seed(0)
    n, k = 2000, 5
    labels = torch.randint(0, k, (n,), generator=g)
    true_logits = torch.randn(n, k, generator=g)
    true_logits[torch.arange(n), labels] += 1.5
    # sample "observed" labels from the calibrated distribution, then make logits 4x overconfident
    observed = torch.multinomial(true_logits.softmax(1), 1, generator=g).squeeze(1)
    t = fit_temperature(4 * true_logits, observed)
    assert t == pytest.approx(4.0, rel=0.15)
    summary = calibration_summary(4 * true_logits, observed)
    assert summary["ece_after"] < summary["ece_before"] and summary["nll_after"] < summary["nll_before"]
    assert set(summary["ood_scores_on_val"]) == {"max_logit", "max_prob", "neg_energy"}


def test_ece_zero_for_perfectly_calibrated_certain_predictions():
    probs = torch.eye(4)
    assert expected_calibration_error(probs, torch.arange(4)) == pytest.approx(0.0)
    assert expected_calibration_error(probs, torch.tensor([1, 2, 3, 0])) == pytest.approx(1.0)


# --- checkpoints ------------------------------------------------------------------------------------
def test_only_published_checkpoints_count_and_old_ones_are_pruned(tmp_path):
    for step in (3, 6, 9):
        tmp = ck.begin_save(tmp_path, step)
        (tmp / "weights").write_text("x")
        ck.finish_save(tmp, {"step": step}, keep_last=2)
    half = ck.begin_save(tmp_path, 12)  # a save killed before publishing
    (half / "weights").write_text("partial")
    done = ck.complete_checkpoints(tmp_path)
    assert [p.name for p in done] == ["step-00000006", "step-00000009"]
    assert ck.resolve_resume("auto", tmp_path) == done[-1]
    assert ck.resolve_resume("none", tmp_path) is None
    with pytest.raises(UsageError, match="not a complete checkpoint"):
        ck.resolve_resume(str(half), tmp_path)


def test_resume_auto_without_checkpoints_starts_fresh(tmp_path):
    assert ck.resolve_resume("auto", tmp_path) is None


def test_rng_state_round_trip():
    state = ck.rng_state()
    a = (torch.rand(3), random.random())
    ck.set_rng_state(state)
    assert torch.equal(torch.rand(3), a[0]) and random.random() == a[1]


def test_export_strips_wrapper_prefixes():
    assert ck.strip_wrapper_prefixes("module._orig_mod.blocks.0.attn.qkv.weight") == "blocks.0.attn.qkv.weight"
    assert ck.strip_wrapper_prefixes("head.weight") == "head.weight"


# --- engine choice and DeepSpeed config -------------------------------------------------------------
def test_engine_auto_follows_zero_stage(monkeypatch):
    for k in ("ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_USE_DEEPSPEED", "MYCODIST_LAUNCHER", "DS_LAUNCHER"):
        monkeypatch.delenv(k, raising=False)
    assert choose_engine(cfg()) == "accelerate"
    assert choose_engine(cfg("train.zero_stage=2")) == "deepspeed"
    assert choose_engine(cfg("train.engine=torchrun-ddp")) == "torchrun-ddp"
    with pytest.raises(UsageError, match="train.engine"):
        choose_engine(cfg("train.engine=horovod"))


def test_deepspeed_config_from_our_keys_and_template(tmp_path):
    c = cfg("train.zero_stage=3", "train.precision=bf16", "train.batch_size=4", "train.grad_accum=2",
            "train.offload=cpu", "train.clip_grad=0.5")
    ds = deepspeed_config(c, world_size=8)
    assert ds["train_batch_size"] == 4 * 2 * 8
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_param"] == {"device": "cpu"}
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["gradient_clipping"] == 0.5
    tmpl = tmp_path / "t.json"
    tmpl.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 1},
                                "bf16": {"enabled": "auto"}}))
    ds = deepspeed_config(cfg(f"train.deepspeed_config={tmpl}", "train.batch_size=4"), world_size=2)
    assert ds["zero_optimization"]["stage"] == 1 and ds["train_micro_batch_size_per_gpu"] == 4
    with pytest.raises(UsageError, match="no such file"):
        deepspeed_config(cfg("train.deepspeed_config=/nonexistent.json"), 2)


@pytest.mark.parametrize("repo_template", ["zero0", "zero1", "zero2", "zero3", "zero3_offload"])
def test_repo_deepspeed_templates_fill(repo_template):
    from mycodist.config import configs_dir

    path = configs_dir() / "deepspeed" / f"{repo_template}.json"
    ds = deepspeed_config(cfg(f"train.deepspeed_config={path}", "train.precision=bf16"), world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 64 and ds["bf16"]["enabled"] is True
    assert not any(v == "auto" for v in ds.values())


# --- launch commands: the CPU traps -----------------------------------------------------------------
def test_cpu_accelerate_command_starts_real_ranks():
    argv, env = launch_command(cfg(), nproc=2, gpus=0, port=12345, script_args=["a=b"])
    assert env["ACCELERATE_USE_CPU"] == "true"  # else --multi_gpu starts two lone rank-0s
    assert "--multi_gpu" in argv and "--cpu" not in argv  # --cpu would start one process
    assert argv[argv.index("--num_processes") + 1] == "2"
    assert argv[argv.index("--main_process_port") + 1] == "12345"
    assert env["OMP_NUM_THREADS"].isdigit() and argv[-1] == "a=b" and argv[-2].endswith("train.py")


def test_cpu_deepspeed_command_sets_threads_port_and_gpus():
    argv, env = launch_command(cfg("train.zero_stage=3"), nproc=2, gpus=0, port=23456, script_args=[])
    assert "deepspeed.launcher.runner" in argv
    assert argv[argv.index("--num_gpus") + 1] == "2" and argv[argv.index("--master_port") + 1] == "23456"
    assert env["DS_ACCELERATOR"] == "cpu" and "OMP_NUM_THREADS" in env


def test_accelerate_with_deepspeed_plugin_keeps_cpu_flag_off():
    argv, env = launch_command(cfg("train.engine=accelerate", "train.zero_stage=2"), 2, 0, 1, [])
    assert "--use_deepspeed" in argv and argv[argv.index("--zero_stage") + 1] == "2"
    assert "ACCELERATE_USE_CPU" not in env  # it would make accelerate drop DeepSpeed


def test_gpu_command_has_no_cpu_environment():
    argv, env = launch_command(cfg("train.precision=bf16"), nproc=8, gpus=8, port=1, script_args=[])
    assert env == {} and argv[argv.index("--mixed_precision") + 1] == "bf16"


def test_train_cli_rejects_bad_input(capsys):
    assert cli_main(["train", "--print-command", "train.engine=horovod"]) == 2
    assert "train.engine" in capsys.readouterr().err
    assert cli_main(["train", "--nproc", "-1", "--print-command"]) == 2


def test_train_cli_prints_the_command(capsys):
    assert cli_main(["train", "--nproc", "2", "--print-command", "train.epochs=1"]) == 0
    out = capsys.readouterr().out
    assert "ACCELERATE_USE_CPU=true" in out and "train.epochs=1" in out


def test_export_cli_refuses_a_non_run_folder(tmp_path, capsys):
    assert cli_main(["export", str(tmp_path)]) == 2
    assert "not a training run folder" in capsys.readouterr().err



def test_accelerate_with_a_deepspeed_template_passes_the_file():
    argv, env = launch_command(cfg("train.engine=accelerate", "train.deepspeed_config=configs/deepspeed/zero3.json"),
                               2, 0, 1, [])
    assert argv[argv.index("--deepspeed_config_file") + 1] == "configs/deepspeed/zero3.json"
    assert "--zero_stage" not in argv and "ACCELERATE_USE_CPU" not in env


def test_entry_maps_deepspeed_launcher_arguments():
    from mycodist.rank_entry import parse_args

    args, overrides = parse_args(["--local_rank=1", "--deepspeed", "--deepspeed_config", "x.json", "train.epochs=1"])
    assert args.local_rank == 1 and args.deepspeed and args.deepspeed_config == "x.json"
    assert overrides == ["train.epochs=1"]
