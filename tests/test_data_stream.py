"""The plain ustar reader in data/stream.py gives exactly what webdataset's tarfile-based expander gives."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest
from webdataset.tariterators import tar_file_expander

from mycodist.data.stream import _plain_members, _tar_members


def archive(fmt: int = tarfile.USTAR_FORMAT, long_name: bool = False, extra: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        def add(name: str, data: bytes, kind: bytes = tarfile.REGTYPE) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.type, info.mtime = (len(data) if kind == tarfile.REGTYPE else 0), kind, 1_700_000_000
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        if extra:
            add("somedir", b"", tarfile.DIRTYPE)
            add("__meta__", b"skipped")
        for i in range(6):
            key = ("k" * 120 if long_name and i == 2 else "") + f"img{i:03d}"
            add(f"{key}.jpg", bytes([i]) * (700 + 513 * i))
            add(f"{key}.cls", str(i).encode())
            if extra and i == 3:
                add(f"d/{key}.link", b"", tarfile.SYMTYPE)
    return buf.getvalue()


def both(data: bytes) -> tuple[list, list, list, list]:
    out = []
    for reader in (lambda s, h: tar_file_expander([{"url": "u", "stream": s}], handler=h),
                   lambda s, h: _tar_members(s, "u", h)):
        errors: list[str] = []

        def keep_going(e: BaseException, errors: list[str] = errors) -> bool:
            errors.append(f"{type(e).__name__}: {e.args[0] if e.args else ''}")
            return True

        out.append([(m.get("fname"), m.get("data")) for m in reader(io.BytesIO(data), keep_going)])
        out.append(errors)
    return out[0], out[2], out[1], out[3]


@pytest.mark.parametrize("kind", ["ustar", "ustar_dirs_meta_links", "gnu_long_names", "pax", "gzip", "empty"])
def test_same_members_as_tarfile(kind):
    data = {"ustar": lambda: archive(), "ustar_dirs_meta_links": lambda: archive(extra=True),
            "gnu_long_names": lambda: archive(tarfile.GNU_FORMAT, long_name=True),
            "pax": lambda: archive(tarfile.PAX_FORMAT, long_name=True), "gzip": lambda: gzip.compress(archive()),
            "empty": lambda: b""}[kind]()
    want, got, want_errors, got_errors = both(data)
    assert got == want and got_errors == want_errors
    if kind in ("ustar", "ustar_dirs_meta_links"):
        assert len(want) == 13


def test_same_members_and_errors_as_tarfile_when_cut_anywhere():
    data = archive(extra=True)
    for cut in list(range(0, len(data), 97)) + [512, 1024, len(data) - 1024, len(data) - 512, len(data) - 1]:
        want, got, want_errors, got_errors = both(data[:cut])
        assert got == want and got_errors == want_errors, cut


def test_bad_checksum_and_garbage_go_to_tarfile():
    data = bytearray(archive())
    data[2 * 512 + 5] ^= 0x20  # the second header's name, checksum now wrong
    want, got, want_errors, got_errors = both(bytes(data))
    assert got == want and got_errors == want_errors
    want, got, *_ = both(b"\x00" * 3 + bytes(range(256)) * 8)
    assert got == want


def test_plain_reader_refuses_what_it_does_not_handle():
    with pytest.raises(Exception, match="not ustar"):
        list(_plain_members(io.BytesIO(archive(tarfile.GNU_FORMAT)), "u"))
    assert list(_plain_members(io.BytesIO(archive()), "u"))[-1] == {}
