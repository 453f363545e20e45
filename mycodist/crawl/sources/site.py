"""What the two site adapters share: an index page linking species pages, each page giving one
species' facts and its photo links. Subclasses only say how to parse their markup."""

from __future__ import annotations

import asyncio
from typing import Any

from mycodist.catalog import Species
from mycodist.crawl.fetch import Fetcher, FetchError
from mycodist.crawl.sources import Discovery, Photo
from mycodist.errors import UsageError


class SiteSource:
    name = ""
    index_what = "species list"  # for errors: what the index page is
    index_markup = ""            # for errors: the markup the index must hold
    url_key = ""                 # for errors: the config key that points at the index
    unparsable_page = "unparsable"  # problem counted when a species page has no name

    def __init__(self, index_url: str) -> None:
        self.index_url = index_url

    def parse_index(self, html: str, page_url: str) -> list[str]:
        raise NotImplementedError

    def parse_page(self, html: str, page_url: str) -> tuple[Species, list[str]] | None:
        raise NotImplementedError

    async def discover(self, fetcher: Fetcher) -> Discovery:
        try:
            resp = await fetcher.get(self.index_url)
        except FetchError as e:
            raise UsageError(f"cannot read the {self.index_what} {self.index_url} ({e}); check {self.url_key}") from None
        pages = self.parse_index(resp.body.decode("utf-8", "replace"), resp.url)
        if not pages:
            raise UsageError(f"{self.index_url} links no species (no {self.index_markup}); is it {self.name} markup?")
        found = Discovery(pages=len(pages) + 1)
        for result in await asyncio.gather(*(self._page(fetcher, u) for u in pages)):
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
        parsed = self.parse_page(resp.body.decode("utf-8", "replace"), resp.url)
        return parsed if parsed is not None else self.unparsable_page
