"""`explain()`: one call for every method, model and target.

Example:
    >>> import facelens
    >>> e = facelens.explain("dlib-resnet", "photo.jpg", method="gradcam")  # doctest: +SKIP
    >>> e.region_attention().top(3)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import ModelError
from ..faces.align import Chip
from ..faces.detect import Face
from ..image import ImageSource, load_image, source_name
from ..models.base import FaceModel
from ..models.registry import load_model
from ..targets import RECOGNIZER_TARGETS, ClassScore, CohortSimilarity, Similarity, Target, ThresholdMargin, as_target
from .base import METHODS, Method
from .engine import DEFAULT_BATCH_SIZE, EMBEDDINGS
from .explanation import Explanation
from .target_range import TargetRange, measure_range

__all__ = ["explain", "get_method", "list_methods", "resolve_target"]

_METHOD_MODULES = ("gradients", "lrp", "ebp", "cams", "perturbation", "face")


def _load_methods() -> None:
    for mod in _METHOD_MODULES:
        importlib.import_module(f"{__package__}.{mod}")


def list_methods() -> list[dict[str, object]]:
    """Every registered method: name, family, the library that computes it, signedness."""
    _load_methods()
    return [
        {"name": c.name, "family": c.family, "library": c.library, "signed": c.signed,
         "localizes": c.localizes, "needs_face": c.needs_face, "settings": dict(c.defaults)}
        for c in METHODS.values()
    ]


def get_method(name: str) -> type[Method]:
    _load_methods()
    key = name.lower().replace("_", "-")
    if key not in METHODS:
        raise ModelError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[key]


def _embedding_of(model: FaceModel, chip: Chip) -> np.ndarray:
    return EMBEDDINGS.get(model.net, chip.image[None])[0]


def resolve_target(model: FaceModel, chip: Chip, target: object = None,
                   reference: ImageSource | np.ndarray | Chip | None = None,
                   metric: str | None = None) -> Target:
    """Turn what the user said into a `Target`.

    Classifiers: the top class by default, or the class named or numbered by ``target``.

    Recognizers: the reference is ``reference`` (a photo, chip or embedding: why is A matched to B) or,
    without one, the face's own unperturbed embedding (what keeps this face this person). The score is
    named by ``target`` (one of :data:`~facelens.targets.RECOGNIZER_TARGETS`) or, for the old
    ``metric`` argument, ``cosine``/``neg_l2``/``dot``:

    * ``cohort`` (the default when the model has a cohort): the match in impostor standard deviations,
      so an impostor scores about 0 (:class:`~facelens.targets.CohortSimilarity`);
    * ``projection``: the dot product with the unit reference, the pre-cohort default (it keeps 92 % of
      its value on a blurred dlib chip: little range);
    * ``cosine``; ``margin``: the model's threshold minus the L2 distance.
    """
    if isinstance(target, Target) or (callable(target) and not isinstance(target, (str, int))):
        return as_target(target)
    if model.task == "classification":
        return _class_target(model, chip, target)
    kind = target if isinstance(target, str) else None
    if kind is not None and kind not in RECOGNIZER_TARGETS:
        raise ModelError(f"{model.name} is a recognizer: target must be one of {', '.join(RECOGNIZER_TARGETS)}, "
                         f"a reference embedding or a callable; got {target!r}")
    if reference is None and target is not None and kind is None:
        reference = target  # a reference embedding given as the target
    if reference is None:
        ref, label = _embedding_of(model, chip), "its own unperturbed embedding"
    elif isinstance(reference, Chip):
        ref, label = _embedding_of(model, reference), "the reference photo"
    elif isinstance(reference, (np.ndarray, torch.Tensor)) and np.asarray(reference).ndim == 1:
        ref, label = np.asarray(reference, np.float32), "the reference embedding"
    else:
        ref, label = _embedding_of(model, model.chip(reference)), "the reference photo"
    if kind is None and metric is not None:
        kind = {"dot": "projection", "neg_l2": "neg_l2"}.get(metric, metric)
    if kind is None:
        kind = "cohort" if model.cohort is not None else ("projection" if reference is None else "cosine")
    if kind == "cohort":
        if model.cohort is None:
            raise ModelError(f"{model.name} has no cohort statistics; give one (facelens.models.cohort) or use "
                             f"target='projection' or 'cosine'")
        return CohortSimilarity(ref, model.cohort, label=label)
    if kind == "margin":
        if model.match_threshold is None:
            raise ModelError(f"{model.name} has no decision threshold, so target='margin' is undefined")
        return ThresholdMargin(torch.as_tensor(ref), float(model.match_threshold), label=label)
    if kind == "projection":
        return Similarity(ref, "dot", label=f"{label} (projection onto it)")  # type: ignore[arg-type]
    if kind in ("cosine", "neg_l2"):
        return Similarity(ref, kind, label=label)  # type: ignore[arg-type]
    raise ModelError(f"unknown similarity metric {metric!r}; use cosine, neg_l2 or dot")


def _class_target(model: FaceModel, chip: Chip, target: object) -> Target:
    names = model.class_names or []
    if target is None:
        idx = int(np.argmax(model.forward_chips(chip)[0]))
    elif isinstance(target, (int, np.integer)):
        idx = int(target)
    elif isinstance(target, str) and target in names:
        idx = names.index(target)
    elif isinstance(target, str) and target.isdigit():
        idx = int(target)
    else:
        raise ModelError(f"{model.name} has no class {target!r}")
    if not 0 <= idx < len(names):
        raise ModelError(f"class index {idx} out of range for {model.name} ({len(names)} classes)")
    return ClassScore(idx, name=names[idx])


def explain(
    model: FaceModel | str,
    image: ImageSource | np.ndarray,
    method: str = "gradcam",
    target: object = None,
    *,
    reference: ImageSource | np.ndarray | None = None,
    face: Face | int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    progress: bool | None = None,
    target_range: TargetRange | None = None,
    **settings: object,
) -> Explanation:
    """Explain one face (the largest, or ``face``) with one method.

    ``target``: a `Target`, a callable, a class name or index (classifiers), or a reference
    embedding (recognizers); ``reference``: a photo or embedding to explain the match against.
    ``batch_size`` is the one cost knob of every perturbation method; ``seed`` makes sampling
    methods repeatable; other keyword settings are method-specific (see `list_methods()`).
    ``target_range``: the range already measured for this face and target (several methods on one
    face need it once); by default it is measured here.
    """
    fm = load_model(model) if isinstance(model, str) else model
    name = source_name(image)
    photo = load_image(image)
    chip = fm.chip(photo, face, name=name)
    tgt = resolve_target(fm, chip, target, reference)
    cls = get_method(method)
    m = cls(fm, batch_size=batch_size, seed=seed, progress=progress, **settings)
    x = fm.to_tensor(chip)
    t0 = time.perf_counter()
    saliency = m.attribute(x, tgt, chips=[chip])[0]
    seconds = time.perf_counter() - t0
    levels = target_range if target_range is not None else measure_range(fm.net, x, tgt)[0]
    return Explanation(
        method=cls.name, model=fm.name, target=tgt.describe(), score=levels.intact,
        chip_map=saliency.numpy().astype(np.float32), chip=chip, photo=photo,
        settings=m.used_settings(), seconds=seconds, signed=cls.signed, library=cls.library,
        extras=getattr(m, "extras", {}), target_range=levels,
    )


def explain_methods(model: FaceModel | str, image: ImageSource | np.ndarray, methods: Sequence[str],
                    target: object = None, **kwargs: object) -> list[Explanation]:
    """Several methods on the same face and target (the face is detected and aligned once)."""
    fm = load_model(model) if isinstance(model, str) else model
    name = source_name(image)
    photo = load_image(image)
    face = kwargs.pop("face", None)
    chip = fm.chip(photo, face, name=name)  # type: ignore[arg-type]
    return [explain(fm, photo, m, target, face=chip.face, **kwargs) for m in methods]  # type: ignore[arg-type]
