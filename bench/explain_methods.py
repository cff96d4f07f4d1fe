"""Every explanation method against its floor, and the peers' fastest settings beside ours.

For each method the network's batches are recorded while the method runs (a
passive forward pre-hook notes the module, the batch size and whether autograd
was on). The floor replays exactly those batches on ready tensors, on the same
module: a bare forward, plus a backward where the method differentiated.
Forward-only scoring runs on the network's inference copy (channels_last, or
dlib-resnet's folded graph) and input-gradient methods on its channels_last
copy, so their floor is that copy's forward (and backward); the
"plain floor" column replays the same batches on the network itself, which is
what the peers run. ratio = method / floor is the overhead of
everything that is not the network; method and floor runs alternate and the
ratio is the median of the per-round ratios. Wall clock still moves by several
percent on a 2-core machine, so for methods that only run forwards
the table also gives the in-run ratio: the method's time divided by the time
its own network forwards took inside the same run (timed by hooks), which the
noise cannot split. Incremental occlusion runs layers on windows, not the network, so its
floor is the batches of the same map by full recompute (``incremental=None``): its ratio
says how far below that floor it gets. The peers (captum Occlusion and
IntegratedGradients, pytorch-grad-cam ScoreCAM) run the same work at their
fastest batch settings, on the network as the user hands it to them, each in
rounds alternating with our method (speed-up = median of the per-round
ratios); captum's Occlusion is also run on our inference copy, to show how
much of the lead is the copy. Agreement is the Spearman correlation of their map with ours.

    python -m bench.explain_methods [--models dlib-resnet fer-emotion] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from bench.common import best_of, portrait_or_face
from facelens.evaluate.agreement import spearman
from facelens.explain.api import get_method, list_methods, resolve_target
from facelens.explain.canonize import canonical_copy
from facelens.models import FaceModel, load_model
from facelens.models.fuse import inference_net, passive

PERTURBATION = {"occlusion", "rise", "lime", "kernelshap", "scorecam", "region-occlusion", "region-lime",
                "region-shap", "dise", "canonical-occlusion"}


def _nets(model: FaceModel, x: torch.Tensor) -> dict[int, torch.nn.Module]:
    """Every module a method may run the network as: itself, its canonical copy (hook-based methods)
    and its inference copies (forward-only scoring; input gradients)."""
    nets = (model.net, canonical_copy(model.net), inference_net(model.net, x), inference_net(model.net, x, grad=True))
    return {id(n): n for n in nets}


def _record(model: FaceModel, x: torch.Tensor,
            run: Callable[[], object]) -> list[tuple[torch.nn.Module, int, bool]]:
    calls: list[tuple[torch.nn.Module, int, bool]] = []
    nets = _nets(model, x)
    handles = []
    for net in nets.values():
        def hook(_m: object, args: tuple[torch.Tensor, ...], net: torch.nn.Module = net) -> None:
            calls.append((net, int(args[0].shape[0]), torch.is_grad_enabled()))

        # passive: counting batches must not stop the engine from using the inference copy
        handles.append(net.register_forward_pre_hook(passive(hook)))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return calls


def _in_run(model: FaceModel, x: torch.Tensor, run: Callable[[], object]) -> tuple[float, float]:
    """(total seconds, seconds spent inside the network's forward) for one run of the method."""
    spent = [0.0]
    start: list[float] = []
    handles = []
    for net in _nets(model, x).values():
        handles.append(net.register_forward_pre_hook(passive(lambda *_: start.append(time.perf_counter()))))
        handles.append(net.register_forward_hook(passive(
            lambda *_: spent.__setitem__(0, spent[0] + time.perf_counter() - start.pop()))))
    try:
        t0 = time.perf_counter()
        run()
        total = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    return total, spent[0]


def _floor(model: FaceModel, x: torch.Tensor, calls: list[tuple[torch.nn.Module, int, bool]],
           plain: bool = False) -> Callable[[], None]:
    """Replay the recorded batches bare, on the module each ran on (``plain``: all on the network itself)."""
    ready = {n: x.expand(n, -1, -1, -1).clone() for n in {n for _, n, _ in calls}}

    def run() -> None:
        for net, n, grad in calls:
            net = model.net if plain else net
            if grad:  # gradient with respect to the input only, as the methods take it
                inp = ready[n].clone().requires_grad_(True)
                torch.autograd.grad(net(inp).sum(), inp)
            else:
                with torch.inference_mode():
                    net(ready[n])

    return run


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


def _peers(model: FaceModel, x: torch.Tensor, target: object, ours: dict[str, np.ndarray],
           runs: dict[str, Callable[[], object]], repeats: int, batch_size: int) -> list[dict[str, object]]:
    """The peers' fastest settings, each timed in rounds alternating with our method (a slow spell of
    the machine then falls on both): speed-up = median over rounds of peer time / our time."""
    from captum.attr import IntegratedGradients, Occlusion
    from pytorch_grad_cam import ScoreCAM

    h = x.shape[-1]
    window = max(4, round(16 * h / 150))
    stride = max(2, round(8 * h / 150))
    rows = []

    def versus(peer: str, meth: str, fn: Callable[[], object], peer_map: Callable[[object], np.ndarray],
               given_our_copy: bool = False) -> None:
        if meth not in runs:
            return
        t, t_ours, ratio, out = _interleaved(fn, runs[meth], repeats)
        rows.append({"peer": peer, "ours": meth, "seconds": t, "ours_seconds": t_ours, "speedup_vs_peer": ratio,
                     "agreement": spearman(ours[meth], peer_map(out)), "given_our_copy": given_our_copy})

    def occlusion(net: torch.nn.Module) -> Callable[[], object]:
        occ = Occlusion(lambda inp: target(net(inp)))
        return lambda: occ.attribute(x, sliding_window_shapes=(3, window, window), strides=(3, stride, stride),
                                     baselines=0.0, perturbations_per_eval=batch_size)

    channel_sum = lambda m: m[0].sum(0).detach().numpy()  # noqa: E731
    versus("captum Occlusion", "occlusion", occlusion(model.net), channel_sum)
    copy_net = inference_net(model.net, x)
    if copy_net is not model.net:
        versus("captum Occlusion, our copy", "occlusion", occlusion(copy_net), channel_sum, given_our_copy=True)
    ig = IntegratedGradients(lambda inp: target(model.net(inp)))  # the scalar captum differentiates
    versus("captum IntegratedGradients", "integrated-gradients",
           lambda: ig.attribute(x, baselines=x * 0, n_steps=50, internal_batch_size=batch_size), channel_sum)

    def scorecam() -> object:
        # built per call: a live CAM keeps hooks on the network, which would make our method, timed
        # between its calls, run on the watched network instead of its inference copy
        with ScoreCAM(model=model.net, target_layers=[model.layer("late")]) as cam:
            cam.batch_size = batch_size
            return cam(input_tensor=x, targets=[target])

    versus("pytorch-grad-cam ScoreCAM", "scorecam", scorecam, lambda m: np.asarray(m)[0])
    return rows


def run(models: list[str], repeats: int = 3, batch_size: int = 64) -> dict[str, object]:
    image = portrait_or_face()
    results: dict[str, object] = {}
    for name in models:
        model = load_model(name)
        chip = model.chip(image)
        x = model.to_tensor(chip)
        target = resolve_target(model, chip)
        rows, maps, runs = [], {}, {}
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
                calls = _record(model, x, attribute)
            except Exception as exc:  # e.g. CAM without global pooling
                rows.append({"method": meth, "error": f"{type(exc).__name__}: {exc}"})
                continue
            floor_of = "its own batches"
            if not calls and meth == "occlusion":  # incremental: it runs layers, not the network
                full = get_method(meth)(model, batch_size=batch_size, incremental=None)
                calls = _record(model, x, lambda f=full, x=x, t=target, c=chip: f.attribute(x, t, chips=[c]))
                floor_of = "the full recompute's batches"
            t, floor_t, ratio, out = _interleaved(attribute, _floor(model, x, calls), repeats)
            maps[meth], runs[meth] = out[0].numpy(), attribute
            in_run, plain_t = None, None
            if calls and floor_of == "its own batches" and not any(g for _, _, g in calls):
                total, inside = _in_run(model, x, attribute)
                in_run = total / inside if inside else None
            if any(net is not model.net for net, _, _ in calls):
                plain_t = best_of(_floor(model, x, calls, plain=True), repeat=repeats)
            rows.append({"method": meth, "family": info["family"], "library": info["library"],
                         "ms": 1000 * t, "floor_ms": 1000 * floor_t,
                         "ratio": ratio if calls and floor_t else None,
                         "in_run_ratio": in_run,
                         # the same batches on the network itself, where the method ran them on a copy
                         "plain_floor_ms": None if plain_t is None else 1000 * plain_t,
                         "forwards": sum(n for _, n, _ in calls), "backward": any(g for _, _, g in calls),
                         "floor_of": floor_of})
        peers = _peers(model, x, target, maps, runs, repeats, batch_size)
        results[name] = {"methods": rows, "peers": peers, "input": list(model.input_size)}
    return results


def print_tables(results: dict[str, object]) -> None:
    for name, res in results.items():
        print(f"\n{name} ({res['input'][0]}×{res['input'][1]}), one face, batch 64")
        print(f"{'method':<22}{'library':<18}{'forwards':>9}{'ms':>10}{'floor ms':>10}{'ratio':>7}{'in-run':>8}"
              f"{'plain floor ms':>16}")
        for r in res["methods"]:
            if "error" in r:
                print(f"{r['method']:<22}n/a: {r['error'][:70]}")
                continue
            in_run = f"{r['in_run_ratio']:>8.2f}" if r["in_run_ratio"] else f"{'-':>8}"
            ratio = f"{r['ratio']:>7.2f}" if r["ratio"] else f"{'-':>7}"
            plain = f"{r['plain_floor_ms']:>16.1f}" if r.get("plain_floor_ms") else f"{'-':>16}"
            mark = "*" if r.get("floor_of", "its own batches") != "its own batches" else ""
            print(f"{r['method'] + mark:<22}{r['library']:<18}{r['forwards']:>9}{r['ms']:>10.1f}{r['floor_ms']:>10.1f}"
                  f"{ratio}{in_run}{plain}")
        if any(r.get("floor_of", "its own batches") != "its own batches" for r in res["methods"]):
            print("* incremental: its floor is the full recompute's forwards (the method runs layers, not the network)")
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
