"""Export to TorchScript/ONNX, int8 quantization and the measured raw-vs-optimized table, on real face chips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from facelens.cli import main
from facelens.errors import FaceLensError, ModelError
from facelens.export import (
    _eval_set,
    calibration_chips,
    dynamic_coverage,
    export_model,
    export_onnx,
    export_torchscript,
    measure_variants,
    shipping_table,
)
from facelens.models import load_model, wrap


@pytest.fixture(scope="module")
def fer():
    return load_model("fer-emotion")


@pytest.fixture(scope="module")
def fer_chips(fer, shared_faces: Path) -> np.ndarray:
    """Twelve real aligned fer-emotion chips (N×3×64×64 in [0, 1])."""
    return calibration_chips(fer, shared_faces / "manifest.csv", limit=12, seed=3)


def _net(model) -> np.ndarray:
    return lambda x: model.net(torch.from_numpy(x)).detach().numpy()


class _FftNet(torch.nn.Module):
    """A network the ONNX exporter cannot handle (no ONNX symbolic for aten::fft_fft2), TorchScript can."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.fft.fft2(self.conv(x)).abs().mean((2, 3)))


def _fft_model():
    return wrap(_FftNet(), task="classification", input_size=32, class_names=["a", "b"], align=None, name="fft-net")


def test_onnx_export_gives_the_same_outputs_in_onnxruntime(fer, fer_chips: np.ndarray, tmp_path: Path) -> None:
    result = export_onnx(fer, tmp_path / "fer.onnx")
    assert result.bytes == (tmp_path / "fer.onnx").stat().st_size
    assert result.max_abs_diff < 1e-4
    session = ort.InferenceSession(str(tmp_path / "fer.onnx"), providers=["CPUExecutionProvider"])
    batch = fer_chips[:5]  # another batch size than the one traced: the batch axis is dynamic
    got = session.run(None, {"input": batch})[0]
    np.testing.assert_allclose(got, _net(fer)(batch), atol=1e-4)


def test_dynamic_int8_reaches_only_linear_layers(fer, fer_chips: np.ndarray, tmp_path: Path) -> None:
    assert dynamic_coverage(fer.net) == 0.0  # mini-Xception has no Linear layer at all
    linear_only = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    assert dynamic_coverage(linear_only) == 1.0
    dlib = load_model("dlib-resnet").net
    assert 0.0 < dynamic_coverage(dlib) < 0.01  # one 256→128 Linear behind 29 convolutions
    result = export_torchscript(fer, tmp_path / "fer_dyn.pt", quantize="int8-dynamic")
    assert "0.0% of the weights" in result.notes[0]
    loaded = torch.jit.load(str(tmp_path / "fer_dyn.pt"))
    with torch.no_grad():
        same = loaded(torch.from_numpy(fer_chips)).numpy()
    np.testing.assert_array_equal(same, _net(fer)(fer_chips))  # nothing to quantize: the model is unchanged


def test_static_int8_onnx_is_quantized_and_calibrated(fer, fer_chips: np.ndarray, tmp_path: Path) -> None:
    fp32 = export_onnx(fer, tmp_path / "fp32.onnx")
    int8 = export_onnx(fer, tmp_path / "int8.onnx", quantize="int8-static", calibration=fer_chips[:6])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert int8.bytes < 0.7 * fp32.bytes  # int8 weights: about a quarter, plus scales and graph
    assert int8.max_abs_diff > 0
    with pytest.raises(ModelError, match="needs real face chips"):
        export_onnx(fer, tmp_path / "x.onnx", quantize="int8-static")
    assert not (tmp_path / "x.onnx").exists()


def test_failed_export_leaves_the_old_file_and_is_a_table_row(shared_faces: Path, tmp_path: Path) -> None:
    model = _fft_model()
    target = tmp_path / "keep.onnx"
    target.write_bytes(b"previous")
    with pytest.raises(ModelError, match="ONNX export failed"):
        export_model(model, target, format="onnx")
    assert target.read_bytes() == b"previous"
    table = measure_variants(model, shared_faces, variants=("eager-fp32", "torchscript-fp32", "onnx-int8-static"),
                             n_chips=4, n_calibration=2, repeats=1, memory="sampled")
    status = {r.variant: r.status for r in table.rows}
    assert status["eager-fp32"] == status["torchscript-fp32"] == "ok"
    assert "fft" in status["onnx-int8-static"]
    assert table.row("torchscript-fp32").top1_agreement == 1.0
    assert "not available" in table.html()


