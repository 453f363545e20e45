"""`mycodist crawl SOURCE --out DIR [crawl.* overrides]` (docs/crawling.md)."""

from __future__ import annotations

import argparse
import json

from omegaconf import DictConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="mushroomworld | wildfooduk | manifest:PATH (CSV/TSV/JSONL/Parquet URL list)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder: shards, manifest.json, crawl_report.json, .crawl/ledger.sqlite")
    parser.add_argument("--retry-failed", action="store_true",
                        help="also replay URLs that failed (network/HTTP) in earlier runs")


def main(args: argparse.Namespace, cfg: DictConfig) -> int:
    from mycodist.crawl.crawler import REPORT, crawl  # aiohttp and the writer load only when crawling

    report = crawl(args.source, args.out, cfg, retry_failed=args.retry_failed)
    run = report["this_run"]
    print(f"crawl: {run['accepted']} new images in {report['duration_s']:.1f}s ({run['images_per_s']} img/s); "
          f"all runs: {json.dumps(report['by_state'])}; report: {args.out}/{REPORT}")
    if report["interrupted"]:
        return 130
    return 0 if report["by_state"].get("done", 0) > 0 else 1
