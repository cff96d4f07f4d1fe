"""Export to TorchScript/ONNX, int8 quantization and the measured raw-vs-optimized table, on real face chips."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from facelens.cli import main
from facelens.errors import FaceLensError, ModelError
from facelens.evaluate.stats import Estimate
from facelens.export import (
    UNCHANGED,
    _eval_set,
    calibration_chips,
    dynamic_coverage,
    export_model,
    export_onnx,
    export_torchscript,
    measure_variants,
    shipping_table,
    speed_call,
    speedup_interval,
    time_rounds,
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
                             n_chips=4, n_calibration=2, repeats=1, warmup=1, batch=2, memory="none")
    status = {r.variant: r.status for r in table.rows}
    assert status["eager-fp32"] == status["torchscript-fp32"] == "ok"
    assert "fft" in status["onnx-int8-static"]
    assert table.row("torchscript-fp32").top1_agreement == 1.0
    assert table.row("torchscript-fp32").latency_b1_ms > 0  # the raw class (defined here) loads in the timer too
    assert "not available" in table.html()


def test_table_on_real_chips_agrees_with_an_independent_check(fer, shared_faces: Path, tmp_path: Path) -> None:
    variants = ("eager-fp32", "onnx-fp32", "torchscript-int8-dynamic", "onnx-int8-static")
    files = tmp_path / "files"
    table = measure_variants(fer, shared_faces, variants=variants, n_chips=6, n_calibration=3, repeats=2, warmup=1,
                             batch=4, memory="none", keep_files=files, seed=5)
    assert [r.variant for r in table.rows] == list(variants)
    assert all(r.status == "ok" for r in table.rows), [r.status for r in table.rows]
    for r in table.rows:
        [path] = files.glob(f"*.{r.variant}.*")
        assert r.size_mb == pytest.approx(path.stat().st_size / 1e6)
    raw = table.row("eager-fp32")
    assert raw.speedup_b1 == 1.0 and raw.max_abs_diff == 0.0 and raw.speed_b1 == "reference"
    for name in ("eager-fp32", "onnx-fp32", "onnx-int8-static"):
        r = table.row(name)
        assert r.latency_b1_q1_ms <= r.latency_b1_ms <= r.latency_b1_q3_ms
        assert r.latency_batch_ms > 0 and r.per_face_batch_ms == pytest.approx(r.latency_batch_ms / 4)
        assert len(table.timing[name][1].rounds) == len(table.timing[name][4].rounds) == 2
    for name in ("onnx-fp32", "onnx-int8-static"):  # two rounds are below the rule's minimum: no speed claim
        assert table.row(name).speed_b1 == table.row(name).speed_batch == "inconclusive"
    static = table.row("onnx-int8-static")  # int8 is also compared with fp32 in its own runtime
    assert static.int8_vs == "onnx-fp32" and static.int8_speed_b1 == "inconclusive" and static.int8_speedup_b1 > 0
    # mini-Xception has no Linear layer: torch dynamic int8 is the traced fp32 network, never a faster variant
    same = table.row("torchscript-int8-dynamic")
    assert same.speed_b1 == same.speed_batch == UNCHANGED and same.unchanged_from == "torchscript-fp32"
    assert math.isnan(same.speedup_b1) and math.isnan(same.latency_b1_ms) and math.isnan(same.size_ratio)
    assert "torchscript-int8-dynamic" not in table.timing and "torchscript-int8-dynamic: model unchanged" in \
        " ".join(table.verdicts())
    assert same.max_abs_diff == 0.0 and same.agreement.startswith("identical")
    assert any(v.startswith(f"torchscript-int8-dynamic: {UNCHANGED}") for v in table.verdicts())
    assert table.row("onnx-int8-static").size == "smaller"  # exact file bytes: 0.55× the raw state dict
    lines = table.verdicts()  # in Verdict.sentence form, so the report can pick the supported ones
    # a file size is counted, not sampled: a fact with its margin, never a statistical "supported"
    assert any(line.startswith("the onnx-int8-static file is 0.") and "exact byte count" in line
               and line.endswith("⇒ smaller.") for line in lines)
    assert not any("file" in line and ": supported — " in line for line in lines)
    assert not any("faster" in line and ": supported — " in line for line in lines)  # 2 rounds decide nothing
    assert table.row("onnx-fp32").max_abs_diff < 1e-4
    # recompute the static row's agreement from its kept file, on the same (seeded) chips
    chips = _eval_set(fer, shared_faces, n_pairs=0, n_chips=6, seed=5).chips
    session = ort.InferenceSession(str(next(files.glob("*.onnx-int8-static.onnx"))),
                                   providers=["CPUExecutionProvider"])
    q, ref = session.run(None, {"input": chips})[0], _net(fer)(chips)
    assert static.top1_agreement == pytest.approx(float((q.argmax(1) == ref.argmax(1)).mean()))
    assert static.decisions_changed == int((q.argmax(1) != ref.argmax(1)).sum()) and static.compared == 6
    assert static.agreement in ("inconclusive", "differs")  # 6 chips cannot show agreement within 1 %
    assert static.max_abs_diff == pytest.approx(float(np.abs(q - ref).max()), rel=1e-5)
    paths = table.write(tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert data["rows"][1]["variant"] == "onnx-fp32" and data["settings"]["batch"] == 4
    assert data["verdicts"]["onnx-fp32"]["speed_b1"]["verdicts"][0]["reason"].startswith("fewer than 8 rounds")
    assert len(data["timing"]["onnx-fp32"]["1"]["rounds"]) == 2
    assert paths["csv"].read_text().splitlines()[0].startswith("variant,")
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert "<table" in table.html() and "onnx-int8-static" in table.html()


def test_recognizer_table_measures_memory_in_fresh_processes(shared_faces: Path) -> None:
    model = load_model("dlib-resnet")
    table = measure_variants(model, shared_faces, variants=("eager-fp32", "onnx-fp32"), n_pairs=2, repeats=1,
                             warmup=1, batch=2, memory="subprocess", seed=1)
    raw, onnx_row = table.row("eager-fp32"), table.row("onnx-fp32")
    assert raw.status == onnx_row.status == "ok"
    for r in (raw, onnx_row):  # positive MB that mean something: the 22 MB of weights are resident
        assert r.peak_mb > r.runtime_mb > 0 and r.model_mb > 15 and r.peak_mb == pytest.approx(
            r.runtime_mb + r.model_mb)
    assert raw.runtime_mb > onnx_row.runtime_mb  # torch weighs more than ONNX Runtime, and the table shows it
    assert onnx_row.cosine_min > 0.99999 and onnx_row.decisions_changed == 0 and onnx_row.compared == 2
    assert onnx_row.agreement == "inconclusive"  # 2 pairs decide nothing
    # verification accuracy, recomputed from each photo with the model's own embed() and its 0.6 threshold
    chosen = _eval_set(model, shared_faces, n_pairs=2, n_chips=0, seed=1)
    assert [same for *_, same in chosen.pairs] == [True, False]
    emb = {p: model.embed(p) for p in chosen.chip_paths}
    said = [model.same_person(emb[chosen.chip_paths[i]], emb[chosen.chip_paths[j]]) for i, j, _ in chosen.pairs]
    acc = float(np.mean([s == same for s, (_, _, same) in zip(said, chosen.pairs, strict=True)]))
    assert raw.verification_acc == pytest.approx(acc)
    assert raw.verification_acc_lo < raw.verification_acc_hi  # a Wilson interval, never of zero width


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
                 "--repeats", "1", "--warmup", "1", "--batch", "2", "--memory", "none", "--faces", str(shared_faces),
                 "--out", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "export_fer-emotion.html").is_file()


def test_shipping_table_needs_the_photos(tmp_path: Path) -> None:
    with pytest.raises(FaceLensError, match=r"no manifest\.csv"):
        shipping_table("fer-emotion", tmp_path)


# -- the timing rule, on functions whose answer is known ---------------------------------------------------------
_X = {1: np.zeros((1, 3, 4, 4), np.float32), 4: np.zeros((4, 3, 4, 4), np.float32)}


def _sleeper(seconds: float):
    def fn(x: np.ndarray) -> np.ndarray:
        time.sleep(seconds)
        return x

    return fn


def test_speed_words_come_from_the_interval_rule() -> None:
    rng = np.random.default_rng(0)
    ref = 0.01 * (1 + rng.random(12))  # a noisy machine: rounds differ by up to 2×, pairs within a round do not
    assert speed_call(speedup_interval(ref, ref), "same").word == "no measurable difference"
    assert speed_call(speedup_interval(ref, ref * 1.05), "5 % slower").word == "no measurable difference"
    assert speed_call(speedup_interval(ref, ref / 2), "twice as fast").word == "faster"
    assert speed_call(speedup_interval(ref, ref * 2), "twice as slow").word == "slower"
    assert speed_call(speedup_interval(ref[:5], ref[:5] / 2), "5 rounds").word == "inconclusive"  # below min n
    wild = speedup_interval(ref, ref * np.tile([0.5, 2.0], 6))  # half the rounds each way: the spread decides
    assert wild.lo < 1 < wild.hi and speed_call(wild, "wild").word == "inconclusive"
    call = speed_call(Estimate(1.3, 1.05, 1.6, 20, 20), "borderline")
    assert call.word == "inconclusive" and call.reason == "the interval contains 1.1"


def test_an_identical_variant_is_never_reported_faster_or_slower() -> None:
    fn = _sleeper(0.002)
    timing = time_rounds({"raw": fn, "same": fn}, _X, rounds=12, warmup=2)
    for b in _X:
        est = speedup_interval(timing["raw"][b].rounds, timing["same"][b].rounds)
        assert speed_call(est, "same module").word in ("no measurable difference", "inconclusive"), est


def test_a_slower_variant_is_reported_slower_and_the_raw_one_faster() -> None:
    timing = time_rounds({"raw": _sleeper(0.001), "heavy": _sleeper(0.02)}, _X, rounds=10, warmup=1, seed=3)
    for b in _X:
        raw, heavy = timing["raw"][b].rounds, timing["heavy"][b].rounds
        assert speed_call(speedup_interval(raw, heavy), "heavy").word == "slower"
        assert speed_call(speedup_interval(heavy, raw), "light").word == "faster"
        assert len(raw) == len(heavy) == 10 and timing["raw"][b].calls > timing["heavy"][b].calls


def test_warm_up_calls_never_enter_the_timed_rounds() -> None:
    calls = {"n": 0}

    def lazy(x: np.ndarray) -> np.ndarray:  # the first call pays for initialisation, like an ONNX session
        calls["n"] += 1
        time.sleep(0.5 if calls["n"] == 1 else 0.002)
        return x

    timing = time_rounds({"raw": _sleeper(0.002), "lazy": lazy}, _X, rounds=8, warmup=1)
    first = timing["lazy"][1]
    assert first.warmup[0] >= 0.5 and first.first_call_ms >= 500  # kept (sleep's guarantee), and reported apart
    assert len(first.warmup) == 1 and len(first.rounds) == 8 and max(first.rounds) < first.warmup[0]  # in no round
    est = speedup_interval(timing["raw"][1].rounds, first.rounds)
    assert speed_call(est, "lazy").word != "slower"
    with pytest.raises(ValueError, match="warm-up"):
        time_rounds({"lazy": lazy}, _X, rounds=1, warmup=0)
