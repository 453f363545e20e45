"""The embedded data set as a stream: catalogue plus (label, key, jpeg) for every photo, in a fixed order.

A photo depends only on (synth.seed, species index, photo index, synth.size, synth.jpeg_quality), never on
how many species or photos are asked for, nor on how many worker processes render them; so K species are
a prefix of K + 1, and any one photo can be made alone (`species_photo`), e.g. by the crawler's mock site.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mycodist.catalog import Species
from mycodist.synth.render import render_photo
from mycodist.synth.species import SynthSpecies, make_catalogue

FORMATS = ("shards", "folders")
MIN_SIZE = 32
MAX_SIZE = 4096


@dataclass(frozen=True)
class SynthSettings:
    """The `synth` config group, checked; every field a photo depends on, plus how to run."""

    species: int = 24
    per_species: int = 100
    size: int = 256
    seed: int = 0
    jpeg_quality: tuple[int, int] = (70, 95)
    workers: int = 0
    format: str = "shards"

    @classmethod
    def from_config(cls, cfg_synth: Mapping[str, Any] | Any) -> SynthSettings:
        """Build from the `synth` group (DictConfig or dict); ValueError says which value is wrong and why."""
        get = cfg_synth.get
        q = get("jpeg_quality", (70, 95))
        q = (q, q) if isinstance(q, int) else tuple(q)
        s = cls(species=int(get("species", 24)), per_species=int(get("per_species", 100)), size=int(get("size", 256)),
                seed=int(get("seed", 0)), jpeg_quality=tuple(int(v) for v in q),  # type: ignore[arg-type]
                workers=int(get("workers", 0)), format=str(get("format", "shards")))
        s.check()
        return s

    def check(self) -> None:
        if self.species < 2:
            raise ValueError(f"synth.species={self.species}: a classifier needs at least 2 species (e.g. synth.species=24)")
        if self.per_species < 1:
            raise ValueError(f"synth.per_species={self.per_species}: need at least 1 photo per species (e.g. 100)")
        if not MIN_SIZE <= self.size <= MAX_SIZE:
            raise ValueError(f"synth.size={self.size}: the longest side must be {MIN_SIZE}..{MAX_SIZE} px (e.g. 256)")
        if len(self.jpeg_quality) != 2 or not 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100:
            raise ValueError(f"synth.jpeg_quality={list(self.jpeg_quality)}: give [low, high] with "
                             "1 <= low <= high <= 100 (e.g. [70,95])")
        if self.workers < 0:
            raise ValueError(f"synth.workers={self.workers}: use 0 (one per CPU core) or a positive count")
        if self.format not in FORMATS:
            raise ValueError(f"synth.format={self.format!r}: choose one of {', '.join(FORMATS)}")

    def resolved_workers(self) -> int:
        if self.workers:
            return self.workers
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
        return max(1, min(cores, 16))


def photo_key(label: str, index: int) -> str:
    """Stable sample key: the label and the photo's number within its species."""
    return f"{label}-{index:05d}"


def species_photo(entry: SynthSpecies, species_index: int, photo_index: int, settings: SynthSettings) -> bytes:
    """JPEG bytes of one photo; same arguments → identical bytes."""
    rng = np.random.default_rng(np.random.SeedSequence([settings.seed, 4, species_index, photo_index]))
    return render_photo(entry.traits, rng, settings.size, settings.jpeg_quality)


# worker-process state: the catalogue and settings, sent once per process instead of once per photo
_WORKER: dict[str, Any] = {}


def _init_worker(settings: SynthSettings) -> None:
    _WORKER["settings"] = settings
    _WORKER["catalogue"] = make_catalogue(settings.species, settings.seed)


def _render_task(task: tuple[int, int]) -> bytes:
    si, pi = task
    return species_photo(_WORKER["catalogue"][si], si, pi, _WORKER["settings"])


def photo_order(n_species: int, per_species: int) -> list[tuple[int, int]]:
    """(species index, photo index) in output order: photo-major, so every shard mixes all species."""
    return [(si, pi) for pi in range(per_species) for si in range(n_species)]


def iter_photos(catalogue: Sequence[SynthSpecies], settings: SynthSettings,
                workers: int | None = None) -> Iterator[tuple[str, str, bytes]]:
    """(label, key, jpeg) for every photo in photo_order, rendered by `workers` processes (order kept)."""
    tasks = photo_order(len(catalogue), settings.per_species)
    n = settings.resolved_workers() if workers is None else max(1, workers)
    if n == 1 or len(tasks) < 16:
        for si, pi in tasks:
            yield catalogue[si].label, photo_key(catalogue[si].label, pi), species_photo(catalogue[si], si, pi, settings)
        return
    # fork where it exists: the renderer needs only numpy and Pillow, and startup stays in milliseconds
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pool = ctx.Pool(n, initializer=_init_worker, initargs=(settings,))
    try:
        for (si, pi), jpg in zip(tasks, pool.imap(_render_task, tasks, chunksize=8), strict=True):
            yield catalogue[si].label, photo_key(catalogue[si].label, pi), jpg
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def generate_dataset(cfg_synth: Mapping[str, Any] | Any, workers: int | None = None
                     ) -> tuple[list[Species], Iterator[tuple[str, str, bytes]]]:
    """The embedded data set: (species catalogue, iterator of (label, key, jpeg_bytes)).

    `cfg_synth` is the `synth` config group (or a dict with its keys: species, per_species, size, seed,
    jpeg_quality, workers). Photos come photo-major (photo 0 of every species, then photo 1, ...); keys are
    f"{label}-{i:05d}". Rendering starts only when the iterator is consumed; `workers` overrides
    synth.workers (1 = in this process). ValueError for invalid settings.
    """
    settings = cfg_synth if isinstance(cfg_synth, SynthSettings) else SynthSettings.from_config(cfg_synth)
    catalogue = make_catalogue(settings.species, settings.seed)
    return [e.species for e in catalogue], iter_photos(catalogue, settings, workers)
