"""Face-specific explanations: landmark regions, verification pairs, DISE, canonical maps.

* **Region methods** (``region-occlusion``, ``region-lime``, ``region-shap``) use the
  landmark regions of the chip (forehead, brows, eyes, nose, mouth, cheeks, jaw, hair
  and background, neck) as the features of occlusion, LIME or KernelSHAP, through
  `feature_attribution` on the shared engine. With only a dozen regions KernelSHAP can
  be exact: when ``n_samples ≥ 2^F`` (4096 for all 12) every coalition is enumerated and
  the values are the exact Shapley values. The per-region numbers are in
  ``extras["regions"]`` (regions absent from a chip are left out).
* **Pair maps** (`pair_maps`) explain a verification decision by occluding landmark-
  anchored patches in one or both photos (Zhong & Deng 2018; Knoche et al. 2023).
* **DISE** (``dise``; Williford et al. 2020, xfr ``STRise``): RISE whose hidden cells are
  drawn from a prior saliency density, scored as a contrast between the mate and
  non-mates.
* **Canonical maps** (John et al. 2021): per-image maps moved onto one frontal face and
  averaged into a model-level map (`canonical_map`, `CanonicalMapAccumulator`), and the
  image-level canonical occlusion map as method ``canonical-occlusion``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import nn

from ..errors import ModelError
from ..faces.align import Chip
from ..faces.canonical import (
    CANONICAL_SIZE,
    canonical_face,
    canonical_to_chip_points,
    chip_landmarks,
    from_canonical,
    similarity_scale,
    to_canonical,
)
from ..faces.regions import REGION_NAMES, chip_region_labels
from ..image import ImageSource, load_image, source_name
from ..models.base import FaceModel
from ..targets import Contrastive, Metric, Similarity, Target
from .base import PerturbationMethod, register
from .engine import DEFAULT_BATCH_SIZE, EMBEDDINGS, PerturbationEngine
from .explanation import Explanation, saliency_mass
from .perturbation import FILL_KINDS, RiseMasks, feature_attribution, fill_image, occlusion_windows

__all__ = [
    "CanonicalMap",
    "CanonicalMapAccumulator",
    "CanonicalOcclusion",
    "Dise",
    "PairExplanation",
    "RegionLime",
    "RegionOcclusion",
    "RegionShap",
    "canonical_map",
    "contrastive_target",
    "pair_maps",
    "region_labels",
    "render_canonical",
    "render_pair",
]

# Pair patches scale with the chip: 24 px windows, stride 12, on a 150 px dlib chip (144 patches;
# Knoche et al.'s middle size is 14 px on 112 px, stride 5). Each patch costs two forwards in mode
# "both", 25–60 ms each for dlib-resnet on a 2-core CPU.
_REFERENCE_SIDE = 150
_PAIR_WINDOW = 24
_PAIR_STRIDE = 12
# Canonical occlusion: CSM zeroes 15 px squares on a 224 px input.
_CIS_PATCH_FRACTION = 15 / 224


def _scaled(reference: int, side: int) -> int:
    return max(1, round(reference * side / _REFERENCE_SIDE))


def _check_fill(fill: str) -> str:
    if fill not in FILL_KINDS:
        raise ModelError(f"fill must be one of {', '.join(FILL_KINDS)}; got {fill!r}")
    return fill


def _box_masks(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Keep-masks ``(B, 1, H, W)``: 0 inside each box ``(y0, y1, x0, x1)`` (end exclusive), 1 outside."""
    rows = torch.arange(h)[None, :]
    cols = torch.arange(w)[None, :]
    in_rows = (rows >= boxes[:, 0:1]) & (rows < boxes[:, 1:2])
    in_cols = (cols >= boxes[:, 2:3]) & (cols < boxes[:, 3:4])
    covered = in_rows[:, :, None] & in_cols[:, None, :]
    return (~covered).float().unsqueeze(1)


def _centred_boxes(centres: np.ndarray, window: int, h: int, w: int) -> torch.Tensor:
    """Square boxes of side ``window`` centred on (x, y) points, cut at the image border."""
    c = np.round(np.asarray(centres, np.float64)).astype(np.int64)
    half = window // 2
    y0 = np.clip(c[:, 1] - half, 0, h)
    x0 = np.clip(c[:, 0] - half, 0, w)
    y1 = np.clip(c[:, 1] - half + window, 0, h)
    x1 = np.clip(c[:, 0] - half + window, 0, w)
    return torch.as_tensor(np.stack([y0, y1, x0, x1], 1))


