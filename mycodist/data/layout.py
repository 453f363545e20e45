"""How one epoch's samples are laid out over ranks and DataLoader workers (pure arithmetic, no I/O).

The epoch's shards are shuffled with a seed derived from (seed, epoch) and concatenated into one
virtual sequence whose length is known exactly from the manifest. Rank r takes the contiguous
positions [r*Q, (r+1)*Q) of that sequence, Q = batches_per_rank * batch_size, so every rank yields
the same number of batches whatever the shard sizes. Inside a rank, batch i comes from worker
i % K (the order in which torch's DataLoader polls its workers); each worker gets the contiguous
block of positions its batches need. A worker reads only the shards overlapping its block,
skipping (without decoding) the samples before its start in the first one.

Remainder policy (`data.epoch_remainder`):
- `drop`: batches_per_rank = N // (W*B); the last N mod (W*B) positions of the epoch's shuffled
  order are not used this epoch (a different set each epoch, since the shard order changes).
- `wrap`: batches_per_rank = ceil(N / (W*B)); positions past N wrap to the start of the same order,
  so every sample is used each epoch and at most W*B - 1 samples are used twice.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from mycodist.data.spec import ShardInfo
from mycodist.errors import UsageError

REMAINDER_POLICIES = ("drop", "wrap")


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of values, stable across processes and Python runs (unlike hash())."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class Piece:
    """Samples [begin, end) of one shard, read in order."""

    shard: ShardInfo
    begin: int
    end: int

    @property
    def samples(self) -> int:
        return self.end - self.begin


def shard_order(shards: list[ShardInfo], seed: int, epoch: int, shuffle: bool = True) -> list[ShardInfo]:
    order = list(shards)
    if shuffle:
        random.Random(derive_seed("shards", seed, epoch)).shuffle(order)
    return order


def batches_per_rank(total: int, world_size: int, batch_size: int, remainder: str = "drop") -> int:
    if remainder not in REMAINDER_POLICIES:
        raise UsageError(f"data.epoch_remainder='{remainder}' is not one of {REMAINDER_POLICIES}")
    if world_size < 1 or batch_size < 1:
        raise UsageError(f"world size ({world_size}) and batch size ({batch_size}) must be at least 1")
    global_batch = world_size * batch_size
    n = total // global_batch if remainder == "drop" else -(-total // global_batch)
    return n


def pieces_for(order: list[ShardInfo], start: int, stop: int) -> list[Piece]:
    """The pieces covering positions [start, stop) of the concatenated order, wrapping past its end."""
    total = sum(s.samples for s in order)
    if stop <= start:
        return []
    if total == 0:
        raise UsageError("the split has no samples; check the manifest and data.shards")
    out: list[Piece] = []
    pos = start
    while pos < stop:
        base = (pos // total) * total  # which lap of the wrapped sequence
        offset = base
        for shard in order:
            s_begin, s_end = offset, offset + shard.samples
            offset = s_end
            lo, hi = max(pos, s_begin), min(stop, s_end)
            if lo < hi:
                out.append(Piece(shard, lo - s_begin, hi - s_begin))
        pos = base + total
    return out


def worker_batches(num_batches: int, workers: int, worker: int) -> int:
    """How many of batches 0..num_batches-1 fall to `worker` when batch i goes to worker i % workers."""
    return len(range(worker, num_batches, max(workers, 1)))


def worker_block(num_batches: int, workers: int, worker: int, batch_sizes: list[int] | int) -> tuple[int, int]:
    """Offset and length, within the rank's positions, of the samples `worker` needs for its batches."""
    sizes = [batch_sizes] * num_batches if isinstance(batch_sizes, int) else batch_sizes
    offset = 0
    for w in range(worker):
        offset += sum(sizes[i] for i in range(w, num_batches, workers))
    return offset, sum(sizes[i] for i in range(worker, num_batches, workers))


@dataclass(frozen=True)
class TrainLayout:
    """One rank's train epoch: its batches and, for each worker, the pieces it reads."""

    epoch: int
    num_batches: int
    batch_size: int
    rank_start: int

    @classmethod
    def build(cls, shards: list[ShardInfo], seed: int, epoch: int, rank: int, world_size: int,
              batch_size: int, remainder: str = "drop") -> TrainLayout:
        total = sum(s.samples for s in shards)
        nb = batches_per_rank(total, world_size, batch_size, remainder)
        return cls(epoch=epoch, num_batches=nb, batch_size=batch_size, rank_start=rank * nb * batch_size)

    def worker_pieces(self, order: list[ShardInfo], workers: int, worker: int) -> list[Piece]:
        off, n = worker_block(self.num_batches, workers, worker, self.batch_size)
        return pieces_for(order, self.rank_start + off, self.rank_start + off + n)


def eval_batch_sizes(total: int, world_size: int, rank: int, batch_size: int) -> tuple[int, list[int]]:
    """Exactly-once eval: rank `rank` gets a contiguous share (sizes differ by at most one sample) split
    into the same number of batches on every rank, each as even as possible (no padding, no duplicates).

    Returns (offset of the rank's first sample, batch sizes). A rank's batch is empty only if the split
    has fewer samples than ranks.
    """
    base, extra = divmod(total, world_size)
    n_rank = base + (1 if rank < extra else 0)
    offset = rank * base + min(rank, extra)
    largest = base + (1 if extra else 0)
    nb = max(1, -(-largest // batch_size)) if total else 0
    if nb == 0:
        return offset, []
    q, r = divmod(n_rank, nb)
    return offset, [q + (1 if i < r else 0) for i in range(nb)]
