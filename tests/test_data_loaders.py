"""Real loaders over real shards: equal batches, coverage, resume, exactly-once eval, bad data."""

from __future__ import annotations

import functools
import http.server
import os
import threading
from collections import Counter
from pathlib import Path

import fsspec
import pytest
import torch
from data_util import loader_config, make_shards

from mycodist.data import BadDataError, DataSpec, ShardInfo, make_eval_loader, make_train_loader
from mycodist.data.loaders import DataTimeoutError
from mycodist.errors import UsageError

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    """3 train shards of 5/50/200 samples and 2 val shards of 7/6."""
    out = tmp_path_factory.mktemp("uneven")
    make_shards(out, [5, 50, 200], [7, 6])
    return out


def run_epoch(cfg, rank, world, spec, epoch=0):
    loader = make_train_loader(cfg, rank, world, spec=spec)
    loader.set_epoch(epoch)
    keys, batches = [], 0
    for images, targets in loader:
        assert images.shape == (4, 3, 32, 32) and targets.shape == (4,)
        keys += loader.last_keys
        batches += 1
    return loader, batches, keys


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("workers", [0, 1, 2])
def test_uneven_shards_give_equal_batches_and_documented_coverage(uneven, world, workers):
    cfg = loader_config(uneven, f"data.workers={workers}")
    spec = DataSpec.from_config(cfg)
    assert (spec.num_train, spec.num_val) == (255, 13)
    counts, seen = set(), []
    for rank in range(world):
        loader, batches, keys = run_epoch(cfg, rank, world, spec)
        assert batches == len(loader)
        counts.add(batches)
        seen += keys
    assert counts == {255 // (world * 4)}  # drop policy: floor(N / global batch) on every rank
    assert len(seen) == len(set(seen))  # no sample twice in an epoch
    assert 255 - len(seen) < world * 4  # only the remainder left out


def test_wrap_policy_uses_every_sample(uneven):
    cfg = loader_config(uneven, "data.epoch_remainder=wrap")
    spec = DataSpec.from_config(cfg)
    seen = []
    for rank in range(2):
        loader, batches, keys = run_epoch(cfg, rank, 2, spec)
        assert batches == len(loader) == 32
        seen += keys
    assert len(set(seen)) == 255 and len(seen) == 256


def test_same_seed_same_order_other_epoch_other_order(uneven):
    cfg = loader_config(uneven, "data.workers=1", "data.color_jitter=0.4")
    spec = DataSpec.from_config(cfg)
    a = make_train_loader(cfg, 1, 2, spec=spec)
    first = [(x.clone(), y.clone()) for x, y in a]
    b = make_train_loader(cfg, 1, 2, spec=spec)
    again = list(b)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(first, again, strict=True))
    _, _, keys0 = run_epoch(cfg, 0, 2, spec, epoch=0)
    _, _, keys1 = run_epoch(cfg, 0, 2, spec, epoch=1)
    assert keys0 != keys1


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_reproduces_the_uninterrupted_order(uneven, workers):
    cfg = loader_config(uneven, f"data.workers={workers}", "data.shuffle_buffer=32", "data.mixup_alpha=0.4",
                        "data.cutmix_alpha=1.0")
    spec = DataSpec.from_config(cfg)
    full = make_train_loader(cfg, 1, 2, spec=spec)
    full.set_epoch(3)
    reference = []
    for x, y in full:
        reference.append((full.last_keys, x.clone(), y.clone()))

    first = make_train_loader(cfg, 1, 2, spec=spec)
    first.set_epoch(3)
    for i, _ in enumerate(first):
        if i == 6:  # 7 batches consumed, an odd number so resumed workers must rotate
            break
    state = first.state_dict()
    assert state["epoch"] == 3 and state["batches"] == 7

    resumed = make_train_loader(cfg, 1, 2, spec=spec)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # the trainer's loop calls this again: it must keep the position
    rest = []
    for x, y in resumed:
        rest.append((resumed.last_keys, x, y))
    assert len(rest) == len(reference) - 7
    for (k1, x1, y1), (k2, x2, y2) in zip(reference[7:], rest, strict=True):
        assert k1 == k2 and torch.equal(x1, x2) and torch.equal(y1, y2)
    # then the next epoch starts from its beginning
    assert resumed.state_dict()["batches"] == len(resumed)
    next(iter(resumed))
    assert resumed.state_dict()["epoch"] == 4


