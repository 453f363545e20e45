"""The reference of dangerous confusions, and the one merge every stage applies to its catalogue.

Why: a site or a folder name says what a species is, rarely what it is mistaken for, and sometimes gets
its edibility wrong. The curated reference (mycodist/reference/, schema in docs/lookalikes.md) records
pairs "sought species ↔ toxic lookalike" with the syndrome, the features that tell them apart and a
citation, plus the edibility of every species it names. `merge_catalogue` joins any catalogue with it:

- names are matched by normalised binomial (`binomial_key`), through the reference's synonyms;
- lookalike links are made symmetric (A lists B ⇒ B lists A);
- when sources disagree on edibility the most dangerous wins, and every source's level stays in
  `Species.edibility_sources` (the disagreement is shown by `mycodist stats` and the API);
- each species keeps what the reference says about each lookalike (`Species.lookalike_notes`), so a
  lookalike that is not one of the model's classes still has a known danger;
- `Species.lookalike_record` says where the lookalike list comes from ("" = nobody ever looked, which
  serving treats as a reason not to call the species edible).

Merging is idempotent, so crawl/ingest and export can both apply it.
"""

from __future__ import annotations

import csv
import io
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mycodist.atomic import atomic_write_text
from mycodist.catalog import EDIBILITY, Species, slugify
from mycodist.errors import UsageError

REFERENCE_DIR = Path(__file__).parent / "reference"
BUILTIN = REFERENCE_DIR / "lookalikes.csv"
BUILTIN_SYNONYMS = REFERENCE_DIR / "synonyms.csv"
COLUMNS = ("sought", "sought_edibility", "lookalike", "lookalike_edibility", "syndrome", "features", "citation")
# Danger rank of the known levels; `unknown` says nothing and never outranks a known level.
DANGER = {"choice": 0, "edible": 1, "inedible": 2, "poisonous": 3, "deadly": 4}
_QUALIFIERS = {"cf", "aff", "sp", "spp", "ssp", "subsp", "var", "f", "agg", "s.l", "s.s", "sensu"}


def binomial_key(name: str) -> str:
    """'Amanita phalloides (Vaill. ex Fr.) Link' / 'amanita_phalloides' / 'AMANITA  Phalloides' →
    'amanita_phalloides'; a single word stays one word; '' when there is no letter."""
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii").lower()
    text = re.sub(r"\([^)]*\)", " ", text).replace("_", " ")
    words = [w for w in re.findall(r"[a-z][a-z\-]*\.?", text) if w.rstrip(".") not in _QUALIFIERS]
    words = [w.rstrip(".") for w in words if not w.endswith(".")]  # abbreviated authors ("Fr.", "L.")
    return "_".join(words[:2])


def most_dangerous(levels: Iterable[str]) -> str:
    """The most dangerous known level; `unknown` only when no level is known."""
    known = [lv for lv in levels if lv in DANGER]
    return max(known, key=DANGER.__getitem__) if known else "unknown"


def edibility_conflict(s: Species) -> dict[str, str]:
    """The sources' levels when they disagree (two or more distinct known levels), else {}."""
    known = {src: lv for src, lv in s.edibility_sources.items() if lv in DANGER}
    return dict(known) if len(set(known.values())) > 1 else {}


@dataclass(frozen=True)
class Pair:
    sought: str          # binomial keys
    lookalike: str
    syndrome: str
    features: str
    citation: str