def _splat(values: np.ndarray, boxes: torch.Tensor, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum of each box's value over its pixels, and the number of boxes covering each pixel.

    Each box adds its value at its four corners of a difference image, whose running sums over
    rows and columns are the totals: one pass, not a Python loop over hundreds of boxes."""
    b = np.asarray(boxes, np.int64).reshape(-1, 4)
    v = np.asarray(values, np.float64).reshape(-1)
    if len(v) != len(b):
        raise ModelError(f"{len(v)} values for {len(b)} boxes")
    out = []
    for weights in (v, np.ones_like(v)):
        diff = np.zeros((h + 1, w + 1), np.float64)
        for rows, cols, sign in ((b[:, 0], b[:, 2], 1.0), (b[:, 0], b[:, 3], -1.0), (b[:, 1], b[:, 2], -1.0),
                                 (b[:, 1], b[:, 3], 1.0)):
            np.add.at(diff, (rows, cols), sign * weights)
        out.append(diff.cumsum(0).cumsum(1)[:h, :w])
    total, hits = out
    return total, np.rint(hits)


def _mean_over_hits(total: np.ndarray, hits: np.ndarray) -> np.ndarray:
    out = np.zeros_like(total)
    np.divide(total, hits, out=out, where=hits > 0)
    return out


# -- region methods ------------------------------------------------------------------------------------
def region_labels(chip: Chip) -> tuple[np.ndarray, dict[int, str]]:
    """The chip's landmark regions as one label map (each pixel in one region) and label → name."""
    labels = chip_region_labels(chip).astype(np.int64)  # a fresh, writable copy of the cached map
    return labels, dict(enumerate(REGION_NAMES))


class _RegionMethod(PerturbationMethod):
    """Landmark regions as the features of occlusion, LIME or KernelSHAP.

    A removed region takes the ``fill`` (``mean`` by default: each channel's mean colour, so
    the region's shape and texture disappear without a black edge). Each pixel of the map
    carries its region's value; ``extras["regions"]`` has region → value, and
    ``extras["labels"]`` the label map used.
    """

    family: ClassVar[str] = "face"
    needs_face: ClassVar[bool] = True
    signed: ClassVar[bool] = True
    library: ClassVar[str] = "facelens"
    kind: ClassVar[Literal["lime", "kernelshap", "occlusion"]]
    defaults: ClassVar[dict[str, object]] = {"fill": "mean"}

    def _options(self) -> dict[str, object]:
        return {}

    def attribute_one(self, x: torch.Tensor, target: Target, chip: Chip | None) -> torch.Tensor:
        assert chip is not None
        labels, names = region_labels(chip)
        fill = fill_image(x, _check_fill(str(self.settings["fill"])))
        n_samples = int(self.settings.get("n_samples", 0))  # type: ignore[call-overload]
        result = feature_attribution(self.engine(target), x, fill, labels, self.kind, n_samples,
                                     self.generator(), **self._options())  # type: ignore[arg-type]
        values = dict(zip(result.labels.tolist(), result.values.tolist(), strict=True))
        self.extras = {
            "regions": {names[k]: float(values[k]) for k in sorted(values)},
            "labels": labels,
            "intercept": result.intercept,
            "evaluations": result.evaluations,
        }
        return result.map


@register
class RegionOcclusion(_RegionMethod):
    """Each landmark region replaced by the fill in turn; the map is the score drop painted on
    the region (positive: the region supports the target). F + 1 evaluations."""

    name = "region-occlusion"
    kind = "occlusion"


@register
class RegionLime(_RegionMethod):
    """LIME (Ribeiro et al. 2016) with the landmark regions as its interpretable features."""

    name = "region-lime"
    kind = "lime"
    defaults: ClassVar[dict[str, object]] = {"fill": "mean", "n_samples": 1000, "kernel_width": 0.25,
                                             "regressor": "ridge", "alpha": 1.0}

    def _options(self) -> dict[str, object]:
        return {"kernel_width": float(self.settings["kernel_width"]),  # type: ignore[arg-type]
                "regressor": str(self.settings["regressor"]), "alpha": float(self.settings["alpha"])}  # type: ignore[arg-type]


@register
class RegionShap(_RegionMethod):
    """KernelSHAP (Lundberg & Lee 2017) with the landmark regions as players.

    With F regions and ``n_samples ≥ 2^F`` (4096 for all 12 regions) every coalition is
    evaluated and the values are the exact Shapley values of "keep these regions, fill the
    rest"; below that they are KernelSHAP's paired-sampling estimate. Either way they sum to
    score(image) − score(all regions filled). The default, 1024, keeps dlib-resnet near a
    minute on a 2-core CPU (4096 coalitions take about four); pass ``n_samples=4096`` for the
    exact values.
    """

    name = "region-shap"
    kind = "kernelshap"
    defaults: ClassVar[dict[str, object]] = {"fill": "mean", "n_samples": 1024}


# -- pair maps -------------------------------------------------------------------------------------------
PairMode = Literal["both", "a", "b", "each"]
Anchors = Literal["grid", "landmarks"]


def _pair_score(ea: torch.Tensor, eb: torch.Tensor, metric: str) -> torch.Tensor:
    """Row-wise similarity; symmetric in its arguments to the last bit (products commute)."""
    if metric == "cosine":
        return torch.nn.functional.cosine_similarity(ea, eb, dim=1, eps=1e-8)
    return -torch.linalg.vector_norm(ea - eb, dim=1)


class _PairNet(nn.Module):
    """Both occluded photos of a pair in one input (6 channels): their embeddings side by side.

    This lets the shared engine batch pairs: a batch of B pairs is two forwards of B chips,
    photo A's and photo B's kept in separate forwards so swapping the photos swaps the
    computations exactly.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.net(x[:, :3].contiguous()), self.net(x[:, 3:].contiguous())], 1)


class _PairTarget(Target):
    kind = "pair similarity"

    def __init__(self, metric: str) -> None:
        self.metric = metric

    def score(self, out: torch.Tensor) -> torch.Tensor:
        half = out.shape[1] // 2
        return _pair_score(out[:, :half], out[:, half:], self.metric)

    def describe(self) -> str:
        return f"{self.metric} similarity of the two occluded photos"


@dataclass
class PairExplanation:
    """Why two faces match (or not): a signed map on each chip.

    ``map_a``/``map_b`` are on the chips (``None`` for the side not explained in modes ``a``
    and ``b``): positive where hiding a patch lowers the similarity (what makes the faces
    similar), negative where it raises it (what makes them differ); each pixel is the mean
    over the patches that cover it, in the units of the similarity. ``similarity`` is the
    intact pair's score, ``distance`` the Euclidean embedding distance that the model's
    ``threshold`` is set on, ``same_person`` the decision (``None`` without a threshold).
    ``photo_a``/``photo_b`` are the photos (``None`` when chips were passed in).
    """

    model: str
    mode: str
    metric: str
    chip_a: Chip
    chip_b: Chip
    photo_a: np.ndarray | None
    photo_b: np.ndarray | None
    map_a: np.ndarray | None
    map_b: np.ndarray | None
    similarity: float
    distance: float
    threshold: float | None
    same_person: bool | None
    settings: dict[str, object]
    seconds: float
    evaluations: int

    @cached_property
    def photo_map_a(self) -> np.ndarray | None:
        return None if self.map_a is None else self.chip_a.to_photo(self.map_a.astype(np.float32))

    @cached_property
    def photo_map_b(self) -> np.ndarray | None:
        return None if self.map_b is None else self.chip_b.to_photo(self.map_b.astype(np.float32))

    def summary(self) -> dict[str, object]:
        return {"model": self.model, "mode": self.mode, "metric": self.metric,
                "similarity": self.similarity, "distance": self.distance, "threshold": self.threshold,
                "same_person": self.same_person, "settings": self.settings,
                "seconds": round(self.seconds, 4), "evaluations": self.evaluations}

    def render(self, on: str = "chip") -> np.ndarray:
        return render_pair(self, on=on)


def _as_chip(model: FaceModel, image: ImageSource | np.ndarray | Chip) -> Chip:
    return image if isinstance(image, Chip) else model.chip(image)


def _chip_and_photo(model: FaceModel, image: ImageSource | np.ndarray | Chip) -> tuple[Chip, np.ndarray | None]:
    if isinstance(image, Chip):
        return image, None
    photo = load_image(image)
    return model.chip(photo, name=source_name(image)), photo


def _patches(chip: Chip, anchors: str, window: int, stride: int) -> torch.Tensor:
    """Boxes ``(P, 4)`` of the occluding patches on one chip."""
    h, w = chip.image.shape[:2]
    if anchors == "grid":
        def starts(size: int) -> np.ndarray:
            covers = occlusion_windows(size, window, stride)
            return covers.float().argmax(1).numpy()

        ys, xs = starts(h), starts(w)
        grid = np.array([(y, min(h, y + window), x, min(w, x + window)) for y in ys for x in xs])
        return torch.as_tensor(grid, dtype=torch.int64)
    if anchors == "landmarks":
        if chip.face is None:
            raise ModelError("anchors='landmarks' needs faces with landmarks; this model's chips have none")
        return _centred_boxes(chip_landmarks(chip), window, h, w)
    raise ModelError(f"anchors must be 'grid' or 'landmarks', got {anchors!r}")


def pair_maps(
    model: FaceModel,
    image_a: ImageSource | np.ndarray | Chip,
    image_b: ImageSource | np.ndarray | Chip,
    *,
    mode: PairMode = "both",
    window: int | None = None,
    stride: int | None = None,
    fill: str = "zero",
    batch_size: int = DEFAULT_BATCH_SIZE,
    anchors: Anchors = "grid",
    metric: Metric = "cosine",
    progress: bool | None = None,
) -> PairExplanation:
    """Occlusion maps of a verification pair (Zhong & Deng 2018; Knoche et al. 2023).

    Modes:
        ``both``: the same patch hidden in both photos at once. Chips are aligned, so with
            ``anchors="grid"`` the same chip location is the same facial location; with
            ``anchors="landmarks"`` one patch is centred on each of the 68 landmarks of each
            chip, so the same landmark is hidden in both. ``map_a`` and ``map_b`` come from the
            same similarity drops.
        ``a`` / ``b``: occlude one photo against the intact other one.
        ``each``: both of those.

    ``window``/``stride`` default to 24/12 px on a 150 px chip, scaled with the chip (grid
    anchors; landmarks use ``window`` only). ``fill`` is ``zero`` (Knoche's black patch),
    ``mean`` or ``blur``. The score is cosine similarity of the embeddings, or minus their
    Euclidean distance (``metric="neg_l2"``). Patches run through the shared engine in
    batches of ``batch_size`` (in mode ``both``, a batch of B pairs is 2·B chips); the intact
    embeddings come from the shared cache. ``pair_maps(b, a)`` returns the maps of
    ``pair_maps(a, b)`` swapped.
    """
    if model.task != "embedding":
        raise ModelError(f"{model.name} is a classifier; pair maps explain recognizers (embeddings)")
    if mode not in ("both", "a", "b", "each"):
        raise ModelError(f"mode must be 'both', 'a', 'b' or 'each', got {mode!r}")
    if metric not in ("cosine", "neg_l2"):
        raise ModelError(f"metric must be 'cosine' or 'neg_l2', got {metric!r}")
    _check_fill(fill)
    (chip_a, photo_a), (chip_b, photo_b) = _chip_and_photo(model, image_a), _chip_and_photo(model, image_b)
    if chip_a.image.shape != chip_b.image.shape:
        raise ModelError(f"the chips differ in size: {chip_a.image.shape} vs {chip_b.image.shape}")
    h, w = chip_a.image.shape[:2]
    side = min(h, w)
    win = int(window) if window is not None else _scaled(_PAIR_WINDOW, side)
    std = int(stride) if stride is not None else min(win, _scaled(_PAIR_STRIDE, side))
    if not 1 <= win <= side or std < 1:
        raise ModelError(f"window must be in 1..{side} and stride ≥ 1; got {win}, {std}")

    t0 = time.perf_counter()
    emb = EMBEDDINGS.get(model.net, np.stack([chip_a.image, chip_b.image]), batch_size)
    ea, eb = torch.from_numpy(emb[0:1]), torch.from_numpy(emb[1:2])
    base = float(_pair_score(ea, eb, metric)[0])
    xa, xb = model.to_tensor(chip_a), model.to_tensor(chip_b)
    fa, fb = fill_image(xa, fill), fill_image(xb, fill)
    boxes_a, boxes_b = _patches(chip_a, anchors, win, std), _patches(chip_b, anchors, win, std)
    evaluations = 0

    def one_side(x: torch.Tensor, f: torch.Tensor, boxes: torch.Tensor, partner: torch.Tensor) -> np.ndarray:
        nonlocal evaluations
        engine = PerturbationEngine(model.net, Similarity(partner[0], metric), batch_size=batch_size,
                                    progress=progress, desc="pair map")
        scores = engine.run_masks(x, f, len(boxes), lambda s, e: _box_masks(boxes[s:e], h, w))
        evaluations += engine.evaluations
        total, hits = _splat(base - scores.double().numpy(), boxes, h, w)
        return _mean_over_hits(total, hits).astype(np.float32)

    map_a: np.ndarray | None = None
    map_b: np.ndarray | None = None
    if mode == "both":
        engine = PerturbationEngine(_PairNet(model.net), _PairTarget(metric), batch_size=batch_size,
                                    progress=progress, desc="pair map")
        da, db = xa - fa, xb - fb

        def build(start: int, stop: int) -> torch.Tensor:
            occ_a = torch.addcmul(fa, _box_masks(boxes_a[start:stop], h, w), da)
            occ_b = torch.addcmul(fb, _box_masks(boxes_b[start:stop], h, w), db)
            return torch.cat([occ_a, occ_b], 1)

        scores = engine.run(len(boxes_a), build)
        evaluations += 2 * engine.evaluations
        drops = base - scores.double().numpy()
        map_a = _mean_over_hits(*_splat(drops, boxes_a, h, w)).astype(np.float32)
        map_b = _mean_over_hits(*_splat(drops, boxes_b, h, w)).astype(np.float32)
    else:
        if mode in ("a", "each"):
            map_a = one_side(xa, fa, boxes_a, eb)
        if mode in ("b", "each"):
            map_b = one_side(xb, fb, boxes_b, ea)
    seconds = time.perf_counter() - t0
    distance = float(np.linalg.norm(emb[0].astype(np.float64) - emb[1].astype(np.float64)))
    threshold = model.match_threshold
    return PairExplanation(
        model=model.name, mode=mode, metric=metric, chip_a=chip_a, chip_b=chip_b, photo_a=photo_a,
        photo_b=photo_b, map_a=map_a, map_b=map_b,
        similarity=base, distance=distance, threshold=threshold,
        same_person=None if threshold is None else bool(distance < threshold),
        settings={"mode": mode, "anchors": anchors, "window": win, "stride": std if anchors == "grid" else None,
                  "fill": fill, "metric": metric, "batch_size": batch_size, "patches": len(boxes_a)},
        seconds=seconds, evaluations=evaluations,
    )


def _diverging_overlay(image: np.ndarray, values: np.ndarray, scale: float, alpha: float = 0.6) -> np.ndarray:
    """PiYG overlay (green: similar, pink: differ) with a fixed symmetric scale."""
    import cv2
    from matplotlib import colormaps

    if values.shape != image.shape[:2]:
        values = cv2.resize(values.astype(np.float32), (image.shape[1], image.shape[0]),
                            interpolation=cv2.INTER_LINEAR)
    m = np.clip(values / scale, -1, 1) if scale > 0 else np.zeros_like(values)
    heat = colormaps["PiYG"]((m + 1) / 2)[..., :3] * 255
    weight = alpha * np.abs(m)[..., None]
    return np.clip(image * (1 - weight) + heat * weight, 0, 255).astype(np.uint8)


def render_pair(pair: PairExplanation, *, on: str = "chip", percentile: float = 99.5) -> np.ndarray:
    """A two-panel figure (photo A, photo B) of a pair map as an RGB array.

    Both panels share one symmetric PiYG scale (as Knoche et al. draw them): green where a
    region makes the faces similar, pink where it makes them differ; a side that was not
    explained is shown without overlay.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    if on not in ("chip", "photo"):
        raise ModelError(f"on must be 'chip' or 'photo', got {on!r}")
    if on == "photo" and (pair.photo_a is None or pair.photo_b is None):
        raise ModelError("this pair was explained from chips; render it on='chip'")
    maps = [pair.map_a, pair.map_b] if on == "chip" else [pair.photo_map_a, pair.photo_map_b]
    images = [pair.chip_a.image, pair.chip_b.image] if on == "chip" else [pair.photo_a, pair.photo_b]
    present = [np.abs(m) for m in maps if m is not None]
    scale = float(np.percentile(np.concatenate([p.ravel() for p in present]), percentile)) if present else 1.0
    scale = scale or max((float(p.max()) for p in present), default=1.0) or 1.0
    fig, axes = plt.subplots(1, 2, figsize=(7.6, 3.9))
    for ax, img, m, label in zip(axes, images, maps, ("A", "B"), strict=True):
        ax.imshow(img if m is None else _diverging_overlay(img, m, scale))
        ax.set_title(f"photo {label}" + ("" if m is not None else " (intact partner)"), fontsize=9)
        ax.axis("off")
    sm = plt.cm.ScalarMappable(norm=Normalize(-scale, scale), cmap="PiYG")
    cb = fig.colorbar(sm, ax=list(axes), fraction=0.03, pad=0.02)
    cb.set_label(f"{pair.metric} similarity drop when hidden\n(pink: differ ↔ green: similar)", fontsize=7)
    cb.ax.tick_params(labelsize=6)
    decision = "" if pair.same_person is None else (
        f", {'same' if pair.same_person else 'different'} person at distance < {pair.threshold:g}")
    fig.suptitle(f"{pair.model}: {pair.metric} {pair.similarity:.3f}, distance {pair.distance:.3f}"
                 f"{decision}\nmode {pair.mode}, {pair.settings['anchors']} patches "
                 f"({pair.settings['window']} px), {pair.seconds:.1f} s", fontsize=8)
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return rgb


# -- DISE ------------------------------------------------------------------------------------------------
def contrastive_target(model: FaceModel, mate: ImageSource | np.ndarray | Chip,
                       nonmates: Sequence[ImageSource | np.ndarray | Chip], metric: Metric = "cosine",
                       batch_size: int = DEFAULT_BATCH_SIZE) -> Contrastive:
    """The DISE target: similarity to the mate minus the mean similarity to the non-mates,
    with every reference embedded once through the shared cache."""
    if not nonmates:
        raise ModelError("a contrastive target needs at least one non-mate")
    chips = [_as_chip(model, c) for c in (mate, *nonmates)]
    emb = EMBEDDINGS.get(model.net, np.stack([c.image for c in chips]), batch_size)
    return Contrastive(torch.from_numpy(emb[0]), torch.from_numpy(emb[1:]), metric)


@register
class Dise(PerturbationMethod):
    """DISE: density-based input sampling for matchers (Williford et al. 2020, xfr ``STRise``).

    Each of ``n_masks`` masks hides ``cells`` cells of a ``grid×grid`` grid (19 cells, xfr's
    12 px cells on 224 px), the hidden cells drawn without replacement from a prior density:
    the ``prior`` map (default: our registered ``gradient`` method on the same image and
    target; any registered method name, ``"uniform"``, or a user map) resized to the grid and
    cut at its ``prior_percentile`` (50, as xfr). The low-resolution masks are upsampled
    bilinearly and shifted at random within a cell; hidden pixels take a Gaussian blur of the
    image (σ = ``blur_sigma`` = 4 % of the side).

    A mask's score is the target's drop, ``target(image) − target(masked)``. With a
    `Contrastive` target (mate + non-mates, see `contrastive_target`) that is xfr's triplet
    score, the mean over the non-mate gallery of [(s(p,ref) − s(masked,ref)) − (s(p,gal) −
    s(masked,gal))]; with a plain `Similarity` (no non-mates) it degrades to density-guided
    RISE on the similarity. The map is the mean of score × hidden-area over the masks with a
    positive score, which is xfr's ``1 − mean(score·mask)`` up to the constant its final
    min–max rescaling removes. It is not divided by the sampling density, as in xfr, so it
    also carries the prior. ``n_masks`` defaults to 2000 for CPU use; xfr uses 6500 (and 50
    non-mates).
    """

    name = "dise"
    library = "facelens"
    family: ClassVar[str] = "perturbation"
    signed = False
    defaults: ClassVar[dict[str, object]] = {"n_masks": 2000, "grid": 19, "cells": 1, "prior": "gradient",
                                             "prior_percentile": 50.0, "blur_sigma": 0.04}

    def used_settings(self) -> dict[str, object]:
        used = super().used_settings()
        if not isinstance(used["prior"], str):
            used["prior"] = f"user map {np.shape(used['prior'])}"
        return used

    def prior_map(self, x: torch.Tensor, target: Target, chip: Chip | None) -> np.ndarray:
        """The prior density on the chip grid (non-negative), before it is cut and resized."""
        prior = self.settings["prior"]
        h, w = x.shape[-2:]
        if isinstance(prior, str) and prior == "uniform":
            return np.ones((h, w), np.float64)
        if isinstance(prior, str):
            from .api import get_method

            cls = get_method(prior)
            if cls.name == self.name:
                raise ModelError("dise cannot be its own prior")
            method = cls(self.model, batch_size=self.batch_size, seed=self.seed, progress=False)
            sal = method.attribute(x, target, chips=[chip])[0].numpy()
        else:
            sal = np.asarray(prior, np.float64)
            if sal.ndim != 2:
                raise ModelError(f"a DISE prior map must be 2-D, got shape {sal.shape}")
        if not np.isfinite(sal).all():
            raise ModelError("the DISE prior map has NaN or infinite values")
        return saliency_mass(sal)

    def grid_prior(self, prior: np.ndarray) -> torch.Tensor:
        """The prior on the mask grid: area-resized, cut below its percentile, summing to 1."""
        import cv2

        grid = int(self.settings["grid"])  # type: ignore[call-overload]
        small = cv2.resize(prior.astype(np.float64), (grid, grid), interpolation=cv2.INTER_AREA)
        small[small < np.percentile(small, float(self.settings["prior_percentile"]))] = 0.0  # type: ignore[arg-type]
        if small.sum() <= 0:
            raise ModelError("the DISE prior map is empty (no positive saliency); use prior='uniform'")
        return torch.as_tensor(small / small.sum()).flatten()

    def masks(self, prior: torch.Tensor, size: tuple[int, int]) -> RiseMasks:
        """Masks as low-resolution grids plus shifts, drawn from the seed alone."""
        import math

        grid = int(self.settings["grid"])  # type: ignore[call-overload]
        n = int(self.settings["n_masks"])  # type: ignore[call-overload]
        cells = int(self.settings["cells"])  # type: ignore[call-overload]
        support = int((prior > 0).sum())
        if n < 1 or grid < 1 or not 1 <= cells <= support:
            raise ModelError(f"dise needs n_masks ≥ 1, grid ≥ 1 and 1 ≤ cells ≤ {support} (cells with prior "
                             f"mass); got {n}, {grid}, {cells}")
        g = self.generator()
        hidden = torch.multinomial(prior.float().expand(n, -1), cells, replacement=False, generator=g)
        keep = torch.ones(n, grid * grid, dtype=torch.bool)
        keep.scatter_(1, hidden, False)
        h, w = size
        cell = (math.ceil(h / grid), math.ceil(w / grid))
        shifts = torch.stack([torch.randint(0, cell[0], (n,), generator=g),
                              torch.randint(0, cell[1], (n,), generator=g)], 1)
        return RiseMasks(keep.view(n, 1, grid, grid), shifts, (h, w), cell)

    def attribute_one(self, x: torch.Tensor, target: Target, chip: Chip | None) -> torch.Tensor:
        h, w = x.shape[-2:]
        prior = self.grid_prior(self.prior_map(x, target, chip))
        masks = self.masks(prior, (h, w))
        n = len(masks)
        engine = self.engine(target)
        intact = float(engine.score(x)[0])
        fill = fill_image(x, "blur", blur_sigma=float(self.settings["blur_sigma"]))  # type: ignore[arg-type]

        def batch(start: int, stop: int) -> torch.Tensor:
            return masks(start, stop, x.device, x.dtype)

        scores = intact - engine.run_masks(x, fill, n, batch).double()
        positive = scores > 0
        # Σ over positive masks of score·(1 − mask) = Σ score − Σ score·mask; the second sum groups the
        # masks by shift before upsampling (`RiseMasks.weighted_sum`) instead of rebuilding every mask
        weights = torch.where(positive, scores, torch.zeros_like(scores))
        total = (weights.sum() - masks.weighted_sum(weights)).flatten()
        n_pos = int(positive.sum())
        grid = int(self.settings["grid"])  # type: ignore[call-overload]
        self.extras = {"prior": prior.view(grid, grid).numpy(), "positive_masks": n_pos,
                       "mask_scores": scores.float().numpy()}
        return (total / max(n_pos, 1)).view(h, w).float()


# -- canonical maps --------------------------------------------------------------------------------------
@dataclass
class CanonicalMap:
    """A model-level saliency map on the canonical face (John et al.'s CMS).

    ``map`` is the mean of ``count`` per-image maps, each made non-negative (its positive
    evidence, see `saliency_mass`) and normalized to unit mass on the canonical face, so it
    sums to 1 and every photo weighs the same (the CSM code sums raw maps instead).
    ``skipped`` counts maps with no mass, which cannot be normalized.
    """

    map: np.ndarray
    count: int
    size: int
    method: str | None = None
    model: str | None = None
    skipped: int = 0

    @property
    def landmarks(self) -> np.ndarray:
        """The template landmarks in canonical pixels."""
        return canonical_face(self.size).landmarks

    def to_face(self, chip: Chip) -> np.ndarray:
        """The model-level map warped onto one face's chip."""
        return from_canonical(self.map, chip)

    def render(self, title: str | None = None) -> np.ndarray:
        return render_canonical(self, title=title)


def _canonical_of(item: Explanation | tuple[np.ndarray, Chip], size: int) -> np.ndarray:
    if isinstance(item, Explanation):
        ready = item.extras.get("canonical") if isinstance(item.extras, dict) else None
        if isinstance(ready, np.ndarray) and ready.shape == (size, size):
            return ready.astype(np.float64)
        return to_canonical(item.chip_map, item.chip, size).astype(np.float64)
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Chip):
        return to_canonical(np.asarray(item[0]), item[1], size).astype(np.float64)
    raise ModelError(f"expected an Explanation or a (map, chip) pair, got {type(item).__name__}")


class CanonicalMapAccumulator:
    """Streaming average of maps on the canonical face, in bounded memory (torchmetrics style).

    ``update`` takes an `Explanation` (or a ``(chip_map, chip)`` pair); ``compute`` returns the
    `CanonicalMap` so far; ``merge`` adds another accumulator's state (e.g. from a worker).
    Explanations of different methods or models are refused: their average means nothing.
    """

    def __init__(self, size: int = CANONICAL_SIZE) -> None:
        canonical_face(size)  # validates the size
        self.size = int(size)
        self.reset()

    def reset(self) -> None:
        self.total = np.zeros((self.size, self.size), np.float64)
        self.count = 0
        self.skipped = 0
        self.method: str | None = None
        self.model: str | None = None

    def _check_source(self, item: object) -> None:
        if not isinstance(item, Explanation):
            return
        for attr in ("method", "model"):
            seen, new = getattr(self, attr), getattr(item, attr)
            if seen is not None and seen != new:
                raise ModelError(f"cannot average maps of {attr} {new!r} with maps of {attr} {seen!r}")
            setattr(self, attr, new)

    def update(self, item: Explanation | tuple[np.ndarray, Chip]) -> None:
        self._check_source(item)
        mass = saliency_mass(_canonical_of(item, self.size))
        total = mass.sum()
        if not np.isfinite(total) or total <= 0:
            self.skipped += 1
            return
        self.total += mass / total
        self.count += 1

    def merge(self, other: CanonicalMapAccumulator) -> None:
        if other.size != self.size:
            raise ModelError(f"cannot merge canonical maps of size {other.size} into size {self.size}")
        for attr in ("method", "model"):
            mine, theirs = getattr(self, attr), getattr(other, attr)
            if mine is not None and theirs is not None and mine != theirs:
                raise ModelError(f"cannot merge maps of {attr} {theirs!r} into maps of {attr} {mine!r}")
            setattr(self, attr, mine if mine is not None else theirs)
        self.total += other.total
        self.count += other.count
        self.skipped += other.skipped

    def compute(self) -> CanonicalMap:
        if self.count == 0:
            raise ModelError("no map with positive mass was added to the canonical average")
        return CanonicalMap(map=(self.total / self.count).astype(np.float32), count=self.count, size=self.size,
                            method=self.method, model=self.model, skipped=self.skipped)


def canonical_map(items: Iterable[Explanation] | tuple[Sequence[np.ndarray], Sequence[Chip]],
                  size: int = CANONICAL_SIZE) -> CanonicalMap:
    """The model-level canonical map of many explanations (or of parallel maps and chips)."""
    acc = CanonicalMapAccumulator(size)
    if isinstance(items, tuple) and len(items) == 2 and not isinstance(items[0], Explanation):
        maps, chips = items
        if len(maps) != len(chips):
            raise ModelError(f"{len(maps)} maps for {len(chips)} chips")
        for m, c in zip(maps, chips, strict=True):
            acc.update((m, c))
    else:
        for e in items:  # type: ignore[union-attr]
            acc.update(e)
    return acc.compute()


def render_canonical(cmap: CanonicalMap, *, title: str | None = None, faces: Sequence[Chip] = ()) -> np.ndarray:
    """The canonical map with the template landmarks (and its triangulation), then the same map
    warped onto each chip in ``faces``, as one RGB figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .render import overlay

    face = canonical_face(cmap.size)
    cols = 1 + len(faces)
    fig, axes = plt.subplots(1, cols, figsize=(3.4 * cols, 3.6), squeeze=False)
    ax = axes[0, 0]
    im = ax.imshow(cmap.map, cmap="jet")
    pts = face.points
    ax.triplot(pts[:, 0], pts[:, 1], face.triangles, color="white", lw=0.3, alpha=0.5)
    ax.plot(face.landmarks[:, 0], face.landmarks[:, 1], ".", color="white", ms=2)
    ax.set_xlim(-0.5, cmap.size - 0.5)
    ax.set_ylim(cmap.size - 0.5, -0.5)
    ax.set_title(f"canonical face, mean of {cmap.count}", fontsize=8)
    ax.axis("off")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
    for i, chip in enumerate(faces, start=1):
        axes[0, i].imshow(overlay(chip.image, cmap.to_face(chip)))
        axes[0, i].set_title("warped onto a face", fontsize=8)
        axes[0, i].axis("off")
    fig.suptitle(title or f"{cmap.model or 'model'}: {cmap.method or 'saliency'} (canonical mean)", fontsize=9)
    fig.tight_layout()
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return rgb


def _mesh_vertices(size: int, density: int) -> np.ndarray:
    """Occlusion sites on the canonical face: the 68 template landmarks, plus (density ≥ 1) the
    midpoints of the edges and the centroids of the triangles between landmarks — a coarse
    stand-in for CSM's subsampled PRNet mesh."""
    face = canonical_face(size)
    points = [face.landmarks]
    if density >= 1:
        inner = face.triangles[(face.triangles < len(face.landmarks)).all(1)]
        edges = np.unique(np.sort(np.concatenate([inner[:, [0, 1]], inner[:, [1, 2]], inner[:, [0, 2]]]), 1), axis=0)
        points.append(face.landmarks[edges].mean(1))
        points.append(face.landmarks[inner].mean(1))
    if density not in (0, 1):
        raise ModelError(f"density must be 0 (landmarks) or 1 (landmarks, edge midpoints, centroids); got {density}")
    return np.vstack(points)


@register
class CanonicalOcclusion(PerturbationMethod):
    """The canonical image saliency of John et al. (CIS): occlusion at mesh vertices, splatted
    onto the canonical face.

    A square of side ``patch`` × chip side (15/224, as CSM) is filled (``zero``, as CSM) at each
    vertex: the landmarks and, with ``density=1``, the midpoints and centroids of the template
    triangles, carried onto the chip by the canonical warp. The score drop at each vertex is
    averaged over the patches covering each pixel, on the chip (the returned map) and on the
    canonical face (``extras["canonical"]``, the patch scaled by the face's size there), which
    `canonical_map` averages directly.
    """

    name = "canonical-occlusion"
    library = "facelens"
    family: ClassVar[str] = "face"
    needs_face = True
    signed = True
    defaults: ClassVar[dict[str, object]] = {"patch": _CIS_PATCH_FRACTION, "density": 1, "fill": "zero",
                                             "size": CANONICAL_SIZE}

    def attribute_one(self, x: torch.Tensor, target: Target, chip: Chip | None) -> torch.Tensor:
        assert chip is not None
        h, w = x.shape[-2:]
        size = int(self.settings["size"])  # type: ignore[call-overload]
        vertices = _mesh_vertices(size, int(self.settings["density"]))  # type: ignore[call-overload]
        on_chip = canonical_to_chip_points(vertices, chip, size)
        window = max(1, round(float(self.settings["patch"]) * min(h, w)))  # type: ignore[arg-type]
        boxes = _centred_boxes(on_chip, window, h, w)
        engine = self.engine(target)
        intact = float(engine.score(x)[0])
        fill = fill_image(x, _check_fill(str(self.settings["fill"])))
        drops = intact - engine.run_masks(x, fill, len(boxes), lambda s, e: _box_masks(boxes[s:e], h, w))
        drops_np = drops.double().numpy()
        canon_window = max(1, round(window / similarity_scale(chip, size)))
        canon_boxes = _centred_boxes(vertices, canon_window, size, size)
        self.extras = {
            "canonical": _mean_over_hits(*_splat(drops_np, canon_boxes, size, size)).astype(np.float32),
            "vertices": on_chip.astype(np.float32),
            "vertex_drops": drops_np.astype(np.float32),
        }
        return torch.from_numpy(_mean_over_hits(*_splat(drops_np, boxes, h, w)).astype(np.float32))
