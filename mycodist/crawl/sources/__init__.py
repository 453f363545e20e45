"""Site adapters. Each turns a SOURCE argument into species facts and labelled photo URLs:
`mushroomworld`, `wildfooduk`, `manifest:PATH`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

from mycodist.catalog import Species
from mycodist.errors import UsageError


@dataclass(frozen=True)
class Photo:
    url: str
    label: str


@dataclass
class Discovery:
    """What a source found before any photo is fetched."""

    species: dict[str, Species] = field(default_factory=dict)
    photos: list[Photo] = field(default_factory=list)
    problems: Counter[str] = field(default_factory=Counter)  # bad manifest rows, failed pages, by reason
    pages: int = 0


class Source(Protocol):
    name: str

    async def discover(self, fetcher: Any) -> Discovery: ...


def open_source(spec: str, crawl_cfg: Any) -> Source:
    """`mushroomworld`, `wildfooduk` or `manifest:PATH` → an adapter."""
    if spec == "mushroomworld":
        from mycodist.crawl.sources.mushroomworld import MushroomWorld

        return MushroomWorld(crawl_cfg.base_url)
    if spec == "wildfooduk":
        from mycodist.crawl.sources.wildfooduk import WildFoodUK

        return WildFoodUK(crawl_cfg.wildfooduk_url)
    if spec.startswith("manifest:"):
        from mycodist.crawl.sources.url_list import ManifestSource

        return ManifestSource(spec[len("manifest:"):], crawl_cfg.url_column, crawl_cfg.label_column)
    raise UsageError(f"unknown source '{spec}'; use mushroomworld, wildfooduk or manifest:PATH "
                     "(a CSV/TSV/JSONL/Parquet URL list)")


def pretty_name(value: str) -> str:
    """`agaricus_arvensis` (the original CSVs' form) → `Agaricus arvensis`; real names stay as they are."""
    value = value.strip()
    if "_" in value and " " not in value:
        value = value.replace("_", " ")
        return value[:1].upper() + value[1:]
    return value


LOOKALIKE_FACTS = ("lookalikes", "lookalike", "similar species", "confused with", "look-alikes")


def lookalike_names(text: str) -> list[str]:
    """'Amanita phalloides; Amanita virosa' or a comma list → names (merged with the reference later)."""
    return [n.strip() for n in text.replace(";", ",").split(",") if n.strip()]


def pop_lookalikes(facts: dict[str, str]) -> list[str]:
    """Take a page's lookalike fact out of `facts` (whatever the site calls it) as a list of names."""
    names: list[str] = []
    for key in LOOKALIKE_FACTS:
        names += lookalike_names(facts.pop(key, ""))
    return list(dict.fromkeys(names))