def test_table_on_real_chips_agrees_with_an_independent_check(fer, shared_faces: Path, tmp_path: Path) -> None:
    variants = ("eager-fp32", "onnx-fp32", "torchscript-int8-dynamic", "onnx-int8-static")
    files = tmp_path / "files"
    table = measure_variants(fer, shared_faces, variants=variants, n_chips=6, n_calibration=3, repeats=1,
                             memory="sampled", keep_files=files, seed=5)
    assert [r.variant for r in table.rows] == list(variants)
    assert all(r.status == "ok" for r in table.rows), [r.status for r in table.rows]
    for r in table.rows:
        [path] = files.glob(f"*.{r.variant}.*")
        assert r.size_mb == pytest.approx(path.stat().st_size / 1e6)
        assert r.latency_b1_ms > 0 and r.latency_b16_ms > 0
    assert table.row("eager-fp32").speedup_b1 == 1.0 and table.row("eager-fp32").max_abs_diff == 0.0
    assert table.row("onnx-fp32").max_abs_diff < 1e-4
    # recompute the static row's agreement from its kept file, on the same (seeded) chips
    chips = _eval_set(fer, shared_faces, n_pairs=0, n_chips=6, seed=5).chips
    session = ort.InferenceSession(str(next(files.glob("*.onnx-int8-static.onnx"))),
                                   providers=["CPUExecutionProvider"])
    q, ref = session.run(None, {"input": chips})[0], _net(fer)(chips)
    assert table.row("onnx-int8-static").top1_agreement == pytest.approx(float((q.argmax(1) == ref.argmax(1)).mean()))
    assert table.row("onnx-int8-static").max_abs_diff == pytest.approx(float(np.abs(q - ref).max()), rel=1e-5)
    paths = table.write(tmp_path / "out")
    assert json.loads(paths["json"].read_text())["rows"][1]["variant"] == "onnx-fp32"
    assert paths["csv"].read_text().splitlines()[0].startswith("variant,")
    assert "<table" in table.html() and "onnx-int8-static" in table.html()


def test_recognizer_table_measures_memory_in_fresh_processes(shared_faces: Path) -> None:
    model = load_model("dlib-resnet")
    table = measure_variants(model, shared_faces, variants=("eager-fp32", "onnx-fp32"), n_pairs=2, repeats=1,
                             memory="subprocess", seed=1)
    raw, onnx_row = table.row("eager-fp32"), table.row("onnx-fp32")
    assert raw.status == onnx_row.status == "ok"
    for r in (raw, onnx_row):  # the 22 MB of weights must be resident in the measuring process
        assert r.peak_mb > 15
    assert onnx_row.cosine_min > 0.99999 and onnx_row.decisions_changed == 0
    # verification accuracy, recomputed from each photo with the model's own embed() and its 0.6 threshold
    chosen = _eval_set(model, shared_faces, n_pairs=2, n_chips=0, seed=1)
    assert [same for *_, same in chosen.pairs] == [True, False]
    emb = {p: model.embed(p) for p in chosen.chip_paths}
    said = [model.same_person(emb[chosen.chip_paths[i]], emb[chosen.chip_paths[j]]) for i, j, _ in chosen.pairs]
    acc = float(np.mean([s == same for s, (_, _, same) in zip(said, chosen.pairs, strict=True)]))
    assert raw.verification_acc == pytest.approx(acc)


def test_cli_export_single_files_and_table(shared_faces: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    q = tmp_path / "m8.onnx"
    assert main(["export", "--model", "fer-emotion", "--format", "onnx", "--quantize", "int8", "--faces",
                 str(shared_faces), "--calibration-limit", "2", "--out", str(q)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["quantize"], printed["bytes"]) == ("int8-static", q.stat().st_size)
    assert main(["export", "--model", "fer-emotion", "--out", str(tmp_path / "x")]) == 1
    assert "--format" in capsys.readouterr().err
    assert main(["export", "--table", "--model", "fer-emotion", "--variants", "eager-fp32,onnx-fp32", "--chips", "2",
                 "--repeats", "1", "--memory", "sampled", "--faces", str(shared_faces),
                 "--out", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "export_fer-emotion.html").is_file()


def test_shipping_table_needs_the_photos(tmp_path: Path) -> None:
    with pytest.raises(FaceLensError, match=r"no manifest\.csv"):
        shipping_table("fer-emotion", tmp_path)
