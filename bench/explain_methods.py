"""Every explanation method against its floor, and the peers' fastest settings beside ours.

For each method the network's batches are recorded while the method runs (a
forward pre-hook notes each batch size and whether autograd was on). The floor
replays exactly those batches on ready tensors: a bare forward, plus a backward
where the method differentiated. ratio = method / floor is the overhead of
everything that is not the network; method and floor runs alternate and the
ratio is the median of the per-round ratios. Wall clock still moves by several
percent on a 2-core machine, so for methods that only run forwards
the table also gives the in-run ratio: the method's time divided by the time
its own network forwards took inside the same run (timed by hooks), which the
noise cannot split. The peers (captum Occlusion and
IntegratedGradients, pytorch-grad-cam ScoreCAM) run the same work at their
fastest batch settings; agreement is the Spearman correlation of their map
with ours.

    python -m bench.explain_methods [--models dlib-resnet fer-emotion] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from bench.common import portrait_or_face
from facelens.evaluate.agreement import spearman
from facelens.explain.api import get_method, list_methods, resolve_target
from facelens.explain.canonize import canonical_copy
from facelens.models import FaceModel, load_model

PERTURBATION = {"occlusion", "rise", "lime", "kernelshap", "scorecam", "region-occlusion", "region-lime",
                "region-shap", "dise", "canonical-occlusion"}


def _record(model: FaceModel, run: Callable[[], object]) -> list[tuple[int, bool]]:
    calls: list[tuple[int, bool]] = []

    def hook(_m: object, args: tuple[torch.Tensor, ...]) -> None:
        calls.append((int(args[0].shape[0]), torch.is_grad_enabled()))

    # hook-based methods run on the canonical copy of the network, so watch both
    nets = {id(n): n for n in (model.net, canonical_copy(model.net))}
    handles = [n.register_forward_pre_hook(hook) for n in nets.values()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return calls


def _in_run(model: FaceModel, run: Callable[[], object]) -> tuple[float, float]:
    """(total seconds, seconds spent inside the network's forward) for one run of the method."""
    spent = [0.0]
    start: list[float] = []
    pre = model.net.register_forward_pre_hook(lambda *_: start.append(time.perf_counter()))
    post = model.net.register_forward_hook(lambda *_: spent.__setitem__(0, spent[0] + time.perf_counter()
                                                                        - start.pop()))
    try:
        t0 = time.perf_counter()
        run()
        total = time.perf_counter() - t0
    finally:
        pre.remove()
        post.remove()
    return total, spent[0]


def _floor(model: FaceModel, x: torch.Tensor, calls: list[tuple[int, bool]]) -> Callable[[], None]:
    ready = {n: x.expand(n, -1, -1, -1).clone() for n in {n for n, _ in calls}}

    def run() -> None:
        for n, grad in calls:
            if grad:  # gradient with respect to the input only, as the methods take it
                inp = ready[n].clone().requires_grad_(True)
                torch.autograd.grad(model.net(inp).sum(), inp)
            else:
                with torch.inference_mode():
                    model.net(ready[n])

    return run


def _best(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _interleaved(method: Callable[[], object], floor: Callable[[], None],
                 repeats: int) -> tuple[float, float, float, object]:
    """(best method s, best floor s, median of per-round method/floor ratios, the method's output).

    Method and floor alternate, so a slow spell of the machine (other processes, clock changes) falls on
    both sides of each ratio; timing them one after the other moved the ratio by ±0.2 on this 2-core box.
    """
    ts, fs, out = [], [], None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = method()
        ts.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        floor()
        fs.append(time.perf_counter() - t0)
    ratios = sorted(t / f for t, f in zip(ts, fs, strict=True) if f > 0)
    ratio = ratios[len(ratios) // 2] if ratios else float("nan")
    return min(ts), min(fs), ratio, out


def _peers(model: FaceModel, x: torch.Tensor, target: object, ours: dict[str, np.ndarray], repeats: int,
           batch_size: int) -> list[dict[str, object]]:
    from captum.attr import IntegratedGradients, Occlusion
    from pytorch_grad_cam import ScoreCAM

    h = x.shape[-1]
    window = max(4, round(16 * h / 150))
    stride = max(2, round(8 * h / 150))
    forward = lambda inp: target(model.net(inp))  # noqa: E731 - the scalar captum differentiates
    rows = []
    occ = Occlusion(forward)
    t, m = _best(lambda: occ.attribute(x, sliding_window_shapes=(3, window, window), strides=(3, stride, stride),
                                       baselines=0.0, perturbations_per_eval=batch_size), repeats)
    rows.append({"peer": "captum Occlusion", "ours": "occlusion", "seconds": t,
                 "agreement": spearman(ours["occlusion"], m[0].sum(0).detach().numpy())})
    ig = IntegratedGradients(forward)
    t, m = _best(lambda: ig.attribute(x, baselines=x * 0, n_steps=50, internal_batch_size=batch_size), repeats)
    rows.append({"peer": "captum IntegratedGradients", "ours": "integrated-gradients", "seconds": t,
                 "agreement": spearman(ours["integrated-gradients"], m[0].sum(0).detach().numpy())})
    layer = model.layer("late")
    with ScoreCAM(model=model.net, target_layers=[layer]) as cam:
        cam.batch_size = batch_size
        t, m = _best(lambda: cam(input_tensor=x, targets=[target]), repeats)
    rows.append({"peer": "pytorch-grad-cam ScoreCAM", "ours": "scorecam", "seconds": t,
                 "agreement": spearman(ours["scorecam"], np.asarray(m)[0])})
    return rows


def run(models: list[str], repeats: int = 3, batch_size: int = 64) -> dict[str, object]:
    image = portrait_or_face()
    results: dict[str, object] = {}
    for name in models:
        model = load_model(name)
        chip = model.chip(image)
        x = model.to_tensor(chip)
        target = resolve_target(model, chip)
        rows, maps = [], {}
        for info in list_methods():
            meth = info["name"]
            try:
                explainer = get_method(meth)(model, batch_size=batch_size)
            except Exception as exc:  # report it, don't stop the suite
                rows.append({"method": meth, "error": str(exc)})
                continue

            def attribute(e=explainer, x=x, target=target, chip=chip) -> torch.Tensor:
                return e.attribute(x, target, chips=[chip])

            try:
                calls = _record(model, attribute)
            except Exception as exc:  # e.g. CAM without global pooling
                rows.append({"method": meth, "error": f"{type(exc).__name__}: {exc}"})
                continue
            t, floor_t, ratio, out = _interleaved(attribute, _floor(model, x, calls), repeats)
            maps[meth] = out[0].numpy()
            in_run = None
            if calls and not any(g for _, g in calls):
                total, inside = _in_run(model, attribute)
                in_run = total / inside if inside else None
            rows.append({"method": meth, "family": info["family"], "library": info["library"],
                         "ms": 1000 * t, "floor_ms": 1000 * floor_t,
                         # no recorded forward (e.g. incremental occlusion runs its own layers): no floor to compare
                         "ratio": ratio if calls and floor_t else None,
                         "in_run_ratio": in_run,
                         "forwards": sum(n for n, _ in calls), "backward": any(g for _, g in calls)})
        peers = _peers(model, x, target, maps, repeats, batch_size)
        for p in peers:
            p["ours_seconds"] = next(r["ms"] / 1000 for r in rows if r.get("method") == p["ours"])
            p["speedup_vs_peer"] = p["seconds"] / p["ours_seconds"]
        results[name] = {"methods": rows, "peers": peers, "input": list(model.input_size)}
    return results


def print_tables(results: dict[str, object]) -> None:
    for name, res in results.items():
        print(f"\n{name} ({res['input'][0]}×{res['input'][1]}), one face, batch 64")
        print(f"{'method':<22}{'library':<18}{'forwards':>9}{'ms':>10}{'floor ms':>10}{'ratio':>7}{'in-run':>8}")
        for r in res["methods"]:
            if "error" in r:
                print(f"{r['method']:<22}n/a: {r['error'][:70]}")
                continue
            in_run = f"{r['in_run_ratio']:>8.2f}" if r["in_run_ratio"] else f"{'-':>8}"
            ratio = f"{r['ratio']:>7.2f}" if r["ratio"] else f"{'-':>7}"
            print(f"{r['method']:<22}{r['library']:<18}{r['forwards']:>9}{r['ms']:>10.1f}{r['floor_ms']:>10.1f}"
                  f"{ratio}{in_run}")
        print(f"{'peer':<28}{'peer ms':>9}{'ours ms':>9}{'ours faster ×':>15}{'Spearman':>10}")
        for p in res["peers"]:
            print(f"{p['peer']:<28}{1000 * p['seconds']:>9.1f}{1000 * p['ours_seconds']:>9.1f}"
                  f"{p['speedup_vs_peer']:>15.2f}{p['agreement']:>10.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["dlib-resnet", "fer-emotion"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    print_tables(run(args.models, args.repeats))


if __name__ == "__main__":
    main()
