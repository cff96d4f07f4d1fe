"""How close each perturbation method runs to its floor: the bare batched forward passes.

For every model and method, the network's batches are recorded while the method
runs; the floor replays exactly those batch sizes on ready tensors (the same
number of forwards, no mask building, no fitting), on the module the engine
scores with (the network's inference copy, see facelens.models.fuse). The ratio method / floor is
the overhead of everything that is not the network; the target is ≤ 1.15.
Timings are the best of ``--repeats`` interleaved runs. On a shared, busy
machine wall and CPU times still wander; the last column ("in-run") divides the
method's wall time by the time its own forwards took in the same run, which
stays meaningful under load.

    python bench/perturbation_floor.py [--models dlib-resnet fer-emotion] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from facelens.errors import FaceLensError
from facelens.explain.cams import ScoreCam
from facelens.explain.perturbation import KernelShap, Lime, Occlusion, Rise
from facelens.models import FaceModel, load_model
from facelens.models.fuse import inference_net, passive
from facelens.targets import ClassScore, Similarity, Target


def _image(h: int, w: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    coarse = F.interpolate(torch.rand(1, 3, 12, 12, generator=g), size=(h, w), mode="bilinear")
    return (coarse + 0.05 * torch.rand(1, 3, h, w, generator=g)).clamp(0, 1)


def _record_batches(model: FaceModel, run: Callable[[], object]) -> tuple[list[int], float, float]:
    """The batch sizes the method feeds the network, its wall time, and the part spent in forwards.

    The last two come from the same run, so a busy machine slows both alike: their ratio is
    the method's own overhead even when absolute timings are noisy.
    """
    sizes: list[int] = []
    inside = [0.0, 0.0]  # start of the current forward, total seconds in forwards

    def before(_m: object, args: tuple[torch.Tensor, ...]) -> None:
        sizes.append(int(args[0].shape[0]))
        inside[0] = time.perf_counter()

    def after(_m: object, _args: object, _out: object) -> None:
        inside[1] += time.perf_counter() - inside[0]

    # passive hooks, on the network and on the inference copy the engine scores with
    handles = []
    for net in {id(n): n for n in (model.net, _runner(model))}.values():
        handles += [net.register_forward_pre_hook(passive(before)), net.register_forward_hook(passive(after))]
    try:
        t0 = time.perf_counter()
        run()
        total = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    return sizes, total, inside[1]


def _runner(model: FaceModel) -> torch.nn.Module:
    """The module the engine scores perturbed batches on (the inference copy, when there is one)."""
    return inference_net(model.net, torch.zeros(1, 3, *model.input_size))


def _floor(model: FaceModel, target: Target, sizes: list[int], x: torch.Tensor) -> Callable[[], None]:
    ready = {n: x.expand(n, -1, -1, -1).clone() + 0.01 * torch.rand(n, *x.shape[1:]) for n in set(sizes)}
    net = _runner(model)

    def run() -> None:
        with torch.inference_mode():
            for n in sizes:
                target(net(ready[n]))

    return run


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall and CPU seconds (CPU time is less shaken by other processes on a shared machine)."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["dlib-resnet", "fer-emotion"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--n-samples", type=int, default=500, help="LIME / KernelSHAP budget")
    parser.add_argument("--n-masks", type=int, default=500, help="RISE budget")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch_size {args.batch_size}")
    print(f"{'model':<13}{'method':<12}{'evals':>7}{'ms/img':>9}{'floor ms/img':>14}{'ratio':>8}"
          f"{'cpu ratio':>11}{'in-run ratio':>14}")
    for name in args.models:
        try:
            model = load_model(name)
        except FaceLensError as exc:
            print(f"{name:<13}skipped: {exc}")
            continue
        h, w = model.input_size
        x = _image(h, w)
        with torch.inference_mode():
            out = model.net(x)[0]
        target: Target = ClassScore(int(out.argmax())) if model.task == "classification" else Similarity(out)
        methods = {
            "occlusion": Occlusion(model, batch_size=args.batch_size),
            "rise": Rise(model, batch_size=args.batch_size, n_masks=args.n_masks),
            "lime": Lime(model, batch_size=args.batch_size, n_samples=args.n_samples),
            "kernelshap": KernelShap(model, batch_size=args.batch_size, n_samples=args.n_samples),
            "scorecam": ScoreCam(model, batch_size=args.batch_size),
        }
        for label, method in methods.items():
            def run(method: object = method, x: torch.Tensor = x, target: Target = target) -> object:
                return method.attribute(x, target)  # type: ignore[attr-defined]

            sizes, _, _ = _record_batches(model, run)  # warm-up, and the batches to replay
            floor = _floor(model, target, sizes, x)
            wall, cpu, floor_wall, floor_cpu, in_run = (float("inf"),) * 5
            for _ in range(args.repeats):  # interleaved, so load changes hit both sides
                c0 = time.process_time()
                _, total, forwards = _record_batches(model, run)
                cpu = min(cpu, time.process_time() - c0)
                wall, in_run = min(wall, total), min(in_run, total / forwards)
                fw, fc = _timed(floor)
                floor_wall, floor_cpu = min(floor_wall, fw), min(floor_cpu, fc)
            n = sum(sizes)
            print(f"{name:<13}{label:<12}{n:>7}{1000 * wall / n:>9.2f}{1000 * floor_wall / n:>14.2f}"
                  f"{wall / floor_wall:>8.3f}{cpu / floor_cpu:>11.3f}{in_run:>14.3f}")


if __name__ == "__main__":
    main()
