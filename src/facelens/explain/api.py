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
from ..image import ImageSource, load_image
from ..models.base import FaceModel
from ..models.registry import load_model
from ..targets import ClassScore, Similarity, Target, as_target
from .base import METHODS, Method
from .engine import DEFAULT_BATCH_SIZE, EMBEDDINGS
from .explanation import Explanation

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
                   metric: str = "cosine") -> Target:
    """Turn what the user said into a `Target`.

    Defaults: the top class for a classifier; for a recognizer, the face's own
    unperturbed embedding (what keeps this identity), measured as the projection
    onto it (``dot``: cosine to itself has zero gradient), or the similarity to
    ``reference`` when given (why is A matched to B).
    """
    if isinstance(target, Target) or (callable(target) and not isinstance(target, (str, int))):
        return as_target(target)
    if model.task == "classification":
        names = model.class_names or []
        if target is None:
            logits = model.forward_chips(chip)[0]
            idx = int(np.argmax(logits))
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
    # recognizer
    if reference is None and target is not None and not isinstance(target, str):
        reference = target
    if reference is None:
        return Similarity(_embedding_of(model, chip), "dot",  # type: ignore[arg-type]
                          label="its own unperturbed embedding (projection onto it)")
    if isinstance(reference, Chip):
        return Similarity(_embedding_of(model, reference), metric, label="the reference photo")  # type: ignore[arg-type]
    if isinstance(reference, (np.ndarray, torch.Tensor)) and np.asarray(reference).ndim == 1:
        return Similarity(reference, metric, label="the reference embedding")  # type: ignore[arg-type]
    ref_chip = model.chip(reference)
    return Similarity(_embedding_of(model, ref_chip), metric, label="the reference photo")  # type: ignore[arg-type]


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
    **settings: object,
) -> Explanation:
    """Explain one face (the largest, or ``face``) with one method.

    ``target``: a `Target`, a callable, a class name or index (classifiers), or a reference
    embedding (recognizers); ``reference``: a photo or embedding to explain the match against.
    ``batch_size`` is the one cost knob of every perturbation method; ``seed`` makes sampling
    methods repeatable; other keyword settings are method-specific (see `list_methods()`).
    """
    fm = load_model(model) if isinstance(model, str) else model
    photo = load_image(image)
    chip = fm.chip(photo, face)
    tgt = resolve_target(fm, chip, target, reference)
    cls = get_method(method)
    m = cls(fm, batch_size=batch_size, seed=seed, progress=progress, **settings)
    x = fm.to_tensor(chip)
    t0 = time.perf_counter()
    saliency = m.attribute(x, tgt, chips=[chip])[0]
    seconds = time.perf_counter() - t0
    with torch.inference_mode():
        score = float(tgt(fm.net(x))[0])
    return Explanation(
        method=cls.name, model=fm.name, target=tgt.describe(), score=score,
        chip_map=saliency.numpy().astype(np.float32), chip=chip, photo=photo,
        settings=m.used_settings(), seconds=seconds, signed=cls.signed, library=cls.library,
        extras=getattr(m, "extras", {}),
    )


def explain_methods(model: FaceModel | str, image: ImageSource | np.ndarray, methods: Sequence[str],
                    target: object = None, **kwargs: object) -> list[Explanation]:
    """Several methods on the same face and target (the face is detected and aligned once)."""
    fm = load_model(model) if isinstance(model, str) else model
    photo = load_image(image)
    face = kwargs.pop("face", None)
    chip = fm.chip(photo, face)  # type: ignore[arg-type]
    return [explain(fm, photo, m, target, face=chip.face, **kwargs) for m in methods]  # type: ignore[arg-type]
