"""The embedded data set: procedurally rendered, photo-like mushroom images of fictional species.

Public API (everything deterministic from the `synth` config group; see docs/config.md):

    from mycodist.synth import generate_dataset
    species, photos = generate_dataset(cfg.synth)            # or a dict: {"species": 8, "size": 128, ...}
    # species: list[mycodist.catalog.Species] (source "synth"; facts["traits"] = the visual traits)
    # photos:  iterator of (label, key, jpeg_bytes), key = f"{label}-{i:05d}", photo-major order
    generate_dataset(cfg_synth, workers=1)                   # render in this process (default: synth.workers)

    from mycodist.synth import make_catalogue, species_photo, SynthSettings
    cat = make_catalogue(24, seed=0)                         # list[SynthSpecies]: .species and .traits
    jpg = species_photo(cat[3], 3, photo_index, SynthSettings(size=256))   # one photo, random access

Modules: species (catalogue, names, lookalike pairs, traits), textures (grass, leaf litter, wood),
render (one photo), generate (the stream, worker processes), cli (`mycodist synth`).
"""

from mycodist.synth.generate import SynthSettings, generate_dataset, photo_key, species_photo
from mycodist.synth.species import SynthSpecies, Traits, make_catalogue

__all__ = ["SynthSettings", "SynthSpecies", "Traits", "generate_dataset", "make_catalogue", "photo_key",
           "species_photo"]
