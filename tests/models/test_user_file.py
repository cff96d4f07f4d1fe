"""User model files (ONNX, TorchScript, state dicts) under a family preset (issue 18, item 1)."""

from __future__ import annotations

import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from facelens.errors import ModelError
from facelens.explain.api import explain
from facelens.models import load_model, load_model_file
from facelens.models.dlib_age_gender import CHIP_PADDING, DLIB_MEAN, DLIB_SCALE
from facelens.models.presets import get_preset
from facelens.weights import weight_path

SRC = Path(__file__).resolve().parents[2] / "src"


def _dlib_preset(size: int, name: str) -> dict[str, object]:
    """dlib-age/gender's recipe and normalization in the custom-preset form (dlib_age_gender.py)."""
    return {"name": name, "size": size, "method": "dlib5", "padding": CHIP_PADDING, "mean": list(DLIB_MEAN),
            "std": DLIB_SCALE, "channels": "RGB", "source": "facelens.models.dlib_age_gender"}


def _tiny_cnn(out: int = 8, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 8, 3, stride=2, padding=1)), ("bn1", nn.BatchNorm2d(8)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(8, 16, 3, stride=2, padding=1)), ("relu2", nn.PReLU(16)),
        ("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("fc", nn.Linear(16, out)),
    ])).eval()


def _export_onnx(module: nn.Module, path: Path, size: int) -> Path:
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    torch.onnx.export(module, (x,), str(path), opset_version=17, dynamo=False, input_names=["input"],
                      output_names=["output"], dynamic_axes={"input": {0: "N"}, "output": {0: "N"}})
    return path


def _one_line(err: pytest.ExceptionInfo[ModelError], name: str) -> str:
    text = str(err.value)
    assert "\n" not in text and name in text, text
    return text


@pytest.fixture(scope="module")
def london_photos(manifest_rows: list[dict[str, str]], shared_faces: Path) -> list[Path]:
    rows = [r for r in manifest_rows if r["dataset"] == "frl_london" and r["subset"] == "neutral"]
    return [shared_faces / r["path"] for r in rows[:12]]


# -- the real dlib ONNX files through the generic path --------------------------------------------
def test_gender_onnx_matches_the_hand_port(london_photos: list[Path]) -> None:
    user = load_model_file(weight_path("gender-v1.onnx"), _dlib_preset(32, "dlib-gender-like"),
                           class_names=["female", "male"])
    zoo = load_model("dlib-gender")
    assert user.task == "classification" and user.input_size == (32, 32) and user.recipe == zoo.recipe
    assert user.provenance["dropped_softmax"] is True
    assert user.provenance["parity_max_abs"] <= 1e-5
    assert len(user.provenance["sha256"]) == 64
    assert not any(p.requires_grad for p in user.net.parameters()) and not user.net.training
    chips = [zoo.chip(p) for p in london_photos]
    assert len(chips) >= 10
    a = user.forward_chips(chips, fused=False)
    b = zoo.forward_chips(chips, fused=False)
    assert np.max(np.abs(a - b)) <= 1e-5
    for photo in london_photos[:2]:
        g_user = explain(user, photo, "gradient").chip_map
        g_zoo = explain(zoo, photo, "gradient").chip_map
        assert np.isfinite(g_user).all()
        assert spearmanr(g_user.ravel(), g_zoo.ravel()).statistic >= 0.999


def test_age_onnx_converts_with_the_pad18_shim(london_photos: list[Path]) -> None:
    """age-v1.onnx uses Pad at opset 18, which onnx2torch 1.5.15 lacks; the shim maps it to Pad-13."""
    user = load_model_file(weight_path("age-v1.onnx"), _dlib_preset(64, "dlib-age-like"))
    zoo = load_model("dlib-age")
    assert user.task == "classification" and len(user.class_names or []) == 81
    assert user.provenance["parity_max_abs"] <= 1e-4
    chips = [zoo.chip(p) for p in london_photos[:4]]
    assert np.max(np.abs(user.forward_chips(chips, fused=False) - zoo.forward_chips(chips, fused=False))) <= 1e-4


# -- the user's own small network ----------------------------------------------------------------
def test_onnx_and_torchscript_of_a_seeded_cnn(tmp_path: Path) -> None:
    preset = get_preset({"name": "tiny", "size": 48, "method": "dlib5", "mean": 127.5, "std": 127.5,
                         "channels": "RGB"})
    module = _tiny_cnn()
    onnx_model = load_model_file(_export_onnx(module, tmp_path / "tiny.onnx", 48), preset)
    assert onnx_model.task == "embedding" and onnx_model.provenance["parity_max_abs"] <= 1e-5
    assert "max |Δ|" in onnx_model.description and onnx_model.layers
    ts_path = tmp_path / "tiny.ts"
    torch.jit.save(torch.jit.script(module), str(ts_path))
    ts_model = load_model_file(ts_path, preset)
    assert ts_model.provenance["format"] == "torchscript"
    x = torch.rand(3, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = module(preset.normalizer()(x))
        for m in (onnx_model, ts_model):
            assert torch.max(torch.abs(m.net(x) - reference)).item() <= 1e-5
    import skimage.data

    photo = skimage.data.astronaut()
    for m in (onnx_model, ts_model):
        assert np.isfinite(explain(m, photo, "gradient").chip_map).all()


def test_state_dict_needs_a_torchvision_arch(tmp_path: Path) -> None:
    import torchvision

    net = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    path = tmp_path / "r18.pth"
    torch.save(net.state_dict(), path)
    with pytest.raises(ModelError) as err:
        load_model_file(path, "arcface")
    assert "architecture" in _one_line(err, "r18.pth")
    m = load_model_file(path, "arcface", arch="torchvision:resnet18", class_names=[str(i) for i in range(10)])
    assert m.task == "classification" and m.input_size == (112, 112)


# -- refusals -------------------------------------------------------------------------------------
def test_pickled_module_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(_tiny_cnn(), path)
    with pytest.raises(ModelError) as err:
        load_model_file(path, "arcface")
    text = _one_line(err, "whole.pt")
    assert "TorchScript" in text and "state_dict" in text


def test_garbage_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"definitely not a protobuf \x00\xff" * 10)
    with pytest.raises(ModelError) as err:
        load_model_file(path, "arcface")
    _one_line(err, "junk.onnx")


