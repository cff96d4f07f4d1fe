"""The face pipeline: detect (dlib HOG), landmarks (dlib 5 and 68 points), align, regions.

Left and right are always the subject's (see `facelens.faces.landmarks`).
"""

from .align import AlignRecipe, Chip, align
from .detect import Face, detect_faces, face_from_box, face_from_landmarks, pick_face
from .landmarks import LANDMARK_GROUPS, landmarks5, landmarks68
from .regions import (
    FACE_REGIONS,
    REGION_GROUPS,
    REGION_NAMES,
    chip_region_labels,
    chip_region_masks,
    eye_bar_mask,
    label_map,
    landmark_region_masks,
    region_label_map,
    region_masks,
    region_overlay,
    regions_union,
)

__all__ = [
    "FACE_REGIONS",
    "LANDMARK_GROUPS",
    "REGION_GROUPS",
    "REGION_NAMES",
    "AlignRecipe",
    "Chip",
    "Face",
    "align",
    "chip_region_labels",
    "chip_region_masks",
    "detect_faces",
    "eye_bar_mask",
    "face_from_box",
    "face_from_landmarks",
    "label_map",
    "landmark_region_masks",
    "landmarks5",
    "landmarks68",
    "pick_face",
    "region_label_map",
    "region_masks",
    "region_overlay",
    "regions_union",
]
