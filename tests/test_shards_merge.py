import json

import pytest
import webdataset as wds
from shards_util import SPECIES, config, jpeg

from mycodist.catalog import Species
from mycodist.cli import main
from mycodist.shards import DatasetWriter, WriterSettings, read_manifest
from mycodist.shards.verify import verify_dataset

BY_LABEL = {s.label: s for s in SPECIES}


def worker_output(out, labels, prefix, n=6, species=None, source="worker"):
    """What one crawl worker leaves: a complete data set over its own labels."""
    species = species or [BY_LABEL[lab] for lab in labels]
    with DatasetWriter(out, labels, species, WriterSettings.from_config(config("shards.max_samples=4")), source=source) as w:
        for i in range(n):
            lab = labels[i % len(labels)]
            w.write("val" if i % 3 == 0 else "train", f"{prefix}-{i:03d}", jpeg(noise_seed=i), lab, {})
    return out


def test_merge_joins_renumbers_and_links(tmp_path, capsys):
    a = worker_output(tmp_path / "a", ["amanita_pallida", "boletus_bonus"], "a", source="site-a")
    b = worker_output(tmp_path / "b", ["boletus_bonus", "cantharellus_aureus"], "b", n=9, source="site-b")
    out = tmp_path / "merged"
    assert main(["merge-manifests", str(out), str(a), str(b)]) == 0
    assert "merged 2 data sets" in capsys.readouterr().out
    m = read_manifest(out, check_hashes=True)
    assert verify_dataset(out) == []
    assert m.labels == ["amanita_pallida", "boletus_bonus", "cantharellus_aureus"]
    assert m.samples() == 15 and m.samples("val") == 2 + 3
    assert [s.file for s in m.shards_of("train")] == [f"train-{i:06d}.tar" for i in range(len(m.shards_of("train")))]
    # a's class numbers are unchanged, so its shards are hard links; b's were rewritten
    a0 = (a / "train-000000.tar").stat()
    assert (out / "train-000000.tar").stat().st_ino == a0.st_ino
    assert m.data["merged_from"][0]["classes_renumbered"] is False
    assert m.data["merged_from"][1]["classes_renumbered"] is True
    assert m.data["source"] == "site-a, site-b"
    labels_seen = {}
    for split in m.splits:
        for s in wds.WebDataset(m.paths(split), shardshuffle=False).decode():
            assert m.labels[s["cls"]] == s["json"]["label"]
            labels_seen[s["__key__"]] = s["json"]["label"]
    assert labels_seen["b-001"] == "cantharellus_aureus"
    species = json.loads((out / "species.json").read_text())
    assert set(species) == set(m.labels) and species["amanita_pallida"]["edibility"] == "deadly"
    # --copy gives separate files with the same bytes
    assert main(["merge-manifests", str(tmp_path / "copied"), str(a), str(b), "--copy"]) == 0
    assert (tmp_path / "copied" / "train-000000.tar").stat().st_ino != a0.st_ino
    assert [s.sha256 for s in read_manifest(tmp_path / "copied").shards] == [s.sha256 for s in m.shards]


def test_merge_keeps_the_most_dangerous_edibility_and_refuses_name_conflicts(tmp_path, capsys):
    a = worker_output(tmp_path / "a", ["amanita_pallida", "boletus_bonus"], "a")
    other = Species("boletus_bonus", "Boletus bonus", "Good bolete", edibility="poisonous")
    c = worker_output(tmp_path / "c", ["boletus_bonus"], "c", species=[other])
    assert main(["merge-manifests", str(tmp_path / "m0"), str(a), str(c)]) == 0
    sp = json.loads((tmp_path / "m0" / "species.json").read_text())["boletus_bonus"]
    assert sp["edibility"] == "poisonous"
    assert sorted(sp["edibility_sources"].values()) == ["choice", "poisonous"]
    notes = read_manifest(tmp_path / "m0").data["merge_notes"]
    assert any("kept the more dangerous 'poisonous'" in n for n in notes)

    renamed = Species("boletus_bonus", "Boletus malus", "Good bolete", edibility="choice")
    e = worker_output(tmp_path / "e", ["boletus_bonus"], "e", species=[renamed])
    assert main(["merge-manifests", str(tmp_path / "m1"), str(a), str(e)]) == 2
    err = capsys.readouterr().err
    assert "disagree" in err and "'boletus_bonus' scientific_name" in err
    assert not (tmp_path / "m1" / "manifest.json").exists()

    d = worker_output(tmp_path / "d", ["boletus_bonus"], "a")  # keys a-000... again
    assert main(["merge-manifests", str(tmp_path / "m2"), str(a), str(d)]) == 2
    assert "appear in more than one input" in capsys.readouterr().err

    assert main(["merge-manifests", str(a), str(a), str(d)]) == 2
    assert "is also an input" in capsys.readouterr().err
    assert main(["merge-manifests", str(d), str(a)]) == 2
    assert "already holds a data set" in capsys.readouterr().err
    read_manifest(a)
    read_manifest(d)


@pytest.mark.parametrize("unknown_first", [True, False])
def test_unknown_facts_are_filled_not_conflicts(tmp_path, unknown_first):
    known = BY_LABEL["boletus_bonus"]
    unknown = Species("boletus_bonus", "", "", source="folder", facts={"folder": "boletus"})
    a = worker_output(tmp_path / "a", ["boletus_bonus"], "a", species=[unknown if unknown_first else known])
    b = worker_output(tmp_path / "b", ["boletus_bonus"], "b", species=[known if unknown_first else unknown])
    assert main(["merge-manifests", str(tmp_path / "m"), str(a), str(b)]) == 0
    sp = json.loads((tmp_path / "m" / "species.json").read_text())["boletus_bonus"]
    assert (sp["scientific_name"], sp["edibility"], sp["facts"]) == ("Boletus bonus", "choice", {"folder": "boletus"})
