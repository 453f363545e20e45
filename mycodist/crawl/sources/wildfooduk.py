"""wildfooduk mushroom guide: guide page → species pages → name, labelled facts where present
(edibility above all; `unknown` where the page states none), photos under div#thumblist."""

from __future__ import annotations

import re
from urllib.parse import urljoin

from mycodist.catalog import Species, normalize_edibility, slugify
from mycodist.crawl.sources import pop_lookalikes
from mycodist.crawl.sources.html import parse_html
from mycodist.crawl.sources.site import SiteSource

IMAGE_EXT = re.compile(r"\.(jpe?g|png|webp|gif)(\?.*)?$", re.I)
_FACT = re.compile(r"^\s*(?P<name>[A-Za-z][A-Za-z /]{1,30}?)\s*:\s*(?P<value>.+)$")
_SCI_KEYS = ("latin name", "scientific name", "botanical name")


def parse_guide(html: str, page_url: str) -> list[str]:
    root = parse_html(html)
    box = root.find(id="mushroom-guide")
    if box is None:
        return []
    urls = [urljoin(page_url, a.attrs["href"]) for td in box.find_all("td", cls="mushroom-image")
            for a in td.find_all("a") if a.attrs.get("href")]
    return list(dict.fromkeys(urls))


def parse_species_page(html: str, page_url: str) -> tuple[Species, list[str]] | None:
    root = parse_html(html)
    title = root.find(id="mushroom-title")
    h1 = title.find("h1") if title is not None else None
    if h1 is None or not h1.text():
        return None
    common = h1.text()
    facts: dict[str, str] = {}
    for node in root.find_all():
        if node.tag in ("p", "li", "tr"):  # "Edibility: Edible" as a paragraph, list item or table row
            m = _FACT.match(node.text())
            if m:
                facts.setdefault(m.group("name").strip().lower(), m.group("value").strip())
    sci = next((facts.pop(k) for k in _SCI_KEYS if k in facts), "")
    edibility_text = facts.pop("edibility", "")
    species = Species(
        label=slugify(sci or common), scientific_name=sci, common_name=common, family=facts.pop("family", ""),
        edibility=normalize_edibility(edibility_text), source="wildfooduk",
        lookalikes=pop_lookalikes(facts),
        facts={**facts, "edibility_text": edibility_text, "page_url": page_url},
    )
    photos: list[str] = []
    thumbs = root.find(id="thumblist")
    if thumbs is not None:
        for n in thumbs.iter():
            ref = n.attrs.get("href") if n.tag == "a" else n.attrs.get("src") if n.tag == "img" else None
            if ref and IMAGE_EXT.search(ref):
                photos.append(urljoin(page_url, ref))
        # a linked full-size photo and its thumbnail image are one photo: keep the links when present
        linked = [urljoin(page_url, a.attrs["href"]) for a in thumbs.find_all("a")
                  if IMAGE_EXT.search(a.attrs.get("href", ""))]
        photos = linked or photos
    return species, list(dict.fromkeys(photos))


class WildFoodUK(SiteSource):
    name = "wildfooduk"
    index_what = "guide"
    index_markup = "div#mushroom-guide td.mushroom-image a[href]"
    url_key = "crawl.wildfooduk_url"
    unparsable_page = "no_title"

    def __init__(self, guide_url: str) -> None:
        super().__init__(guide_url)
        self.guide_url = guide_url

    def parse_index(self, html: str, page_url: str) -> list[str]:
        return parse_guide(html, page_url)

    def parse_page(self, html: str, page_url: str) -> tuple[Species, list[str]] | None:
        return parse_species_page(html, page_url)
