"""The crawl itself: discover → fetch (polite, async) → validate/re-encode (process pool) → dedup →
shard writer, with every URL's state in the ledger so that a rerun after any crash finishes the job
with no image lost and none written twice (a photo is `done` only once its shard is renamed)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import hashlib
import json
import multiprocessing
import os
import signal
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from mycodist import __version__
from mycodist.atomic import atomic_write_json
from mycodist.catalog import Species
from mycodist.crawl import ledger as L
from mycodist.crawl.fetch import Fetcher, FetchError, FetchSettings
from mycodist.crawl.images import ImageOptions, ImageResult, hamming, process_image
from mycodist.crawl.sources import Discovery, open_source
from mycodist.errors import UsageError
from mycodist.shards.writer import DatasetWriter, WriterSettings, assign_splits

REPORT = "crawl_report.json"
# Test hook: `stage:N` kills this process with SIGKILL at the N-th `fetched`, `written` (sample in an
# open shard) or `closed` (shard renamed, ledger not yet told) event, to prove resume exactly.
CRASH_ENV = "MYCODIST_CRAWL_CRASH_AT"


class _CrashHook:
    def __init__(self) -> None:
        spec = os.environ.get(CRASH_ENV, "")
        self.stage, _, n = spec.partition(":")
        self.at = int(n) if n.isdigit() else 0
        self.seen: Counter[str] = Counter()

    def __call__(self, stage: str) -> None:
        if stage == self.stage:
            self.seen[stage] += 1
            if self.seen[stage] == self.at:
                os.kill(os.getpid(), signal.SIGKILL)


def photo_key(url: str, label: str) -> str:
    """Stable and unique per URL; the label prefix only makes shard listings readable."""
    return f"{label[:120]}-{hashlib.sha1(url.encode('utf-8')).hexdigest()[:16]}"


def worker_of(url: str, workers: int) -> int:
    """Which of `workers` crawl machines owns `url` (hash partition: no overlap, nothing missed)."""
    return int.from_bytes(hashlib.sha256(url.encode("utf-8")).digest()[:8], "big") % workers


def _check_settings(c: DictConfig) -> None:
    if c.concurrency < 1 or c.per_host < 1:
        raise UsageError("crawl.concurrency and crawl.per_host must be at least 1")
    if c.num_workers_total < 1 or not 0 <= c.worker_index < c.num_workers_total:
        raise UsageError(f"crawl.worker_index must be in 0..{c.num_workers_total - 1} "
                         f"(crawl.num_workers_total={c.num_workers_total})")
    if c.min_side < 1 or c.max_side < c.min_side:
        raise UsageError(f"need 1 <= crawl.min_side <= crawl.max_side, got {c.min_side} and {c.max_side}")
    if c.retries < 0 or c.max_redirects < 0 or c.max_bytes < 1 or c.max_pixels < 1:
        raise UsageError("crawl.retries and crawl.max_redirects must be >= 0, crawl.max_bytes and "
                         "crawl.max_pixels > 0")
    if not 1 <= c.jpeg_quality <= 95:
        raise UsageError(f"crawl.jpeg_quality must be in 1..95, got {c.jpeg_quality}")


@dataclass(frozen=True)
class CrawlSettings:
    """The crawl stage's settings, built at the command's edge: the validated `crawl` group (read-only
    attributes), the validation share, and the shard writer's settings. The stage never sees the whole config."""

    c: Any
    val_fraction: float
    writer: WriterSettings

    @classmethod
    def from_config(cls, cfg: DictConfig) -> CrawlSettings:
        _check_settings(cfg.crawl)
        group = SimpleNamespace(**OmegaConf.to_container(cfg.crawl, resolve=True))  # type: ignore[arg-type]
        return cls(c=group, val_fraction=float(cfg.shards.val_fraction), writer=WriterSettings.from_config(cfg))