@dataclass
class Reference:
    """Species names, edibility and lookalike pairs, by accepted binomial key."""

    names: dict[str, str] = field(default_factory=dict)        # key → scientific name as written
    edibility: dict[str, str] = field(default_factory=dict)    # key → most dangerous level recorded
    edibility_by: dict[str, dict[str, str]] = field(default_factory=dict)  # key → {origin: level}
    pairs: list[Pair] = field(default_factory=list)
    none_known: dict[str, str] = field(default_factory=dict)   # key → citation of "no dangerous lookalike"
    synonyms: dict[str, str] = field(default_factory=dict)     # synonym key → accepted key

    def accepted(self, name: str) -> str:
        key = binomial_key(name)
        return self.synonyms.get(key, key)

    def pairs_of(self, key: str) -> list[tuple[str, Pair]]:
        """(the other species' key, pair) for every pair naming `key`, either side."""
        return [(p.lookalike if p.sought == key else p.sought, p) for p in self.pairs if key in (p.sought, p.lookalike)]

    def add(self, other: Reference) -> None:
        self.synonyms.update(other.synonyms)
        self.names.update({k: v for k, v in other.names.items() if k not in self.names})
        for key, by in other.edibility_by.items():
            self.edibility_by.setdefault(key, {}).update(by)
            self.edibility[key] = most_dangerous(self.edibility_by[key].values())
        self.pairs += [p for p in other.pairs if p not in self.pairs]
        self.none_known.update({k: v for k, v in other.none_known.items() if k not in self.none_known})


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise UsageError(f"cannot read lookalike reference '{path}': {e.strerror or e}") from None
    return list(csv.DictReader(io.StringIO(text)))


def read_synonyms(path: Path) -> dict[str, str]:
    rows = _read_csv(path)
    out = {}
    for i, row in enumerate(rows, 2):
        name, accepted = (row.get("name") or "").strip(), (row.get("accepted") or "").strip()
        if not binomial_key(name) or not binomial_key(accepted):
            raise UsageError(f"'{path}' line {i}: needs columns name,accepted with a scientific name in each")
        out[binomial_key(name)] = binomial_key(accepted)
    return out


def read_reference(path: str | Path, synonyms: Mapping[str, str] | None = None) -> Reference:
    """One reference CSV (docs/lookalikes.md)."""
    path = Path(path)
    rows = _read_csv(path)
    if rows and set(COLUMNS) - set(rows[0]):
        raise UsageError(f"'{path}' lacks columns {sorted(set(COLUMNS) - set(rows[0]))}; expected {','.join(COLUMNS)}")
    return reference_from_rows(rows, path.name, synonyms, where=f"'{path}'")


def reference_from_rows(rows: Iterable[Mapping[str, str]], origin: str, synonyms: Mapping[str, str] | None = None,
                        where: str = "reference") -> Reference:
    """Reference rows → Reference. Every row needs a sought species, its edibility and a citation; a row
    without a lookalike records "no dangerous lookalike known". Errors name the line."""
    ref = Reference(synonyms=dict(synonyms or {}))
    origin = f"reference:{origin}"
    for i, raw in enumerate(rows, 2):
        row = {k: (raw.get(k) or "").strip() for k in COLUMNS}
        at = f"{where} line {i}"
        if not row["citation"]:
            raise UsageError(f"{at}: every row needs a citation")
        keys = []
        for name_col, edib_col in (("sought", "sought_edibility"), ("lookalike", "lookalike_edibility")):
            name, level = row[name_col], row[edib_col].lower()
            if not name and name_col == "lookalike":
                keys.append("")
                continue
            key = ref.accepted(name)
            if not key:
                raise UsageError(f"{at}: {name_col} {name!r} is not a scientific name")
            if level not in EDIBILITY:
                raise UsageError(f"{at}: {edib_col} {level!r} is not one of {', '.join(EDIBILITY)}")
            before = ref.edibility_by.get(key, {}).get(origin)
            if before is not None and before != level:
                raise UsageError(f"{at}: {name} is {level} here but {before} on an earlier line")
            ref.names.setdefault(key, name)
            ref.edibility_by.setdefault(key, {})[origin] = level
            ref.edibility[key] = most_dangerous(ref.edibility_by[key].values())
            keys.append(key)
        sought, look = keys
        if not look:
            ref.none_known[sought] = row["citation"]
        elif look == sought:
            raise UsageError(f"{at}: a species cannot be its own lookalike")
        else:
            ref.pairs.append(Pair(sought, look, row["syndrome"], row["features"], row["citation"]))
    return ref


def load_references(extra: Sequence[str | Path] = ()) -> Reference:
    """The packaged reference plus `extra` CSV files (config `catalog.references`), in that order."""
    synonyms = read_synonyms(BUILTIN_SYNONYMS)
    ref = read_reference(BUILTIN, synonyms)
    for path in extra:
        if not Path(path).is_file():
            raise UsageError(f"lookalike reference '{path}' (catalog.references) does not exist")
        ref.add(read_reference(path, synonyms))
    return ref


