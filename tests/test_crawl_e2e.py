"""The crawler against the mock site on 127.0.0.1: each fault alone and all together must give exactly
the valid unique photos with the right labels and facts; politeness measured server-side."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from crawl_helpers import content, crawl_cfg, expected_content, pixel_hash

from mycodist.cli import main as cli_main
from mycodist.crawl.crawler import crawl
from mycodist.crawl.mock_site import FAULTS, MockSite, simple_photo, write_synth_reference


@pytest.fixture
def site_factory(tmp_path_factory):
    started = []

    def make(**kw):
        site = MockSite(**{"n_species": 3, "per_species": 4, **kw})
        # the site's pages name no lookalikes; its own pairs come as a reference (as in `make demo`)
        site.reference_file = tmp_path_factory.mktemp("ref") / "lookalikes.csv"
        write_synth_reference(site.reference_file, len(site.species))
        url = site.start_in_thread()
        started.append(site)
        return site, url

    yield make
    for s in started:
        s.stop()


def check_output(site, out, per_host: int = 4) -> dict:
    want, got = expected_content(site), content(out)
    label = site.species[0].label
    near = site.extra.get(f"resized-{label}.jpg")
    if near and (label, pixel_hash(near[0])) in got:  # whichever of two near-duplicates came first is kept
        want[(label, pixel_hash(site.photos[label][2]))] -= 1
        want[(label, pixel_hash(near[0]))] += 1
    assert got == +want
    species = json.loads((out / "species.json").read_text())
    for label, sp in site.expected_species().items():
        got = species[label]
        assert (got["scientific_name"], got["common_name"], got["family"], got["edibility"]) == \
            (sp.scientific_name, sp.common_name, sp.family, sp.edibility)
        assert sorted(got["lookalikes"]) == sorted(sp.lookalikes) and got["lookalike_record"]
        for lk in sp.lookalikes:  # what tells them apart travels with the link
            assert got["lookalike_notes"][lk]["features"] and got["lookalike_notes"][lk]["citation"]
    stats = site.stats.to_json()
    assert stats["disallowed_requests"] == 0
    assert max(stats["peak_concurrent_per_host"].values()) <= per_host
    assert cli_main(["verify", str(out)]) == 0
    return json.loads((out / "crawl_report.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("fault", [*FAULTS, "all"])
def test_each_fault_alone_and_all(site_factory, tmp_path, fault):
    faults = FAULTS if fault == "all" else (fault,)
    site, url = site_factory(faults=faults)
    crawl("mushroomworld", tmp_path / "out", crawl_cfg(url, "crawl.near_dup=true",
                                                         f"catalog.references=[{site.reference_file}]"))
    report = check_output(site, tmp_path / "out")
    reasons = {r for by in report["by_reason"].values() for r in by}
    want = {"404": "http_404", "truncated": "truncated", "html": "not_image", "bomb": "too_many_pixels",
            "tiny": "too_small", "noai": "x_robots_tag", "disallowed": "robots_disallowed",
            "redirect": "too_many_redirects", "dup": "same_pixels", "near": "near_duplicate"}
    for f in faults:
        if f in want:
            assert want[f] in reasons, (f, report["by_reason"])
    if "dup" in faults:
        dups = report["by_reason"]["duplicate"]
        assert (dups["same_bytes"], dups["same_pixels"]) == (1, 1)
    if "500" in faults or "429" in faults:
        assert report["this_run"]["retries"] > 0


@pytest.mark.slow
def test_near_duplicates_kept_unless_asked(site_factory, tmp_path):
    site, url = site_factory(faults=("near",))
    crawl("mushroomworld", tmp_path / "out", crawl_cfg(url))
    assert sum(content(tmp_path / "out").values()) == sum(expected_content(site).values()) + 1


@pytest.mark.slow
def test_per_host_cap_is_never_exceeded(site_factory, tmp_path):
    site, url = site_factory(n_species=2, per_species=12, delay=0.03)
    crawl("mushroomworld", tmp_path / "out", crawl_cfg(url, "crawl.per_host=3", "crawl.concurrency=32"))
    peak = max(site.stats.peak.values())
    assert 2 <= peak <= 3  # the cap binds (the test could see more) and is never exceeded
    assert content(tmp_path / "out") == expected_content(site)


@pytest.mark.slow
def test_wildfooduk_markup(site_factory, tmp_path):
    site, url = site_factory()
    crawl("wildfooduk", tmp_path / "out", crawl_cfg(url, f"catalog.references=[{site.reference_file}]"))
    check_output(site, tmp_path / "out")


@pytest.mark.slow
def test_rerun_is_a_no_op_and_retry_failed_replays_failures(site_factory, tmp_path):
    site, url = site_factory(faults=("404", "truncated"))
    out = tmp_path / "out"
    crawl("mushroomworld", out, crawl_cfg(url))
    again = crawl("mushroomworld", out, crawl_cfg(url))
    assert again["this_run"]["accepted"] == 0 and again["this_run"]["requests"] < 10  # pages only
    label = site.species[0].label
    crawl("mushroomworld", out, crawl_cfg(url))
    assert json.loads((out / "crawl_report.json").read_text())["by_reason"]["failed"] == {"http_404": 1}
    fixed = simple_photo(label, 77, 300, 0)  # the 404 is fixed upstream: a new photo appears at that URL
    site.files[f"missing-{label}.jpg"] = (fixed, 99)
    report = crawl("mushroomworld", out, crawl_cfg(url), retry_failed=True)
    assert report["this_run"]["accepted"] == 1 and "failed" not in report["by_state"]
    assert content(out) == expected_content(site) + Counter({(label, pixel_hash(fixed)): 1})
    assert "truncated" in report["by_reason"]["rejected"]  # rejections are not replayed


@pytest.mark.slow
def test_workers_partition_urls(site_factory, tmp_path):
    site, url = site_factory(n_species=2, per_species=6)
    parts = [crawl("mushroomworld", tmp_path / f"w{i}",
                   crawl_cfg(url, "crawl.num_workers_total=2", f"crawl.worker_index={i}")) for i in range(2)]
    a, b = content(tmp_path / "w0"), content(tmp_path / "w1")
    assert not (set(a) & set(b))
    assert a + b == expected_content(site)
    assert all(p["photos"] > 0 for p in parts)
    c0 = json.loads((tmp_path / "w0" / "class_indices.json").read_text())
    assert c0 == json.loads((tmp_path / "w1" / "class_indices.json").read_text())
    assert cli_main(["merge-manifests", str(tmp_path / "all"), str(tmp_path / "w0"), str(tmp_path / "w1")]) == 0
    assert cli_main(["verify", str(tmp_path / "all")]) == 0
    assert content(tmp_path / "all") == expected_content(site)


@pytest.mark.slow
def test_manifest_with_bad_rows(site_factory, tmp_path):
    site, url = site_factory(n_species=2, per_species=3)
    rows = ["Common_Name,Scientific_Name,Link"]
    for sp in site.species:
        for i in range(3):
            rows.append(f"{sp.common_name},{sp.label},{url}/data/fungi/{site._name(sp, i)}")
    rows += [f"x,{site.species[0].label},", f"x,{site.species[0].label},ftp://example.org/a.jpg",
             rows[1], f"x,,{url}/data/fungi/other.jpg"]
    csv = tmp_path / "urls.csv"
    csv.write_text("\n".join(rows) + "\n")
    report = crawl(f"manifest:{csv}", tmp_path / "out", crawl_cfg(url))
    assert report["discovery"]["problems"] == {"missing_url": 1, "bad_url": 1, "duplicate_url": 1, "missing_label": 1}
    assert content(tmp_path / "out") == expected_content(site)
    species = json.loads((tmp_path / "out" / "species.json").read_text())
    assert species[site.species[0].label]["scientific_name"] == site.species[0].scientific_name


@pytest.mark.slow
def test_a_site_calling_the_death_cap_edible_ends_up_deadly(site_factory, tmp_path, capsys):
    """The packaged reference overrules a source that calls a deadly species edible, keeps the
    disagreement on record (species.json and `mycodist stats`) and links its lookalikes both ways."""
    site, url = site_factory(n_species=2, per_species=3)
    rows = ["Scientific_Name,Edibility,Link"]
    for name, sp in (("Amanita phalloides", site.species[0]), ("Agaricus campestris", site.species[1])):
        rows += [f"{name},Edible and good,{url}/data/fungi/{site._name(sp, i)}" for i in range(3)]
    csv = tmp_path / "urls.csv"
    csv.write_text("\n".join(rows) + "\n")
    crawl(f"manifest:{csv}", tmp_path / "out", crawl_cfg(url))
    species = json.loads((tmp_path / "out" / "species.json").read_text())
    cap, field = species["amanita_phalloides"], species["agaricus_campestris"]
    assert cap["edibility"] == "deadly"
    assert cap["edibility_sources"] == {"manifest:urls.csv": "edible", "reference:lookalikes.csv": "deadly"}
    assert "agaricus_campestris" in cap["lookalikes"] and "amanita_phalloides" in field["lookalikes"]
    assert field["edibility"] == "edible" and field["lookalike_notes"]["amanita_virosa"]["edibility"] == "deadly"
    assert "volva" in field["lookalike_notes"]["amanita_phalloides"]["features"]
    capsys.readouterr()
    assert cli_main(["stats", str(tmp_path / "out"), "--report", str(tmp_path / "report"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "edibility disagreement: amanita_phalloides" in out and "deadly is used" in out
    assert "Sources disagree on edibility" in (tmp_path / "report" / "report.md").read_text()
