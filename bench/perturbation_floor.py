"""How close each perturbation method runs to its floor: the bare batched forward passes.

For every model and method, the network's batches are recorded while the method
runs; the floor replays exactly those batch sizes on ready tensors (the same
number of forwards, no mask building, no fitting). The ratio method / floor is
the overhead of everything that is not the network; the target is ≤ 1.15.
Timings are the best of ``--repeats`` interleaved runs, so a busy machine
inflates both sides alike.

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
from facelens.targets import ClassScore, Similarity, Target


def _image(h: int, w: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    coarse = F.interpolate(torch.rand(1, 3, 12, 12, generator=g), size=(h, w), mode="bilinear")
    return (coarse + 0.05 * torch.rand(1, 3, h, w, generator=g)).clamp(0, 1)


def _record_batches(model: FaceModel, run: Callable[[], object]) -> list[int]:
    sizes: list[int] = []
    handle = model.net.register_forward_pre_hook(lambda _m, args: sizes.append(int(args[0].shape[0])))
    try:
        run()
    finally:
        handle.remove()
    return sizes


def _floor(model: FaceModel, target: Target, sizes: list[int], x: torch.Tensor) -> Callable[[], None]:
    ready = {n: x.expand(n, -1, -1, -1).clone() + 0.01 * torch.rand(n, *x.shape[1:]) for n in set(sizes)}

    def run() -> None:
        with torch.inference_mode():
            for n in sizes:
                target(model.net(ready[n]))

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
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch_size {args.batch_size}")
    print(f"{'model':<13}{'method':<12}{'evals':>7}{'ms/img':>9}{'floor ms/img':>14}{'ratio':>8}"
          f"{'cpu ratio':>11}")
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

            sizes = _record_batches(model, run)
            floor = _floor(model, target, sizes, x)
            ours, base = (float("inf"), float("inf")), (float("inf"), float("inf"))
            for _ in range(args.repeats):  # interleaved, so load changes hit both sides
                ours = tuple(map(min, ours, _timed(run)))  # type: ignore[assignment]
                base = tuple(map(min, base, _timed(floor)))  # type: ignore[assignment]
            n = sum(sizes)
            print(f"{name:<13}{label:<12}{n:>7}{1000 * ours[0] / n:>9.2f}{1000 * base[0] / n:>14.2f}"
                  f"{ours[0] / base[0]:>8.3f}{ours[1] / base[1]:>11.3f}")


if __name__ == "__main__":
    main()
