"""kill -9 at several points (fetching, a sample in an open shard, a shard renamed before the ledger
knew) and Ctrl-C, then rerun: exactly the expected photos, none lost, none twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from crawl_helpers import content, expected_content, read_samples

from mycodist.cli import main as cli_main
from mycodist.crawl.crawler import CRASH_ENV
from mycodist.crawl.mock_site import MockSite


@pytest.fixture(scope="module")
def site():
    s = MockSite(n_species=3, per_species=5, faults=("dup", "500", "404"), delay=0.02)
    s.url = s.start_in_thread()
    yield s
    s.stop()


def crawl_cmd(site, out) -> list[str]:
    return [sys.executable, "-m", "mycodist", "crawl", "mushroomworld", "--out", str(out),
            f"crawl.base_url={site.url}", "crawl.backoff_base=0.02", "crawl.processes=1",
            "crawl.per_host=2", "shards.max_samples=3", "shards.val_fraction=0.0"]


def run(cmd, env_extra=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    return subprocess.run(cmd, env={**env, **(env_extra or {})}, capture_output=True, text=True, timeout=120)


def check_complete(site, out) -> None:
    assert content(out) == expected_content(site)
    assert cli_main(["verify", str(out)]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("point", ["fetched:4", "written:5", "closed:2"])
def test_kill9_then_rerun_gives_exact_set(site, tmp_path, point):
    out = tmp_path / "out"
    first = run(crawl_cmd(site, out), {CRASH_ENV: point})
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert not (out / "manifest.json").exists()
    before = read_samples(out)
    second = run(crawl_cmd(site, out))
    assert second.returncode == 0, second.stderr
    check_complete(site, out)
    assert set(before) <= set(read_samples(out))  # what was in closed shards stayed


@pytest.mark.slow
def test_kill9_from_outside_and_ctrl_c(site, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(crawl_cmd(site, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(out.glob("train-*.tar")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    # Ctrl-C on the rerun: the open shard is finished cleanly and the folder is a valid data set
    proc = subprocess.Popen(crawl_cmd(site, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    n = len(list(out.glob("train-*.tar")))
    while len(list(out.glob("train-*.tar"))) == n and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 130:  # (it may have finished before the signal arrived)
        assert cli_main(["verify", str(out)]) == 0, err
    assert proc.returncode in (0, 130), err
    last = run(crawl_cmd(site, out))
    assert last.returncode == 0, last.stderr
    check_complete(site, out)
