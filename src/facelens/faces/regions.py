"""Facial regions from dlib's 68 landmarks, as boolean pixel masks.

Side convention: ``left_*`` and ``right_*`` are the **subject's** left and right,
as in the iBUG annotation dlib was trained on (and in anatomy). On a
non-mirrored frontal photo ``right_eye`` is therefore the eye on the image's
left. (The FRL ``.tem`` point names use the viewer's side instead.)

`region_masks` partitions the whole image: every pixel belongs to exactly one
of `REGION_NAMES`. Geometry is measured in a face frame: x̂ runs from the
subject's right eye centre to the left one, ŷ is perpendicular to it (down the
face), and lengths are in units of the inter-ocular distance (iod) or of the
eye-to-chin height, so the masks rotate and scale with the face.

* eyes: the eye contour dilated by 0.12 iod (lids and lashes);
* brows: a band from 0.04 iod above the brow landmarks (dlib puts them on the
  brow's upper edge) to 0.16 iod below; the Face Research Lab London and Canada
  ``.tem`` files put the lower brow edge 0.10–0.18 iod below them (5–95 %);
* nose: bridge from the nasion down, widening to the alae, closed by the
  nostril base;
* mouth: the outer lip contour dilated by 0.04 iod;
* chin_jaw: inside the jaw line below the line from jaw point 4 over the mouth
  corners to jaw point 12, and below the lower lip;
* cheeks: between the lower eyelid, the nose, the mouth and the jaw line, split
  at the nose-mouth-chin midline;
* forehead: above the brows up to an estimated hairline 0.45 eye-to-chin
  heights above the brow tops (the median over the FRL London and Canada
  ``.tem`` hairline centre point, 5–95 %: 0.37–0.54), clipped by the ellipse
  through jaw points 0 and 16 and that hairline;
* face pixels left over (temples, the skin between brow and eye, between the
  eyes above the nose) go to the nearest of the regions above;
* neck_clothing: below the jaw line from jaw point 4 to 12, in a band 0.9 jaw
  widths wide (jaw points 2 to 14) that widens to 2.6 jaw widths at the
  shoulders; hair_background: everything else.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

import cv2
import numpy as np
from scipy import ndimage

from ..errors import ModelError
from .align import Chip

__all__ = [
    "FACE_REGIONS",
    "REGION_COLORS",
    "REGION_GROUPS",
    "REGION_NAMES",
    "chip_region_labels",
    "chip_region_masks",
    "eye_bar_mask",
    "label_map",
    "landmark_region_masks",
    "region_label_map",
    "region_masks",
    "region_overlay",
    "regions_union",
]

FACE_REGIONS: tuple[str, ...] = (
    "forehead", "left_brow", "right_brow", "left_eye", "right_eye", "nose", "mouth",
    "left_cheek", "right_cheek", "chin_jaw",
)
REGION_NAMES: tuple[str, ...] = (*FACE_REGIONS, "hair_background", "neck_clothing")

REGION_GROUPS: dict[str, tuple[str, ...]] = {
    "eyes": ("left_eye", "right_eye"),
    "brows": ("left_brow", "right_brow"),
    "cheeks": ("left_cheek", "right_cheek"),
    "eyes_brows": ("left_eye", "right_eye", "left_brow", "right_brow"),
    "eyes_nose": ("left_eye", "right_eye", "nose"),
    "eyes_nose_mouth": ("left_eye", "right_eye", "nose", "mouth"),
    "face": FACE_REGIONS,
    "outside_face": ("hair_background", "neck_clothing"),
}

REGION_COLORS: dict[str, tuple[int, int, int]] = {
    "forehead": (255, 190, 60),
    "left_brow": (150, 70, 20),
    "right_brow": (200, 110, 40),
    "left_eye": (30, 120, 255),
    "right_eye": (0, 200, 255),
    "nose": (255, 60, 60),
    "mouth": (230, 0, 160),
    "left_cheek": (60, 200, 60),
    "right_cheek": (150, 240, 90),
    "chin_jaw": (150, 90, 255),
    "hair_background": (90, 90, 90),
    "neck_clothing": (255, 255, 140),
}

# Geometry, in inter-ocular distances (iod) unless noted; see the module docstring.
EYE_DILATION = 0.12
BROW_ABOVE, BROW_BELOW, BROW_END_EXTENSION = 0.04, 0.16, 0.04
MOUTH_DILATION = 0.04
HAIRLINE_ABOVE_BROWS = 0.45  # in eye-to-chin heights
_SUBPIXEL_BITS = 4


class _FaceFrame:
    """Face-aligned axes: x̂ from the subject's right eye to the left one, ŷ down the face."""

    def __init__(self, pts: np.ndarray) -> None:
        self.right_eye = pts[36:42].mean(axis=0)
        self.left_eye = pts[42:48].mean(axis=0)
        delta = self.left_eye - self.right_eye
        self.iod = float(np.hypot(*delta))
        if not np.isfinite(self.iod) or self.iod < 1e-3:
            raise ModelError("the landmarks' eye centres coincide: not a 68-point face")
        self.x = delta / self.iod
        self.y = np.array([-self.x[1], self.x[0]])
        self.origin = (self.right_eye + self.left_eye) / 2.0
        self.eye_to_chin = max(float((pts[8] - self.origin) @ self.y), 0.5 * self.iod)

    def v(self, pts: np.ndarray) -> np.ndarray:
        """Signed distance below the eye line."""
        return (np.asarray(pts) - self.origin) @ self.y


