"""Incremental occlusion (exact and approximate) against full recompute and captum's Occlusion.

Same map on both sides: 16-px windows at stride 8 on a 150-px chip (scaled with the chip
side), black fill, the model's own target (top class logit, or cosine similarity to the
face's own embedding). Rivals:

* captum ``Occlusion`` at its fastest ``perturbations_per_eval`` (each tried once, the
  fastest kept, then timed with the others);
* facelens ``Occlusion`` with ``incremental=None`` (full recompute on the shared engine);
* facelens incremental ``exact``, ``approx`` at the method's defaults (projective-field
  threshold ``tau`` = 0.4 on maps with a side ≥ 16; drill-down from every 2nd position,
  refining around the top 25 %; bfloat16 convolutions where the CPU has them natively),
  ``approx-fast`` (every 2nd position, top 5 %) and ``approx-coarse`` (every 3rd, top 10 %).

The machine is shared, so the four are timed in interleaved rounds and every ratio is the
median over rounds of ratios taken within one round. Quality: max |Δ| of the exact map
against the full recompute and captum, and SSIM of the approximate map against the exact one.

    python -m bench.incremental_occlusion [--models dlib-resnet fer-emotion] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F

from bench.common import portrait_or_face
from facelens.errors import FaceLensError
from facelens.explain.incremental import (
    DEFAULT_DRILL_FACTOR,
    DEFAULT_DRILL_FRACTION,
    DEFAULT_TAU,
    DEFAULT_TAU_MIN_SIDE,
    incremental_occlusion,
    map_ssim,
)
from facelens.explain.perturbation import Occlusion, fill_image
from facelens.models import FaceModel, load_model
from facelens.outputs import write_json
from facelens.targets import ClassScore, Similarity, Target

CAPTUM_PPE = (16, 32, 64, 128)
APPROX = {  # name: (tau, drill_factor, drill_fraction)
    "approx": (DEFAULT_TAU, DEFAULT_DRILL_FACTOR, DEFAULT_DRILL_FRACTION),
    "approx-fast": (DEFAULT_TAU, 2, 0.05),
    "approx-coarse": (DEFAULT_TAU, 3, 0.1),
}


def _input(model: FaceModel) -> tuple[torch.Tensor, str]:
    """A real face chip when detection works, else a smooth synthetic image (and which one)."""
    try:
        return model.to_tensor(model.chip(portrait_or_face())), "face photo"
    except FaceLensError:
        h, w = model.input_size
        g = torch.Generator().manual_seed(0)
        coarse = F.interpolate(torch.rand(1, 3, 12, 12, generator=g), size=(h, w), mode="bilinear")
        return (coarse + 0.05 * torch.rand(1, 3, h, w, generator=g)).clamp(0, 1), "synthetic image"


def _timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run_model(name: str, repeats: int = 5, batch_size: int = 64) -> dict[str, object]:
    from captum.attr import Occlusion as CaptumOcclusion

    model = load_model(name)
    x, source = _input(model)
    with torch.inference_mode():
        out = model.net(x)[0]
    target: Target = ClassScore(int(out.argmax())) if model.task == "classification" else Similarity(out)
    h, w = x.shape[-2:]
    window, stride = Occlusion(model)._geometry(h, w)
    fill = fill_image(x, "zero")
    captum = CaptumOcclusion(lambda z: target(model.net(z)))

    def run_captum(ppe: int) -> torch.Tensor:
        with torch.inference_mode():
            return captum.attribute(x, sliding_window_shapes=(3, window, window), strides=(3, stride, stride),
                                    baselines=fill, perturbations_per_eval=ppe)[0, 0]

    def run_full() -> torch.Tensor:
        return Occlusion(model, batch_size=batch_size, window=window, stride=stride, incremental=None).attribute(
            x, target)[0]

    def run_exact() -> torch.Tensor:
        return incremental_occlusion(model.net, x, target, window=window, stride=stride, fill=fill, mode="exact",
                                     batch_size=batch_size).map

    approx_info: dict[str, dict[str, object]] = {k: {} for k in APPROX}

    def approx(key: str) -> Callable[[], torch.Tensor]:
        tau, factor, fraction = APPROX[key]

        def run_approx() -> torch.Tensor:
            result = incremental_occlusion(model.net, x, target, window=window, stride=stride, fill=fill,
                                           mode="approx", batch_size=batch_size, tau=tau, drill_factor=factor,
                                           drill_fraction=fraction)
            approx_info[key].update(evaluations=result.evaluations, work_fraction=result.work_fraction,
                                    tau=tau, tau_min_side=DEFAULT_TAU_MIN_SIDE, drill_factor=factor,
                                    drill_fraction=fraction, precision=result.precision)
            return result.map

        return run_approx

    exact_info = incremental_occlusion(model.net, x, target, window=window, stride=stride, fill=fill, mode="exact",
                                       batch_size=batch_size)  # warm-up (tracing) and the record
    for key in APPROX:
        approx(key)()
    sweep = {}
    for ppe in CAPTUM_PPE:
        run_captum(ppe) if ppe == CAPTUM_PPE[0] else None  # warm-up once
        sweep[ppe] = _timed(lambda ppe=ppe: run_captum(ppe))[0]
    best_ppe = min(sweep, key=sweep.__getitem__)
    rivals = {"captum": lambda: run_captum(best_ppe), "full": run_full, "exact": run_exact,
              **{key: approx(key) for key in APPROX}}
    seconds: dict[str, list[float]] = {k: [] for k in rivals}
    maps: dict[str, torch.Tensor] = {}
    for _ in range(repeats):
        for key, fn in rivals.items():
            t, maps[key] = _timed(fn)
            seconds[key].append(t)

    def ratio(slow: str, fast: str) -> float:
        return statistics.median(a / b for a, b in zip(seconds[slow], seconds[fast], strict=True))

    return {
        "input": source, "window": window, "stride": stride, "patches": exact_info.evaluations,
        "captum_best_ppe": best_ppe, "captum_sweep_s": {str(k): round(v, 3) for k, v in sweep.items()},
        "median_s": {k: round(statistics.median(v), 3) for k, v in seconds.items()},
        "speedup_vs_captum": {k: ratio("captum", k) for k in ("full", "exact", *APPROX)},
        "speedup_vs_full": {k: ratio("full", k) for k in ("exact", *APPROX)},
        "exact_max_abs_diff_vs_full": float((maps["exact"] - maps["full"]).abs().max()),
        "exact_max_abs_diff_vs_captum": float((maps["exact"] - maps["captum"]).abs().max()),
        "map_max_abs": float(maps["full"].abs().max()),
        "ssim_vs_exact": {k: map_ssim(maps["exact"], maps[k]) for k in APPROX},
        "exact_work_fraction": exact_info.work_fraction,
        "approx": approx_info,
        "fell_back": exact_info.fell_back,
        "repeats": repeats,
    }


def run(models: list[str], repeats: int = 5) -> dict[str, object]:
    results: dict[str, object] = {}
    for name in models:
        try:
            results[name] = run_model(name, repeats)
        except FaceLensError as exc:
            results[name] = {"skipped": str(exc)}
    return results


def print_table(results: dict[str, object]) -> None:
    print(f"{'model':<13}{'patches':>8}{'captum ppe':>11}{'mode':>13}{'vs captum':>11}{'vs full':>9}"
          f"{'max|Δ| / SSIM':>15}{'evals':>7}{'MAC share':>10}")
    for name, r in results.items():
        if not isinstance(r, dict) or "skipped" in r:
            print(f"{name:<13}skipped: {r.get('skipped') if isinstance(r, dict) else r}")
            continue
        vs_c, vs_f = r["speedup_vs_captum"], r["speedup_vs_full"]
        lead = f"{name:<13}{r['patches']:>8}{r['captum_best_ppe']:>11}"
        print(f"{lead}{'full':>13}{vs_c['full']:>10.2f}×{'':>9}{'':>15}{r['patches']:>7}{1.0:>10.2f}")
        print(f"{'':<32}{'exact':>13}{vs_c['exact']:>10.2f}×{vs_f['exact']:>8.2f}×"
              f"{r['exact_max_abs_diff_vs_full']:>15.1e}{r['patches']:>7}{r['exact_work_fraction']:>10.2f}")
        for key in APPROX:
            info = r["approx"][key]
            print(f"{'':<32}{key:>13}{vs_c[key]:>10.2f}×{vs_f[key]:>8.2f}×{r['ssim_vs_exact'][key]:>15.3f}"
                  f"{info['evaluations']:>7}{info['work_fraction']:>10.2f}  {info['precision']}")
    print("speed-ups are rival time / ours, medians over interleaved rounds; targets: exact ≥ 3× and approx ≥ 10× "
          "captum's best.\nmax|Δ|: exact vs full recompute; SSIM: approximate vs exact map; MAC share: conv+linear "
          "multiply-adds per scored patch relative to a full forward.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["dlib-resnet", "fer-emotion"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="out/bench/incremental_occlusion.json")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    results = run(args.models, args.repeats)
    print_table(results)
    print(f"wrote {write_json(args.out, results)}")


if __name__ == "__main__":
    main()
