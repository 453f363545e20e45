"""mushroom.world: namelist → species pages → facts (edibility above all) and photo links.
Markup: docs/crawling.md (div#name-list, div.caption, div.labelus + div.textus, div#mushroom-list)."""

from __future__ import annotations

import re
from urllib.parse import urljoin

from mycodist.catalog import Species, normalize_edibility, slugify
from mycodist.crawl.sources import pop_lookalikes
from mycodist.crawl.sources.html import Node, parse_html
from mycodist.crawl.sources.site import SiteSource

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
        lookalikes=pop_lookalikes(facts),
        facts={**facts, "edibility_text": edibility_text, "page_url": page_url},
    )
    photos = []
    box = root.find(id="mushroom-list")
    for div in box.find_all("div", cls="image") if box is not None else []:
        for a in div.find_all("a"):
            if a.attrs.get("href"):
                photos.append(urljoin(page_url, a.attrs["href"]))
    return species, list(dict.fromkeys(photos))


class MushroomWorld(SiteSource):
    name = "mushroomworld"
    index_markup = "div#name-list div.item a[href]"
    url_key = "crawl.base_url"
    unparsable_page = "no_caption"

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        super().__init__(f"{self.base_url}/mushrooms/namelist")

    def parse_index(self, html: str, page_url: str) -> list[str]:
        return parse_namelist(html, page_url)

    def parse_page(self, html: str, page_url: str) -> tuple[Species, list[str]] | None:
        return parse_species_page(html, page_url)
