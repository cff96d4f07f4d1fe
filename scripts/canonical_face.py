"""Compute the canonical face template that ``facelens.faces.canonical`` warps maps onto.

Run once from the repository root, with the shared face bundle next to it:

    .venv/bin/python scripts/canonical_face.py --faces ../shared/faces \\
        --out src/facelens/data/canonical_face.json

For every FRL London neutral photo (frontal, neutral expression, even light) it detects
the face with facelens (dlib HOG + 68-point predictor), cuts the dlib 5-point chip that
dlib-resnet uses (padding 0.25) and carries the 68 landmarks into that chip. The template
is their mean in unit chip coordinates (0 and 1 are the centres of the first and last
pixel). The dlib5 alignment is already a similarity normalization, so no further
Procrustes step is needed; the per-point standard deviation is stored as a record of the
spread. Only these numbers are written, no pixels.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

import numpy as np

from facelens.faces.align import AlignRecipe, align
from facelens.faces.detect import pick_face
from facelens.image import load_image

SIZE = 150
PADDING = 0.25


def _compact_json(payload: dict[str, object]) -> str:
    """Indented JSON with one (x, y) pair per line, so the file reads as a table."""
    text = json.dumps(payload, indent=1)
    return re.sub(r"\[\s*(-?[\d.e-]+),\s*(-?[\d.e-]+)\s*\]", r"[\1, \2]", text) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=Path, required=True, help="the shared face bundle (has manifest.csv)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    with open(args.faces / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["dataset"] == "frl_london" and r["subset"] == "neutral"]
    recipe = AlignRecipe(size=SIZE, padding=PADDING, method="dlib5")
    shapes, used = [], []
    for row in sorted(rows, key=lambda r: r["path"]):
        rgb = load_image(args.faces / row["path"])
        chip = align(rgb, pick_face(rgb, source=row["path"]), recipe)
        assert chip.face is not None
        shapes.append(chip.points_to_chip(chip.face.landmarks) / (SIZE - 1))
        used.append(row["path"])
    stack = np.stack(shapes)
    mean, spread = stack.mean(0), stack.std(0)
    payload = {
        "description": "mean dlib 68-point landmarks of FRL London neutral photos, in unit coordinates of a "
                       f"dlib 5-point chip (padding {PADDING}); x right, y down",
        "made_by": "scripts/canonical_face.py",
        "source": "Face Research Lab London Set (DeBruine & Jones 2017, CC BY 4.0), neutral frontal photos",
        "n_faces": len(used),
        "chip": {"method": "dlib5", "padding": PADDING, "size_used": SIZE},
        "landmarks": np.round(mean, 5).tolist(),
        "landmarks_std": np.round(spread, 5).tolist(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(_compact_json(payload), encoding="utf-8")
    print(f"{len(used)} faces → {args.out}; mean spread {spread.mean() * SIZE:.2f} px on a {SIZE} px chip")


if __name__ == "__main__":
    main()
