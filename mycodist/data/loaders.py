"""Train and eval loaders: the layout (layout.py) + raw streams (stream.py) + images (transforms.py).

Batches are built inside DataLoader workers (batch_size=None), so only finished batches cross
process boundaries. Each worker decodes straight into a shared-memory NHWC batch (uint8, or float
0..255 after jitter/mixing) and yields (images, targets, keys, stats delta); the loader object in
the training process turns the images into the configured output (`to_output`: normalised float or
uint8, NCHW), strips keys and stats, keeps `last_keys`, sums `bad_samples`, counts consumed batches
for `state_dict()`, and stops the run when bad samples pass `data.max_bad_fraction`.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mycodist.data.layout import (
    TrainLayout,
    derive_seed,
    eval_batch_sizes,
    pieces_for,
    shard_order,
    worker_batches,
)
from mycodist.data.spec import DataSpec, ShardInfo
from mycodist.data.stream import Sample, worker_stream
from mycodist.data.transforms import (
    ImageConfig,
    color_jitter_,
    decode_eval,
    decode_train,
    empty_batch,
    mix_batch,
    share,
    to_output,
)
from mycodist.errors import UsageError

log = logging.getLogger("mycodist.data")
_LOGGED_PER_REASON = 3


class BadDataError(UsageError):
    """More undecodable/missing samples than `data.max_bad_fraction` allows."""


@dataclass(frozen=True)
class StreamParams:
    """The knobs a worker needs, resolved from the config in the training process."""

    seed: int = 0
    batch_size: int = 64
    workers: int = 2
    shuffle_buffer: int = 1000
    interleave: int = 4
    remainder: str = "drop"
    max_bad_fraction: float = 0.01
    timeout: float = 300.0
    prefetch: int = 2
    class_balanced: bool = False
    pin_memory: bool = False  # page-locked batches, so a non_blocking copy to the GPU really overlaps

    @classmethod
    def from_config(cls, cfg: DictConfig, batch_size: int | None = None, pin_memory: bool = False) -> StreamParams:
        d = cfg.data
        p = cls(seed=int(d.seed), batch_size=int(batch_size or cfg.train.batch_size),
                workers=resolve_workers(int(d.workers)),
                shuffle_buffer=int(d.shuffle_buffer), interleave=int(d.interleave),
                remainder=str(d.epoch_remainder), max_bad_fraction=float(d.max_bad_fraction),
                timeout=float(d.timeout), prefetch=int(d.prefetch), class_balanced=bool(d.class_balanced),
                pin_memory=pin_memory)
        if p.batch_size < 1 or p.interleave < 1 or p.prefetch < 1:
            raise UsageError("train.batch_size, data.interleave, data.prefetch must be >= 1")
        if not 0 <= p.max_bad_fraction <= 1:
            raise UsageError(f"data.max_bad_fraction={p.max_bad_fraction} must be a share in [0, 1]")
        return p


def resolve_workers(workers: int, cuda: bool | None = None) -> int:
    """`data.workers=-1` (auto): on a GPU node, the CPU cores that fall to each local GPU, less one for the
    training process itself (capped at 16); on a CPU-only machine 2, since the ranks compute there too."""
    if workers < -1:
        raise UsageError(f"data.workers={workers}: use -1 (auto), 0 (decode in the training process) or a count")
    if workers >= 0:
        return workers
    if not (torch.cuda.is_available() if cuda is None else cuda):
        return 2
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or max(1, torch.cuda.device_count())
    return max(1, min(16, cores // local - 1))


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _label_of(sample: Sample, num_classes: int) -> int:
    if "jpg" not in sample or "cls" not in sample:
        raise _Bad("incomplete", f"sample {sample.get('__key__')} lacks jpg or cls")
    try:
        label = int(sample["cls"])
    except ValueError:
        raise _Bad("bad_label", f"sample {sample.get('__key__')}: cls {sample['cls'][:20]!r} is not a number") from None
    if not 0 <= label < num_classes:
        raise _Bad("bad_label", f"sample {sample.get('__key__')}: class {label} outside 0..{num_classes - 1}")
    return label


class _Bad(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _note_bad(stats: Counter, reason: str, message: str) -> None:
    stats[reason] += 1
    if stats[reason] <= _LOGGED_PER_REASON:
        log.warning("bad sample skipped (%s): %s", reason, message)


def _decode_or_count(decode, sample: Sample, num_classes: int, stats: Counter,
                     out: np.ndarray | None = None) -> tuple[np.ndarray, int] | None:
    """(pixels, label), the pixels written into `out` (a batch slot) when given; None if the sample is bad."""
    try:
        label = _label_of(sample, num_classes)
        return decode(sample, out), label
    except _Bad as b:
        _note_bad(stats, b.reason, str(b))
    except Exception as e:  # Pillow raises many types for broken JPEGs
        _note_bad(stats, "decode", f"sample {sample.get('__key__')}: {type(e).__name__}: {e}")
    return None


def repeat_factors(counts: dict[int, int]) -> dict[int, float]:
    """Repeat-factor sampling rates: class c is repeated r_c = max(1, sqrt(median / n_c)) times on average,
    so rare species are seen more often while frequent ones keep exactly one copy."""
    med = float(np.median([max(v, 1) for v in counts.values()]))
    return {c: max(1.0, (med / max(n, 1)) ** 0.5) for c, n in counts.items()}


def _balanced(samples: Iterator[Sample], rate: dict[int, float], seed: int) -> Iterator[Sample]:
    """floor(r) copies of each sample plus one more with probability frac(r), each copy numbered so its
    augmentation differs; copies enter the shuffle buffer, which spreads them over batches."""
    for s in samples:
        try:
            r = rate.get(int(s.get("cls", b"-1")), 1.0)
        except ValueError:
            r = 1.0
        extra = random.Random(derive_seed("balance", seed, s.get("__key__"))).random() < r - int(r)
        for copy in range(int(r) + int(extra)):
            yield {**s, "__copy__": copy} if copy else s


class TrainStream(IterableDataset):
    """One rank's train epoch as an iterable of finished batches; see layout.py for who reads what."""

    def __init__(self, spec: DataSpec, image: ImageConfig, params: StreamParams, rank: int, world_size: int):
        super().__init__()
        if not 0 <= rank < world_size:
            raise UsageError(f"rank {rank} is outside world size {world_size}")
        self.shards: list[ShardInfo] = list(spec.train_shards)
        self.labels = list(spec.labels)
        self.class_counts = dict(spec.class_counts.get("train", {}))
        self.image, self.params = image, params
        self.rank, self.world_size = rank, world_size
        # (epoch, batches to skip) in shared memory: persistent DataLoader workers keep their copy of this
        # object across epochs, and read where to start from here at each new iteration
        self._position = torch.zeros(2, dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._position[0])

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._position[0] = int(value)

    @property
    def skip(self) -> int:
        """Batches of this epoch already consumed (resume)."""
        return int(self._position[1])

    @skip.setter
    def skip(self, value: int) -> None:
        self._position[1] = int(value)

    def layout(self, epoch: int | None = None) -> TrainLayout:
        return TrainLayout.build(self.shards, self.params.seed, self.epoch if epoch is None else epoch, self.rank,
                                 self.world_size, self.params.batch_size, self.params.remainder)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str], dict[str, int]]]:
        p, epoch = self.params, self.epoch
        dl_worker, workers = _worker()
        worker = (dl_worker + self.skip) % workers  # resumed epochs rotate so batch `skip` comes first
        layout = self.layout()
        order = shard_order(self.shards, p.seed, epoch)
        pieces = layout.worker_pieces(order, workers, worker)
        mine, done = worker_batches(layout.num_batches, workers, worker), worker_batches(self.skip, workers, worker)
        stats: Counter = Counter()
        seed = derive_seed("samples", p.seed, epoch, self.rank, self.world_size, workers, worker)
        expand = None
        if p.class_balanced:
            rate, bseed = repeat_factors(self.class_counts), derive_seed(p.seed, epoch)
            expand = lambda samples: _balanced(samples, rate, bseed)  # noqa: E731
        raw = worker_stream(pieces, stats, p.interleave, p.shuffle_buffer, seed, expand)
        raw = itertools.islice(raw, done * p.batch_size, None)
        num_classes, size = len(self.labels), self.image.size
        filler: list[tuple[np.ndarray, int, str]] = []
        shared = get_worker_info() is not None

        def decode(sample: Sample, out: np.ndarray | None = None) -> np.ndarray:
            rng = random.Random(derive_seed("aug", p.seed, epoch, sample.get("__key__"), sample.get("__copy__", 0)))
            return decode_train(sample["jpg"], self.image, rng, out)

        for j in range(done, mine):
            # a fresh batch each time: the previous one may still be in use by the training process
            x = empty_batch((p.batch_size, size, size, 3), torch.uint8, shared)
            slots = x.numpy()
            good: list[tuple[int, str]] = []
            for s in itertools.islice(raw, p.batch_size):
                out = _decode_or_count(decode, s, num_classes, stats, slots[len(good)])
                if out is not None:
                    good.append((out[1], str(s["__key__"])))
            if not good:  # a lost stretch (missing/truncated shard, all undecodable): stand-in samples
                stats["padded"] += p.batch_size
                filler = filler or self._fallback(order, decode)
                for i, (arr, label, key) in enumerate(filler):
                    slots[i] = arr
                    good.append((label, key))
            elif len(good) < p.batch_size:
                stats["padded"] += p.batch_size - len(good)
            for i in range(len(good), p.batch_size):  # repeat the good samples to a full batch
                slots[i] = slots[i % len(good)]
            good = list(itertools.islice(itertools.cycle(good), p.batch_size))
            batch_index = worker + j * workers
            images, targets = self._collate(x, good, epoch, batch_index)
            yield images, targets, [k for _, k in good], dict(stats)
            stats.clear()

    def _fallback(self, order: list[ShardInfo], decode) -> list[tuple[np.ndarray, int, str]]:
        """Stand-ins for a batch whose every sample is lost: the first decodable samples of the epoch's
        order. They depend only on (seed, epoch), never on what this worker saw before, so a resumed
        epoch fills the same batches with the same samples."""
        scratch: Counter = Counter()
        total = sum(s.samples for s in order)
        stream = worker_stream(pieces_for(order, 0, total), scratch, 1, 1, 0)
        good = []
        for s in stream:
            out = _decode_or_count(decode, s, len(self.labels), scratch)
            if out is not None:
                good.append((np.ascontiguousarray(out[0]), out[1], str(s["__key__"])))
                if len(good) >= self.params.batch_size:
                    break
        if not good:
            raise BadDataError("no decodable training sample in the whole data set; run `mycodist verify`")
        return good

    def _collate(self, x: torch.Tensor, good: list[tuple[int, str]], epoch: int,
                 batch_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch-level augmentation on the NHWC batch `x`; the output conversion waits for the loader."""
        ic = self.image
        targets = torch.tensor([t for t, _ in good], dtype=torch.long)
        if not (ic.color_jitter > 0 or ic.mixing):
            return x, targets
        rng = random.Random(derive_seed("batch", self.params.seed, epoch, self.rank, batch_index))
        x = x.float()
        if ic.color_jitter > 0:
            x = color_jitter_(x, ic.color_jitter, [random.Random(derive_seed("jitter", rng.random(), k))
                                                   for _, k in good])
        if ic.mixing:
            x, targets = mix_batch(x, targets, len(self.labels), ic, rng)
        return (share(x) if get_worker_info() is not None else x), targets


class EvalStream(IterableDataset):
    """One rank's share of the validation split, in manifest order, each sample exactly once."""

    def __init__(self, spec: DataSpec, image: ImageConfig, params: StreamParams, rank: int, world_size: int):
        super().__init__()
        if not 0 <= rank < world_size:
            raise UsageError(f"rank {rank} is outside world size {world_size}")
        self.shards = list(spec.val_shards)
        self.num_classes = spec.num_classes
        self.image, self.params = image, params
        self.rank, self.world_size = rank, world_size

    def batch_sizes(self) -> tuple[int, list[int]]:
        total = sum(s.samples for s in self.shards)
        return eval_batch_sizes(total, self.world_size, self.rank, self.params.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str], dict[str, int]]]:
        worker, workers = _worker()
        offset, sizes = self.batch_sizes()
        mine = sizes[worker::workers]
        start = offset + sum(sum(sizes[w::workers]) for w in range(worker))
        stats: Counter = Counter()
        raw = worker_stream(pieces_for(self.shards, start, start + sum(mine)), stats, 1, 1, 0)
        decode = lambda sample, out=None: decode_eval(sample["jpg"], self.image, out)  # noqa: E731
        side, shared = self.image.size, get_worker_info() is not None
        for size in mine:
            x = empty_batch((size, side, side, 3), torch.uint8, shared)
            slots = x.numpy()
            good: list[tuple[int, str]] = []
            for s in itertools.islice(raw, size):
                out = _decode_or_count(decode, s, self.num_classes, stats, slots[len(good)])
                if out is not None:
                    good.append((out[1], str(s["__key__"])))
            labels = torch.tensor([t for t, _ in good], dtype=torch.long)
            yield x[:len(good)], labels, [k for _, k in good], dict(stats)
            stats.clear()


