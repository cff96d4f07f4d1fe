import json
import subprocess
import sys

import pytest

from facelens.cli import main


def test_models_lists_the_zoo(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"dlib-resnet", "dlib-age", "dlib-gender", "fer-emotion"} <= {r["name"] for r in rows}


@pytest.mark.parametrize("content", [b"", b"definitely not an image", b"\x89PNG\r\n\x1a\n\x00\x00"])
def test_bad_image_gives_one_line_and_nonzero_exit(tmp_path, content):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(content)
    proc = subprocess.run([sys.executable, "-m", "facelens.cli", "embed", str(bad)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.jpg" in lines[0] and "Traceback" not in proc.stderr


def test_missing_file_and_faceless_image(tmp_path, capsys):
    assert main(["embed", str(tmp_path / "missing.png")]) == 1
    assert "missing.png" in capsys.readouterr().err
    import numpy as np
    from PIL import Image

    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((120, 120, 3), 128, np.uint8)).save(blank)
    assert main(["predict", str(blank), "--model", "dlib-gender"]) == 1
    err = capsys.readouterr().err
    assert "blank.png" in err and "face" in err


def test_embed_and_predict_on_a_portrait(tmp_path, capsys):
    import skimage.data
    from PIL import Image

    photo = tmp_path / "eileen_collins.png"
    Image.fromarray(skimage.data.astronaut()).save(photo)
    assert main(["embed", str(photo)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dim"] == 128 and all(abs(v) < 10 for v in out["embedding"])
    assert main(["predict", str(photo), "--model", "dlib-gender"]) == 0
    top = json.loads(capsys.readouterr().out)["top"]
    assert abs(sum(top.values()) - 1) < 1e-3
    # Eileen Collins. (The same model calls Grace Hopper, in uniform at 78, male at 0.99: a finding for
    # the bias audit, not something this test should paper over.)
    assert next(iter(top)) == "female"


def test_help_lists_every_method_and_the_defaults(capsys):
    from facelens.cli import METHOD_NAMES, build_parser
    from facelens.explain.api import list_methods

    assert sorted(METHOD_NAMES) == sorted(m["name"] for m in list_methods())
    with pytest.raises(SystemExit):
        build_parser().parse_args(["explain", "--help"])
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # argparse wraps after hyphens
    assert [name for name in METHOD_NAMES if name not in text] == []
    assert "(default: gradcam,occlusion)" in text and "(default: out/explain)" in text and "--preset" in text


def test_models_table_fits_100_columns(capsys, tmp_path):
    import torch

    from facelens.cli import main

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    onnx_file = tmp_path / ("a_model_file_with_a_rather_long_name_" * 2 + ".onnx")
    torch.onnx.export(net, (torch.rand(1, 3, 112, 112),), str(onnx_file), opset_version=17, dynamo=False)
    assert main(["models", "--model", str(onnx_file), "--preset", "arcface"]) == 0  # a user model's table too
    lines = capsys.readouterr().out.splitlines()
    assert "preset" in " ".join(lines) and max(len(line.rstrip()) for line in lines) <= 100
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and max(len(line.rstrip()) for line in lines) <= 100
    assert main(["models", "--wide"]) == 0
    assert "license" in capsys.readouterr().out
