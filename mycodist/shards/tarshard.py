"""One WebDataset tar shard on disk: written under a `.tmp-` name and renamed only when complete.

A killed writer therefore leaves at most a `.tmp-*` file, which never matches the shard name pattern
(`{split}-{index:06d}.tar`), so no reader, glob or manifest scan accepts a half-shard.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mycodist.atomic import TMP_PREFIX

SHARD_RE = re.compile(r"^(?P<split>[a-z][a-z0-9_]*)-(?P<index>\d{6})\.tar$")
SPLIT_RE = re.compile(r"^[a-z][a-z0-9_]*$")
# `__key__` is the member name up to the first dot (webdataset's rule), so keys carry no dots or slashes.
KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,199}$")

BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 10240: tarfile pads the finished archive to a multiple of this
# Fixed header fields so that the same samples always give byte-identical shards (stable sha256).
MEMBER_MTIME = 1_700_000_000
MEMBER_MODE = 0o444


def _umask_mode(mode: int = 0o666) -> int:
    """`mode` as a normal file creation would give it (mkstemp makes 0600 files; shards are data to share)."""
    current = os.umask(0)
    os.umask(current)
    return mode & ~current


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def parse_shard_name(name: str) -> tuple[str, int] | None:
    m = SHARD_RE.match(name)
    return (m["split"], int(m["index"])) if m else None


def list_shards(root: str | os.PathLike) -> list[Path]:
    """Complete shards in `root` (by name), ordered by split then index; `.tmp-*` files never match."""
    root = Path(root)
    found = [(parse_shard_name(p.name), p) for p in root.iterdir() if p.is_file()] if root.is_dir() else []
    return [p for parsed, p in sorted((x for x in found if x[0]), key=lambda x: x[0])]


def member_bytes(size: int) -> int:
    """Bytes one member takes in a tar: a header block plus data rounded up to whole blocks."""
    return BLOCK + -(-size // BLOCK) * BLOCK


def archive_bytes(payload: int) -> int:
    """Final file size for `payload` member bytes: two zero end blocks, then padding to a record."""
    return -(-(payload + 2 * BLOCK) // RECORD) * RECORD


def sample_bytes(members: dict[str, bytes]) -> int:
    return sum(member_bytes(len(data)) for data in members.values())


class ShardFile:
    """A tar being written to `.tmp-<name>.*` beside its final path; `commit()` renames it into place."""

    def __init__(self, final_path: Path):
        self.final_path = Path(final_path)
        self.final_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{self.final_path.name}.", dir=self.final_path.parent)
        self.tmp_path = Path(tmp)
        self._file = os.fdopen(fd, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.payload = 0
        self.keys: list[str] = []

    def predicted_size(self, extra_payload: int = 0) -> int:
        return archive_bytes(self.payload + extra_payload)

    def add(self, key: str, members: dict[str, bytes]) -> None:
        """Append one sample: members named `key.ext` in the order given."""
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = MEMBER_MTIME
            info.mode = MEMBER_MODE
            self._tar.addfile(info, io.BytesIO(data))
            self.payload += member_bytes(len(data))
        self.keys.append(key)

    def commit(self) -> Path:
        """Finish the archive, fsync it and rename it to its final name."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.chmod(self.tmp_path, _umask_mode())
        os.replace(self.tmp_path, self.final_path)
        return self.final_path

    def abort(self) -> None:
        """Drop the unfinished shard: nothing of it stays on disk."""
        try:
            self._tar.close()
        except Exception:
            pass
        self._file.close()
        self.tmp_path.unlink(missing_ok=True)


def split_member(name: str) -> tuple[str, str] | None:
    """`dir/abc.seg.jpg` → (`dir/abc`, `seg.jpg`): the key ends at the first dot of the base name.

    The one tar member → sample key rule of mycodist (webdataset's own): the writer, `verify`, the sample
    counts and the training streams (handed to webdataset's `group_by_keys`) all use this function."""
    head, sep, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (head + sep + stem, ext) if dot and stem else None


def iter_samples(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples of a shard as (key, {ext: bytes}), grouping consecutive members by key like webdataset.

    A member without an extension is yielded under its own name with ext "" so a checker can flag it.
    """
    key: str | None = None
    members: dict[str, bytes] = {}
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            k, ext = split_member(info.name) or (info.name, "")
            if k != key:
                if key is not None:
                    yield key, members
                key, members = k, {}
            f = tar.extractfile(info)
            members[ext] = f.read() if f else b""
    if key is not None:
        yield key, members


def iter_keys(path: str | os.PathLike) -> Iterator[str]:
    """Sample keys of a shard, reading only tar headers (member data is skipped by seeking)."""
    last = None
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            if info.isfile():
                k = (split_member(info.name) or (info.name, ""))[0]
                if k != last:
                    last = k
                    yield k
