"""`mycodist <command>`: argument parsing and dispatch only.

Each command lives in its stage's package as a module with `add_arguments(parser)` and
`main(args, cfg) -> int`; it is imported only when chosen, so `mycodist crawl` never loads torch.
Every command takes `--config FILE` and trailing `key=value` overrides (see docs/config.md).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from mycodist import __version__
from mycodist.config import load_config, split_overrides
from mycodist.errors import UsageError

# name → (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("mycodist.synth.cli", "generate the embedded photo-like mushroom data set"),
    "ingest": ("mycodist.shards.ingest", "turn a class-folder image tree into shards"),
    "verify": ("mycodist.shards.verify", "check every shard against its manifest"),
    "stats": ("mycodist.shards.stats", "image-size and class-balance report of a data set"),
    "crawl": ("mycodist.crawl.cli", "collect photos and species facts into shards"),
    "mock-site": ("mycodist.crawl.mock_site", "serve the synthetic species as a local copy of the sites"),
    "merge-manifests": ("mycodist.shards.merge", "join the outputs of several crawl workers"),
    "data": ("mycodist.data.cli", "plan how shards stream to W ranks (`data plan`)"),
    "train": ("mycodist.train.cli", "start training on N local processes with the right launcher"),
    "export": ("mycodist.export.cli", "write RUN_DIR/export for predict and serve"),
    "predict": ("mycodist.serve.predict", "top-k species for images, one JSON line each"),
    "serve": ("mycodist.serve.app", "web page and JSON API for photo → species and edibility"),
    "bench-comm": ("mycodist.profile.bench_comm", "measure collectives' time and bus bandwidth"),
}


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mycodist",
        description="Distributed training framework for mushroom photo classification.",
        epilog="Run `mycodist COMMAND --help` for a command's options.",
    )
    p.add_argument("--version", action="version", version=f"mycodist {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        top = _top_parser()
        if not argv or argv[0].startswith("-"):
            top.parse_args(argv or ["--help"])
            return 0
        top.error(f"unknown command '{argv[0]}'; choose one of: {', '.join(COMMANDS)}")
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"mycodist {name}", description=COMMANDS[name][1],
                                     epilog="Trailing key=value items override config keys (docs/config.md).")
    parser.add_argument("--config", metavar="FILE", help="YAML merged over configs/default.yaml")
    module.add_arguments(parser)
    rest, overrides = split_overrides(argv[1:])
    args = parser.parse_args(rest)
    args.overrides = overrides
    try:
        cfg = load_config(args.config, overrides)
        return int(module.main(args, cfg) or 0)
    except UsageError as e:
        print(f"mycodist {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mycodist {name}: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
