"""The safety rules, rule by rule, plus properties that must hold for any probabilities."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from serve_util import LABELS, SPECIES

from mycodist.catalog import EDIBILITY, EDIBLE, TOXIC, Species
from mycodist.verdict import (
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


# --- one-way links, lookalike records, calibration, thresholds ------------------------------------------

def test_one_way_link_still_blocks_the_edible_answer():
    """Only the deadly species lists the edible one: its 0.5% must still stop `edible_species`."""
    cat = {**CATALOG, "agaricus_similis": Species("agaricus_similis", "Agaricus similis", "Test field mushroom",
                                                  edibility="edible", lookalike_record="test")}
    p = probs_of(agaricus_similis=0.995, amanita_letalis=0.005, hebeloma_toxicum=0.0, mysterium_ignotum=0.0)
    v = decide(p, LABELS, cat, RULES)
    assert v.code == DO_NOT_EAT and "toxic_lookalike" in v.rules
    assert [x["label"] for x in v.lookalikes] == ["amanita_letalis"]


def test_lookalike_known_only_from_a_reference_note_blocks():
    """A lookalike outside the classes and outside the catalogue, known only from the reference note."""
    cat = {**CATALOG, "boletus_bonus": Species(
        "boletus_bonus", "Boletus bonus", "Test king bolete", edibility="choice", lookalikes=["rubroboletus_malus"],
        lookalike_notes={"rubroboletus_malus": {"scientific_name": "Rubroboletus malus", "edibility": "poisonous",
                                                "features": "red pores", "citation": "a field guide"}})}
    v = decide(probs_of(boletus_bonus=0.9999), LABELS, cat, RULES)
    assert v.code == DO_NOT_EAT and "not among its classes" in v.message
    (x,) = v.lookalikes
    assert (x["edibility"], x["features"], x["probability"], x["in_classes"]) == ("poisonous", "red pores", None, False)


def test_edible_without_any_lookalike_record_is_do_not_eat_by_default():
    cat = {**CATALOG, "boletus_bonus": Species("boletus_bonus", "Boletus bonus", "Test king bolete", edibility="choice")}
    p = probs_of(boletus_bonus=0.9999)
    v = decide(p, LABELS, cat, RULES)
    assert v.code == DO_NOT_EAT and v.rules == ("no_lookalike_record",)
    assert "absence of data is not evidence of safety" in v.message
    assert decide(p, LABELS, cat, SafetyRules(require_lookalike_record=False)).code == EDIBLE_SPECIES
    assert decide(p, LABELS, CATALOG, RULES).code == EDIBLE_SPECIES  # "no dangerous lookalike known" is a record


def test_uncalibrated_caps_at_do_not_eat_and_says_why():
    v = decide(probs_of(boletus_bonus=0.9999), LABELS, CATALOG, RULES, uncalibrated="no calibration.json")
    assert v.code == DO_NOT_EAT and v.rules == ("uncalibrated",) and "no calibration.json" in v.message


def test_reasons_name_every_rule_that_fired():
    v = decide(probs_of(amanita_letalis=0.4, hebeloma_toxicum=0.3), LABELS, CATALOG, RULES, out_of_distribution=True,
               uncalibrated="x")
    assert v.code == NOT_IDENTIFIED
    assert {"out_of_distribution", "min_confidence", "top_toxic", "poison_mass", "uncalibrated"} <= set(v.rules)


def test_edibility_disagreement_is_a_reason():
    sp = Species("agaricus_similis", "Agaricus similis", "x", edibility="deadly", lookalikes=["amanita_letalis"],
                 edibility_sources={"site": "edible", "reference:lookalikes.csv": "deadly"})
    v = decide(probs_of(agaricus_similis=0.99), LABELS, {**CATALOG, "agaricus_similis": sp}, RULES)
    assert v.code == POISONOUS and "edibility_conflict" in v.rules
    assert "site says edible" in " ".join(v.reasons)


@pytest.mark.parametrize("kw", [{"poison_mass": 5}, {"min_confidence": -0.01}, {"lookalike_mass": math.nan},
                                {"poison_mass": math.inf}, {"min_confidence": True}, {"unknown_is_toxic": "yes"}])
def test_thresholds_are_validated_on_construction(kw):
    with pytest.raises(ValueError):
        SafetyRules(**kw)


def test_from_config_names_the_bad_key():
    from types import SimpleNamespace

    from mycodist.errors import UsageError

    cfg = SimpleNamespace(min_confidence=0.5, poison_mass=5, lookalike_mass=0.001, unknown_is_toxic=True,
                          get=lambda k, d=None: d)
    with pytest.raises(UsageError, match="serve.poison_mass"):
        SafetyRules.from_config(cfg)


# --- properties over random catalogues with everything the issue lists ------------------------------

OUTSIDE = ["x_deadly", "x_unknown", "x_edible"]  # catalogue records that are not classes


@st.composite
def rich_cases(draw):
    """Random catalogues with toxic lookalikes outside the classes (as records and as reference notes
    only), one-way links, unknown and conflicting edibility, missing lookalike records; random
    probabilities, thresholds, OOD and calibration state."""
    n = draw(st.integers(2, 7))
    labels = [f"s{i}" for i in range(n)]
    names = labels + OUTSIDE + ["note_only"]
    catalog = {}
    for lab in labels:
        sources = draw(st.dictionaries(st.sampled_from(["a", "b", "reference:r"]), st.sampled_from(EDIBILITY),
                                       max_size=2))
        edib = draw(st.sampled_from(EDIBILITY))
        look = draw(st.lists(st.sampled_from(names), max_size=3))  # links are one-way unless drawn twice
        notes = {}
        if "note_only" in look:
            notes["note_only"] = {"edibility": draw(st.sampled_from(EDIBILITY)), "features": "f"}
        catalog[lab] = Species(lab, lab, lab, edibility=edib, lookalikes=look, lookalike_notes=notes,
                               lookalike_record=draw(st.sampled_from(["", "ref"])), edibility_sources=sources)
    for lab, e in zip(OUTSIDE, ("deadly", "unknown", "edible"), strict=True):
        catalog[lab] = Species(lab, lab, lab, edibility=e, lookalikes=draw(st.lists(st.sampled_from(labels), max_size=2)))
    raw = draw(st.lists(st.floats(0, 1), min_size=n, max_size=n))
    total = sum(raw)
    probs = [x / total for x in raw] if total > 0 else [1.0 / n] * n
    rules = SafetyRules(min_confidence=draw(st.floats(0, 1)), poison_mass=draw(st.floats(0, 1)),
                        lookalike_mass=draw(st.floats(0, 1)), unknown_is_toxic=draw(st.booleans()),
                        require_lookalike_record=draw(st.booleans()))
    return probs, labels, catalog, rules, draw(st.booleans()), draw(st.sampled_from(["", "no calibration.json"]))


def _independent_lookalikes(top, catalog):
    """Both directions of every link, computed here without the module's helpers."""
    out = set(catalog[top].lookalikes) | {lab for lab, s in catalog.items() if top in s.lookalikes}
    return out - {top}


