"""`facelens evaluate`: a manifest streams through methods and metrics; bad photos are skipped and counted."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
from PIL import Image

from facelens.cli import main
from facelens.portraits import default_portraits


def _manifest(tmp_path):
    rows = []
    for p in default_portraits():
        path = tmp_path / f"{p.name}.png"
        Image.fromarray(p.image).save(path)
        rows.append(path)
    flipped = tmp_path / "hopper_flipped.png"
    Image.fromarray(default_portraits()[1].image[:, ::-1]).save(flipped)
    rows.append(flipped)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((100, 100, 3), 200, np.uint8)).save(blank)
    rows += [corrupt, blank]
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "identity"])
        for r in rows:
            w.writerow([r.name, r.stem])
    return manifest


def _finite(obj) -> bool:
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_finite(v) for v in obj)
    return not isinstance(obj, float) or math.isfinite(obj)


def test_evaluate_cli_streams_and_reports_bad_photos(tmp_path, capsys):
    manifest = _manifest(tmp_path)
    out = tmp_path / "eval"
    code = main(["evaluate", "--manifest", str(manifest), "--model", "dlib-gender", "--methods",
                 "gradient,occlusion", "--metrics", "deletion,insertion,masked,pointing,agreement",
                 "--steps", "8", "--out", str(out)])
    assert code == 0
    data = json.loads((out / "evaluation.json").read_text())
    assert data["rows_in"] == 5 and data["rows_out"] == 3
    reasons = {s["path"].rsplit("/", 1)[-1]: s["reason"] for s in data["skipped"]}
    assert set(reasons) == {"corrupt.jpg", "blank.png"} and "face" in reasons["blank.png"]
    m = data["metrics"]
    for method in ("gradient", "occlusion", "random", "edges", "centre"):  # the controls are always scored
        assert m[f"deletion:{method}"]["n"] == 3 and len(m[f"deletion:{method}"]["mean_curve"]) == 9
        lo, hi = m[f"deletion:{method}"]["ci"]
        assert lo <= m[f"deletion:{method}"]["auc_mean"] <= hi
        assert m[f"insertion:{method}"]["n"] == 3
        assert 0 <= m[f"pointing:{method}"]["hit_rate"] <= 1 and len(m[f"pointing:{method}"]["ci"]) == 2
        assert "average_drop_pct" in m[f"masked:{method}"]
    assert "win_pct" in m["masked:gradient"] and "win_pct" not in m["masked:random"]  # controls do not compete
    assert m["agreement:gradient vs occlusion"]["n"] == 3
    assert _finite({k: v for k, v in m.items() if not k.startswith("masked")})
    t = data["target"]
    assert t["name"] == "class" and t["unit"] == "logit" and t["n"] == 3
    assert {"intact", "deleted", "deleted_blur", "deleted_mean", "impostor_median"} <= set(t)
    assert t["impostor_median"] is None  # a class score has no impostor
    # three photos: every comparison is inconclusive, whatever the numbers
    assert {c["status"] for comps in data["comparisons"].values() for c in comps} == {"inconclusive"}
    table = list(csv.DictReader((out / "evaluation.csv").read_text().splitlines()))
    assert {"deletion", "insertion", "masked", "pointing", "agreement"} <= {r["metric"] for r in table}
    assert any(r["ci_low"] for r in table if r["metric"] == "deletion")
    assert (out / "curves.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "3/5 photos evaluated, 2 skipped" in printed and "target: logit of" in printed


def test_evaluate_rejects_unknown_metric(tmp_path, capsys):
    manifest = _manifest(tmp_path)
    assert main(["evaluate", "--manifest", str(manifest), "--metrics", "nope", "--out", str(tmp_path)]) == 1
    assert "unknown metric" in capsys.readouterr().err


def test_evaluate_sanity_inpainting_and_annotated_pupils(shared_faces):
    from facelens.datasets import read_manifest
    from facelens.evaluate.runner import evaluate

    london = read_manifest(shared_faces / "manifest.csv", datasets=["frl_london"])
    ids = sorted({r.identity for r in london})[:5]
    rows = [r for r in london if r.identity in ids]
    result = evaluate(rows, "dlib-resnet", ["gradient"], ["pointing", "sanity", "inpainting"], photo_batch=5)
    m = result.metrics
    assert result.rows_out == len(rows) == 10
    # only the neutral photos carry .tem annotations: pupils are points 0 and 1
    assert m["pointing_pupils:gradient"]["n"] == 5
    s = m["sanity:gradient"]
    assert s["verdict"] in ("pass", "fail", "inconclusive") and s["n_images"] == 8
    assert s["ci"][0] <= s["rank_corr"] <= s["ci"][1] and s["decision"]["n_units"] == 8
    game = m["inpainting"]
    assert game["game_set"]["candidates"] == 5 * 4  # one donor per probe and region
    assert 0 <= game["game_set"]["kept"] <= game["game_set"]["candidates"]
    assert _finite(game)


def test_on_london_the_target_has_range_and_occlusion_beats_the_random_map(shared_faces):
    """The issue's acceptance, as a test: 12 FRL London neutral photos, dlib-resnet, default target."""
    from facelens.datasets import read_manifest
    from facelens.evaluate.runner import evaluate

    rows = [r for r in read_manifest(shared_faces / "manifest.csv", datasets=["frl_london"])
            if r.subset == "neutral"][:12]
    result = evaluate(rows, "dlib-resnet", ["occlusion"], ["deletion"])
    t = result.target
    assert t["name"] == "cohort" and t["n"] == 12
    assert t["deleted_blur"] <= t["impostor_median"] < t["intact"] - 3  # blurring the face away removes the match
    assert t["impostor_median_manifest"] is not None  # measured on the other 11 people too
    occ, rnd = result.metrics["deletion:occlusion"], result.metrics["deletion:random"]
    assert occ["ci"][1] < rnd["ci"][0]  # occlusion's whole interval lies below the random map's
    comp = next(c for c in result.comparisons["deletion"] if (c["a"], c["b"]) == ("occlusion", "random"))
    assert comp["status"] == "supported" and comp["ci"][1] < 0
