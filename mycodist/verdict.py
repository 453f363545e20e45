"""The safety rules: calibrated probabilities + the species catalogue → one cautious verdict.

Pure functions, no torch, no I/O, so every rule can be tested exhaustively. Order matters and goes
from "we cannot say" to "as far as this photo goes, edible"; each step can only make the answer more
cautious than the next one. docs/safety.md explains each threshold. Shared base: serving answers with
these rules, and the export counts with them how often int8's verdicts equal fp32's (export/decision.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mycodist.catalog import EDIBLE, TOXIC, Species, slugify
from mycodist.errors import UsageError

NOT_IDENTIFIED = "not_identified"
POISONOUS = "poisonous"
DO_NOT_EAT = "do_not_eat"
INEDIBLE = "inedible"
EDIBLE_SPECIES = "edible_species"
VERDICT_CODES = (NOT_IDENTIFIED, POISONOUS, DO_NOT_EAT, INEDIBLE, EDIBLE_SPECIES)

WARNING = (
    "No photo identification makes a mushroom safe to eat. Never eat a wild mushroom on the strength of "
    "this or any app: have it checked in person by an expert (a mycological society or pharmacist). "
    "If someone may have eaten a poisonous mushroom, call your poison centre or emergency number now."
)


THRESHOLDS = ("min_confidence", "poison_mass", "lookalike_mass")


@dataclass(frozen=True)
class SafetyRules:
    """Thresholds of the rules; defaults and reasons live in configs/default.yaml (`serve` group).

    Checked on construction, so no entry point (serve, predict, benchmarks, tests) can run with a threshold
    outside [0, 1] or NaN: `poison_mass=5` would otherwise let 35% deadly mass through as edible.
    """

    min_confidence: float = 0.5
    poison_mass: float = 0.01
    lookalike_mass: float = 0.001
    unknown_is_toxic: bool = True
    require_lookalike_record: bool = True

    def __post_init__(self) -> None:
        for key in THRESHOLDS:
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
                raise ValueError(f"serve.{key} must be a finite number in [0, 1], got {v!r}")
        for key in ("unknown_is_toxic", "require_lookalike_record"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"serve.{key} must be true or false, got {getattr(self, key)!r}")

    @classmethod
    def from_config(cls, serve_cfg: Any) -> SafetyRules:
        """The `serve` group → rules; a bad value is a UsageError naming the key."""
        try:
            return cls(min_confidence=float(serve_cfg.min_confidence), poison_mass=float(serve_cfg.poison_mass),
                       lookalike_mass=float(serve_cfg.lookalike_mass),
                       unknown_is_toxic=_flag(serve_cfg.unknown_is_toxic, "unknown_is_toxic"),
                       require_lookalike_record=_flag(serve_cfg.get("require_lookalike_record", True),
                                                      "require_lookalike_record"))
        except (TypeError, ValueError) as e:
            raise UsageError(str(e) if str(e).startswith("serve.") else f"bad safety threshold in serve: {e}") from None


def _flag(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"serve.{key} must be true or false, got {value!r}")


@dataclass(frozen=True)
class Verdict:
    code: str
    message: str
    reasons: tuple[str, ...] = field(default=())  # "rule: detail" for every rule that fired
    lookalikes: tuple[dict[str, Any], ...] = field(default=())  # the top species' known lookalikes

    @property
    def rules(self) -> tuple[str, ...]:
        return tuple(r.split(":", 1)[0] for r in self.reasons)

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "reasons": list(self.reasons), "rules": list(self.rules),
                "lookalikes": [dict(x) for x in self.lookalikes]}


def edibility_of(label: str, species: Mapping[str, Species]) -> str:
    """The recorded edibility; a label the catalogue does not know is `unknown`."""
    s = species.get(label)
    return s.edibility if s is not None else "unknown"


def is_toxic(edibility: str, unknown_is_toxic: bool) -> bool:
    return edibility in TOXIC or (unknown_is_toxic and edibility == "unknown")


def display_name(label: str, species: Mapping[str, Species]) -> str:
    s = species.get(label)
    if s is None:
        return label
    if s.common_name and s.scientific_name:
        return f"{s.common_name} ({s.scientific_name})"
    return s.common_name or s.scientific_name or label


def toxic_mass(probs: Sequence[float], labels: Sequence[str], species: Mapping[str, Species],
               unknown_is_toxic: bool = True) -> float:
    """Total probability held by species that are (or, if unrecorded, may be) poisonous or deadly."""
    return float(sum(p for p, lab in zip(probs, labels, strict=True) if is_toxic(edibility_of(lab, species), unknown_is_toxic)))


def _resolve(name: str, species: Mapping[str, Species], index: Mapping[str, int]) -> str:
    if name in index or name in species:
        return name
    try:
        return slugify(name)
    except UsageError:  # an entry with no letters: nothing to match
        return ""


def linked_lookalikes(top: str, species: Mapping[str, Species], index: Mapping[str, int]) -> list[str]:
    """Lookalikes of `top` read both ways: those it lists and every species that lists it. A one-way link
    (only the deadly species names the edible one) must protect the edible answer just the same."""
    s = species.get(top)
    found = [_resolve(n, species, index) for n in (s.lookalikes if s else [])]
    found += [lab for lab, other in species.items() if lab != top
              and any(_resolve(n, species, index) == top for n in other.lookalikes)]
    return [lab for lab in dict.fromkeys(found) if lab and lab != top]


def lookalike_report(top: str, probs: Sequence[float], labels: Sequence[str],
                     species: Mapping[str, Species]) -> list[dict[str, Any]]:
    """Every known lookalike of `top`: names, edibility (the catalogue's, else the reference note's), the
    syndrome, the features that tell them apart, the citation, and the probability it holds (None when it
    is not one of the model's classes). Most dangerous and most probable first."""
    index = {lab: i for i, lab in enumerate(labels)}
    s = species.get(top)
    notes = s.lookalike_notes if s else {}
    out = []
    for lab in linked_lookalikes(top, species, index):
        other = species.get(lab)
        note = dict(notes.get(lab) or {})
        if other is not None and not note.get("features"):
            note = {**(other.lookalike_notes.get(top) or {}), **{k: v for k, v in note.items() if v}}
        edib = other.edibility if other is not None else note.get("edibility") or "unknown"
        out.append({"label": lab, "scientific_name": (other.scientific_name if other else "") or note.get(
                    "scientific_name", ""), "common_name": other.common_name if other else "", "edibility": edib,
                    "syndrome": note.get("syndrome", ""), "features": note.get("features", ""),
                    "citation": note.get("citation", ""), "in_classes": lab in index,
                    "probability": float(probs[index[lab]]) if lab in index else None})
    rank = {"deadly": 0, "poisonous": 1, "unknown": 2}
    out.sort(key=lambda x: (rank.get(x["edibility"], 3), -(x["probability"] or 0.0)))
    return out


def lookalike_hazards(top: str, probs: Sequence[float], labels: Sequence[str], species: Mapping[str, Species],
                      rules: SafetyRules) -> list[str]:
    """Reasons why a lookalike of `top` (either direction of the link) forbids eating it.

    A toxic lookalike counts when it holds at least `lookalike_mass`, or when it is not one of the model's
    classes at all: then the model has never learned to tell the two apart, so its silence proves nothing.
    """
    hazards: list[str] = []
    for x in lookalike_report(top, probs, labels, species):
        edib = x["edibility"]
        if not is_toxic(edib, rules.unknown_is_toxic):
            continue
        who = display_name(x["label"], species) if x["label"] in species else (x["scientific_name"] or x["label"])
        kind = edib if edib in TOXIC else "of unrecorded edibility"
        if not x["in_classes"]:
            hazards.append(f"its lookalike {who} is {kind} and the model cannot tell them apart (not among its classes)")
        elif x["probability"] >= rules.lookalike_mass:
            hazards.append(f"its lookalike {who} is {kind} and holds {x['probability']:.1%} of the probability")
    return hazards


def decide(probs: Sequence[float], labels: Sequence[str], species: Mapping[str, Species], rules: SafetyRules,
           out_of_distribution: bool = False, uncalibrated: str = "") -> Verdict:
    """Every rule is evaluated and named in `reasons`; the verdict is the most cautious one that fired, in
    the order not_identified, poisonous, inedible, do_not_eat, edible_species.

    `probs` are calibrated (temperature-scaled) class probabilities in the order of `labels`.
    `uncalibrated` (why the export lacks calibration or OOD statistics; "" when it has both) caps the
    answer at do_not_eat. An `unknown` edibility never yields edible_species, whatever the thresholds.
    """
    if len(probs) != len(labels) or not labels:
        raise ValueError(f"{len(probs)} probabilities for {len(labels)} labels")
    if any(not math.isfinite(p) for p in probs):
        return Verdict(NOT_IDENTIFIED, "Not identified: the model gave no usable answer for this photo.",
                       ("non_finite: non-finite probabilities",))
    i_top = max(range(len(probs)), key=probs.__getitem__)
    top, p_top = labels[i_top], float(probs[i_top])
    name = display_name(top, species)
    edib = edibility_of(top, species)
    mass = toxic_mass(probs, labels, species, rules.unknown_is_toxic)
    looks = tuple(lookalike_report(top, probs, labels, species))
    fired: list[tuple[str, str]] = []  # (rule, detail)
    if out_of_distribution:
        fired.append(("out_of_distribution", "this photo does not look like the mushroom photos the model knows"))
    if p_top < rules.min_confidence:
        fired.append(("min_confidence", f"top probability {p_top:.4f} < min_confidence {rules.min_confidence}"))
    if edib in TOXIC:
        fired.append(("top_toxic", f"the most likely species, {name}, is recorded as {edib}"))
    elif edib == "inedible":
        fired.append(("top_inedible", f"the most likely species, {name}, is recorded as inedible"))
    elif edib not in EDIBLE:
        fired.append(("top_unknown", f"the most likely species, {name}, has no recorded edibility"))
    if mass >= rules.poison_mass:
        fired.append(("poison_mass", f"poisonous species together hold {mass:.1%} of the probability "
                                     f"(limit {rules.poison_mass:.1%})"))
    fired += [("toxic_lookalike", h) for h in lookalike_hazards(top, probs, labels, species, rules)]
    s = species.get(top)
    if rules.require_lookalike_record and edib in EDIBLE and not (s and s.lookalike_record) and not looks:
        fired.append(("no_lookalike_record", f"no source records the lookalikes of {name}, and absence of data is "
                                             "not evidence of safety"))
    if uncalibrated:
        fired.append(("uncalibrated", f"the model is uncalibrated ({uncalibrated}), so its probabilities cannot "
                                      "rule out a toxic species"))
    conflict = _conflict_text(s)
    if conflict:
        fired.append(("edibility_conflict", conflict))
    reasons = tuple(f"{rule}: {detail}" for rule, detail in fired)
    rules_fired = {rule for rule, _ in fired}
    details = [d for r, d in fired if r in ("poison_mass", "toxic_lookalike", "no_lookalike_record", "uncalibrated")]

    def verdict(code: str, message: str) -> Verdict:
        return Verdict(code, message, reasons, looks)

    if "out_of_distribution" in rules_fired:
        return verdict(NOT_IDENTIFIED, "Not identified: this photo does not look like the mushroom photos the model "
                       "knows. Do not eat it.")
    if "min_confidence" in rules_fired:
        return verdict(NOT_IDENTIFIED, f"Not identified: the best match, {name}, holds only {p_top:.0%} of the "
                       f"probability (at least {rules.min_confidence:.0%} needed). Do not eat it.")
    if edib in TOXIC:
        return verdict(POISONOUS, f"Poisonous: the most likely species, {name} ({p_top:.0%}), is recorded as {edib}. "
                       "Do not eat it.")
    if edib == "inedible":
        extra = f" Poisonous species also hold {mass:.1%} of the probability." if mass >= rules.poison_mass else ""
        return verdict(INEDIBLE, f"Inedible: the most likely species, {name} ({p_top:.0%}), is recorded as inedible. "
                       f"Do not eat it.{extra}")
    if edib not in EDIBLE:
        return verdict(DO_NOT_EAT, f"Do not eat: the most likely species, {name} ({p_top:.0%}), has no recorded "
                       "edibility.")
    if details:
        return verdict(DO_NOT_EAT, f"Do not eat: the most likely species, {name} ({p_top:.0%}), is recorded as "
                       f"{edib}, but " + "; ".join(details) + ".")
    return verdict(EDIBLE_SPECIES, f"Edible species: the most likely species, {name} ({p_top:.0%}), is recorded as "
                   f"{edib} and no poisonous species holds noticeable probability. This is not a safety check: "
                   "deadly species can look exactly like it.")


def _conflict_text(s: Species | None) -> str:
    """The sources' disagreement on edibility, when there is one (the most dangerous level is the one used)."""
    if s is None:
        return ""
    known = {src: lv for src, lv in s.edibility_sources.items() if lv in EDIBLE | TOXIC | {"inedible"}}
    if len(set(known.values())) < 2:
        return ""
    said = ", ".join(f"{src} says {lv}" for src, lv in sorted(known.items()))
    return f"sources disagree on the edibility of {display_name(s.label, {s.label: s})} ({said}); the most dangerous, " \
           f"{s.edibility}, is used"