def _check_landmarks(landmarks68: np.ndarray) -> np.ndarray:
    pts = np.asarray(landmarks68, dtype=np.float64)
    if pts.shape != (68, 2) or not np.isfinite(pts).all():
        raise ModelError(f"region masks need finite 68×2 landmarks (x, y), got shape {pts.shape}")
    return pts


def _check_shape(shape_hw: tuple[int, int]) -> tuple[int, int]:
    h, w = (int(v) for v in tuple(shape_hw)[:2])
    if h < 1 or w < 1:
        raise ModelError(f"mask shape must be positive (H, W), got {tuple(shape_hw)}")
    return h, w


def _fill(shape_hw: tuple[int, int], *polygons: np.ndarray) -> np.ndarray:
    canvas = np.zeros(shape_hw, np.uint8)
    scaled = [np.round(np.asarray(p, np.float64) * (1 << _SUBPIXEL_BITS)).astype(np.int32) for p in polygons]
    cv2.fillPoly(canvas, scaled, 1, lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)
    return canvas.astype(bool)


def _dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    r = round(radius)
    if r < 1:
        return mask
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


def _brow_band(pts: np.ndarray, idx: range, frame: _FaceFrame, above: float, below: float) -> np.ndarray:
    brow = pts[list(idx)]
    ends = brow[[0, -1]]
    direction = ends[1] - ends[0]
    direction = direction / max(float(np.hypot(*direction)), 1e-9)
    ext = BROW_END_EXTENSION * frame.iod
    line = np.vstack([brow[0] - ext * direction, brow, brow[-1] + ext * direction])
    top = line - above * frame.iod * frame.y
    bottom = line + below * frame.iod * frame.y
    return np.vstack([top, bottom[::-1]])


def _nose_polygon(pts: np.ndarray, frame: _FaceFrame) -> np.ndarray:
    iod, x = frame.iod, frame.x
    bridge_half = 0.09 * iod
    lower_width = float(np.hypot(*(pts[35] - pts[31])))
    ala_half = 0.5 * lower_width + 0.10 * iod
    # Alae sit a little above the nostril base line, at the height of the tip.
    tip_level = pts[30] + 0.3 * (pts[33] - pts[30])
    nose_mid = (pts[31] + pts[35]) / 2.0
    ala_center = tip_level + (nose_mid - pts[33]) * 0.5
    right_side = [pts[27] - bridge_half * x, pts[29] - 1.3 * bridge_half * x, ala_center - ala_half * x]
    left_side = [ala_center + ala_half * x, pts[29] + 1.3 * bridge_half * x, pts[27] + bridge_half * x]
    return np.vstack([*right_side, pts[31:36], *left_side])


