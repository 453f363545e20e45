"""Site adapters' parsing (markup as in docs/crawling.md) and manifest inputs in every format,
with bad rows counted rather than fatal."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mycodist.crawl.sources import mushroomworld, wildfooduk
from mycodist.crawl.sources.url_list import ManifestSource
from mycodist.errors import UsageError

NAMELIST = """<div id="name-list"><div class="item"><a href="/show?n=Agaricus-arvensis">Agaricus arvensis</a>
<span><a href="/other">x</a></span></div><div class="item"><a href="https://m.example/show?n=Amanita-phalloides">A</a></div></div>"""

PAGE = """<html><body><div class="caption"><b>Amanita phalloides</b> (Death cap)</div>
<div class="labelus">Family:</div><div class="textus">Amanitaceae</div>
<div class="labelus">Edibility:</div><div class="textus">Deadly poisonous</div>
<div class="labelus">Description:</div><div class="longtextus">Greenish cap.<br>White gills.</div>
<div class="labelus">Similar species:</div><div class="textus">Agaricus campestris; Russula virescens</div>
<div id="mushroom-list"><div class="image"><a href="data/fungi/Amanitaphalloides1.jpg" title="Amanita phalloides">
<img src="thumb.jpg"></a></div><div class="image"><a href="/data/fungi/Amanitaphalloides2.jpg"></a></div></div>
</body></html>"""

WILD = """<div id="mushroom-title"><h1>Blushing Rosette</h1></div>
<p><strong>Latin name:</strong> Abortiporus biennis</p><p>Edibility: Inedible</p><p>Lookalikes: Xus yus</p>
<div id="thumblist"><a href="/wp-content/uploads/2023/02/Blushing-rosette-8.jpg"><img src="/t/small.jpg"></a></div>"""


def test_mushroomworld_markup():
    urls = mushroomworld.parse_namelist(NAMELIST, "https://m.example/mushrooms/namelist")
    assert urls == ["https://m.example/show?n=Agaricus-arvensis", "https://m.example/show?n=Amanita-phalloides"]
    sp, photos = mushroomworld.parse_species_page(PAGE, "https://m.example/show?n=Amanita-phalloides")
    assert (sp.label, sp.scientific_name, sp.common_name) == ("amanita_phalloides", "Amanita phalloides", "Death cap")
    assert (sp.family, sp.edibility, sp.facts["edibility_text"]) == ("Amanitaceae", "deadly", "Deadly poisonous")
    assert sp.facts["description"] == "Greenish cap. White gills."
    assert sp.lookalikes == ["Agaricus campestris", "Russula virescens"] and "similar species" not in sp.facts
    assert photos == ["https://m.example/data/fungi/Amanitaphalloides1.jpg",
                      "https://m.example/data/fungi/Amanitaphalloides2.jpg"]


def test_wildfooduk_markup_and_unknown_edibility():
    assert wildfooduk.parse_guide('<div id="mushroom-guide"><td class="mushroom-image"><a href="/m/x/">x</a></td></div>',
                                  "https://w.example/mushroom-guide/") == ["https://w.example/m/x/"]
    sp, photos = wildfooduk.parse_species_page(WILD, "https://w.example/m/x/")
    assert (sp.label, sp.common_name, sp.edibility) == ("abortiporus_biennis", "Blushing Rosette", "inedible")
    assert sp.lookalikes == ["Xus yus"]
    assert photos == ["https://w.example/wp-content/uploads/2023/02/Blushing-rosette-8.jpg"]
    bare, _ = wildfooduk.parse_species_page('<div id="mushroom-title"><h1>Odd one</h1></div>', "https://w.example/o/")
    assert (bare.label, bare.edibility) == ("odd_one", "unknown")


def test_original_csv_formats(tmp_path):
    a = tmp_path / "mushroom_images.csv"
    a.write_text("Common_Name,Scientific_Name,Link\nhorse_mushroom,agaricus_arvensis,https://x.org/A1.jpg\n"
                 "horse_mushroom,agaricus_arvensis,https://x.org/A2.jpg\n")
    d = ManifestSource(str(a)).read()
    assert [p.label for p in d.photos] == ["agaricus_arvensis"] * 2
    sp = d.species["agaricus_arvensis"]
    assert (sp.scientific_name, sp.common_name, sp.edibility) == ("Agaricus arvensis", "Horse mushroom", "unknown")
    c = tmp_path / "with_lookalikes.csv"
    c.write_text("label,url,lookalikes\nAgaricus arvensis,https://x.org/A1.jpg,Amanita virosa; Amanita phalloides\n")
    assert ManifestSource(str(c)).read().species["agaricus_arvensis"].lookalikes == ["Amanita virosa", "Amanita phalloides"]
    b = tmp_path / "mushroom_uk_images.csv"
    b.write_text("Common_Name,Link\nblushing_rosette,https://w.org/B-8.jpg\n")
    assert [p.label for p in ManifestSource(str(b)).read().photos] == ["blushing_rosette"]


def test_bad_rows_are_counted(tmp_path):
    rows = [{"url": "https://x.org/1.jpg", "species": "A b"}, {"url": "", "species": "A b"},
            {"url": "ftp://x.org/2.jpg", "species": "A b"}, {"url": "https://x.org/1.jpg", "species": "A b"},
            {"url": "https://x.org/3.jpg", "species": ""}, {"url": "javascript:alert(1)", "species": "A b"}]
    j = tmp_path / "list.jsonl"
    j.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    d = ManifestSource(str(j)).read()
    assert [p.url for p in d.photos] == ["https://x.org/1.jpg"]
    assert d.problems == {"missing_url": 1, "bad_url": 2, "duplicate_url": 1, "missing_label": 1, "bad_row": 1}


def test_tsv_parquet_and_named_columns(tmp_path):
    t = tmp_path / "l.tsv"
    t.write_text("photo\tkind\nhttps://x.org/1.jpg\tCantharellus cibarius\n")
    d = ManifestSource(str(t), url_column="photo", label_column="kind").read()
    assert d.photos[0].label == "cantharellus_cibarius"
    with pytest.raises(UsageError, match="crawl.url_column"):
        ManifestSource(str(t)).read()
    p = tmp_path / "l.parquet"
    pq.write_table(pa.table({"URL": ["https://x.org/9.jpg"], "label": ["boletus_edulis"]}), p)
    assert ManifestSource(str(p)).read().photos[0].label == "boletus_edulis"
