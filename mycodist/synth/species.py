"""The fictional species of the embedded data set: names, edibility, lookalikes and visual traits.

Species come in a repeating pattern of six slots so the catalogue for K species is a prefix of the one
for K + 1 (traits and names of species i never depend on K):

    slot 0: deadly or poisonous        slot 1: its edible/choice lookalike
    slot 2: poisonous or deadly        slot 3: its edible lookalike
    slot 4: inedible, unrelated        slot 5: edible or choice, unrelated

A lookalike shares the dangerous species' cap shape, colour and habitat and differs in exactly two
traits among gill colour, ring, bulb, spots, cap texture and stem build, as the field mushroom differs
from the destroying angel (gills, bulb) and the chanterelle from the jack-o'-lantern (gills, habit).
That is what makes the task learnable but not trivial, and what a safety-aware classifier must respect.
"""

from __future__ import annotations

import colorsys
from dataclasses import asdict, dataclass, replace

import numpy as np

from mycodist.catalog import Species, slugify

CAP_SHAPES = ("convex", "flat", "conical", "funnel", "bell")
CAP_TEXTURES = ("smooth", "fibrous", "scaly", "velvety")
SPOT_KINDS = ("none", "warts", "patches")
HABITATS = ("grass", "litter", "wood")

# name → (RGB in 0..1, Latin-ish epithet, English adjective)
CAP_COLOURS: dict[str, tuple[tuple[float, float, float], str, str]] = {
    "white": ((0.93, 0.92, 0.88), "albidus", "White"),
    "ivory": ((0.90, 0.86, 0.74), "eburneus", "Ivory"),
    "cream": ((0.88, 0.80, 0.62), "cremeus", "Cream"),
    "tan": ((0.76, 0.60, 0.42), "fulvus", "Tawny"),
    "ochre": ((0.80, 0.60, 0.22), "ochraceus", "Ochre"),
    "golden": ((0.92, 0.70, 0.18), "aureus", "Golden"),
    "orange": ((0.93, 0.48, 0.12), "aurantiacus", "Orange"),
    "brick": ((0.72, 0.30, 0.18), "lateritius", "Brick"),
    "scarlet": ((0.85, 0.14, 0.10), "coccineus", "Scarlet"),
    "crimson": ((0.62, 0.08, 0.16), "sanguineus", "Blood"),
    "chestnut": ((0.52, 0.30, 0.16), "castaneus", "Chestnut"),
    "umber": ((0.34, 0.22, 0.14), "umbrinus", "Umber"),
    "grey": ((0.58, 0.57, 0.55), "griseus", "Grey"),
    "olive": ((0.52, 0.52, 0.28), "olivaceus", "Olive"),
    "violet": ((0.52, 0.38, 0.60), "violaceus", "Violet"),
    "yellow": ((0.95, 0.86, 0.30), "flavus", "Sulphur"),
}
GILL_COLOURS: dict[str, tuple[float, float, float]] = {
    "white": (0.94, 0.93, 0.90),
    "cream": (0.90, 0.84, 0.68),
    "pink": (0.88, 0.64, 0.62),
    "chocolate": (0.36, 0.22, 0.16),
    "black": (0.14, 0.12, 0.12),
    "yellow": (0.92, 0.80, 0.30),
    "olive": (0.55, 0.55, 0.30),
    "orange": (0.92, 0.55, 0.18),
}
SHAPE_WORDS = {"convex": ("convexus", "Dome"), "flat": ("planus", "Plate"), "conical": ("conicus", "Cone"),
               "funnel": ("infundibulus", "Funnel"), "bell": ("campanulatus", "Bell")}
HABITAT_WORDS = {"grass": ("pratensis", "Meadow"), "litter": ("silvaticus", "Woodland"), "wood": ("lignicola", "Stump")}
QUALIFIERS = ("Common", "Lesser", "Greater", "Northern", "Slender", "Stout", "Shaggy", "Pale", "Dusky", "Late")
EPITHET_POOL = ("fallax", "robustus", "gracilis", "vernalis", "autumnalis", "odoratus", "elegans", "nobilis",
                "tenuis", "montanus", "rufescens", "mollis", "squamosus", "pusillus", "maximus", "tardus")

