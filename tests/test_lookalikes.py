"""The packaged reference of dangerous confusions and the catalogue merge every stage applies."""

from __future__ import annotations

import csv

import pytest

from mycodist.catalog import TOXIC, Species
from mycodist.errors import UsageError
from mycodist.lookalikes import (
    BUILTIN,
    COLUMNS,
    binomial_key,
    load_references,
    merge_catalogue,
    read_reference,
    reference_from_rows,
)

CLASSICS = [  # the confusions that kill, which the reference must hold (sought, lookalike)
    *[(a, b) for a in ("Agaricus arvensis", "Agaricus campestris")
      for b in ("Amanita phalloides", "Amanita virosa", "Amanita verna")],
    ("Russula virescens", "Amanita phalloides"), ("Cantharellus cibarius", "Omphalotus olearius"),
    ("Craterellus tubaeformis", "Cortinarius rubellus"), ("Morchella esculenta", "Gyromitra esculenta"),
    ("Kuehneromyces mutabilis", "Galerina marginata"), ("Armillaria mellea", "Galerina marginata"),
    ("Calocybe gambosa", "Inocybe erubescens"), ("Clitocybe nebularis", "Entoloma sinuatum"),
    ("Macrolepiota procera", "Chlorophyllum molybdites"), ("Macrolepiota procera", "Lepiota brunneoincarnata"),
    ("Clitopilus prunulus", "Clitocybe rivulosa"), ("Clitopilus prunulus", "Clitocybe dealbata"),
    ("Marasmius oreades", "Clitocybe rivulosa"), ("Marasmius oreades", "Clitocybe dealbata"),
    ("Amanita rubescens", "Amanita pantherina"), ("Amanita caesarea", "Amanita muscaria"),
]


def test_packaged_reference_is_complete_and_cited():
    rows = list(csv.DictReader(BUILTIN.open(encoding="utf-8")))
    assert tuple(rows[0]) == COLUMNS
    pairs = [r for r in rows if r["lookalike"]]
    assert len(pairs) >= 25
    for r in rows:
        assert r["citation"] and r["features"], r
    for r in pairs:
        assert r["lookalike_edibility"] and r["syndrome"], r
    ref = load_references()
    have = {(p.sought, p.lookalike) for p in ref.pairs}
    for a, b in CLASSICS:
        assert (binomial_key(a), binomial_key(b)) in have, (a, b)
        assert ref.edibility[binomial_key(b)] in TOXIC
    assert ref.edibility["amanita_phalloides"] == "deadly" and ref.edibility["galerina_marginata"] == "deadly"
    named = {k for p in ref.pairs for k in (p.sought, p.lookalike)} | set(ref.none_known)
    assert named <= set(ref.edibility)  # every species it names has a known edibility


@pytest.mark.parametrize(("name", "key"), [
    ("Amanita phalloides (Vaill. ex Fr.) Link", "amanita_phalloides"), ("amanita_phalloides", "amanita_phalloides"),
    ("AMANITA  Phalloides", "amanita_phalloides"), ("Agaricus cf. arvensis", "agaricus_arvensis"),
    ("Entoloma sinuatum var. x", "entoloma_sinuatum"), ("Morchella", "morchella"), ("123", "")])
def test_binomial_key(name, key):
    assert binomial_key(name) == key


def test_merge_most_dangerous_wins_links_both_ways_and_is_idempotent():
    cat = [Species("a_b", "Amanita phalloides", "Death cap", edibility="edible", source="site"),
           Species("field", "Psalliota campestris", "Field", edibility="edible", source="site"),  # a synonym
           Species("hedgehog", "Hydnum repandum", "Hedgehog"),
           Species("mine", "Mycus fictus", "x", edibility="edible", lookalikes=["Galerina autumnalis"]),
           Species("other", "Othera fictus", "y", edibility="poisonous", lookalikes=["mine"])]
    m = merge_catalogue(cat, load_references())
    assert m["a_b"].edibility == "deadly"
    assert m["a_b"].edibility_sources == {"site": "edible", "reference:lookalikes.csv": "deadly"}
    assert "field" in m["a_b"].lookalikes and "a_b" in m["field"].lookalikes  # matched through the synonym
    assert m["field"].lookalike_notes["amanita_verna"]["edibility"] == "deadly"  # outside the catalogue
    assert m["field"].lookalike_notes["a_b"]["edibility"] == "deadly"
    assert m["hedgehog"].edibility == "choice" and m["hedgehog"].lookalikes == []
    assert m["hedgehog"].lookalike_record.startswith("no dangerous lookalike known")
    assert m["mine"].lookalikes == ["galerina_marginata", "other"]  # synonym resolved; one-way link made symmetric
    assert m["mine"].lookalike_notes["galerina_marginata"]["edibility"] == "deadly"
    assert m["mine"].lookalike_notes["other"]["edibility"] == "poisonous"
    again = merge_catalogue(m, load_references())
    assert {k: s.to_json() for k, s in again.items()} == {k: s.to_json() for k, s in m.items()}


def test_merge_never_makes_a_species_safer():
    ref = reference_from_rows([{"sought": "Xus yus", "sought_edibility": "choice", "citation": "c"}], "r")
    m = merge_catalogue([Species("x", "Xus yus", "", edibility="poisonous", source="s")], ref)
    assert m["x"].edibility == "poisonous" and m["x"].edibility_sources == {"s": "poisonous", "reference:r": "choice"}


@pytest.mark.parametrize(("row", "msg"), [
    ({"sought": "Xus yus", "sought_edibility": "edible"}, "citation"),
    ({"sought": "Xus yus", "sought_edibility": "tasty", "citation": "c"}, "tasty"),
    ({"sought": "Xus yus", "sought_edibility": "edible", "lookalike": "Xus yus", "lookalike_edibility": "edible",
      "citation": "c"}, "own lookalike"),
    ({"sought": "1", "sought_edibility": "edible", "citation": "c"}, "not a scientific name")])
def test_bad_reference_rows_are_refused_with_the_line(row, msg):
    with pytest.raises(UsageError, match=msg):
        reference_from_rows([row], "r")


def test_extra_reference_file_and_missing_file(tmp_path):
    f = tmp_path / "mine.csv"
    f.write_text(",".join(COLUMNS) + "\nXus yus,edible,Amanita phalloides,deadly,amatoxins,volva,my society\n")
    ref = load_references([f])
    assert ("xus_yus", "amanita_phalloides") in {(p.sought, p.lookalike) for p in ref.pairs}
    assert read_reference(f).edibility["xus_yus"] == "edible"
    with pytest.raises(UsageError, match="does not exist"):
        load_references([tmp_path / "nope.csv"])
