"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_util import make_shards


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """The small 4-class training shards (tests/train_util.make_shards) the distributed-training tests read:
    made once per session (read only; a module needing other shards defines its own `shards`)."""
    return make_shards(tmp_path_factory.mktemp("train_shards") / "shards")