class DataTimeoutError(UsageError):
    """A DataLoader worker produced no batch within `data.timeout` seconds."""


class _Loader:
    """Shared plumbing: run a stream through a torch DataLoader and gather the side channels."""

    def __init__(self, stream: IterableDataset, params: StreamParams):
        self.stream, self.params = stream, params
        self.bad_samples: Counter = Counter()
        self.padded = 0
        self.last_keys: list[str] = []
        self._loader: DataLoader | None = None

    def _dataloader(self) -> DataLoader:
        """One DataLoader for the loader's life: its workers stay alive between epochs and evaluations
        (persistent_workers) instead of being forked again, and pin batches when the run is on a GPU."""
        if self._loader is None:
            w = self.params.workers
            kw: dict[str, Any] = dict(batch_size=None, num_workers=w, pin_memory=self.params.pin_memory)
            if w > 0:
                kw.update(timeout=self.params.timeout, prefetch_factor=self.params.prefetch, persistent_workers=True)
            self._loader = DataLoader(self.stream, **kw)
        return self._loader

    def close(self) -> None:
        """Stop the persistent workers now (they would otherwise live until this object is collected)."""
        it = getattr(self._loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._loader = None

    def _batches(self) -> Iterator[Any]:
        """The DataLoader's batches, with its bare timeout error turned into one that says what to do."""
        it = iter(self._dataloader())
        while True:
            try:
                item = next(it)
            except StopIteration:
                return
            except RuntimeError as e:
                if "timed out" not in str(e):
                    raise
                raise DataTimeoutError(
                    f"rank {self.stream.rank}: no batch from a DataLoader worker in {self.params.timeout:.0f} s "
                    f"({e}); a shard source is stalled or very slow: check the shard URLs/network, or raise "
                    f"data.timeout") from None
            yield item

    def _absorb(self, stats: dict[str, int]) -> int:
        bad = 0
        for reason, n in stats.items():
            if reason == "padded":
                self.padded += n
            else:
                self.bad_samples[reason] += n
                bad += n
        return bad


class TrainLoader(_Loader):
    """`len()` batches per epoch on every rank; `set_epoch`, `state_dict`/`load_state_dict` for resume."""

    stream: TrainStream

    def __init__(self, stream: TrainStream, params: StreamParams):
        super().__init__(stream, params)
        self.epoch = 0
        self.batches = 0  # consumed in self.epoch
        self._epoch_bad = 0

    def __len__(self) -> int:
        return self.stream.layout(self.epoch).num_batches

    @property
    def samples_per_epoch(self) -> int:
        return len(self) * self.params.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch to iterate; re-choosing the current one keeps a resumed position."""
        if epoch != self.epoch:
            self.epoch, self.batches, self._epoch_bad = int(epoch), 0, 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.batches >= len(self) > 0:  # iterating again without set_epoch: next epoch
            self.set_epoch(self.epoch + 1)
        self.stream.epoch, self.stream.skip = self.epoch, self.batches
        budget = self.params.max_bad_fraction * max(self.samples_per_epoch, 1)
        for images, targets, keys, stats in self._batches():
            self._epoch_bad += self._absorb(stats)
            if self._epoch_bad > budget:
                raise BadDataError(
                    f"rank {self.stream.rank}: {self._epoch_bad} bad samples in epoch {self.epoch} "
                    f"({dict(self.bad_samples)}) exceed data.max_bad_fraction={self.params.max_bad_fraction} "
                    f"of {self.samples_per_epoch}; run `mycodist verify` on the shards, or raise the limit")
            self.batches += 1
            self.last_keys = keys
            yield to_output(images, self.stream.image), targets

    def state_dict(self) -> dict[str, Any]:
        p = self.params
        return {"epoch": self.epoch, "batches": self.batches, "seed": p.seed, "world_size": self.stream.world_size,
                "workers": max(p.workers, 1), "batch_size": p.batch_size, "shuffle_buffer": p.shuffle_buffer,
                "interleave": p.interleave, "num_samples": sum(s.samples for s in self.stream.shards),
                "bad_samples": dict(self.bad_samples), "padded": self.padded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` stopped; the layout must be the one that produced it."""
        mine = self.state_dict()
        for k in ("seed", "world_size", "workers", "batch_size", "shuffle_buffer", "interleave", "num_samples"):
            if k in state and state[k] != mine[k]:
                raise UsageError(
                    f"cannot resume the data stream mid-epoch: {k} was {state[k]}, now {mine[k]}; the exact "
                    f"continuation needs the same seed, world size, workers, batch size, buffer and data. "
                    f"Restore them, or resume from an epoch boundary")
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        self.bad_samples = Counter(state.get("bad_samples", {}))
        self.padded = int(state.get("padded", 0))
        self._epoch_bad = 0


class EvalLoader(_Loader):
    """Yields (images, labels, keys); the union over ranks is the validation split, each sample once."""

    stream: EvalStream

    def __len__(self) -> int:
        return len(self.stream.batch_sizes()[1])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        for images, labels, keys, stats in self._batches():
            self._absorb(stats)
            self.last_keys = keys
            yield to_output(images, self.stream.image), labels, keys


def make_train_loader(cfg: DictConfig, rank: int, world_size: int, spec: DataSpec | None = None,
                      batch_size: int | None = None, pin_memory: bool = False) -> TrainLoader:
    spec = spec or DataSpec.from_config(cfg)
    params = StreamParams.from_config(cfg, batch_size, pin_memory)
    if not spec.train_shards:
        raise UsageError(f"'{spec.source}' has no train shards")
    if params.class_balanced and not spec.class_counts.get("train"):
        raise UsageError("data.class_balanced=true needs per-class counts, which come from manifest.json; "
                         "point data.shards at the data set folder (not a pattern)")
    loader = TrainLoader(TrainStream(spec, ImageConfig.from_config(cfg), params, rank, world_size), params)
    if len(loader) == 0:
        raise UsageError(f"{spec.num_train} train samples are fewer than one global batch "
                         f"({world_size} ranks x {params.batch_size}); lower train.batch_size or set "
                         f"data.epoch_remainder=wrap")
    return loader


def make_eval_loader(cfg: DictConfig, rank: int, world_size: int, spec: DataSpec | None = None,
                     batch_size: int | None = None, pin_memory: bool = False) -> EvalLoader:
    spec = spec or DataSpec.from_config(cfg)
    params = StreamParams.from_config(cfg, batch_size, pin_memory)
    return EvalLoader(EvalStream(spec, ImageConfig.from_config(cfg), params, rank, world_size), params)
