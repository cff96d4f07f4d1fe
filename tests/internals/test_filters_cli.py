"""``facelens filters`` writes its PNG, JSON and HTML, and fails cleanly on bad input."""

from __future__ import annotations

import json

import pytest

from facelens.cli import main
from facelens.datasets import read_manifest
from facelens.internals.dataset_view import sample_rows


def test_filters_writes_png_json_html(shared_faces, tmp_path, capsys) -> None:
    rows = sample_rows([r for r in read_manifest(shared_faces / "manifest.csv") if r.dataset == "utkface"], 4)
    csv = tmp_path / "faces.csv"
    csv.write_text("path,dataset\n" + "".join(f"{r.path},utkface\n" for r in rows))
    out = tmp_path / "out"
    rc = main(["filters", "--model", "dlib-gender", "--channels", "2", "--steps", "3", "--manifest", str(csv),
               "--faces", "4", "--view-channels", "1", "--top", "2", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert str(out / "filters.json") in printed and "dlib-gender" in printed
    for name in ("filters.json", "filters.html", "filters_am_grid.png", "filters_stats.png", "filters_kernels.png",
                 "filters_dataset_early.png", "filters_layers.csv", "filters_units.csv"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    data = json.loads((out / "filters.json").read_text())
    assert data["model"] == "dlib-gender" and data["settings"]["activation_max"]["steps"] == 3
    assert len(data["activation_max"]["units"]) == 6  # 2 channels × 3 depths
    assert {"activation", "noise_mean", "z_vs_noise"} <= set(data["activation_max"]["units"][0])
    assert len(data["filter_stats"]["layers"]) >= 3 and data["filter_stats"]["faces"] == 4
    assert data["verdicts"] and all(isinstance(v, str) for v in data["verdicts"])
    assert len(data["dataset_views"]) == 3 and data["dataset_views"][0]["patches"]
    html = (out / "filters.html").read_text()
    assert html.startswith("<section") and "data:image/png;base64," in html and "http" not in html


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "no-such-model"], "unknown model"),
    (["--model", "dlib-gender", "--layers", "early,nowhere"], "no layer 'nowhere'"),
    (["--model", "dlib-gender", "--manifest", "/no/such/manifest.csv"], "manifest not found"),
])
def test_filters_errors_are_one_line(args, message, tmp_path, capsys) -> None:
    rc = main(["filters", *args, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 1 and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "x").exists()
