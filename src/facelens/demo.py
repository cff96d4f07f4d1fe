"""The default job until the report lands: embed and classify the default portraits.

It exercises the whole foundation on public-domain photos: detection, 5-point
alignment, the ported dlib ResNet, and every classifier in the zoo.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .faces import detect_faces
from .models import ZOO, load_model
from .models.dlib_age_gender import expected_age
from .outputs import write_json
from .portraits import default_portraits

__all__ = ["run_demo"]


def run_demo(out_dir: Path) -> Path:
    """Write ``summary.json`` into ``out_dir`` and return its path."""
    t0 = time.perf_counter()
    portraits = default_portraits()
    recognizer = load_model("dlib-resnet")
    classifiers = [load_model(n) for n, c in ZOO.items() if c.task == "classification"]
    summary: dict[str, object] = {"portraits": {}, "models": [m.info() for m in [recognizer, *classifiers]]}
    embeddings = {}
    for p in portraits:
        faces = detect_faces(p.image)
        entry: dict[str, object] = {
            "credit": p.credit, "size": list(p.image.shape[:2]), "faces": len(faces),
            "face_box": list(faces[0].box) if faces else None,
            "face_score": round(faces[0].score, 4) if faces else None,
        }
        emb = recognizer.embed(p.image, face=faces[0] if faces else None)
        embeddings[p.name] = emb
        entry["embedding_norm"] = round(float(np.linalg.norm(emb)), 4)
        for m in classifiers:
            probs = m.predict(p.image, face=faces[0] if faces else None)
            entry[m.name] = {"top3": {k: round(v, 4) for k, v in list(probs.items())[:3]}}
            if m.name == "dlib-age":
                bins = np.array([probs[c] for c in m.class_names or []])
                entry[m.name]["expected_age"] = round(expected_age(bins), 1)
        summary["portraits"][p.name] = entry  # type: ignore[index]
    a, b = (embeddings[p.name] for p in portraits)
    d = recognizer.distance(a, b)
    summary["verification"] = {
        "pair": [p.name for p in portraits], "euclidean_distance": round(d, 4),
        "threshold": recognizer.match_threshold, "same_person": bool(recognizer.same_person(a, b)),
        "how_measured": "dlib-resnet embeddings of the largest face in each portrait; Euclidean distance",
    }
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    out = Path(out_dir) / "summary.json"
    write_json(out, summary)
    return out