def test_resume_is_exact_on_damaged_data_too(damaged):
    cfg = loader_config(damaged, "data.workers=2", "data.max_bad_fraction=0.9")
    spec = DataSpec.from_config(cfg)
    full = make_train_loader(cfg, 0, 2, spec=spec)
    reference = [(full.last_keys, x.clone()) for x, _ in full]
    first = make_train_loader(cfg, 0, 2, spec=spec)
    for i, _ in enumerate(first):
        if i == 4:
            break
    resumed = make_train_loader(cfg, 0, 2, spec=spec)
    resumed.load_state_dict(first.state_dict())
    rest = [(resumed.last_keys, x) for x, _ in resumed]
    assert len(rest) == len(reference) - 5
    for (k1, x1), (k2, x2) in zip(reference[5:], rest, strict=True):
        assert k1 == k2 and torch.equal(x1, x2)


def test_resume_refuses_another_layout(uneven):
    cfg = loader_config(uneven)
    state = make_train_loader(cfg, 0, 2).state_dict()
    with pytest.raises(UsageError, match="world size|world_size"):
        make_train_loader(cfg, 0, 3).load_state_dict(state)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_eval_sees_every_val_sample_exactly_once(uneven, world, workers):
    cfg = loader_config(uneven, f"data.workers={workers}")
    spec = DataSpec.from_config(cfg)
    seen, counts = [], set()
    for rank in range(world):
        ev = make_eval_loader(cfg, rank, world, spec=spec)
        n = 0
        for images, labels, keys in ev:
            assert images.shape[1:] == (3, 32, 32) and images.shape[0] == len(labels) == len(keys) > 0
            seen += keys
            n += 1
        assert n == len(ev)
        counts.add(n)
    assert len(counts) == 1
    assert Counter(seen) == Counter(f"s{i:05d}" for i in range(255, 268))


@pytest.fixture
def damaged(tmp_path) -> Path:
    """Corrupted samples 3 and 40, train-000001 truncated mid-way, train-000003 deleted."""
    make_shards(tmp_path, [20, 20, 20, 20], [5], corrupt=frozenset({3, 40}))
    shard = tmp_path / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    os.unlink(tmp_path / "train-000003.tar")
    return tmp_path


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_and_shards_are_skipped_and_counted(damaged, workers):
    cfg = loader_config(damaged, f"data.workers={workers}", "data.max_bad_fraction=0.9")
    spec = DataSpec.from_config(cfg)
    bad, seen, padded = Counter(), [], 0
    for rank in range(2):
        loader, batches, keys = run_epoch(cfg, rank, 2, spec)
        assert batches == len(loader) == 10
        bad.update(loader.bad_samples)
        padded += loader.padded
        seen += keys
    assert bad["decode"] == 2
    assert bad["missing_shard"] == 20
    assert 5 <= bad["truncated"] + bad["incomplete"] < 20
    assert "s00003" not in seen and "s00040" not in seen
    assert padded == sum(bad.values())  # every lost position was filled to keep batch shapes equal


def test_too_many_bad_samples_stop_with_a_clear_error(damaged):
    cfg = loader_config(damaged, "data.max_bad_fraction=0.05")
    with pytest.raises(BadDataError, match="max_bad_fraction"):
        for rank in range(2):
            run_epoch(cfg, rank, 2, DataSpec.from_config(cfg))


def test_a_stalled_shard_source_fails_instead_of_hanging(uneven):
    cfg = loader_config(uneven, "data.workers=1", "data.timeout=1")
    spec = DataSpec.from_config(cfg)
    spec.train_shards = [ShardInfo(f"pipe:sleep 2; cat {uneven}/train-000001.tar", 50)]
    with pytest.raises(DataTimeoutError, match="data.timeout"):
        next(iter(make_train_loader(cfg, 0, 1, spec=spec)))


