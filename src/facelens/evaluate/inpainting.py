"""The inpainting game for face matchers (Williford, May & Byrne, ECCV 2020; stresearch/xfr).

A face matcher's saliency map can be checked against a known answer when the
only difference between two identities is known. The game makes that answer:

* **Non-mates by synthesis.** A probe photo gets one facial region (both eyes,
  brows, nose or mouth) replaced by the same region of another person, so the
  result is a *different identity* for the matcher that differs from the probe
  only inside that region. xfr inpaints the region with a generative model; we
  transplant a real donor's region instead: the donor chip is aligned to the
  probe by a similarity transform estimated (``cv2.estimateAffinePartial2D``)
  from the landmarks of the region and its surroundings, and blended with
  OpenCV's Poisson ``seamlessClone`` (``NORMAL_CLONE``) inside the dilated region
  mask. The dilated mask is the ground truth of what changed.
* **The twin gallery.** As in xfr, the inpainted identity has its own gallery
  photo: the probe's mate (another photo of the same person; FRL London has a
  neutral and a smiling photo of everyone) with the same region taken from the
  same donor. The original identity's gallery photo is the untouched mate.
* **Only the cases the network separates** (xfr ``filter_inpaintinggame_for_net``):
  the probe must match its mate (distance below the match threshold and closer to
  the mate than to the twin gallery), and the inpainted probe must be the twin
  (closer to the twin gallery than to the mate, and not matched to the mate).
* **The game.** The map explains the *original* probe's match with a contrastive
  target: similarity to the mate minus similarity to the twin gallery (xfr's
  triplet target). Sweep the share of saliency mass ("percent-density" in xfr)
  from 0 to 100 %; at each level replace the probe's most salient pixels with the
  inpainted probe's pixels and ask whether the hybrid is now classified as the
  twin (closer to the twin gallery than to the mate). Alongside, count the
  replaced pixels inside (true positives) and outside (false alarms) the
  ground-truth region. A good map flips the identity while replacing few pixels
  outside the region.

Reported per method: the curve of non-mate classification rate against the
saliency false-alarm rate (false-alarm pixels / all pixels outside the region,
pooled over the triplets, as xfr's ``plot_cls_vs_fpr``; the classification rate
is averaged per region and then over regions, xfr's ``balance_masks``), its area
and the rates at false-alarm 1, 5 and 10 %; also the true-positive pixel rate,
the IoU with the region, and the share of replaced pixels that lie outside the
region (the false-discovery share).

Every hybrid image of a batch goes through the shared `PerturbationEngine` in one
pass, built from pixel ranks batch by batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from ..errors import FaceLensError, ModelError
from ..explain.engine import DEFAULT_BATCH_SIZE, EMBEDDINGS, PerturbationEngine
from ..explain.explanation import saliency_mass
from ..faces.landmarks import JAW, LEFT_BROW, LEFT_EYE, MOUTH, NOSE, NOSE_BRIDGE, NOSE_LOWER, RIGHT_BROW, RIGHT_EYE
from ..models.base import FaceModel
from ..targets import Contrastive, Target
from .base import Metric

__all__ = [
    "DEFAULT_STEP",
    "FALSE_ALARM_POINTS",
    "GAME_REGIONS",
    "GameSet",
    "GameTriplet",
    "InpaintingGame",
    "TwinMargin",
    "curve_area",
    "explain_triplets",
    "game_target",
    "make_triplets",
    "mass_counts",
    "plot",
    "rate_at",
    "replace_region",
    "saliency_order",
]

DEFAULT_STEP = 2.0
FALSE_ALARM_POINTS = (0.01, 0.05, 0.10)

# 68-point (iBUG / dlib) landmarks of the region and around it that anchor the donor → probe similarity
# (a region's own points alone can be nearly collinear, e.g. the brows or a closed mouth).
_ANCHORS: dict[str, list[int]] = {
    "eyes": [*RIGHT_EYE, *LEFT_EYE, *RIGHT_BROW, *LEFT_BROW, *NOSE_BRIDGE[:2]],
    "brows": [*RIGHT_BROW, *LEFT_BROW, *RIGHT_EYE, *LEFT_EYE],
    "nose": [*NOSE, RIGHT_EYE[3], LEFT_EYE[0], MOUTH[0], MOUTH[6]],
    "mouth": [*MOUTH, *NOSE_LOWER, *JAW[5:12:3]],
}
# region name → names understood by `facelens.faces.regions`, and the dilation in pixels of a 150 px chip
# (xfr dilates by 5 px for eyes and brows and 9 px for nose and mouth on 224 px chips).
GAME_REGIONS: dict[str, tuple[tuple[str, ...], float]] = {
    "eyes": (("left_eye", "right_eye"), 4.0),
    "brows": (("left_brow", "right_brow"), 4.0),
    "nose": (("nose",), 6.0),
    "mouth": (("mouth",), 6.0),
}


# -- synthesis ---------------------------------------------------------------------------------------------
def _region_mask(landmarks: np.ndarray, region: str, shape: tuple[int, int]) -> np.ndarray:
    """The undilated region mask on a chip from its 68 landmarks (via `facelens.faces.regions`)."""
    from ..faces.regions import landmark_region_masks

    if region not in GAME_REGIONS:
        raise ModelError(f"unknown game region {region!r}; known: {', '.join(GAME_REGIONS)}")
    parts, _ = GAME_REGIONS[region]
    masks = landmark_region_masks(landmarks, shape)
    missing = [p for p in parts if p not in masks]
    if missing:
        raise ModelError(f"facelens.faces.regions has no region {missing[0]!r}")
    out = np.zeros(shape, bool)
    for p in parts:
        out |= masks[p]
    return out


def _dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    r = max(round(radius), 0)
    if r == 0:
        return mask.copy()
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    return cv2.dilate(mask.astype(np.uint8), k) > 0


def replace_region(image: np.ndarray, landmarks: np.ndarray, donor: np.ndarray, donor_landmarks: np.ndarray,
                   region: str, *, dilate: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``image`` with ``region`` replaced by the donor's, seamlessly; returns (new image, changed mask).

    Both images are uint8 RGB chips with their 68 landmarks (x, y) in chip pixels. The donor
    is warped onto the image by the similarity (rotation, uniform scale, translation) that
    best maps its anchor landmarks onto the image's (``cv2.estimateAffinePartial2D``,
    least-median), then Poisson-blended by ``cv2.seamlessClone`` (``NORMAL_CLONE``) inside
    the region mask dilated by ``dilate`` px (default: `GAME_REGIONS`, scaled to the chip
    side). Pixels outside that mask are left exactly as they were, so the mask is the
    ground truth of the change.
    """
    if region not in GAME_REGIONS:
        raise ModelError(f"unknown game region {region!r}; known: {', '.join(GAME_REGIONS)}")
    img, don = np.ascontiguousarray(image), np.ascontiguousarray(donor)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or don.dtype != np.uint8 or don.ndim != 3:
        raise ModelError("replace_region needs uint8 RGB images")
    pts, dpts = np.asarray(landmarks, np.float64), np.asarray(donor_landmarks, np.float64)
    if pts.shape != (68, 2) or dpts.shape != (68, 2):
        raise ModelError("replace_region needs 68 landmarks for both images")
    h, w = img.shape[:2]
    radius = GAME_REGIONS[region][1] * min(h, w) / 150.0 if dilate is None else float(dilate)
    mask = _dilate(_region_mask(pts, region, (h, w)), radius)
    # seamlessClone needs the mask clear of the border; trim it to a 2 px margin
    mask[:2], mask[-2:], mask[:, :2], mask[:, -2:] = False, False, False, False
    if not mask.any():
        raise ModelError(f"the {region} region is empty on this chip")
    anchors = _ANCHORS[region]
    matrix, _ = cv2.estimateAffinePartial2D(dpts[anchors].astype(np.float32), pts[anchors].astype(np.float32),
                                            method=cv2.LMEDS)
    if matrix is None:
        raise ModelError(f"cannot align the donor's {region} to the image (degenerate landmarks)")
    warped = cv2.warpAffine(don, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    x, y, bw, bh = cv2.boundingRect(mask.astype(np.uint8))
    # OpenCV places the mask's bounding box at center − (w/2, h/2) (integer halves): this centre
    # puts it back where it came from, without a shift
    center = (x + bw // 2, y + bh // 2)
    blended = cv2.seamlessClone(warped, img, mask.astype(np.uint8) * 255, center, cv2.NORMAL_CLONE)
    out = img.copy()
    out[mask] = blended[mask]  # keep every pixel outside the mask bit-exact
    return out, mask


# -- the game set ------------------------------------------------------------------------------------------
@dataclass
class GameTriplet:
    """One game case: a probe, its inpainted twin, and a gallery photo of each identity.

    Attributes:
        probe: the original probe chip (uint8 H×W×3).
        inpainted: the probe with ``region`` from ``donor`` (the inpainted non-mate).
        mask: the ground-truth changed pixels (bool H×W, chip frame).
        mate: another chip of the probe's identity (the original identity's gallery).
        mate_inpainted: the mate with the same region from the same donor (the twin's gallery).
        region, identity, donor: what was swapped, whose probe, whose region.
        distances: probe/twin distances to both galleries under the model (for the record).
        probe_chip: the probe's `Chip` (landmarks etc.), for methods that need the face.
    """

    probe: np.ndarray
    inpainted: np.ndarray
    mask: np.ndarray
    mate: np.ndarray
    mate_inpainted: np.ndarray
    region: str
    identity: str
    donor: str
    distances: dict[str, float] = field(default_factory=dict)
    probe_chip: Any = None

    def describe(self) -> dict[str, object]:
        return {"identity": self.identity, "region": self.region, "donor": self.donor,
                "mask_share": float(self.mask.mean()), **self.distances}


@dataclass
class GameSet:
    """The kept triplets, and how many candidates the network's filter saw and rejected (and why).

    ``cases`` has one row per candidate (identity, region, donor, distances, and the
    reason it was rejected or ``"kept"``), for the record.
    """

    triplets: list[GameTriplet]
    candidates: int
    rejected: dict[str, int]
    threshold: float
    normalize: bool
    failed: list[str] = field(default_factory=list)
    cases: list[dict[str, object]] = field(default_factory=list)

    @property
    def kept(self) -> int:
        return len(self.triplets)

    def summary(self) -> dict[str, object]:
        by_region: dict[str, int] = {}
        for t in self.triplets:
            by_region[t.region] = by_region.get(t.region, 0) + 1
        return {"candidates": self.candidates, "kept": self.kept, "kept_by_region": by_region,
                "rejected": dict(self.rejected), "threshold": self.threshold,
                "normalized_embeddings": self.normalize, "failed_photos": list(self.failed)}


def _distance(a: np.ndarray, b: np.ndarray, normalize: bool) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if normalize:
        a = a / np.linalg.norm(a, axis=-1, keepdims=True)
        b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return np.linalg.norm(a - b, axis=-1)


def _accept(d_probe_mate: float, d_probe_twin: float, d_twin_twin: float, d_twin_mate: float,
            threshold: float) -> str | None:
    """xfr's filter; returns the reason for rejection, or None to keep the case."""
    if not d_probe_mate < threshold:
        return "probe does not match its mate"
    if not d_probe_mate < d_probe_twin:
        return "probe closer to the twin gallery than to its mate"
    if not d_twin_twin < d_twin_mate:
        return "inpainted probe closer to the mate than to the twin gallery"
    if not d_twin_mate > threshold:
        return "inpainted probe still matches the mate"
    return None


def _photo_chip(model: FaceModel, path: str | Path) -> Any:
    chip = model.chip(path)
    if chip.landmarks is None or np.asarray(chip.landmarks).shape != (68, 2):
        raise ModelError(f"{path}: the game needs 68 landmarks on the chip")
    return chip


def make_triplets(source: Sequence[Mapping[str, str]] | Sequence[tuple[str | Path, str | Path, str]],
                  model: FaceModel, *, root: str | Path | None = None, regions: Sequence[str] = tuple(GAME_REGIONS),
                  donors: int = 1, probe_subset: str = "neutral", mate_subset: str = "smiling",
                  threshold: float | str | None = None, genuine_quantile: float = 0.95,
                  normalize: bool | None = None, seed: int = 0, batch_size: int = DEFAULT_BATCH_SIZE) -> GameSet:
    """Build the game set for ``model`` and keep only the cases it separates.

    ``source``: manifest rows (``path``, ``identity``, ``subset``; paths relative to ``root``)
    — every identity with a ``probe_subset`` and a ``mate_subset`` photo gives a probe and a
    mate, and the probe photos of the other identities are the donors — or
    ``(probe_path, mate_path, identity)`` tuples. For each probe, each region and
    ``donors`` donors drawn with ``seed``, one candidate is synthesized.

    ``threshold``: the match threshold of the filter: a number; ``None`` for the model's
    own (0.6 Euclidean for dlib-resnet); or ``"genuine"`` to calibrate it per net on the
    source, as xfr calibrates one per network: the ``genuine_quantile`` quantile of the
    probe–mate distances of all its identities, the strict operating point at which that
    share of genuine pairs still match. Why the option: dlib's 0.6 was set on LFW's
    unconstrained pairs; on FRL London's studio photos genuine distances are 0.1–0.3 and a
    single swapped region moved no probe of our first 10 identities beyond 0.6 from its
    mate (0 of 40 candidates kept), so the model's own threshold leaves an empty game.

    ``normalize``: L2-normalize embeddings before distances, as xfr does; default: off for
    models whose threshold is set on raw embeddings (``match_threshold``), on otherwise.
    A photo without a detectable face is skipped and listed in ``failed``.
    """
    if model.task != "embedding":
        raise ModelError(f"the inpainting game needs a face matcher; {model.name} is a {model.task} model")
    if isinstance(threshold, str) and threshold != "genuine":
        raise ModelError(f"threshold must be a number, None or 'genuine', got {threshold!r}")
    if threshold is None and model.match_threshold is None:
        raise ModelError(f"{model.name} has no match threshold: pass threshold= a number or 'genuine'")
    if not 0 < genuine_quantile <= 1:
        raise ModelError(f"genuine_quantile must be in (0, 1], got {genuine_quantile}")
    norm = (model.match_threshold is None) if normalize is None else bool(normalize)
    for r in regions:
        if r not in GAME_REGIONS:
            raise ModelError(f"unknown game region {r!r}; known: {', '.join(GAME_REGIONS)}")
    base = Path(root) if root is not None else Path()
    people: list[tuple[str, Path, Path]] = []
    if source and isinstance(source[0], Mapping):
        by_id: dict[str, dict[str, Path]] = {}
        for row in source:  # type: ignore[union-attr]
            by_id.setdefault(str(row["identity"]), {})[str(row.get("subset", ""))] = base / str(row["path"])
        people = [(i, s[probe_subset], s[mate_subset]) for i, s in sorted(by_id.items())
                  if probe_subset in s and mate_subset in s]
    else:
        people = [(str(ident), base / str(p), base / str(m)) for p, m, ident in source]  # type: ignore[misc]
    if len(people) < 2:
        raise ModelError("the game needs at least two identities with a probe and a mate photo")

    failed: list[str] = []
    chips: dict[str, tuple[Any, Any]] = {}
    for ident, probe_path, mate_path in people:
        try:
            chips[ident] = (_photo_chip(model, probe_path), _photo_chip(model, mate_path))
        except FaceLensError as exc:  # no face, unreadable photo: skip the identity, say why
            failed.append(str(exc))
    ids = list(chips)
    rng = np.random.default_rng(seed)
    cands: list[tuple[str, str, str, np.ndarray, np.ndarray, np.ndarray]] = []
    for ident in ids:
        probe, mate = chips[ident]
        others = [d for d in ids if d != ident]
        for region in regions:
            for donor in rng.permutation(others)[:donors]:
                dchip = chips[str(donor)][0]
                twin, mask = replace_region(probe.image, probe.landmarks, dchip.image, dchip.landmarks, region)
                mate_twin, _ = replace_region(mate.image, mate.landmarks, dchip.image, dchip.landmarks, region)
                cands.append((ident, str(donor), region, twin, mask, mate_twin))
    if not cands:
        raise ModelError("no candidate could be made: fewer than two identities with detectable faces")
    stack = np.stack([c[3] for c in cands] + [c[5] for c in cands])
    emb = EMBEDDINGS.get(model.net, stack, batch_size)
    twins, mate_twins = emb[:len(cands)], emb[len(cands):]
    own = EMBEDDINGS.get(model.net, np.stack([chips[i][k].image for i in ids for k in (0, 1)]), batch_size)
    own_of = {i: (own[2 * j], own[2 * j + 1]) for j, i in enumerate(ids)}
    if threshold == "genuine":
        genuine = [float(_distance(p, m, norm)) for p, m in own_of.values()]
        thr = float(np.quantile(genuine, genuine_quantile))
    else:
        thr = float(threshold if threshold is not None else model.match_threshold)  # type: ignore[arg-type]

    kept: list[GameTriplet] = []
    rejected: dict[str, int] = {}
    cases: list[dict[str, object]] = []
    for c, e_twin, e_mate_twin in zip(cands, twins, mate_twins, strict=True):
        ident, donor, region, twin, mask, mate_twin = c
        e_probe, e_mate = own_of[ident]
        d = {"probe_mate": float(_distance(e_probe, e_mate, norm)),
             "probe_twin_gallery": float(_distance(e_probe, e_mate_twin, norm)),
             "twin_twin_gallery": float(_distance(e_twin, e_mate_twin, norm)),
             "twin_mate": float(_distance(e_twin, e_mate, norm)),
             "probe_twin": float(_distance(e_probe, e_twin, norm))}
        reason = _accept(d["probe_mate"], d["probe_twin_gallery"], d["twin_twin_gallery"], d["twin_mate"], thr)
        cases.append({"identity": ident, "region": region, "donor": donor, **d, "outcome": reason or "kept"})
        if reason is not None:
            rejected[reason] = rejected.get(reason, 0) + 1
            continue
        probe_chip, mate_chip = chips[ident]
        kept.append(GameTriplet(probe=probe_chip.image, inpainted=twin, mask=mask, mate=mate_chip.image,
                                mate_inpainted=mate_twin, region=region, identity=ident, donor=donor,
                                distances=d, probe_chip=probe_chip))
    return GameSet(kept, len(cands), rejected, thr, norm, failed, cases)


# -- targets and maps --------------------------------------------------------------------------------------
def game_target(model: FaceModel, triplet: GameTriplet, normalize: bool) -> Target:
    """xfr's triplet target for the probe: similarity to the mate minus similarity to the twin gallery.

    Cosine when the game uses normalized embeddings (xfr), minus the Euclidean distance otherwise
    (the metric dlib's threshold is set on).
    """
    emb = EMBEDDINGS.get(model.net, np.stack([triplet.mate, triplet.mate_inpainted]))
    return Contrastive(torch.as_tensor(emb[0]), torch.as_tensor(emb[1][None]),
                       metric="cosine" if normalize else "neg_l2")


def explain_triplets(model: FaceModel, triplets: Sequence[GameTriplet], method: str, *, normalize: bool,
                     batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0, **settings: object) -> np.ndarray:
    """The method's maps ``(N, H, W)`` of the probes, for the game's contrastive target."""
    from ..explain.api import get_method

    if not triplets:
        return np.zeros((0, *model.input_size), np.float32)
    m = get_method(method)(model, batch_size=batch_size, seed=seed, **settings)
    x = model.to_tensor([t.probe for t in triplets])
    targets = [game_target(model, t, normalize) for t in triplets]
    chips = [t.probe_chip for t in triplets]
    return m.attribute(x, targets, chips=chips if all(c is not None for c in chips) else None).numpy()


class TwinMargin(Target):
    """Distance to the original gallery minus distance to the twin gallery: > 0 means "the twin"."""

    kind = "twin_margin"

    def __init__(self, original: np.ndarray, twin: np.ndarray, normalize: bool) -> None:
        self.normalize = normalize
        self.original = torch.as_tensor(np.asarray(original, np.float32)).flatten()
        self.twin = torch.as_tensor(np.asarray(twin, np.float32)).flatten()
        if normalize:
            self.original = self.original / self.original.norm()
            self.twin = self.twin / self.twin.norm()

    def score(self, out: torch.Tensor) -> torch.Tensor:
        e = out.flatten(1).float()
        if self.normalize:
            e = e / e.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return (e - self.original).norm(dim=1) - (e - self.twin).norm(dim=1)

    def describe(self) -> str:
        return "distance to the mate minus distance to the twin gallery"


# -- thresholding by saliency mass -------------------------------------------------------------------------
def saliency_order(saliency: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pixels from most to least salient, and their saliency mass in that order (summing to 1).

    Mass is `saliency_mass` (the positive part of a signed map, or its magnitude when it has
    none). Ties are broken by a seeded random order, as xfr breaks them with seeded noise,
    so a flat or blocky map does not favour the top-left of the image.
    """
    mass = saliency_mass(np.asarray(saliency, np.float64)).ravel()
    total = mass.sum()
    mass = mass / total if total > 0 else mass
    tie = np.random.default_rng(seed).permutation(mass.size)
    order = np.lexsort((tie, -mass))
    return order, mass[order]


def mass_counts(sorted_mass: np.ndarray, percents: np.ndarray, include_zero: bool = False) -> np.ndarray:
    """How many top pixels each percent of saliency mass replaces (xfr's "percent-density").

    A pixel is replaced at level *p* when the mass of the pixels above it is below *p* %:
    0 % replaces nothing, 100 % every pixel with positive mass (every pixel if
    ``include_zero``; xfr's default is not to).
    """
    above = np.cumsum(sorted_mass) - sorted_mass
    positive = int((sorted_mass > 0).sum())
    counts = np.array([int((above < p / 100.0).sum()) if p < 100 else
                       (sorted_mass.size if include_zero else positive) for p in percents])
    return np.minimum(counts, sorted_mass.size if include_zero else positive)


def curve_area(false_alarm: np.ndarray, rate: np.ndarray) -> float:
    """Area under the classification rate over the false-alarm rate on [0, 1].

    The sweep's points are joined linearly; past the last point (a map whose mass stops
    short of some pixels never replaces them) the last rate holds to a false-alarm rate of 1.
    """
    x = np.concatenate([np.asarray(false_alarm, np.float64), [1.0]])
    y = np.concatenate([np.asarray(rate, np.float64), [float(rate[-1])]])
    return float(np.trapezoid(y, x))


def rate_at(false_alarm: np.ndarray, rate: np.ndarray, level: float) -> float:
    """The classification rate at a false-alarm level, interpolated between sweep points.

    The point used below the level is the last one (highest mass) that stays at or under
    it, the operating point a user with that false-alarm budget would pick.
    """
    x, y = np.asarray(false_alarm, np.float64), np.asarray(rate, np.float64)
    under = np.nonzero(x <= level)[0]
    if not under.size:
        return float("nan")
    i = int(under[-1])
    if i + 1 >= len(x):
        return float(y[i])
    x0, x1, y0, y1 = x[i], x[i + 1], y[i], y[i + 1]
    return float(y0 + (y1 - y0) * (level - x0) / (x1 - x0)) if x1 > x0 else float(y0)


def _pooled(recs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One curve from per-triplet records: rates balanced over regions, pixel counts pooled (xfr)."""
    fp = np.array([r["false_pos"] for r in recs], np.float64).sum(0)
    tp = np.array([r["true_pos"] for r in recs], np.float64).sum(0)
    replaced = np.array([r["replaced"] for r in recs], np.float64).sum(0)
    neg = max(float(sum(r["neg"] for r in recs)), 1.0)
    pos = max(float(sum(r["pos"] for r in recs)), 1.0)
    by_region: dict[str, list[list[int]]] = {}
    for r in recs:
        by_region.setdefault(r["region"], []).append(r["twin"])
    rate = np.mean([np.mean(np.asarray(v, np.float64), axis=0) for v in by_region.values()], axis=0)
    return {
        "n": len(recs),
        "false_alarm_rate": fp / neg,
        "nonmate_rate": rate,
        "true_positive_rate": tp / pos,
        "iou": np.mean([r["iou"] for r in recs], axis=0),
        "false_discovery_share": np.divide(fp, replaced, out=np.zeros_like(fp), where=replaced > 0),
    }


# -- the metric --------------------------------------------------------------------------------------------
class InpaintingGame(Metric):
    """The inpainting game over a stream of (triplets, maps) batches, for any number of methods.

    Args:
        model: the face matcher.
        normalize: L2-normalize embeddings (xfr) or not (the model's own raw metric); should
            match the `GameSet` that made the triplets.
        step: the sweep's step in percent of saliency mass (0, step, …, 100).
        include_zero: also replace pixels with no saliency at 100 % (xfr: no).
        batch_size: hybrid images per forward.
        seed: tie-breaking among equal saliency values.
    """

    name = "inpainting_game"

    def __init__(self, model: FaceModel, *, normalize: bool, step: float = DEFAULT_STEP, include_zero: bool = False,
                 batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0, progress: bool | None = None) -> None:
        super().__init__()
        if not 0 < step <= 100:
            raise ModelError(f"step must be in (0, 100], got {step}")
        self.model, self.normalize, self.step = model, bool(normalize), float(step)
        self.include_zero, self.batch_size = bool(include_zero), int(batch_size)
        self.seed, self.progress = int(seed), progress
        self.percents = np.unique(np.append(np.arange(0.0, 100.0, self.step), 100.0))
        self.add_state("records", [])

    def update(self, triplets: Sequence[GameTriplet], maps: Mapping[str, Any] | np.ndarray | torch.Tensor,
               method: str | None = None) -> list[dict[str, Any]]:
        """Add a batch: ``maps`` is ``(N, H, W)`` for ``method``, or ``{method: (N, H, W)}``."""
        if not isinstance(maps, Mapping):
            maps = {method or "map": maps}
        trips = list(triplets)
        n, p = len(trips), len(self.percents)
        if n == 0:
            return []
        h, w = trips[0].probe.shape[:2]
        methods = list(maps)
        arrays = {}
        for meth in methods:
            a = maps[meth]
            a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
            if a.shape != (n, h, w):
                raise ModelError(f"{meth}: maps must be {(n, h, w)}, got {a.shape}")
            arrays[meth] = a
        probes = self.model.to_tensor([t.probe for t in trips])
        twins = self.model.to_tensor([t.inpainted for t in trips])
        delta = twins - probes
        gallery = EMBEDDINGS.get(self.model.net, np.stack([im for t in trips for im in (t.mate, t.mate_inpainted)]),
                                 self.batch_size)
        targets = [TwinMargin(gallery[2 * i], gallery[2 * i + 1], self.normalize) for i in range(n)]

        # pixel ranks and replacement counts for every (method, triplet)
        ranks = np.empty((len(methods), n, h * w), np.int64)
        counts = np.empty((len(methods), n, p), np.int64)
        rows: list[dict[str, Any]] = []
        for k, meth in enumerate(methods):
            for i, t in enumerate(trips):
                order, sorted_mass = saliency_order(arrays[meth][i], self.seed)
                ranks[k, i, order] = np.arange(h * w)
                counts[k, i] = mass_counts(sorted_mass, self.percents, self.include_zero)
                gt = t.mask.ravel()[order]
                tp_cum = np.concatenate([[0], np.cumsum(gt)])
                tp = tp_cum[counts[k, i]]
                fp = counts[k, i] - tp
                pos, neg = int(t.mask.sum()), int(t.mask.size - t.mask.sum())
                rows.append({"method": meth, "region": t.region, "identity": t.identity, "donor": t.donor,
                             "true_pos": tp.tolist(), "false_pos": fp.tolist(), "pos": pos, "neg": neg,
                             "replaced": counts[k, i].tolist(),
                             "iou": (tp / np.maximum(pos + fp, 1)).tolist()})
        ranks_t = torch.from_numpy(ranks).view(len(methods) * n, 1, h, w)
        counts_t = torch.from_numpy(counts).view(len(methods) * n, p)

        def build(start: int, stop: int) -> torch.Tensor:
            idx = torch.arange(start, stop)
            case, level = idx // p, idx % p
            trip = case % n
            m = (ranks_t[case] < counts_t[case, level].view(-1, 1, 1, 1)).float()
            return torch.addcmul(probes[trip], m, delta[trip])

        engine = PerturbationEngine(self.model.net, targets, batch_size=self.batch_size, progress=self.progress,
                                    desc="inpainting game")
        margins = engine.run(len(methods) * n * p, build,
                             owners=lambda a, b: (torch.arange(a, b) // p) % n).view(len(methods) * n, p)
        for row, margin in zip(rows, margins.numpy(), strict=True):
            row["twin"] = (margin > 0).astype(int).tolist()
            row["margin"] = margin.astype(float).tolist()
        self.records.extend(rows)
        return rows

    def _method_curves(self, recs: list[dict[str, Any]]) -> dict[str, Any]:
        c = _pooled(recs)
        regions = sorted({r["region"] for r in recs})
        by_region = {}
        for region in regions:
            rc = _pooled([r for r in recs if r["region"] == region])
            by_region[region] = {"n": rc["n"], "area": curve_area(rc["false_alarm_rate"], rc["nonmate_rate"]),
                                 "rate_at_far_5pct": rate_at(rc["false_alarm_rate"], rc["nonmate_rate"], 0.05)}
        far, rate = c["false_alarm_rate"], c["nonmate_rate"]
        return {
            "n": c["n"],
            "area": curve_area(far, rate),
            **{f"rate_at_far_{round(lv * 100)}pct": rate_at(far, rate, lv) for lv in FALSE_ALARM_POINTS},
            "rate_at_full_mass": float(rate[-1]), "false_alarm_at_full_mass": float(far[-1]),
            "curve": {"percent_mass": self.percents.tolist(), **{k: np.asarray(v).tolist() for k, v in c.items()
                                                                 if k != "n"}},
            "by_region": by_region,
        }

    def compute(self) -> dict[str, Any]:
        if not self.records:
            return {"metric": self.name, "n": 0}
        methods: dict[str, list[dict[str, Any]]] = {}
        for r in self.records:
            methods.setdefault(r["method"], []).append(r)
        return {
            "metric": self.name, "step": self.step, "include_zero": self.include_zero,
            "normalized_embeddings": self.normalize,
            "methods": {m: self._method_curves(recs) for m, recs in methods.items()},
            "how_measured": (
                f"top pixels by saliency mass (0–100 % in {self.step:g} % steps) of the probe replaced by the "
                "inpainted probe's; 'non-mate' when the hybrid is closer to the twin gallery (mate with the same "
                "region swapped) than to the mate; false-alarm rate = replaced pixels outside the changed region / "
                "all pixels outside it, pooled over triplets; rate averaged per region, then over regions; area "
                "over false-alarm rate 0–1 (last rate held to 1)"),
        }


# -- the figure --------------------------------------------------------------------------------------------
def plot(result: Mapping[str, Any], title: str | None = None) -> np.ndarray:
    """xfr-style figure: non-mate classification vs false-alarm rate (log-like x), and IoU vs mass.

    ``result`` is `InpaintingGame.compute()`'s dict. Returns an RGB ``uint8`` array.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = result.get("methods") or {}
    if not methods:
        raise ModelError("nothing to plot: the game has no results")
    fig = Figure(figsize=(11, 4.4), dpi=100)
    ax_roc, ax_iou = fig.subplots(1, 2)
    for k, (name, res) in enumerate(methods.items()):
        c = res["curve"]
        far = np.asarray(c["false_alarm_rate"]) * 100
        ax_roc.plot(np.append(far, 100.0), np.append(np.asarray(c["nonmate_rate"]), c["nonmate_rate"][-1]) * 100,
                    color=f"C{k}", linewidth=2,
                    label=f"{name} (area {res['area']:.3f}, @5% {res['rate_at_far_5pct'] * 100:.0f}%)")
        ax_iou.plot(c["percent_mass"], c["iou"], color=f"C{k}", linewidth=2, label=name)
    ax_roc.set_xscale("symlog", linthresh=1.0)
    ax_roc.set_xlim(0, 100)
    ticks = [0, 1, 2, 5, 10, 20, 50, 100]
    ax_roc.set_xticks(ticks)
    ax_roc.set_xticklabels([f"{t}%" for t in ticks])
    ax_roc.set_ylim(-2, 102)
    ax_roc.set_xlabel("saliency false-alarm rate (%)")
    ax_roc.set_ylabel("classified as inpainted non-mate (%)")
    for lv in FALSE_ALARM_POINTS:
        ax_roc.axvline(lv * 100, color="gray", linewidth=0.6, linestyle=":")
    ax_roc.legend(fontsize=7, loc="upper left")
    ax_roc.grid(which="both", linestyle=":", linewidth=0.5)
    ax_iou.set_xlabel("top % of saliency mass replaced")
    ax_iou.set_ylabel("IoU with the changed region")
    ax_iou.set_ylim(0, 1)
    ax_iou.grid(linestyle=":", linewidth=0.5)
    ax_iou.legend(fontsize=7)
    n = max(r["n"] for r in methods.values())
    fig.suptitle(title or f"Inpainting game ({n} triplets)", fontsize=11)
    fig.tight_layout()
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[..., :3])

