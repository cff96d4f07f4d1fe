"""facelens's whole default pipeline against dlib's own, photo in, embedding out.

dlib's pipeline is the one ``face_recognition`` and dlib's ``dnn_face_recognition_ex`` run: the HOG
detector with one upsampling, the 5-point shape predictor on the largest box, and
``compute_face_descriptor(img, shape)`` (which cuts ``get_face_chip(150, 0.25)`` itself). facelens's
``load_model("dlib-resnet").embed(path)`` must give the same vector wherever that detector finds the
face: the same box, landmarks and chip leave only the port's float error (about 1e-6).
"""

from __future__ import annotations

from pathlib import Path

import dlib
import numpy as np
import pytest
from PIL import Image

from facelens.explain.api import explain
from facelens.models import load_model
from facelens.models.dlib_resnet import WEIGHTS_KEY
from facelens.weights import weight_path

END_TO_END_L2 = 1e-2  # the bound; the measured worst case is printed
SAMPLE = {"frl_london": 6, "orl": 4}  # every Nth photo of each set


def _rgb(path: Path) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(Image.open(path).convert("RGB")))


def test_embeddings_equal_dlibs_own_pipeline(shared_faces: Path, manifest_rows: list[dict[str, str]]) -> None:
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(weight_path("shape_predictor_5_face_landmarks.dat")))
    recognizer = dlib.face_recognition_model_v1(str(weight_path(WEIGHTS_KEY)))
    model = load_model("dlib-resnet")
    gaps: dict[str, list[tuple[float, str]]] = {}
    dlib_missed: dict[str, int] = {}
    for dataset, step in SAMPLE.items():
        rows = [r for r in manifest_rows if r["dataset"] == dataset][::step]
        gaps[dataset], dlib_missed[dataset] = [], 0
        for row in rows:
            path = shared_faces / row["path"]
            img = _rgb(path)
            boxes = list(detector(img, 1))
            if not boxes:  # outside the claim: facelens may still find it by its reported fallback
                dlib_missed[dataset] += 1
                continue
            shape = predictor(img, max(boxes, key=lambda b: b.area()))
            theirs = np.array(recognizer.compute_face_descriptor(img, shape))
            ours = model.embed(str(path)).astype(np.float64)
            gaps[dataset].append((float(np.linalg.norm(ours - theirs)), row["path"]))
    print("\nend to end, facelens embed(path) vs dlib's own pipeline (L2 of the 128-d difference):")
    for dataset, pairs in gaps.items():
        worst, where = max(pairs)
        print(f"  {dataset}: {len(pairs)} photos, median {np.median([g for g, _ in pairs]):.1e}, worst "
              f"{worst:.1e} ({where}); dlib's detector found no face on {dlib_missed[dataset]}")
    for dataset, pairs in gaps.items():
        assert len(pairs) >= 20, f"{dataset}: only {len(pairs)} photos compared"
        worst, where = max(pairs)
        assert worst <= END_TO_END_L2, f"{dataset}: {where} differs from dlib's own pipeline by L2 {worst:.2e}"


def test_a_fallback_face_is_reported(shared_faces: Path, manifest_rows: list[dict[str, str]]) -> None:
    """A photo dlib's own detector misses at one upsampling is still explained, and says so."""
    detector = dlib.get_frontal_face_detector()
    model = load_model("dlib-resnet")
    for row in (r for r in manifest_rows if r["dataset"] in ("orl", "utkface")):
        img = _rgb(shared_faces / row["path"])
        if list(detector(img, 1)):
            continue
        chip = model.chip(img)  # raises NoFaceError if no level finds it either
        assert chip.face is not None and chip.face.fallback and chip.face.upsample != 1
        assert "dlib's own pipeline (upsample 1) finds no face here" in chip.face.detection()
        summary = explain(model, img, "gradient").summary()  # every explanation carries it
        assert summary["face"]["fallback"] is True and summary["face"]["upsample"] == chip.face.upsample
        return
    pytest.fail("no photo in ORL or UTKFace needs the fallback: the fallback is untested")
