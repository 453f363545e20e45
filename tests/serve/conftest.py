"""Session fixtures for the serving tests (helpers live in serve_util.py)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from serve_util import CALIBRATED, full_builder, logits_for, make_export


@pytest.fixture(scope="session")
def export_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    made: dict[str, Path] = {}

    def make(name: str, probs: dict[str, float], calibration: dict | None = CALIBRATED) -> Path:
        if name not in made:
            made[name] = make_export(tmp_path_factory.mktemp(f"export-{name}"), logits_for(probs), calibration)
        return made[name]

    return make


@pytest.fixture(scope="session")
def real_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export of the configured architecture (vit_tiny_patch16 at 32 px) that the default loader builds,
    for the tests that start `mycodist serve` / `mycodist predict` as the user would. Its head says the
    death cap, so every photo must come back poisonous."""
    return make_export(tmp_path_factory.mktemp("export-real"), logits_for({"amanita_letalis": 0.97}),
                       CALIBRATED, builder=full_builder)


@pytest.fixture(scope="session")
def served(real_export: Path) -> Iterator[str]:
    """`mycodist serve` in its own process on a free port; yields its base URL."""
    cmd = [sys.executable, "-m", "mycodist", "serve", "--model", str(real_export), "--port", "0",
           "serve.max_wait_ms=20", "serve.torch_threads=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = None
    deadline = time.monotonic() + 120
    lines = []
    while time.monotonic() < deadline and proc.poll() is None:
        line = proc.stdout.readline()
        lines.append(line)
        m = re.search(r"open (http://\S+/) in a browser", line)
        if m:
            url = m.group(1)
            break
    if url is None:
        proc.kill()
        pytest.fail("mycodist serve did not start:\n" + "".join(lines))
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep its pipe drained
    yield url
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
