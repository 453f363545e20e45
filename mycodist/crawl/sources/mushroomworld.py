"""mushroom.world: namelist → species pages → facts (edibility above all) and photo links.
Markup: docs/crawling.md (div#name-list, div.caption, div.labelus + div.textus, div#mushroom-list)."""

from __future__ import annotations

import asyncio
import re
from typing import Any
from urllib.parse import urljoin

from mycodist.catalog import Species, normalize_edibility, slugify
from mycodist.crawl.fetch import Fetcher, FetchError
from mycodist.crawl.sources import Discovery, Photo
from mycodist.crawl.sources.html import Node, parse_html
from mycodist.errors import UsageError

_CAPTION = re.compile(r"^\s*(?P<sci>[^()]+?)\s*(?:\((?P<common>[^)]*)\))?\s*$")


def parse_namelist(html: str, page_url: str) -> list[str]:
    root = parse_html(html)
    box = root.find(id="name-list")
    if box is None:
        return []
    urls = []
    for item in box.find_all("div", cls="item"):
        a = next((n for n in item.find_all("a") if n.attrs.get("href")), None)
        if a is not None:
            urls.append(urljoin(page_url, a.attrs["href"]))
    return list(dict.fromkeys(urls))


def _facts(root: Node) -> dict[str, str]:
    facts: dict[str, str] = {}
    for lab in root.find_all("div", cls="labelus"):
        value = lab.next_element()
        if value is None or not ({"textus", "longtextus"} & value.classes):
            continue
        name = lab.text().rstrip(":").strip().lower()
        if name:
            facts[name] = value.text()
    return facts


def parse_species_page(html: str, page_url: str, source: str = "mushroomworld") -> tuple[Species, list[str]] | None:
    """One species page → its Species record and absolute photo URLs (None when it has no caption)."""
    root = parse_html(html)
    cap = root.find("div", cls="caption")
    m = _CAPTION.match(cap.text()) if cap is not None else None
    if m is None:
        return None
    sci = m.group("sci").strip()
    common = (m.group("common") or "").strip()
    facts = _facts(root)
    edibility_text = facts.pop("edibility", "")
    species = Species(
        label=slugify(sci), scientific_name=sci, common_name=common, family=facts.pop("family", ""),
        edibility=normalize_edibility(edibility_text), source=source,
        facts={**facts, "edibility_text": edibility_text, "page_url": page_url},
    )
    photos = []
    box = root.find(id="mushroom-list")
    for div in box.find_all("div", cls="image") if box is not None else []:
        for a in div.find_all("a"):
            if a.attrs.get("href"):
                photos.append(urljoin(page_url, a.attrs["href"]))
    return species, list(dict.fromkeys(photos))


class MushroomWorld:
    name = "mushroomworld"

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")

    async def discover(self, fetcher: Fetcher) -> Discovery:
        namelist = f"{self.base_url}/mushrooms/namelist"
        try:
            resp = await fetcher.get(namelist)
        except FetchError as e:
            raise UsageError(f"cannot read the species list {namelist} ({e}); check crawl.base_url") from None
        pages = parse_namelist(resp.body.decode("utf-8", "replace"), resp.url)
        if not pages:
            raise UsageError(f"{namelist} lists no species (no div#name-list div.item a[href]); is it mushroom.world markup?")
        found = Discovery(pages=len(pages) + 1)
        results = await asyncio.gather(*(self._page(fetcher, u) for u in pages))
        for result in results:
            if isinstance(result, str):
                found.problems[f"page_{result}"] += 1
                continue
            species, photos = result
            found.species.setdefault(species.label, species)
            found.photos.extend(Photo(p, species.label) for p in photos)
        return found

    async def _page(self, fetcher: Fetcher, url: str) -> Any:
        try:
            resp = await fetcher.get(url)
        except FetchError as e:
            return e.reason
        parsed = parse_species_page(resp.body.decode("utf-8", "replace"), resp.url)
        return parsed if parsed is not None else "no_caption"