_ONSETS = ("M", "Tr", "C", "Ph", "L", "Gr", "Sc", "V", "Br", "Pl", "Cl", "N", "H", "X", "Ch", "D", "T", "St")
_VOWELS = ("a", "e", "i", "o", "u", "y", "au", "ae")
_MIDDLES = ("r", "l", "n", "m", "ct", "th", "rc", "lv", "ss", "x", "ph", "d")
_GENUS_ENDINGS = ("ella", "ina", "aria", "ocybe", "ius", "ops", "myces", "ula", "ites", "ora")
_FEMININE = ("ella", "ina", "aria", "ocybe", "ula", "ora")


@dataclass(frozen=True)
class Traits:
    """What a species looks like, independent of any one photo. Lengths are relative to the cap radius."""

    cap_shape: str
    cap_colour: str
    cap_rgb: tuple[float, float, float]
    cap_centre_shade: float      # centre brightness relative to the rim (<1 darker centre)
    cap_texture: str
    spots: str
    spot_rgb: tuple[float, float, float]
    gill_colour: str
    gill_rgb: tuple[float, float, float]
    stem_rgb: tuple[float, float, float]
    stem_length: float           # stem length / cap radius
    stem_thickness: float        # stem half width / cap radius
    ring: bool
    bulb: bool
    size: float                  # typical cap radius relative to the species average
    habitat: str
    cluster: float               # chance of each extra fruit body (1–3 per photo)
    gloss: float                 # specular strength

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("cap_rgb", "spot_rgb", "gill_rgb", "stem_rgb"):
            d[k] = [round(c, 4) for c in d[k]]
        return d


@dataclass(frozen=True)
class SynthSpecies:
    """A catalogue entry plus the traits the renderer draws from."""

    species: Species
    traits: Traits

    @property
    def label(self) -> str:
        return self.species.label


def _jitter_rgb(rng: np.random.Generator, rgb: tuple[float, float, float], hue: float, sat: float,
                val: float) -> tuple[float, float, float]:
    h, s, v = colorsys.rgb_to_hsv(*rgb)
    h = (h + rng.uniform(-hue, hue)) % 1.0
    s = float(np.clip(s * rng.uniform(1 - sat, 1 + sat), 0.0, 1.0))
    v = float(np.clip(v * rng.uniform(1 - val, 1 + val), 0.05, 1.0))
    return tuple(round(c, 4) for c in colorsys.hsv_to_rgb(h, s, v))  # type: ignore[return-value]


def _random_traits(rng: np.random.Generator) -> Traits:
    colour = str(rng.choice(list(CAP_COLOURS)))
    shape = str(rng.choice(CAP_SHAPES))
    spots = str(rng.choice(SPOT_KINDS, p=[0.55, 0.25, 0.20]))
    stem_base = np.array(CAP_COLOURS[colour][0]) * 0.35 + np.array([0.88, 0.85, 0.78]) * 0.65
    gill = str(rng.choice(list(GILL_COLOURS)))
    return Traits(
        cap_shape=shape,
        cap_colour=colour,
        cap_rgb=_jitter_rgb(rng, CAP_COLOURS[colour][0], 0.02, 0.12, 0.08),
        cap_centre_shade=round(float(rng.uniform(0.6, 1.1)), 3),
        cap_texture=str(rng.choice(CAP_TEXTURES)),
        spots=spots,
        spot_rgb=_jitter_rgb(rng, (0.95, 0.94, 0.9) if rng.random() < 0.7 else (0.45, 0.32, 0.22), 0.02, 0.1, 0.05),
        gill_colour=gill,
        gill_rgb=_jitter_rgb(rng, GILL_COLOURS[gill], 0.01, 0.08, 0.06),
        stem_rgb=_jitter_rgb(rng, tuple(stem_base), 0.02, 0.2, 0.08),
        stem_length=round(float(rng.uniform(0.8, 2.4) if shape != "flat" else rng.uniform(0.6, 1.6)), 3),
        stem_thickness=round(float(rng.uniform(0.1, 0.3)), 3),
        ring=bool(rng.random() < 0.4),
        bulb=bool(rng.random() < 0.3),
        size=round(float(rng.uniform(0.75, 1.25)), 3),
        habitat=str(rng.choice(HABITATS)),
        cluster=round(float(rng.uniform(0.05, 0.7)), 3),
        gloss=round(float(rng.uniform(0.0, 0.5)), 3),
    )


