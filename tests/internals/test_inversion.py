"""Feature inversion: the input layer gives the photo back; deeper layers reach their feature target."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from facelens import wrap
from facelens.cli import main
from facelens.errors import FaceLensError
from facelens.internals.inversion import (
    InversionSettings,
    extract_features,
    invert_features,
    invert_report,
    pixel_metrics,
)
from facelens.portraits import default_portraits


@pytest.fixture(scope="module")
def tiny():
    """A small random CNN over whole images (no face detection), with early/mid/late layers."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(16, 4))
    return wrap(net, task="embedding", input_size=48, align=None,
                layers={"early": "1", "mid": "3", "late": "5"}, name="tiny")


@pytest.fixture(scope="module")
def portraits():
    return [p.image for p in default_portraits()]


def test_input_layer_inversion_recovers_the_photo(tiny, portraits):
    x = tiny.to_tensor(tiny.chip(portraits[0]))
    batch = invert_features(tiny, "input", x, ("tv", "pyramid"), InversionSettings(steps=80))
    photo = (x[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    noise_rmse = float(batch.start_distance[0]) * float(x.pow(2).mean().sqrt())  # RMSE of the starting noise
    for i, prior in enumerate(("tv", "pyramid")):
        img = (batch.images[i].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        m = pixel_metrics(img, photo)
        assert m["rmse"] < 0.05 and m["rmse"] < 0.2 * noise_rmse, (prior, m, noise_rmse)
        assert m["ssim"] > 0.9, (prior, m)
        assert batch.feature_distance[i] < 0.15 * batch.start_distance[i]


def test_each_target_in_a_batch_gets_its_own_image(tiny, portraits):
    x = torch.cat([tiny.to_tensor(tiny.chip(p)) for p in portraits])
    batch = invert_features(tiny, "input", x, ("tv",), InversionSettings(steps=60))
    err = [[float((batch.images[i] - x[j]).pow(2).mean()) for j in range(2)] for i in range(2)]
    assert err[0][0] < 0.1 * err[0][1] and err[1][1] < 0.1 * err[1][0]


@pytest.mark.parametrize("depth", ["early", "mid", "late"])
def test_deeper_layers_reach_their_feature_target(tiny, portraits, depth):
    x = tiny.to_tensor(tiny.chip(portraits[0]))
    with torch.no_grad():
        target = extract_features(tiny, x, depth)
    batch = invert_features(tiny, depth, target, ("tv", "pyramid"), InversionSettings(steps=60))
    assert batch.images.shape == (2, 3, 48, 48)
    assert float(batch.images.min()) >= 0 and float(batch.images.max()) <= 1
    assert (batch.feature_distance < 0.5 * batch.start_distance).all(), (batch.start_distance, batch.feature_distance)


def test_dlib_resnet_early_layer_inversion_drops_the_feature_distance(portraits):
    from facelens.models import load_model

    model = load_model("dlib-resnet")
    report = invert_report(portraits[0], model=model, layers=["early"], settings=InversionSettings(steps=30))
    for run in report.runs:
        assert run.feature_distance < 0.6 * run.start_feature_distance, run.row()
        assert run.image.shape == (150, 150, 3)


def test_interpolation_ends_match_their_faces(tiny, portraits, tmp_path):
    report = invert_report(portraits[0], model=tiny, layers=["input"], priors=["tv"], second=portraits[1],
                           alphas=(0.0, 1.0), interpolation_layer="input", interpolation_prior="tv",
                           settings=InversionSettings(steps=40))
    it = report.interpolation
    assert it is not None
    assert it.rmse_to_a[0] < 0.5 * it.rmse_to_b[0]
    assert it.rmse_to_b[1] < 0.5 * it.rmse_to_a[1]
    assert it.output_distance_to_a[0] < it.output_distance_to_b[0]
    paths = report.write(tmp_path / "inv")
    data = json.loads(paths["json"].read_text())
    assert data["interpolation"]["rows"][0]["alpha"] == 0.0
    assert paths["interpolation_png"].stat().st_size > 0 and "<figure>" in paths["html"].read_text()


def test_bad_settings_and_layers_are_facelens_errors(tiny, portraits):
    with pytest.raises(FaceLensError, match="steps"):
        InversionSettings(steps=0)
    with pytest.raises(FaceLensError, match="nose_layer"):
        invert_report(portraits[0], model=tiny, layers=["nose_layer"], settings=InversionSettings(steps=1))
    with pytest.raises(FaceLensError, match="prior"):
        invert_report(portraits[0], model=tiny, priors=["fourier"], settings=InversionSettings(steps=1))


def test_cli_invert_writes_png_json_html(tmp_path, portraits):
    from PIL import Image

    photo = tmp_path / "face.png"
    Image.fromarray(portraits[0]).save(photo)
    out = tmp_path / "out"
    rc = main(["invert", str(photo), "--model", "dlib-gender", "--layers", "input,mid", "--steps", "3",
               "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "inversion.json").read_text())
    assert {(r["depth"], r["prior"]) for r in data["runs"]} == {(d, p) for d in ("input", "mid")
                                                                 for p in ("tv", "pyramid")}
    assert data["settings"]["steps"] == 3
    assert (out / "inversion.png").stat().st_size > 0
    assert (out / "inversion.html").read_text().startswith("<section")


def test_cli_invert_bad_image_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    assert main(["invert", str(bad), "--steps", "2", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "broken.jpg" in err