@settings(max_examples=600, deadline=None)
@given(rich_cases())
def test_edible_species_never_when_any_rule_says_otherwise(case):
    probs, labels, catalog, rules, ood, uncal = case
    v = decide(probs, labels, catalog, rules, out_of_distribution=ood, uncalibrated=uncal)
    top = labels[max(range(len(probs)), key=probs.__getitem__)]
    if v.code != EDIBLE_SPECIES:
        return
    sp = catalog[top]
    assert not ood and not uncal
    assert max(probs) >= rules.min_confidence
    assert sp.edibility in EDIBLE
    mass = sum(p for p, lab in zip(probs, labels, strict=True)
               if catalog[lab].edibility in TOXIC or (rules.unknown_is_toxic and catalog[lab].edibility == "unknown"))
    assert mass < rules.poison_mass
    for lk in _independent_lookalikes(top, catalog):
        edib = catalog[lk].edibility if lk in catalog else sp.lookalike_notes.get(lk, {}).get("edibility", "unknown")
        if edib in TOXIC or (rules.unknown_is_toxic and edib == "unknown"):
            assert lk in labels and probs[labels.index(lk)] < rules.lookalike_mass, (lk, edib)
    if rules.require_lookalike_record:
        assert sp.lookalike_record or _independent_lookalikes(top, catalog)


def test_the_generator_reaches_every_branch():
    """The property above is only worth something if its cases reach each rule, notably a toxic lookalike
    outside the classes, and an edible answer at all (first hit, no shrinking)."""
    from hypothesis import Phase, find

    quick = settings(max_examples=3000, database=None, phases=[Phase.generate])

    def verdict(c):
        return decide(*c[:4], out_of_distribution=c[4], uncalibrated=c[5])

    for rule in ("toxic_lookalike", "no_lookalike_record", "uncalibrated", "edibility_conflict", "poison_mass"):
        find(rich_cases(), lambda c, rule=rule: rule in verdict(c).rules, settings=quick)
    find(rich_cases(), lambda c: "not among its classes" in decide(*c[:4]).message, settings=quick)
    find(rich_cases(), lambda c: verdict(c).code == EDIBLE_SPECIES, settings=quick)
