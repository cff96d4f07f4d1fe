"""Deletion AUC, facelens against Quantus PixelFlipping: same model, faces, maps and steps.

Both remove the most salient pixels in equal steps and replace them with black
(0 in the network's [0, 1] RGB input); both score the class logit. Quantus
records the score after each step, facelens also before the first, so their
curves are compared point for point on the shared steps. Quantus sorts colour
values, not pixels (the map is broadcast over the 3 channels), and requires
``features_in_step`` to divide H·W, so with 48 steps on 64×64 chips each of
its steps removes 256 colour values = 85⅓ pixels; facelens removes whole
pixels, round(85⅓·k) after step k. The curves therefore differ slightly at the
one partly removed pixel per step; the difference is reported, not hidden. The
speed ratio is measured in this run, on this machine. facelens scores on the
network's inference copy (:func:`facelens.models.fuse.inference_net`), Quantus
on the network it is given; Quantus is also timed on that copy, to show how much
of the lead is the copy.

    python -m bench.deletion_vs_quantus [--faces 50] [--steps 48]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench.common import face_paths
from facelens.errors import FaceLensError
from facelens.evaluate.deletion import DeletionInsertion, auc
from facelens.explain.api import get_method
from facelens.image import load_image
from facelens.models import load_model
from facelens.models.fuse import inference_net
from facelens.targets import ClassScore


def run(n_faces: int = 50, steps: int = 48, model_name: str = "fer-emotion", method: str = "gradient") -> dict:
    import quantus

    model = load_model(model_name)
    chips = []
    for p in face_paths(4 * n_faces):
        try:
            chips.append(model.chip(load_image(p)))
        except FaceLensError:
            continue
        if len(chips) == n_faces:
            break
    if not chips:
        return {"skipped": "no shared faces available"}
    x = model.to_tensor(chips)
    with torch.inference_mode():
        labels = model.net(x).argmax(1)
    targets = [ClassScore(int(c)) for c in labels]
    maps = get_method(method)(model).attribute(x, targets, chips=chips)
    h, w = x.shape[-2:]
    features_in_step = 3 * h * w // steps
    if (3 * h * w) % steps or (h * w) % features_in_step:
        raise ValueError(f"Quantus cannot split {h}×{w}×3 values into {steps} equal steps")

    t0 = time.perf_counter()
    ours = DeletionInsertion(model.net, mode="deletion", baseline="zero", steps=steps, batch_size=64)
    curves = ours.update(x, maps, targets)
    t_ours = time.perf_counter() - t0

    metric = quantus.PixelFlipping(features_in_step=features_in_step, perturb_baseline=0.0, normalise=True,
                                   return_auc_per_sample=False, disable_warnings=True)
    t0 = time.perf_counter()
    q_curves = np.asarray(metric(model=model.net.eval(), x_batch=x.numpy(), y_batch=labels.numpy(),
                                 a_batch=maps.unsqueeze(1).numpy(), channel_first=True, softmax=False,
                                 device="cpu", batch_size=64))
    t_q = time.perf_counter() - t0

    # what Quantus would take if handed our inference copy: how much of the lead is the copy
    copy_net = inference_net(model.net, x)
    t0 = time.perf_counter()
    metric(model=copy_net, x_batch=x.numpy(), y_batch=labels.numpy(), a_batch=maps.unsqueeze(1).numpy(),
           channel_first=True, softmax=False, device="cpu", batch_size=64)
    t_q_copy = time.perf_counter() - t0

    diff = np.abs(curves[:, 1:] - q_curves)
    ours_auc = np.array([auc(c[1:]) * (steps - 1) for c in curves])  # Quantus: trapz with dx=1 over its steps
    q_auc = np.trapezoid(q_curves, dx=1, axis=1)
    return {
        "model": model_name, "method": method, "faces": len(chips), "steps": steps,
        "max_abs_curve_difference": float(diff.max()), "mean_abs_curve_difference": float(diff.mean()),
        "score_range": float(np.ptp(curves)), "max_abs_auc_difference": float(np.abs(ours_auc - q_auc).max()),
        "auc_correlation": float(np.corrcoef(ours_auc, q_auc)[0, 1]),
        "facelens_seconds": t_ours, "quantus_seconds": t_q, "speedup": t_q / t_ours,
        "quantus_on_our_copy_seconds": t_q_copy, "speedup_vs_quantus_on_our_copy": t_q_copy / t_ours,
        "forwards_each": len(chips) * steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faces", type=int, default=50)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--model", default="fer-emotion")
    ap.add_argument("--method", default="gradient")
    args = ap.parse_args()
    r = run(args.faces, args.steps, args.model, args.method)
    for k, v in r.items():
        print(f"{k:>28}: {v}")


if __name__ == "__main__":
    main()