def landmark_region_masks(landmarks68: np.ndarray, shape_hw: tuple[int, int]) -> dict[str, np.ndarray]:
    """Tight masks of the landmark-delimited features, undilated and not a partition.

    ``left_eye``/``right_eye`` (eye contours), ``left_brow``/``right_brow`` (the
    band the FRL templates put between the brow's upper and lower edges),
    ``nose`` and ``mouth`` (outer lip contour). For editing a feature (e.g.
    swapping it between faces) with a dilation of the caller's choice.
    """
    pts = _check_landmarks(landmarks68)
    hw = _check_shape(shape_hw)
    frame = _FaceFrame(pts)
    return {
        "left_eye": _fill(hw, pts[42:48]),
        "right_eye": _fill(hw, pts[36:42]),
        "left_brow": _fill(hw, _brow_band(pts, range(22, 27), frame, 0.0, 0.13)),
        "right_brow": _fill(hw, _brow_band(pts, range(17, 22), frame, 0.0, 0.13)),
        "nose": _fill(hw, _nose_polygon(pts, frame)),
        "mouth": _fill(hw, pts[48:60]),
    }


def _face_outline(pts: np.ndarray, frame: _FaceFrame) -> np.ndarray:
    """Jaw line 0→16, then back over the forehead along the half-ellipse through the estimated hairline."""
    a_pt, b_pt = pts[16], pts[0]
    center = (a_pt + b_pt) / 2.0
    across = a_pt - b_pt
    half_width = float(np.hypot(*across)) / 2.0
    u = across / max(2.0 * half_width, 1e-9)
    up = -np.array([-u[1], u[0]])
    brow_top = float(frame.v(pts[17:27]).min())
    hairline = frame.origin + (brow_top - HAIRLINE_ABOVE_BROWS * frame.eye_to_chin) * frame.y
    height = max(float((hairline - center) @ up), 0.1 * frame.iod)
    theta = np.linspace(0.0, np.pi, 64)
    arc = center + np.outer(half_width * np.cos(theta), u) + np.outer(height * np.sin(theta), up)
    return np.vstack([pts[0:17], arc[1:-1]])