def _lookalike_traits(rng: np.random.Generator, model: Traits) -> Traits:
    """Same silhouette, colour and habitat as `model`, with exactly two telling differences."""
    t = replace(model, cap_rgb=_jitter_rgb(rng, model.cap_rgb, 0.015, 0.08, 0.06),
                cap_centre_shade=round(float(np.clip(model.cap_centre_shade + rng.uniform(-0.1, 0.1), 0.55, 1.15)), 3),
                size=round(float(model.size * rng.uniform(0.9, 1.1)), 3),
                cluster=round(float(np.clip(model.cluster + rng.uniform(-0.15, 0.15), 0.02, 0.8)), 3))
    changes = rng.choice(["gills", "ring", "bulb", "spots", "texture", "stem"], size=2, replace=False)
    for change in changes:
        if change == "gills":
            gill = str(rng.choice([g for g in GILL_COLOURS if g != model.gill_colour]))
            t = replace(t, gill_colour=gill, gill_rgb=_jitter_rgb(rng, GILL_COLOURS[gill], 0.01, 0.08, 0.06))
        elif change == "ring":
            t = replace(t, ring=not model.ring)
        elif change == "bulb":
            t = replace(t, bulb=not model.bulb)
        elif change == "spots":
            t = replace(t, spots=str(rng.choice([s for s in SPOT_KINDS if s != model.spots])))
        elif change == "texture":
            t = replace(t, cap_texture=str(rng.choice([x for x in CAP_TEXTURES if x != model.cap_texture])))
        else:
            slender = model.stem_thickness > 0.2
            t = replace(t, stem_thickness=round(float(rng.uniform(0.08, 0.14) if slender else rng.uniform(0.26, 0.36)), 3),
                        stem_length=round(float(np.clip(model.stem_length * rng.uniform(0.7, 1.4), 0.6, 2.6)), 3))
    return t


def _genus(rng: np.random.Generator) -> str:
    name = str(rng.choice(_ONSETS)) + str(rng.choice(_VOWELS)) + str(rng.choice(_MIDDLES))
    if rng.random() < 0.25:
        name += str(rng.choice(_VOWELS)) + str(rng.choice(_MIDDLES))
    return name + str(rng.choice(_GENUS_ENDINGS))


def _agree(epithet: str, genus: str) -> str:
    """Latin adjectives agree with the genus: `aureus` under a feminine genus becomes `aurea`."""
    if genus.endswith(_FEMININE) and epithet.endswith("us"):
        return epithet[:-2] + "a"
    return epithet


EDIBILITY_BY_SLOT = (("deadly", "poisonous"), ("choice", "edible"), ("poisonous", "deadly"), ("edible", "choice"),
                     ("inedible", "inedible"), ("edible", "choice"))


def _seq(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *key]))


