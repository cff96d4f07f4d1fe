"""StudyResult files and the per-photo chip-variant worker shared by the studies."""

from __future__ import annotations

import csv
import functools
import json
from pathlib import Path

import numpy as np
import pytest

from facelens.datasets import ManifestRow, read_manifest
from facelens.faces.anonymize import anonymize
from facelens.studies.base import StudyResult
from facelens.studies.features import extract


def test_write_produces_json_csv_png_and_html(tmp_path):
    r = StudyResult("toy", "m", settings={"k": 1}, summary={"rate": 0.5, "undefined": float("nan")},
                    tables={"rates": [{"group": "a", "rate": 0.5}, {"group": "b", "rate": 0.25, "n": 4}]},
                    verdicts=["a differs from b"], failures=[{"path": "x.jpg", "reason": "no face"}])
    with pytest.raises(ValueError, match="caption"):
        r.add_figure("empty", np.zeros((2, 2, 3), np.uint8), "")
    r.add_figure("fig", np.zeros((4, 5, 3), np.uint8), "a black figure")
    paths = r.write(tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert data["summary"] == {"rate": 0.5, "undefined": None}
    assert data["figures"] == {"fig": "a black figure"}
    with open(paths["csv:rates"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"group": "a", "rate": "0.5", "n": ""}, {"group": "b", "rate": "0.25", "n": "4"}]
    assert paths["png:fig"].stat().st_size > 0
    page = paths["html"].read_text()
    assert "a differs from b" in page and "x.jpg" in page and "data:image/png;base64," in page


@pytest.fixture(scope="module")
def few_rows(shared_faces: Path) -> list[ManifestRow]:
    rows = [r for r in read_manifest(shared_faces / "manifest.csv") if r.dataset == "frl_london"][:3]
    return rows


def test_extract_runs_variants_in_one_pass_and_reports_bad_photos(few_rows, tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    blank = tmp_path / "blank.png"
    from PIL import Image

    Image.fromarray(np.full((120, 120, 3), 128, np.uint8)).save(blank)
    rows = [few_rows[0], ManifestRow(path=corrupt), few_rows[1], ManifestRow(path=blank), few_rows[2]]
    variants = [("original", None), ("eye_bar", functools.partial(anonymize, method="eye_bar")),
                ("full_face", functools.partial(anonymize, method="full_face"))]
    res = extract(rows, "dlib-resnet", variants, layers=["stage4.block2.relu2"], pool=1, keep_chips=True,
                  batch_size=2)
    assert (res.rows_in, res.rows_out, len(res.failures)) == (5, 3, 2)
    assert [r.path for r in res.rows] == [few_rows[i].path for i in range(3)]
    assert {f.path for f in res.failures} == {str(corrupt), str(blank)}
    from facelens.models import load_model

    model = load_model("dlib-resnet")
    for row, rec in zip(res.rows, res.records, strict=True):
        direct = model.embed(row.path)
        np.testing.assert_allclose(rec.outputs["original"], direct, atol=1e-5)
        masked = model.forward_chips(rec.chips["eye_bar"])[0]
        np.testing.assert_allclose(rec.outputs["eye_bar"], masked, atol=1e-5)
        d = {k: float(np.linalg.norm(v - direct)) for k, v in rec.outputs.items()}
        assert d["original"] < 1e-4 < d["eye_bar"] < d["full_face"]
        assert rec.layer_features["stage4.block2.relu2"]["original"].shape == (256,)