def _below_brows_polygon(pts: np.ndarray, frame: _FaceFrame, far: float) -> np.ndarray:
    """Everything below the brow bands' bottom edge, extended sideways and downwards."""
    right = _brow_band(pts, range(17, 22), frame, BROW_ABOVE, BROW_BELOW)
    left = _brow_band(pts, range(22, 27), frame, BROW_ABOVE, BROW_BELOW)
    right_bottom = right[len(right) // 2:][::-1]  # outer → inner
    left_bottom = left[len(left) // 2:][::-1]  # inner → outer
    edge = np.vstack([right_bottom, left_bottom])
    x, y = frame.x, frame.y
    return np.vstack([edge[0] - far * x, edge, edge[-1] + far * x, edge[-1] + far * x + far * y,
                      edge[0] - far * x + far * y])


def _cheek_polygon(pts: np.ndarray, side: str) -> np.ndarray:
    if side == "right":  # subject's right: image left
        return np.vstack([pts[0:5], pts[48], pts[31], pts[28], pts[39], pts[40], pts[41], pts[36]])
    return np.vstack([pts[12:17][::-1], pts[54], pts[35], pts[28], pts[42], pts[47], pts[46], pts[45]])


def _chin_polygon(pts: np.ndarray, frame: _FaceFrame) -> np.ndarray:
    lip_margin = MOUTH_DILATION * frame.iod * frame.y
    lower_lip = pts[[54, 55, 56, 57, 58, 59, 48]] + lip_margin
    return np.vstack([pts[4:13], lower_lip])


def _midline_side(shape_hw: tuple[int, int], pts: np.ndarray, frame: _FaceFrame, far: float) -> np.ndarray:
    """Pixels on the subject's left of the midline nasion → nose → lips → chin (image right when frontal)."""
    midline = pts[[27, 30, 33, 51, 57, 8]]
    top = midline[0] - far * frame.y
    bottom = midline[-1] + far * frame.y
    line = np.vstack([top, midline, bottom])
    return _fill(shape_hw, np.vstack([line, bottom + far * frame.x, top + far * frame.x]))


def _neck_polygon(pts: np.ndarray, frame: _FaceFrame, far: float) -> np.ndarray:
    x, y, e2c = frame.x, frame.y, frame.eye_to_chin
    chin_v = frame.v(pts[8])
    jaw_half = float((pts[14] - pts[2]) @ x) / 2.0
    center_x = float((pts[2] + pts[14]) @ x) / 2.0 - float(frame.origin @ x)

    def at(u: float, v: float) -> np.ndarray:
        return frame.origin + u * x + v * y

    neck_v, shoulder_v = chin_v + 0.4 * e2c, chin_v + 0.9 * e2c
    left = [at(center_x + 0.9 * jaw_half, neck_v), at(center_x + 2.6 * jaw_half, shoulder_v),
            at(center_x + 2.6 * jaw_half, chin_v + far)]
    right = [at(center_x - 2.6 * jaw_half, chin_v + far), at(center_x - 2.6 * jaw_half, shoulder_v),
             at(center_x - 0.9 * jaw_half, neck_v)]
    return np.vstack([pts[4:13], *left, *right])


def region_masks(shape_hw: tuple[int, int], landmarks68: np.ndarray) -> dict[str, np.ndarray]:
    """All `REGION_NAMES` as boolean masks of ``shape_hw``, mutually exclusive and covering the image."""
    labels = region_label_map(shape_hw, landmarks68)
    return {name: labels == i for i, name in enumerate(REGION_NAMES)}


def region_label_map(shape_hw: tuple[int, int], landmarks68: np.ndarray) -> np.ndarray:
    """The index in `REGION_NAMES` of every pixel of ``shape_hw`` (int32, read-only): the regions
    as one map, for methods that take features as labels (region occlusion, LIME, SHAP)."""
    pts = _check_landmarks(landmarks68)
    hw = _check_shape(shape_hw)
    return _cached_labels(hw, pts.tobytes()) if hw[0] * hw[1] <= _CACHED_PIXELS else _region_labels(hw, pts)


_CACHED_PIXELS = 256 * 256  # chips, not photos: 256 cached label maps stay under 64 MiB


@functools.lru_cache(maxsize=256)
def _cached_labels(hw: tuple[int, int], points: bytes) -> np.ndarray:
    """`_region_labels` of a chip, cached: one chip's regions are asked for by every method and every
    region-attention table of a report, and rasterizing them took about 2 ms, a fifth of
    fer-emotion's 13-forward region occlusion."""
    return _region_labels(hw, np.frombuffer(points, np.float64).reshape(68, 2))


def _region_labels(hw: tuple[int, int], pts: np.ndarray) -> np.ndarray:
    """The index in `REGION_NAMES` of every pixel (read-only)."""
    frame = _FaceFrame(pts)
    far = 4.0 * (frame.eye_to_chin + frame.iod) + float(np.abs(pts).max()) + float(max(hw))

    outline = _fill(hw, _face_outline(pts, frame))
    seeds: dict[str, np.ndarray] = {
        "left_eye": _dilate(_fill(hw, pts[42:48]), EYE_DILATION * frame.iod),
        "right_eye": _dilate(_fill(hw, pts[36:42]), EYE_DILATION * frame.iod),
        "left_brow": _fill(hw, _brow_band(pts, range(22, 27), frame, BROW_ABOVE, BROW_BELOW)),
        "right_brow": _fill(hw, _brow_band(pts, range(17, 22), frame, BROW_ABOVE, BROW_BELOW)),
        "mouth": _dilate(_fill(hw, pts[48:60]), MOUTH_DILATION * frame.iod),
        "nose": _fill(hw, _nose_polygon(pts, frame)),
        "chin_jaw": _fill(hw, _chin_polygon(pts, frame)) & outline,
        "right_cheek": _fill(hw, _cheek_polygon(pts, "right")) & outline,
        "left_cheek": _fill(hw, _cheek_polygon(pts, "left")) & outline,
        "forehead": outline & ~_fill(hw, _below_brows_polygon(pts, frame, far)),
    }
    # Cheeks end at the midline even where their polygons (through the nose bridge) would cross it.
    subject_left = _midline_side(hw, pts, frame, far)
    seeds["right_cheek"] &= ~subject_left
    seeds["left_cheek"] &= subject_left

    labels = np.full(hw, -1, np.int32)
    for name, seed in seeds.items():  # dict order is the precedence: first claim wins
        labels[(labels < 0) & seed] = REGION_NAMES.index(name)
    face = outline | (labels >= 0)
    leftover = face & (labels < 0)
    if leftover.any():
        _, (iy, ix) = ndimage.distance_transform_edt(labels < 0, return_indices=True)
        labels[leftover] = labels[iy[leftover], ix[leftover]]
    neck = _fill(hw, _neck_polygon(pts, frame, far)) & ~face
    labels[neck] = REGION_NAMES.index("neck_clothing")
    labels[labels < 0] = REGION_NAMES.index("hair_background")
    labels.setflags(write=False)
    return labels


def _chip_points(chip: Chip, landmarks68: np.ndarray | None) -> np.ndarray:
    if landmarks68 is None:
        if chip.face is None:
            raise ModelError("this chip was cut without a face: pass landmarks68 to get its regions")
        landmarks68 = chip.face.landmarks
    return chip.points_to_chip(_check_landmarks(landmarks68))


def chip_region_masks(chip: Chip, landmarks68: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """`region_masks` in the chip's frame, from the face's landmarks carried into the chip.

    ``landmarks68`` (photo pixels) overrides the chip's face, e.g. for a
    whole-image chip cut without one.
    """
    return region_masks(chip.shape, _chip_points(chip, landmarks68))


def chip_region_labels(chip: Chip, landmarks68: np.ndarray | None = None) -> np.ndarray:
    """`region_label_map` in the chip's frame (read-only), as `chip_region_masks` finds the landmarks."""
    return region_label_map(chip.shape, _chip_points(chip, landmarks68))


def label_map(masks: Mapping[str, np.ndarray]) -> np.ndarray:
    """One int32 map: each pixel's index in `REGION_NAMES` (e.g. a captum ``feature_mask``).

    Pixels in no mask get -1; a pixel in two masks is an error.
    """
    unknown = [n for n in masks if n not in REGION_NAMES]
    if unknown:
        raise ModelError(f"unknown region {unknown[0]!r}; regions: {', '.join(REGION_NAMES)}")
    if not masks:
        raise ModelError("label_map needs at least one mask")
    shape = next(iter(masks.values())).shape
    labels = np.full(shape, -1, np.int32)
    for name, mask in masks.items():
        m = np.asarray(mask, bool)
        if m.shape != shape:
            raise ModelError(f"mask {name} is {m.shape}, others are {shape}")
        if (labels[m] >= 0).any():
            raise ModelError(f"mask {name} overlaps another region: label maps need exclusive masks")
        labels[m] = REGION_NAMES.index(name)
    return labels


def regions_union(masks: Mapping[str, np.ndarray], names: str | Iterable[str]) -> np.ndarray:
    """The union of regions and groups, e.g. ``"eyes"``, ``"eyes_nose"``, ``["mouth", "chin_jaw"]``."""
    wanted = [names] if isinstance(names, str) else list(names)
    if not wanted:
        raise ModelError("regions_union needs at least one region or group name")
    expanded: list[str] = []
    for name in wanted:
        if name in REGION_GROUPS:
            expanded.extend(REGION_GROUPS[name])
        elif name in REGION_NAMES:
            expanded.append(name)
        else:
            raise ModelError(f"unknown region or group {name!r}; regions: {', '.join(REGION_NAMES)}; "
                             f"groups: {', '.join(REGION_GROUPS)}")
    missing = [n for n in expanded if n not in masks]
    if missing:
        raise ModelError(f"no mask for region {missing[0]!r} among {', '.join(masks)}")
    out = np.zeros(np.asarray(masks[expanded[0]]).shape, bool)
    for name in expanded:
        out |= np.asarray(masks[name], bool)
    return out


def eye_bar_mask(shape_hw: tuple[int, int], landmarks68: np.ndarray) -> np.ndarray:
    """A CNIL-style eye bar: a rectangle along the eye line from brow tops to the top of the cheeks.

    It spans the face between jaw points 0 and 16 (widened by 0.1 iod each
    side) and, across, from 0.05 iod above the highest brow landmark to 0.25 iod
    below the lowest lower-lid landmark, rotated with the eye line.
    """
    pts = _check_landmarks(landmarks68)
    hw = _check_shape(shape_hw)
    frame = _FaceFrame(pts)
    x, y, iod = frame.x, frame.y, frame.iod
    along = (pts[[0, 16, 36, 45]] - frame.origin) @ x
    u0, u1 = float(along.min()) - 0.1 * iod, float(along.max()) + 0.1 * iod
    v0 = float(frame.v(pts[17:27]).min()) - 0.05 * iod
    v1 = float(frame.v(pts[[40, 41, 46, 47]]).max()) + 0.25 * iod
    corners = [frame.origin + u * x + v * y for u, v in ((u0, v0), (u1, v0), (u1, v1), (u0, v1))]
    return _fill(hw, np.array(corners))


def region_overlay(image: np.ndarray, masks: Mapping[str, np.ndarray], *, alpha: float = 0.45,
                   labels: bool = True) -> np.ndarray:
    """The image tinted by region colour (`REGION_COLORS`), with region borders and, optionally, names."""
    rgb = np.asarray(image)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ModelError(f"region_overlay needs an H×W×3 image, got shape {rgb.shape}")
    out = rgb.astype(np.float32)
    color = np.zeros_like(out)
    covered = np.zeros(rgb.shape[:2], bool)
    for name, mask in masks.items():
        m = np.asarray(mask, bool)
        if m.shape != rgb.shape[:2]:
            raise ModelError(f"mask {name} is {m.shape}, image is {rgb.shape[:2]}")
        color[m] = REGION_COLORS.get(name, (255, 255, 255))
        covered |= m
    out[covered] = (1.0 - alpha) * out[covered] + alpha * color[covered]
    out = np.clip(out, 0, 255).astype(np.uint8)
    thickness = max(1, round(min(rgb.shape[:2]) / 400))
    scale = max(0.3, min(rgb.shape[:2]) / 1600)
    for name, mask in masks.items():
        m = np.asarray(mask, np.uint8)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, (255, 255, 255), thickness)
        if labels and m.any():
            # Write the name where the region is thickest, which is inside it even when it is not convex.
            depth = cv2.distanceTransform(np.pad(m, 1), cv2.DIST_L2, 3)[1:-1, 1:-1]
            cy, cx = np.unravel_index(int(np.argmax(depth)), depth.shape)
            org = (int(cx) - int(len(name) * 9 * scale), int(cy))
            cv2.putText(out, name, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness + 1, cv2.LINE_AA)
            cv2.putText(out, name, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness,
                        cv2.LINE_AA)
    return out
