"""What the web app shows, computed only by the public facelens API.

The app arranges these results; it never computes a number of its own. Each function here is
what one button does, returns a typed result, and holds no state between calls, so two browser
sessions can never see each other's results. The same functions are called by the tests with
the Python API's answers beside them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import FaceLensError, ModelError
from ..explain.explanation import Explanation
from ..faces.detect import Face
from ..models.base import FaceModel

__all__ = [
    "ANONYMIZATION_CHOICES",
    "DEFAULT_METHODS",
    "METHOD_CHOICES",
    "OWN_EMBEDDING",
    "REFERENCE_PHOTO",
    "REID_MODEL",
    "TOP_CLASS",
    "Analysis",
    "AnonymizationEffect",
    "Verification",
    "analyze",
    "anonymization_effect",
    "face_models",
    "target_choices",
    "verify",
]

#: methods offered in the page, fastest first (region-shap, rise and scorecam take seconds to a minute)
METHOD_CHOICES: tuple[str, ...] = (
    "gradcam", "gradcam++", "layercam", "gradient", "gradient-x-input", "guided-backprop", "lrp", "ebp", "deeplift",
    "region-occlusion", "smoothgrad", "integrated-gradients", "occlusion", "scorecam", "rise", "region-lime",
    "region-shap",
)
DEFAULT_METHODS: tuple[str, ...] = ("gradcam", "gradient")
#: the four anonymizations the page offers, with the strength the graded ones start at
ANONYMIZATION_CHOICES: dict[str, float | None] = {"eye_bar": None, "eyes_nose": None, "blur": 0.15,
                                                  "pixelate": 0.25}
#: re-identification is always judged by the recognizer, whatever model is explained
REID_MODEL = "dlib-resnet"
TOP_CLASS = "top class"
OWN_EMBEDDING = "its own embedding"
REFERENCE_PHOTO = "the reference photo"


def face_models() -> list[str]:
    """Zoo face models whose weights are on this machine (the page never downloads anything)."""
    from ..models.registry import ZOO

    return [card.name for card in ZOO.values() if card.cached()]


def target_choices(model: FaceModel) -> list[str]:
    """What the target dropdown offers for a model: its classes, or its own embedding / the reference."""
    if model.task == "classification":
        return [TOP_CLASS, *(model.class_names or [])]
    return [OWN_EMBEDDING, REFERENCE_PHOTO]


def _target_and_reference(model: FaceModel, target: str | None,
                          reference: np.ndarray | None) -> tuple[object, np.ndarray | None]:
    """The ``target``/``reference`` arguments of `explain` for what the dropdown says."""
    choice = target or (TOP_CLASS if model.task == "classification" else OWN_EMBEDDING)
    if model.task == "classification":
        if reference is not None:
            raise ModelError(f"{model.name} is a classifier: a reference photo only applies to a recognizer")
        return (None if choice == TOP_CLASS else choice), None
    if choice == REFERENCE_PHOTO:
        if reference is None:
            raise ModelError("the target is 'the reference photo' but no reference photo was given")
        return None, reference
    if choice != OWN_EMBEDDING:
        raise ModelError(f"{model.name} is a recognizer; its target is {OWN_EMBEDDING!r} or {REFERENCE_PHOTO!r}")
    return None, None


@dataclass
class Analysis:
    """One photo explained by several methods, and the model's own outputs on it.

    ``outputs`` is what the model says: class probabilities (classifier, `FaceModel.predict`), or
    for a recognizer the embedding's size and, with a reference photo, the distance, cosine and
    decision (`FaceModel.embed`, `FaceModel.distance`, `FaceModel.same_person`).
    """

    model: str
    task: str
    explanations: list[Explanation]
    outputs: dict[str, object]
    face: Face

    def numbers(self) -> dict[str, object]:
        """Every number the page shows, at full precision (the page prints them rounded)."""
        return {
            "model": self.model,
            "target": self.explanations[0].target,
            "outputs": self.outputs,
            "methods": {e.method: {"score": e.score, "seconds": e.seconds,
                                   "region_attention": e.region_attention().mass}
                        for e in self.explanations},
        }


def _find_face(model: FaceModel, photo: np.ndarray, name: str) -> Face | None:
    """The face the model will use, detected first so that an error names the user's file.

    The API only sees arrays here (``<array 3x4000>`` in its messages); detection results are
    remembered by content, so the model's own detection of the same photo costs nothing more.
    """
    from ..faces.detect import pick_face

    return pick_face(photo, source=name) if model.recipe.needs_face else None


def analyze(model_name: str, photo: np.ndarray, methods: Sequence[str], target: str | None = None,
            reference: np.ndarray | None = None, *, names: tuple[str, str] = ("photo", "reference photo"),
            ) -> Analysis:
    """Explain ``photo`` with each method (one detection, one alignment) and read the model's outputs.

    ``names`` are what errors call the photo and the reference (the files' original names).
    """
    from ..explain.api import explain_methods
    from ..models.registry import load_model

    if not methods:
        raise FaceLensError("choose at least one method")
    unknown = [m for m in methods if m not in METHOD_CHOICES]
    if unknown:
        raise FaceLensError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHOD_CHOICES)}")
    model = load_model(model_name)
    tgt, ref = _target_and_reference(model, target, reference)
    found = _find_face(model, photo, names[0])
    if ref is not None:
        _find_face(model, ref, names[1])
    exps = explain_methods(model, photo, list(methods), tgt, reference=ref, face=found)
    face = exps[0].chip.face
    assert face is not None  # every zoo face model aligns on a detected face
    outputs: dict[str, object]
    if model.task == "classification":
        outputs = {"probabilities": dict(list(model.predict(photo, face=face).items())[:5])}
    else:
        emb = model.embed(photo, face=face)
        outputs = {"embedding_size": len(emb), "embedding_norm": float(np.linalg.norm(emb.astype(np.float64)))}
        if ref is not None:
            ref_emb = model.embed(ref)
            outputs.update(_match(model, emb, ref_emb))
    return Analysis(model=model.name, task=model.task, explanations=exps, outputs=outputs, face=face)


def _match(model: FaceModel, a: np.ndarray, b: np.ndarray) -> dict[str, object]:
    cos = float(np.dot(a, b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
    out: dict[str, object] = {"distance": model.distance(a, b), "cosine": cos, "threshold": model.match_threshold}
    if model.match_threshold is not None:
        out["same_person"] = model.same_person(a, b)
    return out


@dataclass
class AnonymizationEffect:
    """The photo anonymized, what it does to the explained score, and whether it still re-identifies.

    ``score_before``/``score_after``: the same target (e.g. the class, or the projection on the
    photo's own embedding) on the photo and on its anonymized copy, with the same face location.
    ``reid``: the recognizer's distance and cosine between the photo and its anonymized copy and
    its decision (same person below its threshold): anonymization works when that turns false.
    """

    method: str
    strength: float | None
    anonymized: np.ndarray
    explanation: Explanation
    score_before: float
    score_after: float
    reid: dict[str, object] = field(default_factory=dict)

    def numbers(self) -> dict[str, object]:
        return {"method": self.method, "strength": self.strength, "target": self.explanation.target,
                "score_before": self.score_before, "score_after": self.score_after, "reid": self.reid}


def anonymization_effect(model_name: str, photo: np.ndarray, method: str, anonymization: str,
                         strength: float | None = None, target: str | None = None,
                         reference: np.ndarray | None = None, *,
                         names: tuple[str, str] = ("photo", "reference photo")) -> AnonymizationEffect:
    """Anonymize the face (landmark-placed), explain the copy, and measure score and re-identification."""
    from ..explain.api import explain, resolve_target
    from ..faces.anonymize import DEFAULT_STRENGTHS, anonymize
    from ..models.registry import load_model

    if anonymization not in ANONYMIZATION_CHOICES:
        raise FaceLensError(f"unknown anonymization {anonymization!r}; choose from {', '.join(ANONYMIZATION_CHOICES)}")
    if anonymization not in DEFAULT_STRENGTHS:
        strength = None
    model = load_model(model_name)
    tgt_spec, ref = _target_and_reference(model, target, reference)
    chip = model.chip(photo, _find_face(model, photo, names[0]))
    if ref is not None:
        _find_face(model, ref, names[1])
    face = chip.face
    assert face is not None
    tgt = resolve_target(model, chip, tgt_spec, ref)
    before = explain(model, photo, method, tgt, face=face)
    anon = anonymize(photo, face.landmarks, anonymization, strength)
    after = explain(model, anon, method, tgt, face=face)
    recognizer = load_model(REID_MODEL)
    # the detected face (photo frame) is model-independent: each model aligns it with its own recipe
    original = recognizer.embed(photo, face=face)
    masked = recognizer.embed(anon, face=face)
    reid = {"model": recognizer.name, **_match(recognizer, original, masked)}
    return AnonymizationEffect(method=anonymization, strength=strength, anonymized=anon, explanation=after,
                               score_before=before.score, score_after=after.score, reid=reid)


@dataclass
class Verification:
    """Two photos compared by a recognizer, and the pair maps that explain the decision."""

    pair: object  # facelens.explain.face.PairExplanation

    def numbers(self) -> dict[str, object]:
        p = self.pair
        return {"model": p.model, "similarity": p.similarity, "distance": p.distance,  # type: ignore[attr-defined]
                "threshold": p.threshold, "same_person": p.same_person,  # type: ignore[attr-defined]
                "settings": p.settings, "seconds": p.seconds}  # type: ignore[attr-defined]


#: pair-map patch sizes (window, stride in chip pixels of dlib-resnet's 150 px chip)
PAIR_DETAIL: dict[str, tuple[int, int]] = {"coarse": (36, 24), "fine": (24, 12)}


def verify(model_name: str, photo_a: np.ndarray, photo_b: np.ndarray, detail: str = "coarse", *,
           names: tuple[str, str] = ("photo A", "photo B")) -> Verification:
    """Similarity, distance and decision of two photos, with their pair occlusion maps."""
    from ..explain.face import pair_maps
    from ..models.registry import load_model

    if detail not in PAIR_DETAIL:
        raise FaceLensError(f"detail must be one of {', '.join(PAIR_DETAIL)}; got {detail!r}")
    model = load_model(model_name)
    if model.task != "embedding":
        raise ModelError(f"{model.name} is a classifier; verification needs a recognizer such as {REID_MODEL}")
    for photo, name in zip((photo_a, photo_b), names, strict=True):
        _find_face(model, photo, name)
    window, stride = PAIR_DETAIL[detail]
    return Verification(pair_maps(model, photo_a, photo_b, window=window, stride=stride))
