"""Where shards come from: local paths, globs and brace patterns, `http(s)://`, `pipe:` and fsspec URLs.

One function opens any of them as a binary stream, so the readers never care where a shard lives.
webdataset's `gopen` already handles local files, `pipe:` and `http(s)` (through curl); every other
scheme (`s3://`, `gs://`, `az://`, ...) goes to fsspec, whose backend for that scheme must be installed.
"""

from __future__ import annotations

import glob
import os
import posixpath
import shutil
from typing import IO
from urllib.parse import urlparse

import braceexpand
from webdataset.gopen import gopen

from mycodist.errors import UsageError

_GOPEN_SCHEMES = {"", "file", "pipe"}
_CURL_SCHEMES = {"http", "https"}


def scheme_of(url: str) -> str:
    """The URL scheme, with Windows-like `C:` drive letters and plain paths counting as local."""
    if url.startswith("pipe:"):
        return "pipe"
    s = urlparse(url).scheme
    return "" if len(s) <= 1 else s


def is_local(url: str) -> bool:
    return scheme_of(url) in ("", "file")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def open_url(url: str) -> IO[bytes]:
    """Open a shard or manifest for reading, whatever its scheme."""
    scheme = scheme_of(url)
    if scheme in _GOPEN_SCHEMES:
        return gopen(url, "rb")
    if scheme in _CURL_SCHEMES and shutil.which("curl"):
        return gopen(url, "rb")
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec ships with our dependencies
        raise UsageError(f"cannot open '{url}': install fsspec and its backend for '{scheme}://'") from None
    try:
        return fsspec.open(url, "rb").open()
    except (ImportError, ValueError) as e:
        raise UsageError(f"cannot open '{url}': no fsspec backend for '{scheme}://' ({e}); "
                         f"install it (e.g. s3fs, gcsfs) or copy the shards locally") from None


def read_bytes(url: str) -> bytes:
    with open_url(url) as f:
        return f.read()


def join_url(base: str, name: str) -> str:
    """`name` relative to the folder of `base` (a manifest), for local paths and URLs alike."""
    if scheme_of(name) not in ("",) or os.path.isabs(name):
        return name
    if is_local(base):
        return os.path.join(os.path.dirname(local_path(base)), name)
    return posixpath.join(posixpath.dirname(base), name)


def expand_pattern(spec: str) -> list[str]:
    """`a-{000000..000009}.tar`, `dir/*.tar`, `url1::url2` → a sorted, de-duplicated list of URLs.

    Local patterns are globbed (a brace range may name files that do not exist: those are kept, so a
    missing shard is reported when it is read rather than silently dropped from the data set).
    """
    urls: list[str] = []
    for part in spec.split("::"):
        part = part.strip()
        if not part:
            continue
        for item in braceexpand.braceexpand(part):
            if is_local(item) and glob.has_magic(local_path(item)):
                urls.extend(sorted(glob.glob(local_path(item))))
            else:
                urls.append(item)
    seen: set[str] = set()
    return [u for u in urls if not (u in seen or seen.add(u))]
