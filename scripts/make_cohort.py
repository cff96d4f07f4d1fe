"""Build the cohort statistics shipped for a zoo recognizer (``src/facelens/data/cohort_<model>.npz``).

The cohort is made of openly licensed photos only: the Face Research Lab London set (neutral and
smiling, 81 people) and Canada set (32 people), both CC BY 4.0 (DeBruine & Jones 2017). The file keeps
the mean and covariance of the unit embeddings and the quantiles of the cohort's own z-scores, plus
the list of photos (path in the bundle and sha256) so anyone with the bundle can rebuild it:

    .venv/bin/python scripts/make_cohort.py --faces ../shared/faces [--model dlib-resnet]

Photos without a detectable face are listed in the provenance and left out.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np

from facelens.datasets import read_manifest
from facelens.errors import FaceLensError
from facelens.image import load_image
from facelens.models import load_model
from facelens.models.cohort import cohort_from_embeddings, save_cohort

DATASETS = ("frl_london", "frl_canada")
SOURCE = ("Face Research Lab London set (neutral and smiling) and Canada set, CC BY 4.0: DeBruine, L. & "
          "Jones, B. (2017), doi:10.6084/m9.figshare.5047666.v5 and doi:10.6084/m9.figshare.4220517.v1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faces", default="../shared/faces", help="the face bundle (with manifest.csv)")
    ap.add_argument("--model", default="dlib-resnet")
    ap.add_argument("--out", default=None, help="default: the package's data folder")
    args = ap.parse_args()
    faces = Path(args.faces).resolve()
    model = load_model(args.model)
    rows = read_manifest(faces / "manifest.csv", datasets=list(DATASETS))
    chips, ids, photos, skipped = [], [], [], []
    for row in rows:
        try:
            chips.append(model.chip(load_image(row.path)))
        except FaceLensError as exc:
            skipped.append({"path": str(row.path.relative_to(faces)), "reason": str(exc)})
            continue
        ids.append(f"{row.dataset}:{row.identity}")
        photos.append({"path": str(row.path.relative_to(faces)),
                       "sha256": hashlib.sha256(row.path.read_bytes()).hexdigest()})
    emb = model.forward_chips(chips)
    provenance = {"source": SOURCE, "datasets": list(DATASETS), "license": "CC-BY-4.0",
                  "model_source": model.source, "alignment": model.recipe.describe(),
                  "built_by": "scripts/make_cohort.py", "photos": photos, "skipped": skipped}
    cohort = cohort_from_embeddings(model.name, np.asarray(emb), ids, provenance=provenance)
    path = save_cohort(cohort, args.out)
    print(f"{path}: {cohort.n_identities} identities, {cohort.n_photos} photos, {len(skipped)} skipped")
    print("impostor z:", cohort.impostor_quantiles)
    print("genuine z:", cohort.genuine_quantiles)


if __name__ == "__main__":
    main()