class Crawl:
    """One run over one output folder. `run()` returns the report it also writes to crawl_report.json."""

    def __init__(self, source: str, out_dir: str | Path, settings: CrawlSettings, *, retry_failed: bool = False) -> None:
        self.spec = source
        self.out = Path(out_dir)
        self.settings = settings
        self.c = settings.c
        self.retry_failed = retry_failed
        self.source = open_source(source, self.c)
        self.opts = ImageOptions(max_side=self.c.max_side, min_side=self.c.min_side, max_pixels=self.c.max_pixels,
                                 jpeg_quality=self.c.jpeg_quality)
        self.crash = _CrashHook()
        self.stop = asyncio.Event()
        self.run_counts: Counter[str] = Counter()  # this run's outcomes, by state and by reason
        self.bytes_in = 0
        self.interrupted = False

    # -- setup ----------------------------------------------------------------------------------
    def _open_ledger(self) -> L.Ledger:
        ledger = L.Ledger(self.out)
        ident = json.dumps({"source": self.spec, "workers": self.c.num_workers_total, "index": self.c.worker_index})
        known = ledger.get_meta("identity")
        if known is None:
            ledger.set_meta("identity", ident)
        elif known != ident:
            ledger.close()
            raise UsageError(f"'{self.out}' holds a crawl of {known}, not {ident}; use another --out "
                             "(or delete the folder to start over)")
        return ledger

    def _plan(self, ledger: L.Ledger, found: Discovery) -> tuple[list[str], list[Species]]:
        """Fix labels on the first run (a resumed writer needs the same classes) and add this worker's
        share of the photos to the ledger."""
        stored = ledger.get_meta("species")
        if stored is None:
            with_photos = {p.label for p in found.photos}
            labels = sorted(lab for lab in found.species if lab in with_photos)
            if not labels:
                raise UsageError(f"source '{self.spec}' gave no photo URLs; nothing to crawl")
            species = {lab: found.species[lab] for lab in labels}
            ledger.set_meta("labels", json.dumps(labels))
            ledger.set_meta("species", json.dumps({lab: s.to_json() for lab, s in species.items()}))
        else:
            labels = json.loads(ledger.get_meta("labels") or "[]")
            species = {lab: Species.from_json(lab, d) for lab, d in json.loads(stored).items()}
            species.update({lab: s for lab, s in found.species.items() if lab in species})  # fresher facts
        seen: set[str] = set()
        by_label: dict[str, list[str]] = defaultdict(list)
        photos = []
        for p in found.photos:
            if p.url in seen:
                found.problems["duplicate_url"] += 1
                continue
            seen.add(p.url)
            if p.label not in species:
                found.problems["label_not_in_first_run"] += 1
                continue
            key = photo_key(p.url, p.label)
            by_label[p.label].append(key)
            photos.append((p.url, key, p.label))
        splits = assign_splits(dict(by_label), self.settings.val_fraction)
        W, i = self.c.num_workers_total, self.c.worker_index
        ledger.add_photos((u, k, lab, splits[k]) for u, k, lab in photos if worker_of(u, W) == i)
        return labels, list(species.values())

    # -- one photo -------------------------------------------------------------------------------
    async def _one(self, row: Any, fetcher: Fetcher, pool: concurrent.futures.Executor, st: _DedupState,
                   writer: DatasetWriter, ledger: L.Ledger) -> None:
        url, key, label, split = row["url"], row["key"], row["label"], row["split"]
        try:
            resp = await fetcher.get(url, refuse_noai=bool(self.c.respect_robots))
        except FetchError as e:
            state = L.DISALLOWED if e.disallowed else L.FAILED
            self._outcome(ledger, url, state, e.reason)
            return
        self.crash("fetched")
        self.bytes_in += len(resp.body)
        loop = asyncio.get_running_loop()
        res: ImageResult = await loop.run_in_executor(pool, process_image, resp.body, self.opts)
        if res.reason is not None:
            self._outcome(ledger, url, L.REJECTED, res.reason, sha256=res.sha256, nbytes=len(resp.body))
            return
        dup = st.duplicate_of(label, res, self.c.near_dup_distance if self.c.near_dup else -1)
        if dup is not None:
            reason, other = dup
            self._outcome(ledger, url, L.DUPLICATE, reason, dup_of=other, sha256=res.sha256)
            return
        st.add(key, label, res)
        ledger.set_state(url, L.ACCEPTED, sha256=res.sha256, pixel_sha256=res.pixel_sha256, phash=res.phash,
                         nbytes=len(resp.body), attempts=resp.attempts)
        sp = writer.species[label]
        writer.write(split, key, res.jpg, label, {
            "scientific_name": sp.scientific_name, "common_name": sp.common_name, "edibility": sp.edibility,
            "source": self.source.name, "url": url, "final_url": resp.url if resp.url != url else None,
            "sha256": res.sha256, "pixel_sha256": res.pixel_sha256, "width": res.width, "height": res.height,
        })
        self.run_counts["accepted"] += 1
        self.crash("written")

    def _outcome(self, ledger: L.Ledger, url: str, state: str, reason: str, **kw: Any) -> None:
        ledger.set_state(url, state, reason, **kw)
        self.run_counts[state] += 1
        self.run_counts[f"{state}:{reason}"] += 1

    # -- the run ---------------------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        t0 = time.monotonic()
        started = time.time()
        ledger = self._open_ledger()
        loop = asyncio.get_running_loop()
        pool = _start_pool(self.c.processes or os.cpu_count() or 1)
        self._install_signals(loop)
        writer: DatasetWriter | None = None
        try:
            async with Fetcher(FetchSettings.from_config(self.c)) as fetcher:
                found = await self.source.discover(fetcher)
                labels, species = self._plan(ledger, found)

                def on_closed(split: str, path: Path, keys: list[str]) -> None:
                    self.crash("closed")
                    ledger.mark_done_keys(keys)

                writer = DatasetWriter(self.out, labels, species, self.settings.writer, source=self.source.name,
                                       on_shard_closed=on_closed, resume=True)
                ledger.mark_done_keys(writer.keys)  # shards renamed before a crash let the ledger know
                ledger.replay(self.retry_failed)
                state = _DedupState(ledger.done_hashes())
                todo = list(ledger.photos(L.PENDING))
                await self._work(todo, fetcher, pool, state, writer, ledger)
            writer.close()  # closes the open shards (Ctrl-C too), then side files and manifest.json
        except BaseException:
            if writer is not None and not writer.closed:
                writer.abort()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self._remove_signals(loop)
        report = self._report(ledger, found, labels, started, time.monotonic() - t0, fetcher.stats)
        ledger.close()
        atomic_write_json(self.out / REPORT, report)
        return report

    async def _work(self, todo: list[Any], fetcher: Fetcher, pool: concurrent.futures.Executor,
                    state: _DedupState, writer: DatasetWriter, ledger: L.Ledger) -> None:
        queue: asyncio.Queue = asyncio.Queue()
        for row in todo:
            queue.put_nowait(row)
        bar = tqdm(total=len(todo), unit="img", desc="crawl", disable=not (self.c.progress and sys.stderr.isatty()))

        async def worker() -> None:
            while not self.stop.is_set():
                try:
                    row = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await self._one(row, fetcher, pool, state, writer, ledger)
                bar.update(1)

        tasks = [asyncio.create_task(worker()) for _ in range(min(self.c.concurrency, max(1, len(todo))))]
        stopper = asyncio.create_task(self.stop.wait())
        try:
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending | {stopper}, return_when=asyncio.FIRST_COMPLETED)
                for t in done - {stopper}:
                    t.result()  # a bug in one photo's path must surface, not vanish
                pending -= {stopper}
                if stopper in done:  # Ctrl-C: drop in-flight photos (they stay pending), keep what is written
                    self.interrupted = True
                    for t in pending:
                        t.cancel()
                    await asyncio.gather(*pending, return_exceptions=True)
                    break
        finally:
            stopper.cancel()
            bar.close()

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        def first(sig: int) -> None:
            print(f"\ncrawl: {signal.Signals(sig).name}: finishing the open shard; press again to abort",
                  file=sys.stderr)
            self.stop.set()
            self._remove_signals(loop)

        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, first, sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (tests) or not Unix
            pass

    @staticmethod
    def _remove_signals(loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass

    def _report(self, ledger: L.Ledger, found: Discovery, labels: list[str], started: float, duration: float,
                stats: Counter[str]) -> dict[str, Any]:
        by_state = ledger.counts()
        accepted = self.run_counts["accepted"]
        return {
            "source": self.spec,
            "mycodist_version": __version__,
            "worker": {"index": self.c.worker_index, "total": self.c.num_workers_total},
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "duration_s": round(duration, 3),
            "interrupted": self.interrupted,
            "species": len(labels),
            "photos": sum(by_state.values()),
            "by_state": dict(sorted(by_state.items())),
            "by_reason": ledger.reasons(),
            "discovery": {"pages": found.pages, "photo_urls": len(found.photos), "problems": dict(found.problems)},
            "this_run": {
                "accepted": accepted,
                "outcomes": {k: v for k, v in sorted(self.run_counts.items()) if k != "accepted"},
                "bytes_downloaded": self.bytes_in,
                "requests": stats["requests"],
                "retries": stats["retries"],
                "redirects": stats["redirects"],
                "images_per_s": round(accepted / duration, 2) if duration > 0 else 0.0,
            },
        }


def _worker_init() -> None:
    """Image workers die with the crawl (kill -9 must not leave orphans holding its pipes) and leave
    Ctrl-C to the crawl, which finishes the open shard."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _warm(_: int) -> int:
    time.sleep(0.05)
    return os.getpid()


def _start_pool(n: int) -> concurrent.futures.ProcessPoolExecutor:
    """Fork all workers up front, before the HTTP session starts any thread (forking is cheap and the
    workers share the parent's imported PIL)."""
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = concurrent.futures.ProcessPoolExecutor(n, mp_context=multiprocessing.get_context(method),
                                                  initializer=_worker_init)
    list(pool.map(_warm, range(n)))
    return pool


class _DedupState:
    """Hashes of every photo kept so far (closed shards + this run): same bytes or same pixels are one
    photo; with near-dup on, a close difference hash within the species is one too."""

    def __init__(self, done: list[tuple[str, str, str, str, int | None]]) -> None:
        self.by_sha: dict[str, str] = {}
        self.by_pixels: dict[str, str] = {}
        self.phashes: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for key, label, sha, pix, ph in done:
            self._remember(key, label, sha, pix, ph)

    def _remember(self, key: str, label: str, sha: str | None, pix: str | None, ph: int | None) -> None:
        if sha:
            self.by_sha.setdefault(sha, key)
        if pix:
            self.by_pixels.setdefault(pix, key)
        if ph is not None:
            self.phashes[label].append((ph, key))

    def add(self, key: str, label: str, res: ImageResult) -> None:
        self._remember(key, label, res.sha256, res.pixel_sha256, res.phash)

    def duplicate_of(self, label: str, res: ImageResult, near: int) -> tuple[str, str] | None:
        if res.sha256 in self.by_sha:
            return "same_bytes", self.by_sha[res.sha256]
        if res.pixel_sha256 in self.by_pixels:
            return "same_pixels", self.by_pixels[res.pixel_sha256]
        if near >= 0:
            for ph, key in self.phashes[label]:
                if hamming(ph, res.phash) <= near:
                    return "near_duplicate", key
        return None


def crawl(source: str, out_dir: str | Path, cfg: DictConfig, *, retry_failed: bool = False) -> dict[str, Any]:
    """Run one crawl to the end (or to Ctrl-C) and return its report."""
    return asyncio.run(Crawl(source, out_dir, CrawlSettings.from_config(cfg), retry_failed=retry_failed).run())
