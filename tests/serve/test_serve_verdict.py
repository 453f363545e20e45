"""The safety rules, rule by rule, plus properties that must hold for any probabilities."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from serve_util import LABELS, SPECIES

from mycodist.catalog import EDIBILITY, EDIBLE, TOXIC, Species
from mycodist.serve.verdict import (
    DO_NOT_EAT,
    EDIBLE_SPECIES,
    INEDIBLE,
    NOT_IDENTIFIED,
    POISONOUS,
    VERDICT_CODES,
    SafetyRules,
    decide,
    toxic_mass,
)

CATALOG = {s.label: s for s in SPECIES}
RULES = SafetyRules()


def probs_of(**mass: float) -> list[float]:
    rest = (1.0 - sum(mass.values())) / (len(LABELS) - len(mass))
    return [mass.get(lab, rest) for lab in LABELS]


def test_low_confidence_is_not_identified():
    v = decide(probs_of(boletus_bonus=0.45), LABELS, CATALOG, RULES)
    assert v.code == NOT_IDENTIFIED
    assert "45%" in v.message


def test_out_of_distribution_wins_over_a_confident_edible():
    v = decide(probs_of(boletus_bonus=0.9999), LABELS, CATALOG, RULES, out_of_distribution=True)
    assert v.code == NOT_IDENTIFIED


def test_non_finite_probabilities_are_not_identified():
    p = probs_of(boletus_bonus=0.99)
    p[0] = math.nan
    assert decide(p, LABELS, CATALOG, RULES).code == NOT_IDENTIFIED


@pytest.mark.parametrize("label", ["amanita_letalis", "hebeloma_toxicum"])
def test_toxic_top_is_poisonous(label):
    v = decide(probs_of(**{label: 0.9}), LABELS, CATALOG, RULES)
    assert v.code == POISONOUS
    assert CATALOG[label].edibility in v.message


def test_poison_mass_at_the_threshold_is_do_not_eat():
    v = decide(probs_of(boletus_bonus=0.95, hebeloma_toxicum=0.01, amanita_letalis=0.0,
                        mysterium_ignotum=0.0), LABELS, CATALOG, RULES)
    assert v.code == DO_NOT_EAT
    assert "1.0%" in v.message


def test_poison_mass_just_below_the_threshold_is_edible():
    p = probs_of(boletus_bonus=0.99, hebeloma_toxicum=0.009, amanita_letalis=0.0, mysterium_ignotum=0.0)
    assert toxic_mass(p, LABELS, CATALOG) < RULES.poison_mass
    assert decide(p, LABELS, CATALOG, RULES).code == EDIBLE_SPECIES


def test_poisonous_lookalike_with_noticeable_mass_is_do_not_eat():
    p = probs_of(agaricus_similis=0.995, amanita_letalis=0.002, hebeloma_toxicum=0.0, mysterium_ignotum=0.0)
    assert toxic_mass(p, LABELS, CATALOG) < RULES.poison_mass  # the mass rule alone would let it pass
    v = decide(p, LABELS, CATALOG, RULES)
    assert v.code == DO_NOT_EAT
    assert "lookalike" in v.message and "Test death cap" in v.message


def test_lookalike_below_noticeable_mass_does_not_block():
    p = probs_of(agaricus_similis=0.9995, amanita_letalis=0.0005, hebeloma_toxicum=0.0, mysterium_ignotum=0.0)
    assert decide(p, LABELS, CATALOG, RULES).code == EDIBLE_SPECIES


def test_toxic_lookalike_the_model_never_learned_blocks():
    p = probs_of(lepista_tuta=0.9999, amanita_letalis=0.0, hebeloma_toxicum=0.0, mysterium_ignotum=0.0)
    v = decide(p, LABELS, CATALOG, RULES)
    assert v.code == DO_NOT_EAT
    assert "not among its classes" in v.message


def test_unknown_edibility_top_is_do_not_eat():
    v = decide(probs_of(mysterium_ignotum=0.99), LABELS, CATALOG, RULES)
    assert v.code == DO_NOT_EAT


def test_unknown_mass_counts_as_toxic_unless_configured_off():
    p = probs_of(boletus_bonus=0.97, mysterium_ignotum=0.03, amanita_letalis=0.0, hebeloma_toxicum=0.0)
    assert decide(p, LABELS, CATALOG, RULES).code == DO_NOT_EAT
    assert decide(p, LABELS, CATALOG, SafetyRules(unknown_is_toxic=False)).code == EDIBLE_SPECIES


def test_label_missing_from_catalogue_is_treated_as_unknown():
    cat = {k: v for k, v in CATALOG.items() if k != "boletus_bonus"}
    assert decide(probs_of(boletus_bonus=0.999), LABELS, cat, RULES).code == DO_NOT_EAT


def test_inedible_top_is_inedible_and_mentions_poison_mass():
    v = decide(probs_of(tylopilus_amarus=0.9, hebeloma_toxicum=0.05), LABELS, CATALOG, RULES)
    assert v.code == INEDIBLE
    assert "Poisonous species also hold" in v.message


def test_clear_edible_is_edible_species_with_caveat():
    v = decide(probs_of(boletus_bonus=0.9999), LABELS, CATALOG, RULES)
    assert v.code == EDIBLE_SPECIES
    assert "not a safety check" in v.message


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError):
        decide([1.0], LABELS, CATALOG, RULES)


# --- properties over arbitrary catalogues and probabilities -------------------------------------------

@st.composite
def cases(draw):
    n = draw(st.integers(2, 8))
    labels = [f"s{i}" for i in range(n)]
    edib = draw(st.lists(st.sampled_from(EDIBILITY), min_size=n, max_size=n))
    look = [draw(st.lists(st.sampled_from(labels + ["absent_species"]), max_size=2)) for _ in range(n)]
    catalog = {lab: Species(lab, lab, lab, edibility=e, lookalikes=lk) for lab, e, lk in zip(labels, edib, look, strict=True)}
    raw = draw(st.lists(st.floats(0, 1), min_size=n, max_size=n))
    total = sum(raw)
    probs = [x / total for x in raw] if total > 0 else [1.0 / n] * n
    rules = SafetyRules(min_confidence=draw(st.floats(0, 1)), poison_mass=draw(st.floats(0, 1)),
                        lookalike_mass=draw(st.floats(0, 1)), unknown_is_toxic=draw(st.booleans()))
    return probs, labels, catalog, rules, draw(st.booleans())


@settings(max_examples=400, deadline=None)
@given(cases())
def test_edible_species_only_when_every_rule_allows_it(case):
    probs, labels, catalog, rules, ood = case
    v = decide(probs, labels, catalog, rules, out_of_distribution=ood)
    assert v.code in VERDICT_CODES and v.message
    top = labels[max(range(len(probs)), key=probs.__getitem__)]
    if v.code == EDIBLE_SPECIES:
        assert not ood
        assert max(probs) >= rules.min_confidence
        assert catalog[top].edibility in EDIBLE  # never unknown, never toxic
        assert toxic_mass(probs, labels, catalog, rules.unknown_is_toxic) < rules.poison_mass
        for lk in catalog[top].lookalikes:
            if lk in catalog and catalog[lk].edibility in TOXIC:
                assert lk in labels and probs[labels.index(lk)] < rules.lookalike_mass
    if catalog[top].edibility in TOXIC and not ood and max(probs) >= rules.min_confidence:
        assert v.code == POISONOUS


@settings(max_examples=200, deadline=None)
@given(cases(), st.floats(0, 1))
def test_stricter_poison_mass_never_turns_do_not_eat_into_edible(case, stricter):
    probs, labels, catalog, rules, ood = case
    strict = SafetyRules(rules.min_confidence, min(rules.poison_mass, stricter), rules.lookalike_mass,
                         rules.unknown_is_toxic)
    if decide(probs, labels, catalog, rules, ood).code != EDIBLE_SPECIES:
        assert decide(probs, labels, catalog, strict, ood).code != EDIBLE_SPECIES
