"""The species catalogue every stage shares: names, family, edibility, lookalikes.

Files (the shard contract, docs/shards.md):
- `class_indices.json`: `{"0": "agaricus_arvensis", ...}` (the original project's format);
- `species.json`: `{label: {scientific_name, common_name, family, edibility, lookalikes, source, ...}}`.

`lookalike_notes`, `lookalike_record` and `edibility_sources` are filled by mycodist.lookalikes when a
catalogue is merged with the reference of dangerous confusions (docs/lookalikes.md).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mycodist.atomic import atomic_write_json
from mycodist.errors import UsageError

# Ordered from safest to most dangerous; `unknown` is what a source that states nothing gives.
EDIBILITY = ("choice", "edible", "inedible", "poisonous", "deadly", "unknown")
EDIBLE = frozenset({"choice", "edible"})
TOXIC = frozenset({"poisonous", "deadly"})

CLASS_INDICES = "class_indices.json"
SPECIES = "species.json"


def slugify(name: str) -> str:
    """`Agaricus arvensis` → `agaricus_arvensis`; accents folded, anything else to `_`."""
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    if not slug:
        raise UsageError(f"cannot make a label from the name {name!r}: it has no letters or digits")
    return slug


def normalize_edibility(text: str | None) -> str:
    """Map a site's free-text edibility ('Edible and good', 'Deadly poisonous', ...) to a level."""
    if not text:
        return "unknown"
    t = text.strip().lower()
    if t in EDIBILITY:
        return t
    if any(w in t for w in ("deadly", "lethal", "fatal")):
        return "deadly"
    if any(w in t for w in ("poison", "toxic")):
        return "poisonous"
    if any(w in t for w in ("inedible", "not edible", "unpalatable")):
        return "inedible"
    if "choice" in t or "excellent" in t:
        return "choice"
    if "edible" in t:
        return "edible"
    return "unknown"


FIELDS = ("scientific_name", "common_name", "family", "edibility", "lookalikes", "source", "facts", "lookalike_notes",
          "lookalike_record", "edibility_sources")


@dataclass
class Species:
    label: str
    scientific_name: str
    common_name: str
    family: str = ""
    edibility: str = "unknown"
    lookalikes: list[str] = field(default_factory=list)
    source: str = ""
    facts: dict[str, Any] = field(default_factory=dict)  # location, dimensions, description, ...
    # per lookalike label: {scientific_name, edibility, syndrome, features, citation, source}
    lookalike_notes: dict[str, dict[str, str]] = field(default_factory=dict)
    lookalike_record: str = ""  # where the lookalike list comes from; "" = nobody recorded any
    edibility_sources: dict[str, str] = field(default_factory=dict)  # source → level it gave

    def __post_init__(self) -> None:
        if self.edibility not in EDIBILITY:
            raise ValueError(f"edibility {self.edibility!r} of {self.label!r} is not one of {EDIBILITY}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("label")
        return d

    @classmethod
    def from_json(cls, label: str, d: Mapping[str, Any]) -> Species:
        known = {k: d[k] for k in FIELDS if k in d}
        known.setdefault("scientific_name", "")
        known.setdefault("common_name", "")
        return cls(label=label, **known)


def save_class_indices(path: str | Path, labels: Iterable[str]) -> None:
    atomic_write_json(path, {str(i): lab for i, lab in enumerate(labels)})


def load_class_indices(path: str | Path) -> list[str]:
    """Read `{"0": label, ...}` into a list indexed by class; gaps or duplicates are errors."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read class indices '{path}': {e}") from None
    try:
        pairs = sorted((int(k), str(v)) for k, v in raw.items())
    except (AttributeError, ValueError):
        raise UsageError(f"'{path}' must map class numbers to labels, like {{\"0\": \"agaricus_arvensis\"}}") from None
    labels = [v for _, v in pairs]
    if [k for k, _ in pairs] != list(range(len(pairs))):
        raise UsageError(f"'{path}': class numbers must run 0..{len(pairs) - 1} without gaps")
    if len(set(labels)) != len(labels):
        raise UsageError(f"'{path}': a label appears under two class numbers")
    return labels


def save_species(path: str | Path, species: Iterable[Species]) -> None:
    atomic_write_json(path, {s.label: s.to_json() for s in species})


def load_species(path: str | Path) -> dict[str, Species]:
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read species catalogue '{path}': {e}") from None
    return {label: Species.from_json(label, d) for label, d in raw.items()}
