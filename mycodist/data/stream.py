"""Raw sample streams: a worker's pieces of shards → interleaved → shuffled, with every loss counted.

Samples stay as raw bytes until they leave the shuffle buffer, so skipping (a piece that starts
mid-shard, a resumed epoch) costs reading, never decoding. A shard that cannot be opened or ends
early loses exactly the positions the manifest promised; those are counted (`missing_shard`,
`truncated`) and the stream goes on.
"""

from __future__ import annotations

import logging
import random
import re
import sys
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


_USTAR = b"ustar\x0000"  # POSIX ustar magic + version, what DatasetWriter writes
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator skips these names
_ENCODING = sys.getfilesystemencoding()  # tarfile's default for member names


class _Irregular(Exception):
    """Something in the archive that the plain reader leaves to tarfile."""


def _plain_members(stream, url: str) -> Iterator[dict[str, Any]]:
    """The regular members of an uncompressed POSIX ustar archive as webdataset's `tar_file_expander` yields
    them (`fname`, `data`, `__url__`, then `{}` at the end), read straight from the file: Python's tarfile
    spends ~65 us per member parsing headers in stream mode (~0.2 ms per 3-member sample). Raises
    `_Irregular` at the first header it does not handle exactly as tarfile would: another format or type
    (pax, GNU, links), a bad or signed checksum, a base-256 size, a short read (a truncated shard)."""
    read = stream.read
    while True:
        header = read(512)
        if len(header) < 512:
            raise _Irregular("short header")
        if header.count(0) == 512:  # end of archive
            yield {}
            return
        if header[257:265] != _USTAR:
            raise _Irregular("not ustar")
        try:
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            chksum = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            raise _Irregular("bad number") from None
        if header[124] & 0x80 or chksum != 256 + sum(header) - sum(header[148:156]):
            raise _Irregular("base-256 size or checksum")
        flag = header[156:157]
        name = header[:100].split(b"\0", 1)[0].decode(_ENCODING, "surrogateescape")
        prefix = header[345:500].split(b"\0", 1)[0].decode(_ENCODING, "surrogateescape")
        if prefix:
            name = prefix + "/" + name
        padded = -(-size // 512) * 512
        if flag == b"5":  # a directory: not a sample file
            if padded and len(read(padded)) < padded:
                raise _Irregular("short directory")
            continue
        if flag not in (b"0", b"\0") or name.endswith("/"):
            raise _Irregular("not a regular file")
        data = read(size)
        if len(data) < size or (padded > size and len(read(padded - size)) < padded - size):
            raise _Irregular("short member")
        if ("/" not in name and name.startswith("__") and name.endswith("__")) or _SKIP_META.match(name):
            continue
        yield {"fname": name, "data": data, "__url__": url}


def _tar_members(stream, url: str, handler) -> Iterator[dict[str, Any]]:
    """webdataset's `tar_file_expander` over one opened shard, through `_plain_members` where the shard is a
    seekable plain ustar file. At anything irregular it starts again with tarfile from the beginning and skips
    the members already given, which tarfile reads identically: the samples, errors and losses are tarfile's."""
    given = 0
    if getattr(stream, "seekable", lambda: False)() and stream.tell() == 0:
        try:
            for member in _plain_members(stream, url):
                yield member
                given += 1
            return
        except _Irregular:
            stream.seek(0)
    for i, member in enumerate(tar_file_expander([{"url": url, "stream": stream}], handler=handler)):
        if i >= given:
            yield member


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
        files = _tar_members(stream, url, keep_going)
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
