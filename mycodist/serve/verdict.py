"""The safety rules: calibrated probabilities + the species catalogue → one cautious verdict.

Pure functions, no torch, no I/O, so every rule can be tested exhaustively. Order matters and goes
from "we cannot say" to "as far as this photo goes, edible"; each step can only make the answer more
cautious than the next one. docs/safety.md explains each threshold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mycodist.catalog import EDIBLE, TOXIC, Species, slugify

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


@dataclass(frozen=True)
class SafetyRules:
    """Thresholds of the rules; defaults and reasons live in configs/default.yaml (`serve` group)."""

    min_confidence: float = 0.5
    poison_mass: float = 0.01
    lookalike_mass: float = 0.001
    unknown_is_toxic: bool = True

    @classmethod
    def from_config(cls, serve_cfg: Any) -> SafetyRules:
        return cls(
            min_confidence=float(serve_cfg.min_confidence),
            poison_mass=float(serve_cfg.poison_mass),
            lookalike_mass=float(serve_cfg.lookalike_mass),
            unknown_is_toxic=bool(serve_cfg.unknown_is_toxic),
        )


@dataclass(frozen=True)
class Verdict:
    code: str
    message: str
    reasons: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "reasons": list(self.reasons)}


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


def lookalike_hazards(top: str, probs: Sequence[float], labels: Sequence[str], species: Mapping[str, Species],
                      rules: SafetyRules) -> list[str]:
    """Reasons why a listed lookalike of `top` forbids eating it.

    A toxic lookalike counts when it holds at least `lookalike_mass`, or when it is not one of the model's
    classes at all: then the model has never learned to tell the two apart, so its silence proves nothing.
    """
    s = species.get(top)
    if s is None:
        return []
    index = {lab: i for i, lab in enumerate(labels)}
    hazards: list[str] = []
    for name in s.lookalikes:
        try:
            lab = name if name in index or name in species else slugify(name)
        except Exception:  # a lookalike entry with no letters: nothing to match
            continue
        if lab == top:
            continue
        edib = edibility_of(lab, species)
        if not is_toxic(edib, rules.unknown_is_toxic):
            continue
        who = display_name(lab, species)
        kind = edib if edib in TOXIC else "of unrecorded edibility"
        if lab not in index:
            hazards.append(f"its lookalike {who} is {kind} and the model cannot tell them apart (not among its classes)")
        elif probs[index[lab]] >= rules.lookalike_mass:
            hazards.append(f"its lookalike {who} is {kind} and holds {probs[index[lab]]:.1%} of the probability")
    return hazards


def decide(probs: Sequence[float], labels: Sequence[str], species: Mapping[str, Species], rules: SafetyRules,
           out_of_distribution: bool = False) -> Verdict:
    """Apply the rules in order: not_identified, poisonous, do_not_eat, inedible, edible_species.

    `probs` are calibrated (temperature-scaled) class probabilities in the order of `labels`.
    An `unknown` edibility never yields edible_species, whatever the thresholds.
    """
    if len(probs) != len(labels) or not labels:
        raise ValueError(f"{len(probs)} probabilities for {len(labels)} labels")
    if any(not math.isfinite(p) for p in probs):
        return Verdict(NOT_IDENTIFIED, "Not identified: the model gave no usable answer for this photo.",
                       ("non-finite probabilities",))
    i_top = max(range(len(probs)), key=probs.__getitem__)
    top, p_top = labels[i_top], float(probs[i_top])
    name = display_name(top, species)

    if out_of_distribution:
        return Verdict(NOT_IDENTIFIED, "Not identified: this photo does not look like the mushroom photos the model "
                       "knows. Do not eat it.", ("out of distribution",))
    if p_top < rules.min_confidence:
        return Verdict(NOT_IDENTIFIED, f"Not identified: the best match, {name}, holds only {p_top:.0%} of the "
                       f"probability (at least {rules.min_confidence:.0%} needed). Do not eat it.",
                       (f"top probability {p_top:.4f} < min_confidence {rules.min_confidence}",))

    edib = edibility_of(top, species)
    if edib in TOXIC:
        return Verdict(POISONOUS, f"Poisonous: the most likely species, {name} ({p_top:.0%}), is recorded as {edib}. "
                       "Do not eat it.", (f"top species is {edib}",))

    mass = toxic_mass(probs, labels, species, rules.unknown_is_toxic)
    if edib == "inedible":
        extra = f" Poisonous species also hold {mass:.1%} of the probability." if mass >= rules.poison_mass else ""
        return Verdict(INEDIBLE, f"Inedible: the most likely species, {name} ({p_top:.0%}), is recorded as inedible. "
                       f"Do not eat it.{extra}", ("top species is inedible",))
    if edib not in EDIBLE:
        return Verdict(DO_NOT_EAT, f"Do not eat: the most likely species, {name} ({p_top:.0%}), has no recorded "
                       "edibility.", ("top species edibility unknown",))

    reasons: list[str] = []
    if mass >= rules.poison_mass:
        reasons.append(f"poisonous species together hold {mass:.1%} of the probability "
                       f"(limit {rules.poison_mass:.1%})")
    reasons += lookalike_hazards(top, probs, labels, species, rules)
    if reasons:
        return Verdict(DO_NOT_EAT, f"Do not eat: the most likely species, {name} ({p_top:.0%}), is recorded as "
                       f"{edib}, but " + "; ".join(reasons) + ".", tuple(reasons))
    return Verdict(EDIBLE_SPECIES, f"Edible species: the most likely species, {name} ({p_top:.0%}), is recorded as "
                   f"{edib} and no poisonous species holds noticeable probability. This is not a safety check: "
                   "deadly species can look exactly like it.", (f"top species is {edib}",))