def make_catalogue(n_species: int, seed: int = 0) -> list[SynthSpecies]:
    """The first `n_species` fictional species for `seed`; same seed → same catalogue, K is a prefix of K+1."""
    genera = []
    grng = _seq(seed, 1)
    while len(genera) < 4 + n_species // 3:  # a fixed sequence: species i uses only its first 4 + i // 3
        g = _genus(grng)
        if g not in genera:
            genera.append(g)
    traits: list[Traits] = []
    for i in range(n_species):
        rng = _seq(seed, 2, i)
        slot = i % 6
        traits.append(_lookalike_traits(rng, traits[i - 1]) if slot in (1, 3) else _random_traits(rng))

    out: list[SynthSpecies] = []
    used_names: set[str] = set()
    used_common: set[str] = set()
    for i, t in enumerate(traits):
        rng = _seq(seed, 3, i)
        slot, cycle = i % 6, i // 6
        edibility = EDIBILITY_BY_SLOT[slot][cycle % 2]
        genus = genera[int(rng.integers(4 + i // 3))]
        candidates = [CAP_COLOURS[t.cap_colour][1], SHAPE_WORDS[t.cap_shape][0], HABITAT_WORDS[t.habitat][0]]
        if slot in (0, 2):
            candidates.insert(0, "fallax")
        if edibility == "deadly":
            candidates.insert(0, "mortifer")
        candidates += list(rng.permutation(EPITHET_POOL))
        scientific = ""
        for ep in candidates + [f"{_genus(rng).lower()}ensis" for _ in range(50)]:
            scientific = f"{genus} {_agree(str(ep), genus)}"
            if scientific not in used_names:
                break
        used_names.add(scientific)
        common = _common_name(t, rng, used_common)
        out.append(SynthSpecies(
            species=Species(
                label=slugify(scientific), scientific_name=scientific, common_name=common,
                family=genus[:-len(next(e for e in _GENUS_ENDINGS if genus.endswith(e)))].capitalize() + "aceae",
                edibility=edibility, lookalikes=[], source="synth",
                facts={"habitat": t.habitat, "description": describe(t), "traits": t.to_json()},
            ),
            traits=t,
        ))
    for i in range(0, n_species - 1, 6):
        for a, b in ((i, i + 1), (i + 2, i + 3)):
            if b < n_species:
                out[a].species.lookalikes.append(out[b].label)
                out[b].species.lookalikes.append(out[a].label)
    return out


def _common_name(t: Traits, rng: np.random.Generator, used: set[str]) -> str:
    base = f"{CAP_COLOURS[t.cap_colour][2]} {SHAPE_WORDS[t.cap_shape][1]}"
    options = [base, f"{HABITAT_WORDS[t.habitat][1]} {base}"]
    if t.ring:
        options.append(f"Ringed {base}")
    if t.spots != "none":
        options.append(f"Speckled {base}")
    options += [f"{q} {base}" for q in rng.permutation(QUALIFIERS)]
    options += [f"{base} {n}" for n in range(2, 1000)]
    name = next(o for o in options if o not in used)
    used.add(name)
    return name


def describe(t: Traits) -> str:
    """One sentence a field guide would print, generated from the traits (no copied text)."""
    spots = {"none": "", "warts": ", dotted with small warts", "patches": ", with torn veil patches"}[t.spots]
    stem = "slender" if t.stem_thickness < 0.16 else "stout" if t.stem_thickness > 0.24 else "medium"
    parts = [f"{t.cap_shape} {t.cap_colour} cap, {t.cap_texture}{spots}", f"{t.gill_colour} gills",
             f"{stem} stem" + (" with a ring" if t.ring else "") + (" and a bulbous base" if t.bulb else ""),
             f"found on {'rotting wood' if t.habitat == 'wood' else 'grass' if t.habitat == 'grass' else 'leaf litter'}"]
    return "; ".join(parts).capitalize() + "."


SYNTH_CITATION = "mycodist.synth catalogue: fictional species, lookalike pairs made by construction"


def _differences(a: Traits, b: Traits) -> str:
    """The traits that tell two species apart, in words: what a field guide's key would say."""
    out = []
    if a.gill_colour != b.gill_colour:
        out.append(f"gills {a.gill_colour} vs {b.gill_colour}")
    if a.ring != b.ring:
        out.append(f"ring {'present' if a.ring else 'absent'} vs {'present' if b.ring else 'absent'}")
    if a.bulb != b.bulb:
        out.append(f"bulbous base {'present' if a.bulb else 'absent'} vs {'present' if b.bulb else 'absent'}")
    if a.spots != b.spots:
        out.append(f"cap {a.spots} vs {b.spots}".replace("none", "without spots"))
    if a.cap_texture != b.cap_texture:
        out.append(f"cap texture {a.cap_texture} vs {b.cap_texture}")
    if abs(a.stem_thickness - b.stem_thickness) > 0.05:
        thin = lambda t: "slender" if t < 0.2 else "stout"  # noqa: E731
        out.append(f"stem {thin(a.stem_thickness)} vs {thin(b.stem_thickness)}")
    return "; ".join(out)


def reference_rows(catalogue: list[SynthSpecies]) -> list[dict[str, str]]:
    """The synthetic catalogue's own lookalike pairs as reference rows (mycodist.lookalikes format):
    the edible species is `sought`, the traits that differ are the telling features; species made
    without a lookalike get a "no dangerous lookalike known" row, true by construction."""
    by_label = {e.label: e for e in catalogue}
    rows, seen = [], set()
    for e in catalogue:
        s = e.species
        if not s.lookalikes:
            rows.append({"sought": s.scientific_name, "sought_edibility": s.edibility, "citation": SYNTH_CITATION,
                         "features": "made without a lookalike"})
        for lab in s.lookalikes:
            other = by_label.get(lab)
            if other is None or frozenset((s.label, lab)) in seen:
                continue
            seen.add(frozenset((s.label, lab)))
            sought, look = (e, other) if s.edibility in ("choice", "edible") else (other, e)
            rows.append({"sought": sought.species.scientific_name, "sought_edibility": sought.species.edibility,
                         "lookalike": look.species.scientific_name, "lookalike_edibility": look.species.edibility,
                         "syndrome": "fictional", "features": _differences(sought.traits, look.traits),
                         "citation": SYNTH_CITATION})
    return rows
