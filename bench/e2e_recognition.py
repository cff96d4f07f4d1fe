"""End-to-end face recognition throughput, facelens against a plain dlib-bin pipeline, on the same photos.

Both start from the same decoded RGB arrays (decoding is not timed) and end with one 128-d
descriptor per photo:

- **facelens**: ``model.chip`` (HOG detection at one upsampling, as dlib's own pipeline, with its
  fallback levels; 68- and 5-point landmarks; dlib5 alignment) per photo, then one batched
  ``forward_chips`` (the fused fast path). Remembered detections are cleared before every round, so
  detection is timed every time;
- **dlib-bin**: ``get_frontal_face_detector`` (upsample 1, then 0 if nothing is found, as facelens
  does), ``shape_predictor`` with the 5-point model, and ``compute_face_descriptor(image, shape)`` per
  face, as dlib's own example does.

The embedding step alone compares the same 150×150 chips (``dlib.get_face_chip``) through
``compute_face_descriptor(list_of_chips)`` (dlib's batched call) and our ``forward_chips`` (plain
and fused). Rounds are interleaved and the best of each kept. Faces per second; higher is better.

    python -m bench.e2e_recognition [--photos 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

from bench.common import face_paths


def run(photos: int = 64, rounds: int = 3) -> dict[str, object]:
    import dlib

    from facelens.errors import FaceLensError
    from facelens.faces.detect import clear_detections
    from facelens.image import load_image
    from facelens.models import load_model
    from facelens.weights import weight_path

    model = load_model("dlib-resnet")
    images = []
    for p in face_paths(photos):
        try:
            images.append(load_image(p))
        except FaceLensError:
            continue
    if not images:
        return {"skipped": "no shared faces available"}
    detector = dlib.get_frontal_face_detector()
    sp5 = dlib.shape_predictor(str(weight_path("shape_predictor_5_face_landmarks.dat")))
    rec = dlib.face_recognition_model_v1(str(weight_path("dlib_face_recognition_resnet_model_v1.dat")))

    def dlib_e2e() -> np.ndarray:
        out = []
        for img in images:
            dets = detector(img, 1) or detector(img, 0)
            if not dets:
                continue
            d = max(dets, key=lambda r: r.area())
            out.append(np.asarray(rec.compute_face_descriptor(img, sp5(img, d))))
        return np.asarray(out)

    def ours_e2e(fused: bool = True) -> np.ndarray:
        clear_detections()
        chips = []
        for img in images:
            try:
                chips.append(model.chip(img))
            except FaceLensError:
                continue
        return model.forward_chips(chips, fused=fused)

    chips = [model.chip(img) for img in images]
    chip_arrays = [c.image for c in chips]
    x_chips = [np.ascontiguousarray(c) for c in chip_arrays]
    model.forward_chips(chip_arrays, fused=True)  # build the fused copy outside the timing

    fns: dict[str, Callable[[], np.ndarray]] = {
        "dlib_e2e": dlib_e2e,
        "facelens_e2e": ours_e2e,
        "dlib_embed": lambda: np.asarray(rec.compute_face_descriptor(x_chips)),
        "facelens_embed_plain": lambda: model.forward_chips(chip_arrays, fused=False),
        "facelens_embed_fused": lambda: model.forward_chips(chip_arrays, fused=True),
    }
    best = dict.fromkeys(fns, float("inf"))
    outs: dict[str, np.ndarray] = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            outs[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    n = len(chips)
    fps = {k: len(outs[k]) / v for k, v in best.items()}
    agree = float(np.abs(outs["dlib_embed"] - outs["facelens_embed_fused"]).max())
    return {
        "photos": len(images), "faces": n, "rounds": rounds, "seconds": best, "faces_per_s": fps,
        "e2e_speedup_vs_dlib": fps["facelens_e2e"] / fps["dlib_e2e"],
        "embed_speedup_vs_dlib": fps["facelens_embed_fused"] / fps["dlib_embed"],
        "embed_plain_speedup_vs_dlib": fps["facelens_embed_plain"] / fps["dlib_embed"],
        "embed_target": 3.0, "max_abs_descriptor_difference_vs_dlib": agree,
    }


def print_table(res: dict[str, object]) -> None:
    if "skipped" in res:
        print(f"skipped: {res['skipped']}")
        return
    print(f"{res['faces']} faces from {res['photos']} photos, best of {res['rounds']} interleaved rounds")
    print(f"{'pipeline':<24}{'s':>8}{'faces/s':>10}")
    for k, s in res["seconds"].items():  # type: ignore[attr-defined]
        print(f"{k:<24}{s:>8.2f}{res['faces_per_s'][k]:>10.1f}")  # type: ignore[index]
    print(f"end to end: facelens {res['e2e_speedup_vs_dlib']:.2f}× dlib-bin; embedding alone: fused "
          f"{res['embed_speedup_vs_dlib']:.2f}× (plain {res['embed_plain_speedup_vs_dlib']:.2f}×), target ≥ 3×; "
          f"max |descriptor Δ| vs dlib {res['max_abs_descriptor_difference_vs_dlib']:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print_table(run(args.photos, args.rounds))


if __name__ == "__main__":
    main()
