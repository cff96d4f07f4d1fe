"""`facelens report`: the default run, its JSON and HTML, bad inputs, and atomic output."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facelens.cli import main
from facelens.errors import FaceLensError
from facelens.report import builder
from facelens.report.builder import ReportSettings, build_report, write_report

EXTERNAL = re.compile(r"""(?:src|href|action|poster|data)\s*=\s*["']?\s*(?:https?:|//|ftp:)"""
                      r"""|url\(\s*["']?(?:https?:|//)|@import""", re.I)
SECTIONS = ("looks", "filters", "anonymization", "one_shot", "bias", "shipping")


def _numbers(obj, path="$"):
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return
    if isinstance(obj, (int, float)):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")


@pytest.fixture(scope="module")
def default_report(tmp_path_factory) -> Path:
    """The default run, exactly as `make demo` does it (no arguments), built once for this module."""
    out = tmp_path_factory.mktemp("report") / "report"
    assert main(["report", "--out", str(out)]) == 0
    return out


def test_default_report_has_every_section_built(default_report):
    data = json.loads((default_report / "report.json").read_text())
    assert set(SECTIONS) <= set(data["sections"])
    errors = {k: s["error"] for k, s in data["sections"].items() if s["error"]}
    assert not errors, errors
    assert [p["name"] for p in data["inputs"]] == ["eileen_collins", "grace_hopper"]
    looks = data["sections"]["looks"]["data"]
    for model in builder.DEFAULT_MODELS:
        photos = looks[model]["photos"]
        assert len(photos) == 2, model
        for p in photos:
            shares = p["methods"]["gradcam"]["region_share"]
            assert sum(shares.values()) == pytest.approx(1.0, abs=1e-6)
    assert data["sections"]["bias"]["data"]["skipped"] == "no labelled manifest"


def test_default_report_numbers_are_finite(default_report):
    data = json.loads((default_report / "report.json").read_text())
    numbers = list(_numbers(data["sections"]))
    assert len(numbers) > 100
    bad = [(p, v) for p, v in numbers if not math.isfinite(v)]
    assert not bad, bad[:5]


def test_default_report_html_is_self_contained(default_report):
    page = (default_report / "index.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert not EXTERNAL.search(page), EXTERNAL.search(page).group(0)
    assert "<script" not in page.lower()
    assert page.count('src="data:image/png;base64,') + page.count('src="data:image/webp;base64,') >= 8
    for title in ("Where the network looks", "What the filters detect", "Anonymization", "One-shot recognition",
                  "Bias summary", "Shipping"):
        assert title in page
    # saliency maps come first: the first section after the inputs is "where the network looks"
    assert page.index("Where the network looks</h2>") < page.index("What the filters detect</h2>")


def test_default_report_leads_with_what_holds_and_warns_beside_every_map(default_report):
    data = json.loads((default_report / "report.json").read_text())
    page = (default_report / "index.html").read_text()
    # Key findings come first, and list only what the verdict rule supports
    assert page.index("Key findings</h2>") < page.index("<nav>") < page.index('<section id="looks">')
    assert all(": supported — " in f["finding"] for f in data["key_findings"])
    # two portraits: every sanity verdict rests on fewer photos than a verdict needs, and the page says so
    looks = data["sections"]["looks"]["data"]
    for model in builder.DEFAULT_MODELS:
        for row in looks[model]["sanity"]:
            assert row["verdict"] == "inconclusive" and row["n_photos"] == 2 and "fewer than 8" in row["reason"]
        assert looks[model]["target"]["n"] == 2 and "unit" in looks[model]["target"]
        assert {r["map"] for r in looks[model]["faithfulness"]} >= {"random", "edges", "centre"}
    section = page[page.index('<section id="looks">'):page.index('<section id="filters">')]
    assert section.count("Sanity check not passed") == section.count("<figure><img") - len(builder.DEFAULT_MODELS)
    # the no-manifest notice precedes the numbers it qualifies
    anon = page[page.index('<section id="anonymization">'):]
    assert anon.index("Illustration, not a measurement") < anon.index("<table")


def test_a_corrupt_photo_among_good_ones_is_named_and_the_rest_is_built(tmp_path, capsys):
    from facelens.portraits import default_portraits

    good = tmp_path / "hopper.png"
    Image.fromarray(default_portraits()[1].image).save(good)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF" + b"\x00" * 40)
    empty = tmp_path / "no_face.png"
    Image.fromarray(np.full((200, 200, 3), 90, np.uint8)).save(empty)
    out = tmp_path / "rep"
    code = main(["report", str(good), str(bad), str(empty), "--model", "dlib-gender", "--methods", "gradcam",
                 "--no-filters", "--no-studies", "--no-shipping", "--no-sanity", "--out", str(out)])
    assert code == 0
    err = capsys.readouterr().err
    assert "broken.jpg" in err
    data = json.loads((out / "report.json").read_text())
    assert [b["source"] for b in data["bad_inputs"]] == [str(bad)]
    assert [p["photo"] for p in data["sections"]["looks"]["data"]["dlib-gender"]["photos"]] == ["hopper"]
    notes = " ".join(data["sections"]["looks"]["notes"])
    assert "no_face" in notes
    page = (out / "index.html").read_text()
    assert "broken.jpg" in page and "no_face" in page


def test_write_report_never_replaces_a_foreign_folder_and_is_all_or_nothing(tmp_path, monkeypatch):
    rep = build_report(ReportSettings(models=["dlib-gender"], methods=["gradient"], sanity=False, filters=False,
                                      studies=False, shipping=False), progress=False)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(FaceLensError, match="not empty"):
        write_report(rep, foreign)
    assert (foreign / "thesis.tex").read_text() == "precious"

    out = tmp_path / "rep"
    write_report(rep, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fail(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(builder, "atomic_write_text", fail)
    with pytest.raises(KeyboardInterrupt):
        write_report(rep, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temporary folder was left behind"
    shutil.rmtree(out)
