"""Raw sample streams: a worker's pieces of shards → interleaved → shuffled, with every loss counted.

Samples stay as raw bytes until they leave the shuffle buffer, so skipping (a piece that starts
mid-shard, a resumed epoch) costs reading, never decoding. A shard that cannot be opened or ends
early loses exactly the positions the manifest promised; those are counted (`missing_shard`,
`truncated`) and the stream goes on.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from webdataset.filters import shuffle as wds_shuffle
from webdataset.tariterators import group_by_keys, tar_file_expander

from mycodist.data.layout import Piece
from mycodist.data.urls import open_url
from mycodist.shards.tarshard import split_member

log = logging.getLogger("mycodist.data")

Sample = dict[str, Any]


def _key_and_ext(name: str) -> tuple[str | None, str | None]:
    """webdataset's `keys=` hook fed with mycodist's one key rule (shards.tarshard.split_member)."""
    return split_member(name) or (None, None)


def read_piece(piece: Piece, stats: Counter) -> Iterator[Sample]:
    """Samples [begin, end) of a shard; what the shard cannot deliver is counted, not raised."""
    url = piece.shard.url
    try:
        stream = open_url(url)
    except Exception as e:
        stats["missing_shard"] += piece.samples
        log.warning("shard %s cannot be opened (%s): %d samples skipped", url, e, piece.samples)
        return
    errors: list[BaseException] = []

    def keep_going(exn: BaseException) -> bool:
        errors.append(exn)
        return True

    index = 0
    try:
        files = tar_file_expander([{"url": url, "stream": stream}], handler=keep_going)
        for sample in group_by_keys(files, keys=_key_and_ext, handler=keep_going):
            if index >= piece.end:
                break
            if index >= piece.begin:
                yield sample
            index += 1
    finally:
        try:
            stream.close()
        except Exception:  # a pipe: that we stopped reading exits with SIGPIPE; nothing to do
            pass
    if index < piece.end:
        lost = piece.end - max(index, piece.begin)
        stats["truncated"] += lost
        why = f": {errors[0]}" if errors else ""
        log.warning("shard %s ended after %d of %d samples%s; %d skipped", url, index, piece.end, why, lost)


def interleave(streams: Iterable[Iterator[Sample]], width: int) -> Iterator[Sample]:
    """Round-robin over up to `width` open streams, opening the next when one ends (deterministic).

    Reading several shards at once gives the shuffle buffer samples from several shards, which
    matters when a shard holds few classes."""
    pending = iter(streams)
    active: list[Iterator[Sample]] = []
    for s in pending:
        active.append(s)
        if len(active) >= max(width, 1):
            break
    i = 0
    while active:
        i %= len(active)
        try:
            yield next(active[i])
            i += 1
        except StopIteration:
            nxt = next(pending, None)
            if nxt is None:
                active.pop(i)
            else:
                active[i] = nxt


def shuffled(samples: Iterator[Sample], buffer: int, seed: int) -> Iterator[Sample]:
    """webdataset's shuffle buffer with our own seeded generator (same seed → same order)."""
    if buffer <= 1:
        return samples
    return wds_shuffle(buffer, initial=buffer, rng=random.Random(seed))(samples)


def worker_stream(pieces: list[Piece], stats: Counter, interleave_width: int, buffer: int, seed: int,
                  expand: Callable[[Iterator[Sample]], Iterator[Sample]] | None = None) -> Iterator[Sample]:
    """Pieces → interleaved → (optionally expanded, e.g. class-balanced repeats) → shuffle buffer."""
    samples = interleave((read_piece(p, stats) for p in pieces), interleave_width)
    if expand is not None:
        samples = expand(samples)
    return shuffled(samples, buffer, seed)
