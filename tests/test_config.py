import pytest
from omegaconf import OmegaConf

from mycodist.cli import main
from mycodist.config import load_config, save_config, split_overrides
from mycodist.errors import UsageError


def test_defaults_have_every_group():
    cfg = load_config()
    for group in ("data", "model", "train", "crawl", "serve", "profile", "synth"):
        assert group in cfg


def test_file_then_overrides_win(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  batch_size: 8\n  lr: 0.5\n")
    cfg = load_config(f, ["train.batch_size=4"])
    assert cfg.train.batch_size == 4
    assert cfg.train.lr == 0.5


def test_unknown_key_names_nearest():
    with pytest.raises(UsageError, match=r"unknown config key 'train.batch_sise'.*'train.batch_size'"):
        load_config(None, ["train.batch_sise=3"])


def test_unknown_key_in_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("modle:\n  name: x\n")
    with pytest.raises(UsageError, match="unknown config key 'modle'.*'model'"):
        load_config(f)


def test_leaf_in_wrong_group_is_suggested():
    with pytest.raises(UsageError, match="did you mean 'train.batch_size'"):
        load_config(None, ["batch_size=3"])


def test_type_errors():
    with pytest.raises(UsageError, match="takes an integer"):
        load_config(None, ["train.batch_size=abc"])
    with pytest.raises(UsageError, match="takes a number"):
        load_config(None, ["train.lr=fast"])
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0


def test_malformed_override():
    with pytest.raises(UsageError, match="key=value"):
        load_config(None, ["=3"])


def test_group_cannot_be_set_to_scalar():
    with pytest.raises(UsageError, match="is a group"):
        load_config(None, ["train=3"])


def test_missing_config_file(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["model.img_size=64"])
    path = save_config(cfg, tmp_path)
    assert OmegaConf.load(path).model.img_size == 64
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_split_overrides_keeps_paths_and_flags():
    rest, ov = split_overrides(["crawl", "manifest:a.csv", "--out", "x", "crawl.per_host=2", "/p/a=b"])
    assert ov == ["crawl.per_host=2"]
    assert rest == ["crawl", "manifest:a.csv", "--out", "x", "/p/a=b"]


def test_cli_reports_usage_error_with_exit_2(capsys):
    rc = main(["verify", "/nonexistent-dir", "train.batch_sise=1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "error: unknown config key 'train.batch_sise'" in err


def test_cli_unknown_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2
