"""Batched dlib-resnet embedding against the machine's limit: the sgemm peak measured in the same run.

The limit is the network's FLOPs (counted from its convolutions and linear layer, ≈ 542 MFLOP per
150×150 face) divided by the GFLOP/s of a large float32 ``torch.mm`` on this CPU. Every variant
(the plain port, and the fused copies of :mod:`facelens.models.fuse`) and the sgemm are timed in
interleaved rounds and the best round of each is kept, so a machine shared with other work slows
them alike; ``x limit`` = ms per face / limit ms per face (target ≤ 1.5). ``cpu x limit`` is the same
ratio in CPU seconds (process time), which other processes disturb less than wall time.

    python -m bench.embedding_speed [--batch 64] [--rounds 5] [--variants plain,eager,channels_last,jit]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import nn

DEFAULT_VARIANTS = ("plain", "eager", "channels_last", "jit")


def count_flops(net: nn.Module, input_size: tuple[int, int]) -> int:
    """Multiply-adds × 2 of every Conv2d and Linear for one input (what the 542 MFLOP counts)."""
    total = [0]

    def hook(mod: nn.Module, _inp: object, out: torch.Tensor) -> None:
        if isinstance(mod, nn.Conv2d):
            total[0] += 2 * mod.weight[0].numel() * out[0].numel()
        elif isinstance(mod, nn.Linear):
            total[0] += 2 * mod.weight.numel()

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.inference_mode():
            net(torch.rand(1, 3, *input_size))
    finally:
        for h in handles:
            h.remove()
    return total[0]


def sgemm(n: int = 2048) -> tuple[Callable[[], object], int]:
    """A large float32 matrix product and its FLOPs: the CPU's practical peak for this kind of work."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(n, n, generator=g), torch.rand(n, n, generator=g)
    return (lambda: torch.mm(a, b)), 2 * n ** 3


def run(batch: int = 64, rounds: int = 5, variants: tuple[str, ...] = DEFAULT_VARIANTS) -> dict[str, object]:
    from facelens.models import load_model
    from facelens.models.fuse import FastNet

    model = load_model("dlib-resnet")
    net = model.net
    flops = count_flops(net, model.input_size)
    x = torch.rand(batch, 3, *model.input_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = net(x)
    fns: dict[str, Callable[[], torch.Tensor]] = {}
    build: dict[str, float] = {}
    diff: dict[str, float] = {}
    for v in variants:
        t0 = time.perf_counter()
        f: nn.Module = net if v == "plain" else FastNet(net, v)  # type: ignore[arg-type]
        with torch.inference_mode():
            out = f(x)  # also compiles / packs weights
        build[v] = time.perf_counter() - t0
        diff[v] = float((out - ref).abs().max())
        fns[v] = lambda f=f: f(x)
    mm, mm_flops = sgemm()
    best: dict[str, float] = dict.fromkeys([*variants, "sgemm"], float("inf"))
    cpu: dict[str, float] = dict(best)
    for _ in range(rounds):
        for name, fn in [*fns.items(), ("sgemm", mm)]:
            with torch.inference_mode():
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
                cpu[name] = min(cpu[name], time.process_time() - c0)
    peak = mm_flops / best["sgemm"]
    limit_ms = 1000 * flops / peak
    cpu_limit = flops / (mm_flops / cpu["sgemm"])  # CPU seconds per face at sgemm efficiency
    rows = []
    for v in variants:
        ms = 1000 * best[v] / batch
        rows.append({"variant": v, "ms_per_face": ms, "gflops": flops * batch / best[v] / 1e9,
                     "fraction_of_peak": flops * batch / best[v] / peak, "x_limit": ms / limit_ms,
                     "cpu_x_limit": cpu[v] / batch / cpu_limit,
                     "speedup_vs_plain": best["plain"] / best[v] if "plain" in best else None,
                     "max_abs_diff": diff[v], "build_s": build[v]})
    return {"batch": batch, "rounds": rounds, "threads": torch.get_num_threads(), "mflop_per_face": flops / 1e6,
            "sgemm_gflops": peak / 1e9, "limit_ms_per_face": limit_ms, "target_x_limit": 1.5, "variants": rows}


def print_table(res: dict[str, object]) -> None:
    print(f"dlib-resnet, batch {res['batch']}, {res['threads']} threads: {res['mflop_per_face']:.0f} MFLOP/face, "
          f"sgemm peak {res['sgemm_gflops']:.0f} GFLOP/s → limit {res['limit_ms_per_face']:.2f} ms/face")
    print(f"{'variant':<15}{'ms/face':>9}{'GFLOP/s':>9}{'of peak':>9}{'× limit':>9}{'cpu × lim':>10}{'× plain':>9}"
          f"{'max |Δ|':>10}{'build s':>9}")
    for r in res["variants"]:  # type: ignore[attr-defined]
        sp = f"{r['speedup_vs_plain']:>9.2f}" if r["speedup_vs_plain"] else f"{'-':>9}"
        print(f"{r['variant']:<15}{r['ms_per_face']:>9.2f}{r['gflops']:>9.1f}{r['fraction_of_peak']:>9.0%}"
              f"{r['x_limit']:>9.2f}{r['cpu_x_limit']:>10.2f}{sp}{r['max_abs_diff']:>10.1e}{r['build_s']:>9.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help="comma-separated: plain, eager, channels_last, jit, compile")
    args = ap.parse_args()
    print_table(run(args.batch, args.rounds, tuple(v.strip() for v in args.variants.split(","))))


if __name__ == "__main__":
    main()