def reference_from_config(cfg: Any) -> Reference:
    """`load_references(cfg.catalog.references)`; a config without the group gets the packaged reference."""
    group = cfg.get("catalog") if hasattr(cfg, "get") else None
    extra = list(group.get("references") or []) if group is not None else []
    return load_references([str(p) for p in extra])


def write_reference(path: str | Path, rows: Iterable[Mapping[str, str]]) -> None:
    """Write reference rows (COLUMNS) atomically, e.g. the synthetic catalogue's pairs."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: row.get(k, "") for k in COLUMNS})
    atomic_write_text(path, buf.getvalue())


# ---- the merge ---------------------------------------------------------------------------------
def _key_of(s: Species, ref: Reference) -> str:
    return ref.accepted(s.scientific_name) if binomial_key(s.scientific_name) else ref.accepted(s.label)


def _note(name: str, edibility: str, pair: Pair | None, source: str) -> dict[str, str]:
    return {"scientific_name": name, "edibility": edibility, "syndrome": pair.syndrome if pair else "",
            "features": pair.features if pair else "", "citation": pair.citation if pair else "", "source": source}


def merge_catalogue(species: Mapping[str, Species] | Iterable[Species], ref: Reference) -> dict[str, Species]:
    """A copy of `species` joined with `ref` (module docstring). Labels and classes never change; only
    edibility (more dangerous, never less), lookalikes, their notes and the record fields are added."""
    items = list(species.values()) if isinstance(species, Mapping) else list(species)
    out = {s.label: Species.from_json(s.label, s.to_json()) for s in items}
    label_of: dict[str, str] = {}
    for s in out.values():
        for key in {_key_of(s, ref), ref.accepted(s.label)}:
            label_of.setdefault(key, s.label)

    def target(name: str) -> tuple[str, str]:
        """A lookalike entry (label or name) → (label to list, accepted key)."""
        if name in out:
            return name, _key_of(out[name], ref)
        key = ref.accepted(name)
        if not key:
            return "", ""
        return label_of.get(key, slugify(key)), key

    for s in out.values():
        key = _key_of(s, ref)
        if not s.edibility_sources:
            s.edibility_sources = {s.source or "catalogue": s.edibility}
        s.edibility_sources.update(ref.edibility_by.get(key, {}))
        s.edibility = most_dangerous(s.edibility_sources.values())
        listed = []
        for name in s.lookalikes:
            lab, k = target(name)
            if lab and lab != s.label:
                listed.append(lab)
                if lab not in out and lab not in s.lookalike_notes:
                    s.lookalike_notes[lab] = _note(ref.names.get(k, name), ref.edibility.get(k, "unknown"), None,
                                                   s.source or "catalogue")
        if listed and not s.lookalike_record:
            s.lookalike_record = f"listed by {s.source or 'the catalogue'}"
        for other, pair in ref.pairs_of(key):
            lab = label_of.get(other, slugify(other))
            listed.append(lab)
            s.lookalike_notes[lab] = _note(ref.names.get(other, other), ref.edibility.get(other, "unknown"), pair,
                                           "reference")
            s.lookalike_record = s.lookalike_record or f"reference: {pair.citation}"
        if key in ref.none_known and not s.lookalike_record:
            s.lookalike_record = f"no dangerous lookalike known: {ref.none_known[key]}"
        s.lookalikes = list(dict.fromkeys(listed))
    # symmetric links: B gets A wherever A lists B
    for s in list(out.values()):
        for lab in s.lookalikes:
            other = out.get(lab)
            if other is None or s.label in other.lookalikes:
                continue
            other.lookalikes.append(s.label)
            note = s.lookalike_notes.get(lab, {})
            other.lookalike_notes.setdefault(s.label, {**_note(s.scientific_name, s.edibility, None, "link"),
                                                       **{k: note.get(k, "") for k in ("syndrome", "features", "citation")}})
            other.lookalike_record = other.lookalike_record or f"linked from {s.label}"
    # notes of lookalikes that are classes carry the merged edibility, so a note never reads safer
    for s in out.values():
        for lab, note in s.lookalike_notes.items():
            if lab in out:
                note["edibility"] = out[lab].edibility
    return out
