"""`mycodist verify OUT`: check every shard against the manifest and every sample against the contract.

Exit 0 when the data set is complete and consistent; otherwise exit 1 with one line per problem, so a
corrupted or half-written data set is caught before hours of training read it.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig
from PIL import Image
from tqdm import tqdm

from mycodist.atomic import TMP_PREFIX
from mycodist.catalog import EDIBILITY, SPECIES, load_species
from mycodist.errors import UsageError
from mycodist.shards.manifest import MANIFEST, check_manifest
from mycodist.shards.tarshard import KEY_RE, iter_samples, list_shards
from mycodist.shards.writer import REQUIRED_META

MAX_LISTED = 50  # problems printed in full; the rest are counted


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="data-set folder holding manifest.json and the shards")
    parser.add_argument("--no-decode", action="store_true", help="skip decoding every JPEG (faster, weaker)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def verify_dataset(root: str | Path, *, decode: bool = True, progress: bool = False) -> list[str]:
    """Every problem found in the data set at `root`, as readable one-line messages ([] = valid)."""
    root = Path(root)
    manifest, problems = check_manifest(root, check_files=True, check_hashes=True)
    if manifest is None:
        return problems
    listed = {s.file for s in manifest.shards}
    for path in list_shards(root):
        if path.name not in listed:
            problems.append(f"{path.name}: a shard file the manifest does not list (a glob would read it)")
    for p in sorted(root.glob(TMP_PREFIX + "*")):
        problems.append(f"{p.name}: unfinished temporary file left by an interrupted writer (delete it)")
    try:
        species = load_species(root / SPECIES)
    except UsageError as e:
        species = {}
        problems.append(str(e))
    missing_species = [lab for lab in manifest.labels if lab not in species]
    if missing_species:
        problems.append(f"{SPECIES} lacks labels {missing_species[:5]}")
    seen_keys: dict[str, str] = {}
    bar = tqdm(total=manifest.samples(), unit="img", desc="verify", disable=not progress, file=sys.stderr)
    for shard in manifest.shards:
        if not shard.path.is_file():
            continue  # already reported
        count = 0
        try:
            for key, members in iter_samples(shard.path):
                count += 1
                bar.update(1)
                where = f"{shard.file}:{key}"
                if key in seen_keys:
                    problems.append(f"{where}: key also in {seen_keys[key]}")
                seen_keys[key] = shard.file
                problems.extend(f"{where}: {p}" for p in _check_sample(key, members, manifest.labels, decode))
        except (tarfile.TarError, OSError, EOFError) as e:
            problems.append(f"{shard.file}: not a readable tar ({e})")
            continue
        if count != shard.samples:
            problems.append(f"{shard.file}: {count} samples, manifest says {shard.samples}")
    bar.close()
    return problems


def _check_sample(key: str, members: dict[str, bytes], labels: list[str], decode: bool) -> Iterator[str]:
    if not KEY_RE.match(key):
        yield "key is not letters, digits, '_' or '-'"
    absent = [ext for ext in ("jpg", "cls", "json") if ext not in members]
    if absent:
        yield f"missing member(s) {', '.join(absent)}"
    extra = sorted(set(members) - {"jpg", "cls", "json"})
    if extra:
        yield f"unexpected member(s) {', '.join(extra)}"
    cls = None
    if "cls" in members:
        text = members["cls"].decode("ascii", "replace").strip()
        if not text.isdigit() or int(text) >= len(labels):
            yield f"cls {text!r} is not a class number in 0..{len(labels) - 1}"
        else:
            cls = int(text)
    record = None
    if "json" in members:
        try:
            record = json.loads(members["json"])
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError) as e:
            yield f"json unreadable ({e})"
            record = None
    if record is not None:
        lacking = [k for k in REQUIRED_META if k not in record]
        if lacking:
            yield f"json lacks {', '.join(lacking)}"
        if cls is not None and record.get("label") != labels[cls]:
            yield f"json label {record.get('label')!r} but cls {cls} is {labels[cls]!r}"
        if "edibility" in record and record["edibility"] not in EDIBILITY:
            yield f"edibility {record['edibility']!r} not one of {EDIBILITY}"
    if "jpg" in members:
        try:
            with Image.open(io.BytesIO(members["jpg"])) as im:
                if im.format != "JPEG" or im.mode != "RGB":
                    yield f"jpg is {im.format} {im.mode}, not an RGB JPEG"
                size = im.size
                if decode:
                    im.load()
            if record is not None and (record.get("width"), record.get("height")) != size:
                yield f"json says {record.get('width')}x{record.get('height')}, image is {size[0]}x{size[1]}"
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            yield f"jpg does not decode ({e})"


def main(args: argparse.Namespace, cfg: DictConfig) -> int:
    root = Path(args.out)
    if not root.is_dir():
        raise UsageError(f"'{root}' is not a folder; give the data-set folder that holds {MANIFEST}")
    problems = verify_dataset(root, decode=not args.no_decode, progress=not args.quiet)
    if not problems:
        manifest, _ = check_manifest(root, check_files=False)
        assert manifest is not None
        print(f"OK {root}: {len(manifest.shards)} shards, {manifest.samples()} samples, "
              f"{len(manifest.labels)} classes")
        return 0
    print(f"FAILED {root}: {len(problems)} problem(s)", file=sys.stderr)
    for p in problems[:MAX_LISTED]:
        print(f"  - {p}", file=sys.stderr)
    if len(problems) > MAX_LISTED:
        print(f"  ... and {len(problems) - MAX_LISTED} more", file=sys.stderr)
    return 1
