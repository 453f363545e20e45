"""The generator: catalogue contract, determinism, photo properties, settings validation."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mycodist.catalog import EDIBILITY, EDIBLE, TOXIC, slugify
from mycodist.synth.generate import SynthSettings, generate_dataset, iter_photos, photo_key, species_photo
from mycodist.synth.render import render_photo
from mycodist.synth.species import CAP_SHAPES, make_catalogue

TELLING = ("gill_colour", "ring", "bulb", "spots", "cap_texture", "stem_thickness")


def _decode(jpg: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(jpg)) as im:
        assert im.format == "JPEG" and im.mode == "RGB"
        return np.asarray(im, np.float32)


def test_catalogue_is_deterministic_and_k_is_a_prefix_of_larger_k():
    a, b = make_catalogue(24, 0), make_catalogue(24, 0)
    assert [(e.species, e.traits) for e in a] == [(e.species, e.traits) for e in b]
    bigger = make_catalogue(31, 0)
    assert [e.traits for e in bigger[:24]] == [e.traits for e in a]
    assert [e.label for e in bigger[:24]] == [e.label for e in a]
    assert [e.label for e in make_catalogue(24, 1)] != [e.label for e in a]


@pytest.mark.parametrize("k", [2, 24, 61])
def test_catalogue_contract(k):
    cat = make_catalogue(k, 3)
    labels = [e.label for e in cat]
    assert len(set(labels)) == k and all(slugify(e.species.scientific_name) == e.label for e in cat)
    assert len({e.species.common_name for e in cat}) == k
    for e in cat:
        genus, epithet = e.species.scientific_name.split(" ")
        assert genus[0].isupper() and epithet.islower()
        assert e.species.family.endswith("aceae") and e.species.source == "synth"
        assert e.species.edibility in EDIBILITY and e.species.edibility != "unknown"
        assert e.traits.cap_shape in CAP_SHAPES
        assert e.species.facts["traits"]["cap_shape"] == e.traits.cap_shape
    by_label = {e.label: e for e in cat}
    for e in cat:  # symmetric, and only to species that exist
        for other in e.species.lookalikes:
            assert e.label in by_label[other].species.lookalikes


def test_edible_species_have_dangerous_lookalikes_that_differ_in_two_traits():
    cat = make_catalogue(24, 0)
    by_label = {e.label: e for e in cat}
    assert {e.species.edibility for e in cat} == set(EDIBILITY) - {"unknown"}
    pairs = [(e, by_label[o]) for e in cat if e.species.edibility in EDIBLE for o in e.species.lookalikes
             if by_label[o].species.edibility in TOXIC]
    assert len(pairs) >= 6
    for edible, toxic in pairs:
        assert (edible.traits.cap_shape, edible.traits.cap_colour, edible.traits.habitat) == \
               (toxic.traits.cap_shape, toxic.traits.cap_colour, toxic.traits.habitat)
        assert np.abs(np.subtract(edible.traits.cap_rgb, toxic.traits.cap_rgb)).max() < 0.2
        differing = [f for f in TELLING if getattr(edible.traits, f) != getattr(toxic.traits, f)]
        assert len(differing) == 2, differing


def test_same_seed_gives_identical_bytes_and_photos_vary():
    settings = SynthSettings(species=3, per_species=2, size=96, seed=5)
    cat = make_catalogue(3, 5)
    first = species_photo(cat[1], 1, 0, settings)
    assert species_photo(cat[1], 1, 0, settings) == first
    assert species_photo(cat[1], 1, 1, settings) != first
    assert species_photo(cat[1], 1, 0, SynthSettings(species=3, size=96, seed=6)) != first
    _, photos = generate_dataset({"species": 3, "per_species": 2, "size": 96, "seed": 5}, workers=1)
    photos = list(photos)
    assert [(lab, key) for lab, key, _ in photos[:3]] == [(e.label, photo_key(e.label, 0)) for e in cat]
    assert photos[4][2] == species_photo(cat[1], 1, 1, settings)


def test_photo_size_aspect_and_range():
    cat = make_catalogue(2, 0)
    settings = SynthSettings(species=2, size=80)
    sizes = set()
    for i in range(12):
        arr = _decode(species_photo(cat[0], 0, i, settings))
        assert max(arr.shape[:2]) == 80
        assert arr.std() > 10  # a scene, not a flat colour
        sizes.add(arr.shape[:2])
    assert len(sizes) >= 2  # square and oblong frames


def test_jpeg_quality_range_is_used():
    cat = make_catalogue(2, 0)
    low = species_photo(cat[0], 0, 0, SynthSettings(species=2, size=128, jpeg_quality=(20, 20)))
    high = species_photo(cat[0], 0, 0, SynthSettings(species=2, size=128, jpeg_quality=(98, 98)))
    assert len(high) > 1.5 * len(low)


def test_two_species_in_the_same_scene_look_different():
    """Same photo generator state (ground, light, layout draws) for two species: the mushrooms differ."""
    cat = make_catalogue(6, 0)
    a = _decode(render_photo(cat[0].traits, np.random.default_rng(7), 128))
    again = _decode(render_photo(cat[0].traits, np.random.default_rng(7), 128))
    b = _decode(render_photo(cat[4].traits, np.random.default_rng(7), 128))
    assert np.array_equal(a, again)
    assert a.shape == b.shape
    changed = (np.abs(a - b).max(axis=2) > 40).mean()
    assert changed > 0.02


@pytest.mark.slow
def test_worker_processes_do_not_change_the_output():
    settings = SynthSettings(species=3, per_species=8, size=48)
    cat = make_catalogue(3, 0)
    assert list(iter_photos(cat, settings, workers=2)) == list(iter_photos(cat, settings, workers=1))


@pytest.mark.parametrize("bad, match", [
    ({"species": 1}, "at least 2 species"),
    ({"per_species": 0}, "at least 1 photo"),
    ({"size": 16}, "longest side"),
    ({"jpeg_quality": [90, 70]}, "low <= high"),
    ({"jpeg_quality": [0, 70]}, "1 <= low"),
    ({"format": "zip"}, "shards, folders"),
    ({"workers": -1}, "workers"),
])
def test_settings_are_validated(bad, match):
    with pytest.raises(ValueError, match=match):
        SynthSettings.from_config({**{"species": 4, "per_species": 2}, **bad})
