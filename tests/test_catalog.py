import json

import pytest

from mycodist.catalog import (
    Species,
    load_class_indices,
    load_species,
    normalize_edibility,
    save_class_indices,
    save_species,
    slugify,
)
from mycodist.errors import UsageError


def test_slugify():
    assert slugify("Agaricus arvensis") == "agaricus_arvensis"
    assert slugify("  Cèpe de Bordeaux! ") == "cepe_de_bordeaux"
    with pytest.raises(UsageError):
        slugify("!!!")


@pytest.mark.parametrize(
    "text,level",
    [
        ("Edible", "edible"),
        ("edible and good", "edible"),
        ("Choice edible", "choice"),
        ("Deadly poisonous", "deadly"),
        ("Poisonous", "poisonous"),
        ("Toxic raw", "poisonous"),
        ("Inedible", "inedible"),
        ("Not edible", "inedible"),
        ("", "unknown"),
        (None, "unknown"),
        ("who knows", "unknown"),
    ],
)
def test_normalize_edibility(text, level):
    assert normalize_edibility(text) == level


def test_class_indices_round_trip(tmp_path):
    p = tmp_path / "class_indices.json"
    save_class_indices(p, ["b", "a", "c"])
    assert json.loads(p.read_text()) == {"0": "b", "1": "a", "2": "c"}
    assert load_class_indices(p) == ["b", "a", "c"]


def test_class_indices_gaps_rejected(tmp_path):
    p = tmp_path / "ci.json"
    p.write_text('{"0": "a", "2": "b"}')
    with pytest.raises(UsageError, match="without gaps"):
        load_class_indices(p)


def test_species_round_trip_and_validation(tmp_path):
    s = Species("a_b", "A b", "Bee", family="Fam", edibility="deadly", lookalikes=["c_d"], source="t",
                facts={"location": "woods"})
    p = tmp_path / "species.json"
    save_species(p, [s])
    assert load_species(p) == {"a_b": s}
    with pytest.raises(ValueError):
        Species("x", "X", "x", edibility="tasty")