def test_pipe_sources_stream_like_files(uneven):
    cfg = loader_config(uneven)
    spec = DataSpec.from_config(cfg)
    spec.train_shards = [ShardInfo(f"pipe:cat {s.url}", s.samples) for s in spec.train_shards]
    loader = make_train_loader(cfg, 0, 1, spec=spec)
    keys = [k for _ in loader for k in loader.last_keys]
    assert len(keys) == len(set(keys)) == 252 and not loader.bad_samples


def test_uint8_channels_last_and_soft_targets(uneven):
    cfg = loader_config(uneven, "data.output=uint8", "data.channels_last=true", "data.mixup_alpha=0.4")
    x, y = next(iter(make_train_loader(cfg, 0, 1)))
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 32, 32)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert y.shape == (4, 4) and torch.allclose(y.sum(1), torch.ones(4))


def test_glob_pattern_without_manifest_finds_splits_and_counts(uneven):
    spec = DataSpec.from_source(f"{uneven}/{{train,val}}-*.tar")
    assert spec.num_train == 255 and spec.num_val == 13 and not spec.from_manifest
    assert len(spec.labels) == 4


def test_bad_sources_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="matches no shard"):
        DataSpec.from_source(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(UsageError, match="manifest"):
        DataSpec.from_source(str(tmp_path))


def test_class_balanced_sampling_sees_rare_species_more_often(tmp_path):
    # class 3 is rare: 4 of 120 samples
    make_shards(tmp_path, [40, 40, 40], [4], label_of=lambda n: 3 if n % 30 == 0 else n % 3)
    rare = []
    for balanced in ("false", "true"):
        cfg = loader_config(tmp_path, f"data.class_balanced={balanced}", "data.shuffle_buffer=64")
        loader = make_train_loader(cfg, 0, 1)
        batches = list(loader)
        assert len(batches) == len(loader) == 30  # balancing never changes the epoch length
        targets = torch.cat([t for _, t in batches])
        rare.append(int((targets == 3).sum()))
        if balanced == "true":
            images = torch.cat([x for x, _ in batches])
            rare_images = images[targets == 3]
            assert len({tuple(img.flatten()[:64].tolist()) for img in rare_images}) == len(rare_images)
    assert rare[0] <= 4 and rare[1] >= 2 * rare[0]


def test_class_balanced_needs_manifest_counts(tmp_path):
    make_shards(tmp_path, [8], [])
    cfg = loader_config(tmp_path, "data.class_balanced=true", f"data.shards={tmp_path}/train-*.tar")
    with pytest.raises(UsageError, match="class counts|per-class counts"):
        make_train_loader(cfg, 0, 1)


def test_http_manifest_and_shards_stream_from_a_local_server(uneven):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(uneven))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *a, **k: None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/manifest.json"
        spec = DataSpec.from_source(url)
        assert spec.num_train == 255 and spec.train_urls[0].startswith("http://127.0.0.1")
        cfg = loader_config(uneven, "data.workers=1")
        ev = make_eval_loader(cfg, 0, 1, spec=spec)
        keys = [k for _, _, ks in ev for k in ks]
        assert sorted(keys) == [f"s{i:05d}" for i in range(255, 268)] and not ev.bad_samples
    finally:
        server.shutdown()
        server.server_close()


def test_fsspec_urls_are_read_through_fsspec(uneven):
    fs = fsspec.filesystem("memory")
    for path in uneven.iterdir():
        fs.pipe(f"/ds/{path.name}", path.read_bytes())
    spec = DataSpec.from_source("memory://ds/manifest.json")
    assert spec.train_urls[0].startswith("memory://") and spec.num_val == 13
    cfg = loader_config(uneven)
    loader = make_train_loader(cfg, 1, 2, spec=spec)
    keys = [k for _ in loader for k in loader.last_keys]
    assert len(keys) == len(set(keys)) == 31 * 4 and not loader.bad_samples