def test_input_size_mismatch_names_both_sizes(tmp_path: Path) -> None:
    path = tmp_path / "my.onnx"
    torch.onnx.export(_tiny_cnn(), (torch.rand(1, 3, 64, 64),), str(path), opset_version=17, dynamo=False)
    with pytest.raises(ModelError) as err:
        load_model_file(path, "arcface")
    text = _one_line(err, "my.onnx")
    assert "1×3×64×64" in text and "112×112" in text and "size 64" in text


def test_unconvertible_operator_is_named(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    odd = helper.make_node("Hardmax", ["flat"], ["y"], axis=1)
    flat = helper.make_node("GlobalAveragePool", ["c"], ["p"])
    fl = helper.make_node("Flatten", ["p"], ["flat"])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], np.ones(108, np.float32).tolist())
    graph = helper.make_graph([node, flat, fl, odd], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 112, 112])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [w])
    path = tmp_path / "odd.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(ModelError) as err:
        load_model_file(path, "arcface")
    text = _one_line(err, "odd.onnx")
    assert "operator Hardmax" in text and "opset 17" in text


# -- registry ------------------------------------------------------------------------------------
def test_registry_remembers_the_preset_per_file(tmp_path: Path) -> None:
    path = _export_onnx(_tiny_cnn(out=16, seed=3), tmp_path / "reg.onnx", 112)
    with pytest.raises(ModelError) as err:
        load_model(str(path))
    assert "arcface" in _one_line(err, "reg.onnx")
    first = load_model(str(path), preset="arcface")
    assert load_model(str(path)) is first
    assert load_model(path) is first  # a Path too
    from facelens.models import list_models

    row = next(r for r in list_models() if r.get("user_file") and r["source"] == str(path.resolve()))
    assert row["preset"] == "arcface" and row["input"] == "112×112" and len(row["sha256"]) == 64
    assert row["parity_max_abs"] <= 1e-5


# -- CLI -----------------------------------------------------------------------------------------
def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(SRC), "OMP_WAIT_POLICY": "PASSIVE", "PATH": "/usr/bin:/bin",
           "HOME": str(Path.home())}
    return subprocess.run([sys.executable, "-m", "facelens.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env=env)


def test_cli_explains_an_arcface_like_onnx(tmp_path: Path) -> None:
    import skimage.data
    from PIL import Image

    model = _export_onnx(_tiny_cnn(out=512, seed=4), tmp_path / "tiny_arcface.onnx", 112)
    photo = tmp_path / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(photo)
    out = tmp_path / "maps"
    proc = _cli("explain", str(photo), "--model", str(model), "--preset", "arcface", "--method", "gradient",
                "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (out / "explanations.json").is_file() and list(out.glob("*.png"))

    toml = tmp_path / "mine.toml"
    toml.write_text('name = "mine"\nsize = 112\nmethod = "template5"\ntemplate = "arcface"\n'
                    'mean = 127.5\nstd = 128\nchannels = "BGR"\n')
    proc = _cli("models", "--model", str(model), "--preset", str(toml), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "tiny_arcface.onnx" in proc.stdout and "mine" in proc.stdout and "onnx" in proc.stdout

    for args in (["--model", str(tmp_path / "bad.onnx"), "--preset", "arcface"],  # not ONNX
                 ["--model", str(model)]):  # no preset
        (tmp_path / "bad.onnx").write_bytes(b"nope")
        proc = _cli("explain", str(photo), *args, "--method", "gradient", "--out", str(out), cwd=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert Path(args[1]).name in lines[0]


def test_report_builds_on_a_user_model(tmp_path: Path) -> None:
    """`facelens report --model my.onnx --preset arcface`: every section, including the studies that name
    the model by its file name rather than its path."""
    import contextlib
    import io
    import json

    from facelens.cli import main

    model = _export_onnx(_tiny_cnn(out=512, seed=5), tmp_path / "my_arcface.onnx", 112)
    out = tmp_path / "report"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["report", "--model", str(model), "--preset", "arcface", "--out", str(out)])
    assert code == 0 and "not built" not in err.getvalue(), err.getvalue()
    assert (out / "index.html").is_file()
    assert load_model("my_arcface.onnx") is load_model(model)  # the name finds the loaded file
    assert "my_arcface.onnx" in json.dumps(json.loads((out / "report.json").read_text()))
