"""The one config system: omegaconf defaults in configs/default.yaml, a --config file merged over
them, then `key=value` overrides. Unknown keys and wrongly typed values are errors that name the key
and the nearest valid one, so a typo never silently trains with a default."""

from __future__ import annotations

import difflib
import os
import re
import sys
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from mycodist.atomic import atomic_write_text
from mycodist.errors import UsageError

CONFIG_FILENAME = "config.yaml"
_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")


def configs_dir() -> Path:
    """Where configs/ lives: the source tree (editable install) or the installed data files."""
    env = os.environ.get("MYCODIST_CONFIG_DIR")
    candidates = [Path(env)] if env else []
    candidates += [
        Path(__file__).resolve().parent.parent / "configs",
        Path(sys.prefix) / "share" / "mycodist" / "configs",
    ]
    for c in candidates:
        if (c / "default.yaml").is_file():
            return c
    raise UsageError(
        "cannot find configs/default.yaml; set MYCODIST_CONFIG_DIR to the repo's configs/ folder"
    )


def _flat_keys(node: Any, prefix: str = "") -> list[str]:
    keys: list[str] = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            full = f"{prefix}.{k}" if prefix else str(k)
            keys.append(full)
            keys.extend(_flat_keys(node._get_node(k), full))
    return keys


def _suggest(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:
        # a key valid under another group (e.g. `batch_size` for `train.batch_size`)
        leaf = key.rsplit(".", 1)[-1]
        close = [v for v in valid if v.rsplit(".", 1)[-1] == leaf][:1]
    return f"; did you mean '{close[0]}'?" if close else ""


def _check_type(key: str, default: Any, value: Any) -> Any:
    """Reject a value whose type cannot stand in for the default's (int for int, etc.)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise UsageError(f"config key '{key}' takes true/false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UsageError(f"config key '{key}' takes an integer, got {value!r}")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UsageError(f"config key '{key}' takes a number, got {value!r}")
    if isinstance(default, str):
        if isinstance(value, (dict, list, DictConfig, ListConfig)):
            raise UsageError(f"config key '{key}' takes a string, got {value!r}")
        return str(value)
    if isinstance(default, (list, ListConfig)) and not isinstance(value, (list, ListConfig)):
        raise UsageError(f"config key '{key}' takes a list like [a,b], got {value!r}")
    return value


# Renamed keys: the old name keeps working for one release (0.2.x) with a warning naming the new one.
RENAMED: dict[str, str] = {
    "model.attn_drop": "model.attn_drop_rate",
    "model.layer_scale_init": "model.init_values",
    "data.val_fraction": "shards.val_fraction",
    "data.shard_max_samples": "shards.max_samples",
    "data.shard_max_bytes": "shards.max_bytes",
    "data.ingest_jpeg_quality": "shards.ingest_jpeg_quality",
    "data.ingest_max_side": "shards.ingest_max_side",
    "data.ingest_workers": "shards.ingest_workers",
}


def renamed(key: str, origin: str = "") -> str:
    """The current name of `key` (warning once per use when it is an old one)."""
    new = RENAMED.get(key)
    if new is None:
        return key
    warnings.warn(f"config key '{key}' is now '{new}'{f' ({origin})' if origin else ''}; the old name stops "
                  f"working in mycodist 0.3", FutureWarning, stacklevel=3)
    return new


def select(cfg: Any, key: str) -> Any:
    """`key` from a config that may have been saved under an older name (a run or data set folder's
    config.yaml from before a rename)."""
    value = OmegaConf.select(cfg, key)
    if value is None:
        for old, new in RENAMED.items():
            if new == key:
                value = OmegaConf.select(cfg, old)
                break
    return value


def _merge_checked(base: DictConfig, update: DictConfig, valid: Sequence[str], origin: str) -> None:
    """Merge `update` into `base` in place, key by key, refusing unknown keys and bad types."""

    def walk(node: Any, prefix: str) -> None:
        for k in node.keys():
            full = renamed(f"{prefix}.{k}" if prefix else str(k), origin)
            if full not in valid:
                raise UsageError(f"unknown config key '{full}' ({origin}){_suggest(full, valid)}")
            child = node._get_node(k)
            default = OmegaConf.select(base, full)
            if isinstance(child, DictConfig) and isinstance(default, DictConfig):
                walk(child, full)
                continue
            if isinstance(default, DictConfig):
                raise UsageError(f"config key '{full}' is a group; set one of its keys like '{full}.<key>=...'")
            value = OmegaConf.to_container(child, resolve=False) if isinstance(child, (DictConfig, ListConfig)) else child._value()
            OmegaConf.update(base, full, _check_type(full, default, value), merge=False)

    walk(update, "")


def parse_overrides(items: Iterable[str]) -> DictConfig:
    """`key=value` strings → a DictConfig; a malformed item is a UsageError."""
    items = list(items)
    for item in items:
        if "=" not in item or item.startswith("="):
            raise UsageError(f"expected a key=value override, got '{item}' (e.g. train.batch_size=32)")
    try:
        return OmegaConf.from_dotlist(items)
    except Exception as e:  # omegaconf raises several grammar errors
        raise UsageError(f"cannot parse overrides {items}: {e}") from None


def load_config(config_file: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> DictConfig:
    """Defaults ← config file ← overrides, validated; returns a resolved, read-only-keyed DictConfig."""
    cfg = OmegaConf.load(configs_dir() / "default.yaml")
    valid = _flat_keys(cfg)
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise UsageError(f"config file '{path}' does not exist")
        try:
            file_cfg = OmegaConf.load(path)
        except Exception as e:
            raise UsageError(f"cannot read config file '{path}': {e}") from None
        if not isinstance(file_cfg, DictConfig):
            raise UsageError(f"config file '{path}' must hold a mapping of groups (data:, model:, ...)")
        _merge_checked(cfg, file_cfg, valid, f"in {path}")
    _merge_checked(cfg, parse_overrides(overrides), valid, "on the command line")
    try:
        OmegaConf.resolve(cfg)
    except Exception as e:
        raise UsageError(f"cannot resolve config interpolation: {e}") from None
    OmegaConf.set_struct(cfg, True)
    return cfg


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate trailing `key=value` items from other arguments (argparse cannot tell them apart)."""
    rest, overrides = [], []
    for a in argv:
        (overrides if _OVERRIDE.match(a) else rest).append(a)
    return rest, overrides


def save_config(cfg: DictConfig, out_dir: str | os.PathLike, name: str = CONFIG_FILENAME) -> Path:
    """Write the resolved config beside an output, atomically, so every output says how it was made."""
    path = Path(out_dir) / name
    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
    return path


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
