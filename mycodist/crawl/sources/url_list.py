"""`manifest:PATH`: a URL list in CSV/TSV/JSONL/Parquet with a URL and a label column. The original
project's CSVs (`Common_Name,Scientific_Name,Link` and `Common_Name,Link`) work as they are.
Bad rows (no URL, a scheme other than http(s), a URL listed twice, no label) are counted, never fatal."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mycodist.catalog import Species, normalize_edibility, slugify
from mycodist.crawl.sources import Discovery, Photo, lookalike_names, pretty_name
from mycodist.errors import UsageError

URL_COLUMNS = ("url", "link", "image_url", "photo_url", "src")
# a scientific name makes the best label (stable across sites); a common name is the fallback
LABEL_COLUMNS = ("label", "scientific_name", "species", "common_name", "name")


def read_rows(path: Path) -> Iterator[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".txt"):
        with path.open(newline="", encoding="utf-8-sig") as f:
            yield from csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
    elif suffix in (".jsonl", ".ndjson"):
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        row = None
                    yield row if isinstance(row, dict) else {}
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UsageError("reading Parquet needs pyarrow: pip install pyarrow") from None
        yield from pq.read_table(path).to_pylist()
    else:
        raise UsageError(f"manifest '{path}' must end in .csv, .tsv, .jsonl or .parquet")


def _pick(columns: list[str], wanted: str, candidates: tuple[str, ...], what: str, key: str) -> str:
    by_lower = {c.lower().strip(): c for c in columns}
    if wanted:
        if wanted.lower() in by_lower:
            return by_lower[wanted.lower()]
        raise UsageError(f"manifest has no column '{wanted}' (set by {key}); its columns: {', '.join(columns)}")
    for c in candidates:
        if c in by_lower:
            return by_lower[c]
    raise UsageError(f"cannot tell which manifest column holds the {what} (columns: {', '.join(columns)}); "
                     f"set {key}=NAME")


class ManifestSource:
    name = "manifest"

    def __init__(self, path: str, url_column: str = "", label_column: str = "") -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise UsageError(f"manifest file '{path}' does not exist")
        self.url_column = url_column
        self.label_column = label_column

    async def discover(self, fetcher: Any = None) -> Discovery:
        return self.read()

    def read(self) -> Discovery:
        found = Discovery()
        seen: set[str] = set()
        url_col = label_col = None
        lower: dict[str, str] = {}
        for row in read_rows(self.path):
            if url_col is None and row:
                cols = [str(c) for c in row]
                url_col = _pick(cols, self.url_column, URL_COLUMNS, "photo URLs", "crawl.url_column")
                label_col = _pick(cols, self.label_column, LABEL_COLUMNS, "labels", "crawl.label_column")
                lower = {c.lower(): c for c in cols}
            if not row or url_col is None:
                found.problems["bad_row"] += 1
                continue
            url = str(row.get(url_col) or "").strip()
            raw_label = str(row.get(label_col) or "").strip()
            if not url:
                found.problems["missing_url"] += 1
                continue
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                found.problems["bad_url"] += 1
                continue
            if url in seen:
                found.problems["duplicate_url"] += 1
                continue
            try:
                label = slugify(raw_label)
            except UsageError:
                found.problems["missing_label"] += 1
                continue
            seen.add(url)
            found.photos.append(Photo(url, label))
            if label not in found.species:
                found.species[label] = self._species(label, row, lower)
        if url_col is None:
            raise UsageError(f"manifest '{self.path}' has no rows")
        return found

    def _species(self, label: str, row: dict[str, Any], lower: dict[str, str]) -> Species:
        def col(name: str) -> str:
            return str(row.get(lower.get(name, ""), "") or "").strip()

        return Species(label=label, scientific_name=pretty_name(col("scientific_name")),
                       common_name=pretty_name(col("common_name")), family=col("family"),
                       edibility=normalize_edibility(col("edibility")), source=f"manifest:{self.path.name}",
                       lookalikes=lookalike_names(col("lookalikes")))
