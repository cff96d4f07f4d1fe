"""Sanity checks for saliency methods (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018).

A map that explains the *model* must change when the model's knowledge is
destroyed. Two ways of destroying it:

* **Model-parameter randomization.** Re-initialize the weights layer by layer,
  from the output side down (*cascading*: randomizations accumulate), or one
  layer at a time with the others intact (*independent*), and compare each new
  map with the trained model's map for the same input and target.
* **Data randomization.** Train a probe head on the network's features once with
  the true labels and once with shuffled labels, and compare the maps of the
  two heads. A map that looks the same for a head that learned nothing but
  memorized noise does not explain what was learned.

Similarity, as in the paper, each named for what it holds: ``rank_corr`` (Spearman rank correlation
of the maps as the method returns them, sign kept), ``rank_corr_of_abs_maps`` (of the absolute maps),
``ssim_of_abs_maps`` (SSIM) and ``hog_of_abs_maps`` (Pearson correlation of HOG descriptors), the last two on the
absolute maps min-max normalized to [0, 1]. Every value is a mean over photos with a 95 % bootstrap
interval.

**Verdict** (the one rule of :mod:`facelens.evaluate.verdict`). The claim is "the map changes when
the model's knowledge is destroyed": ``rank_corr`` with the trained model's map below
`PASS_THRESHOLD` = 0.5 after the decisive randomization: every layer (cascading), the output layer
alone (independent: a map that survives a random output layer ignores what the model decides, the
class-insensitivity Guided Backprop is known for) or the shuffled-label head (data). *Pass* when
the whole interval is below 0.5, *fail* when it is entirely at or above, *inconclusive* when it
contains 0.5 or rests on fewer than :data:`~facelens.evaluate.verdict.MIN_N` photos. The signed
correlation is judged, not its magnitude: a map that inverts under randomization (ρ = −0.85) has
changed. Why 0.5: a rank correlation of 0.5 means the two maps share only a quarter of their rank
variance (ρ² = 0.25); a map that keeps more than that with every weight random is still mostly a
function of the input (edges, contrast) rather than of what the network learned. In the paper the
methods that pass fall to ρ ≈ 0–0.3 after full randomization while Guided Backprop and Guided
Grad-CAM stay far above 0.5. The threshold is a parameter; every number is reported, whichever way
the verdict goes.

**Targets** stay fixed while the network changes: a class index for classifiers, and for recognizers
the trained network's embedding of the unperturbed photo as the reference (the model's default
recognizer target, cohort-normalized when it has a cohort). Recomputing the reference under each
randomized network would explain a different question at every step: the randomized network's
match to its own output.

Work is always done on a private deep copy of the model: the cached shared
model is never touched.
"""

from __future__ import annotations

import copy
import dataclasses
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ..errors import ModelError
from ..explain.engine import DEFAULT_BATCH_SIZE
from ..models.base import FaceModel
from ..targets import ClassScore, CohortSimilarity, Similarity, Target
from .agreement import spearman
from .base import Metric
from .stats import Estimate, mean_interval
from .verdict import MIN_N, Verdict, decide, sanity_word

__all__ = [
    "PASS_THRESHOLD",
    "DataRandomization",
    "ModelRandomization",
    "ProbeHead",
    "SanityResult",
    "StepSimilarity",
    "data_randomization",
    "group_layers",
    "hog_similarity",
    "map_similarity",
    "model_randomization",
    "parameterized_layers",
    "plot",
    "randomize_layer",
    "randomized_models",
    "ssim_similarity",
]

PASS_THRESHOLD = 0.5
MEASURES = ("rank_corr", "rank_corr_of_abs_maps", "ssim_of_abs_maps", "hog_of_abs_maps")
DECISIVE_MEASURE = "rank_corr"

Check = Literal["cascading", "independent", "data"]
Randomize = Literal["default", "gaussian"]
MapFunction = Callable[[FaceModel, torch.Tensor, Sequence[Target]], torch.Tensor]
MethodSpec = str | type | MapFunction
TargetFactory = Callable[[FaceModel, torch.Tensor], Sequence[Target]]


# -- similarity of two maps --------------------------------------------------------------------------------
def _unit(m: np.ndarray) -> np.ndarray:
    """|map| min-max normalized to [0, 1] (a constant map becomes all zeros)."""
    a = np.abs(np.asarray(m, np.float64))
    span = a.max() - a.min()
    return (a - a.min()) / span if span > 0 else np.zeros_like(a)


def ssim_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM (scikit-image) of the two absolute maps normalized to [0, 1]."""
    from skimage.metrics import structural_similarity

    x, y = _unit(a), _unit(b)
    if x.shape != y.shape:
        raise ModelError(f"maps differ in shape: {x.shape} and {y.shape}")
    side = min(x.shape)
    win = min(7, side if side % 2 else side - 1)
    if win < 3:
        raise ModelError(f"maps of {x.shape} are too small for SSIM (need at least 3×3)")
    return float(structural_similarity(x, y, data_range=1.0, win_size=win))


def hog_similarity(a: np.ndarray, b: np.ndarray, *, pixels_per_cell: int | None = None,
                   cells_per_block: int = 2, orientations: int = 9) -> float:
    """Pearson correlation of the HOG descriptors (scikit-image) of the two normalized absolute maps.

    Cells are 8 px, smaller on maps under 32 px so that there are at least 4 cells a side.
    A constant descriptor (a flat map) correlates 0 with anything.
    """
    from skimage.feature import hog

    x, y = _unit(a), _unit(b)
    if x.shape != y.shape:
        raise ModelError(f"maps differ in shape: {x.shape} and {y.shape}")
    ppc = int(pixels_per_cell or max(1, min(8, min(x.shape) // 4)))
    kw = dict(orientations=orientations, pixels_per_cell=(ppc, ppc),
              cells_per_block=(cells_per_block, cells_per_block), feature_vector=True)
    hx, hy = hog(x, **kw), hog(y, **kw)
    if hx.std() == 0 or hy.std() == 0:
        return 0.0
    return float(np.corrcoef(hx, hy)[0, 1])


def map_similarity(original: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """The paper's four similarity measures between a map and the trained model's map (see `MEASURES`)."""
    o, m = np.asarray(original, np.float64), np.asarray(other, np.float64)
    return {
        "rank_corr": spearman(o, m),
        "rank_corr_of_abs_maps": spearman(np.abs(o), np.abs(m)),
        "ssim_of_abs_maps": ssim_similarity(o, m),
        "hog_of_abs_maps": hog_similarity(o, m),
    }


# -- which layers, in which order ---------------------------------------------------------------------------
def parameterized_layers(net: nn.Module, example: torch.Tensor | None = None) -> list[str]:
    """Modules that own parameters, ordered from the output to the input.

    With an ``example`` input the order is the order in which a forward pass last
    calls each module (reversed), which is right even when modules are declared
    out of order; modules the forward pass never calls are left out, since they
    cannot change a map. Without an example, declaration order (reversed) is used.
    """
    owners = [(n, m) for n, m in net.named_modules() if any(True for _ in m.parameters(recurse=False))]
    if example is None:
        return [n for n, _ in reversed(owners)]
    last_call: dict[str, int] = {}
    counter = iter(range(1 << 30))
    handles = [m.register_forward_hook(lambda *_a, _n=n: last_call.__setitem__(_n, next(counter)))
               for n, m in owners]
    try:
        with torch.inference_mode():
            net(example[:1])
    finally:
        for h in handles:
            h.remove()
    return sorted(last_call, key=lambda n: -last_call[n])


def group_layers(names: Sequence[str], depth: int) -> list[tuple[str, list[str]]]:
    """Consecutive layers sharing their first ``depth`` name parts form one step (e.g. one residual block)."""
    groups: list[tuple[str, list[str]]] = []
    for name in names:
        key = ".".join(name.split(".")[:depth])
        if groups and groups[-1][0] == key:
            groups[-1][1].append(name)
        else:
            groups.append((key, [name]))
    return groups


def _steps(net: nn.Module, example: torch.Tensor,
           layers: Sequence[str | Sequence[str]] | None) -> list[tuple[str, list[str]]]:
    known = dict(net.named_modules())
    if layers is None:
        return [(n, [n]) for n in parameterized_layers(net, example)]
    steps = []
    for item in layers:
        names = [item] if isinstance(item, str) else list(item)
        for n in names:
            if n not in known:
                raise ModelError(f"no layer {n!r} in the network")
        steps.append((names[0] if len(names) == 1 else "+".join(names), names))
    return steps


# -- randomizing ---------------------------------------------------------------------------------------------
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d,
          nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm, nn.LayerNorm)


def _layer_seed(seed: int, name: str) -> int:
    """The same layer gets the same random weights in every check, batch and mode."""
    return (zlib.crc32(name.encode()) ^ (seed * 0x9E3779B1)) & 0x7FFFFFFF


def randomize_layer(module: nn.Module, *, seed: int, how: Randomize = "default") -> None:
    """Re-initialize the parameters a module owns (not its children's), reproducibly.

    ``default``: the module's own ``reset_parameters`` (Kaiming-uniform for conv and
    linear layers), run under a private seeded RNG so global random state is left
    alone. ``gaussian``: each tensor drawn from N(0, σ²) with σ the trained tensor's
    own standard deviation. Normalization and frozen-affine layers (batch norm, dlib's
    ``affine``) would be *reset to the identity* by ``reset_parameters``, which is not
    random, so their scale and shift are always drawn from a Gaussian with the trained
    tensor's own mean and standard deviation: still in the trained range, with the
    learned per-channel pattern gone. Running statistics (buffers) are left as they are.
    Modules without ``reset_parameters`` get the Gaussian treatment.
    """
    own = list(module.named_parameters(recurse=False))
    if not own:
        return
    norm = isinstance(module, _NORMS)
    if how == "default" and not norm and hasattr(module, "reset_parameters"):
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            module.reset_parameters()
        return
    if how not in ("default", "gaussian"):
        raise ModelError(f"randomize must be 'default' or 'gaussian', got {how!r}")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in own:
            data = p.detach().double()
            mean = float(data.mean()) if norm else 0.0
            std = float(data.std()) if data.numel() > 1 else 0.0
            if not std > 0:
                std = 0.1 * max(abs(mean), 1.0)
            p.copy_((torch.randn(p.shape, generator=g, dtype=torch.float64) * std + mean).to(p.dtype))


def randomized_models(model: FaceModel, mode: Literal["cascading", "independent"],
                      steps: Sequence[tuple[str, Sequence[str]]], *, seed: int = 0,
                      how: Randomize = "default") -> Iterator[tuple[int, str, FaceModel]]:
    """Yield ``(step, label, model)`` with the step's layers randomized, on a private deep copy.

    Cascading: step *k* has the first *k* steps' layers random (steps run output → input).
    Independent: only step *k*'s layers are random; the others are restored each time.
    The same copy is yielded each time: use it before advancing the iterator.
    """
    if mode not in ("cascading", "independent"):
        raise ModelError(f"mode must be 'cascading' or 'independent', got {mode!r}")
    work = copy.deepcopy(model)
    modules = dict(work.net.named_modules())
    for step, (label, names) in enumerate(steps, start=1):
        saved = {n: copy.deepcopy(modules[n].state_dict()) for n in names} if mode == "independent" else {}
        for n in names:
            randomize_layer(modules[n], seed=_layer_seed(seed, n), how=how)
        yield step, label, work
        for n, state in saved.items():
            modules[n].load_state_dict(state)


# -- computing maps -------------------------------------------------------------------------------------------
def _method_name(method: MethodSpec) -> str:
    if isinstance(method, str):
        return method
    return str(getattr(method, "name", getattr(method, "__name__", type(method).__name__)))


def _maps(model: FaceModel, method: MethodSpec, inputs: torch.Tensor, targets: Sequence[Target],
          chips: Sequence[Any] | None, settings: dict[str, object], batch_size: int, seed: int) -> np.ndarray:
    """Maps ``(N, H, W)`` of one method on one (possibly randomized) model."""
    if callable(method) and not isinstance(method, (str, type)):
        out = method(model, inputs, targets)
    else:
        from ..explain.api import get_method

        cls = get_method(method) if isinstance(method, str) else method
        out = cls(model, batch_size=batch_size, seed=seed, **settings).attribute(inputs, list(targets), chips=chips)
    maps = out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
    if maps.shape != (inputs.shape[0], *inputs.shape[-2:]):
        raise ModelError(f"{_method_name(method)} returned maps of shape {maps.shape}, "
                         f"expected {(inputs.shape[0], *inputs.shape[-2:])}")
    return maps.astype(np.float64)


def _default_targets(model: FaceModel, inputs: torch.Tensor) -> TargetFactory:
    """The trained model's target, fixed for every step: its top class (classifiers), or the match to the
    trained network's embedding of the same photo (recognizers; cohort-normalized when the model has a
    cohort, else the projection onto it, whose gradient at the photo itself is not zero)."""
    with torch.inference_mode():
        out = model.net(inputs).detach().flatten(1).clone()
    if model.task == "classification":
        names = model.class_names or []
        fixed: list[Target] = [ClassScore(int(i), name=names[i] if i < len(names) else None)
                               for i in out.argmax(1).tolist()]
    elif model.cohort is not None:
        fixed = [CohortSimilarity(e, model.cohort, label="the trained network's embedding") for e in out]
    else:
        fixed = [Similarity(e, "dot", label="the trained network's embedding (projection)") for e in out]
    return lambda _m, _x: fixed


def _as_factory(targets: Target | Sequence[Target] | TargetFactory | None, model: FaceModel,
                inputs: torch.Tensor) -> TargetFactory:
    if targets is None:
        return _default_targets(model, inputs)
    if isinstance(targets, Target):
        return lambda _m, x: [targets] * x.shape[0]
    if callable(targets):
        return targets
    fixed = list(targets)
    if len(fixed) != inputs.shape[0]:
        raise ModelError(f"{len(fixed)} targets for {inputs.shape[0]} inputs")
    return lambda _m, _x: fixed


def _as_inputs(model: FaceModel, inputs: torch.Tensor | np.ndarray | Sequence[Any]) -> torch.Tensor:
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() != 4:
            raise ModelError(f"inputs must be N×3×H×W, got shape {tuple(inputs.shape)}")
        return inputs.float()
    return model.to_tensor(inputs)


# -- results ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepSimilarity:
    """Mean similarity to the trained model's maps after one randomization step (0 = nothing randomized),
    with 95 % bootstrap intervals over photos for the decisive measure and SSIM."""

    step: int
    layer: str
    rank_corr: float
    rank_corr_of_abs_maps: float
    ssim_of_abs_maps: float
    hog_of_abs_maps: float
    n: int
    rank_corr_ci: tuple[float | None, float | None] = (None, None)
    ssim_of_abs_maps_ci: tuple[float | None, float | None] = (None, None)
    flat_maps: int = 0  # photos whose map at this step is flat (no saliency anywhere): counted as unrelated


@dataclass
class SanityResult:
    """One method's similarity curve under one check, and its verdict.

    ``steps[0]`` compares the method's map with a second run on the untouched model:
    1.0 for a deterministic method; less shows the method's own run-to-run noise.
    ``decision`` is the rule's verdict on the claim "the map changes" (see the module docstring);
    ``verdict`` its pass / fail / inconclusive.
    """

    method: str
    model: str
    check: Check
    steps: list[StepSimilarity]
    threshold: float
    decision: Verdict
    decisive_step: int
    n_images: int
    settings: dict[str, object] = field(default_factory=dict)
    extras: dict[str, object] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return sanity_word(self.decision)

    @property
    def decisive(self) -> StepSimilarity:
        """The step the verdict is read at."""
        return self.steps[self.decisive_step]

    def to_rows(self) -> list[dict[str, object]]:
        """One flat row per step, for CSV or JSON."""
        return [{"method": self.method, "model": self.model, "check": self.check, **dataclasses.asdict(s),
                 "threshold": self.threshold, "verdict": self.verdict,
                 "decisive": i == self.decisive_step} for i, s in enumerate(self.steps)]

    def summary(self) -> dict[str, object]:
        d = self.decisive
        where = f"every layer (the cascade ended at {d.layer})" if self.check == "cascading" else d.layer
        return {"method": self.method, "model": self.model, "check": self.check, "verdict": self.verdict,
                "decisive_step": where, "rank_corr": d.rank_corr, "ci": list(d.rank_corr_ci),
                "rank_corr_of_abs_maps": d.rank_corr_of_abs_maps, "ssim_of_abs_maps": d.ssim_of_abs_maps,
                "ssim_of_abs_maps_ci": list(d.ssim_of_abs_maps_ci), "hog_of_abs_maps": d.hog_of_abs_maps,
                "flat_maps": d.flat_maps, "threshold": self.threshold, "n_images": self.n_images,
                "decision": self.decision.as_dict(), "sentence": self.decision.sentence(), **self.extras}


def _aggregate(rows: Sequence[dict[str, Any]], seed: int = 0) -> tuple[list[StepSimilarity], dict[int, Estimate]]:
    """Per-step means and intervals, and the decisive measure's `Estimate` per step."""
    by_step: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_step.setdefault(int(r["step"]), []).append(r)
    out, estimates = [], {}
    for step in sorted(by_step):
        rs = by_step[step]
        vals = {k: np.array([r[k] for r in rs], np.float64) for k in MEASURES}
        rho = mean_interval(vals[DECISIVE_MEASURE], [r["image"] for r in rs], seed=seed)
        ssim = mean_interval(vals["ssim_of_abs_maps"], [r["image"] for r in rs], seed=seed)
        estimates[step] = rho
        out.append(StepSimilarity(step=step, layer=str(rs[0]["layer"]), n=len(rs),
                                  rank_corr_ci=tuple(rho.bounds), ssim_of_abs_maps_ci=tuple(ssim.bounds),
                                  flat_maps=sum(bool(r.get("flat")) for r in rs),
                                  **{k: float(v.mean()) for k, v in vals.items()}))
    return out, estimates


def _decide(estimate: Estimate, threshold: float, check: str, flat: int = 0) -> Verdict:
    what = {"cascading": "every layer re-initialized", "independent": "the output layer re-initialized",
            "data": "the head trained on shuffled labels"}[check]
    v = decide(f"the map changes with {what} (rank correlation with the trained map below {threshold:g})",
               estimate, threshold, direction="below", min_n=MIN_N, unit="photos")
    if flat:  # a flat map has no ranks: it is counted as unrelated (ρ = 0), and the sentence says so
        v = dataclasses.replace(v, reason=f"{v.reason}; {flat} of {estimate.n} maps became flat (no saliency "
                                          "anywhere), counted as unrelated (rank correlation 0)")
    return v


# -- model-parameter randomization ------------------------------------------------------------------------------
class ModelRandomization(Metric):
    """Cascading or independent model-parameter randomization over a stream of image batches.

    Each `update` runs the whole randomization sweep on one batch (a fresh private copy
    of the model, randomized with per-layer seeds, so every batch sees the same random
    networks) and keeps one similarity row per image and step. `compute` averages per step.

    Args:
        model: the trained model (left untouched).
        method: a registry name (``"gradcam"``), a `Method` class, or a function
            ``(model, inputs, targets) -> maps (N, H, W)``.
        mode: ``"cascading"`` (output → input, cumulative) or ``"independent"``.
        layers: the steps, output side first: layer names, or lists of names randomized
            together (see `group_layers`); default every parameterized module in
            forward order, reversed.
        targets: one `Target`, one per image, or a factory ``(model, inputs) -> targets``
            called on each randomized model; default: the trained model's top class
            (classifiers), the dot product with the current embedding (recognizers).
        randomize: ``"default"`` or ``"gaussian"`` (see `randomize_layer`).
        settings: the method's settings; ``batch_size`` and ``seed`` go to the method too.
    """

    def __init__(self, model: FaceModel, method: MethodSpec, *, mode: Literal["cascading", "independent"] = "cascading",
                 layers: Sequence[str | Sequence[str]] | None = None,
                 targets: Target | Sequence[Target] | TargetFactory | None = None,
                 randomize: Randomize = "default", seed: int = 0, threshold: float = PASS_THRESHOLD,
                 batch_size: int = DEFAULT_BATCH_SIZE, settings: dict[str, object] | None = None,
                 self_check: bool = True) -> None:
        super().__init__()
        if mode not in ("cascading", "independent"):
            raise ModelError(f"mode must be 'cascading' or 'independent', got {mode!r}")
        self.name = f"{mode}_randomization"
        self.model, self.method, self.mode = model, method, mode
        self.layers, self.targets, self.randomize = layers, targets, randomize
        self.seed, self.threshold, self.batch_size = int(seed), float(threshold), int(batch_size)
        self.settings = dict(settings or {})
        self.self_check = bool(self_check)  # step 0: a second run on the intact model (the method's own noise)
        self.add_state("rows", [])
        self.add_state("images", 0)

    def update(self, inputs: torch.Tensor | np.ndarray | Sequence[Any],
               targets: Target | Sequence[Target] | TargetFactory | None = None,
               chips: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        """Add a batch of inputs (tensor ``N×3×H×W`` in [0, 1], or chips); returns its rows."""
        x = _as_inputs(self.model, inputs)
        factory = _as_factory(targets if targets is not None else self.targets, self.model, x)
        steps = _steps(self.model.net, x, self.layers)
        if not steps:
            raise ModelError(f"{self.model.name} has no parameterized layers to randomize")

        def maps_of(m: FaceModel) -> np.ndarray:
            return _maps(m, self.method, x, factory(m, x), chips, self.settings, self.batch_size, self.seed)

        intact = copy.deepcopy(self.model)
        base = maps_of(intact)
        rows = self._rows(base, maps_of(intact), 0, "original") if self.self_check else []
        for step, label, randomized in randomized_models(self.model, self.mode, steps, seed=self.seed,
                                                         how=self.randomize):
            rows += self._rows(base, maps_of(randomized), step, label)
        self.rows.extend(rows)
        self.images += x.shape[0]
        return rows

    def _rows(self, base: np.ndarray, maps: np.ndarray, step: int, label: str) -> list[dict[str, Any]]:
        return [{"image": self.images + i, "step": step, "layer": label, "flat": bool(np.ptp(maps[i]) == 0),
                 **map_similarity(base[i], maps[i])} for i in range(len(base))]

    def result(self) -> SanityResult:
        steps, estimates = _aggregate(self.rows, self.seed)
        first = 1 if self.self_check else 0  # the index of the first randomized step
        if len(steps) <= first:
            raise ModelError("no batch was added: call update() first")
        decisive = len(steps) - 1 if self.mode == "cascading" else first
        # the first step randomizes the output-side layer: how much the map cares what the model decides
        extras: dict[str, object] = {"output_layer_rank_corr": steps[first].rank_corr}
        if self.mode == "independent":
            changed = [s.rank_corr < self.threshold for s in steps[first:]]
            extras["layers_changing_map_share"] = float(np.mean(changed))
        return SanityResult(
            method=_method_name(self.method), model=self.model.name, check=self.mode, steps=steps,
            threshold=self.threshold, decision=_decide(estimates[steps[decisive].step], self.threshold, self.mode,
                                                       steps[decisive].flat_maps),
            decisive_step=decisive, n_images=int(self.images),
            settings={**self.settings, "randomize": self.randomize, "seed": self.seed}, extras=extras)

    def compute(self) -> dict[str, Any]:
        if not self.rows:
            return {"metric": self.name, "n": 0}
        res = self.result()
        return {"metric": self.name, **res.summary(), "steps": [dataclasses.asdict(s) for s in res.steps],
                "how_measured": (
                    f"{self.mode} re-initialization ({self.randomize}) of parameterized layers, output → input; "
                    "rank correlation (Spearman) of the maps and of |map|, SSIM and HOG-descriptor Pearson on "
                    "|map| scaled to [0,1], each against the trained model's map, averaged over photos with 95% "
                    f"bootstrap intervals; pass if the whole interval of the rank correlation is below "
                    f"{self.threshold:g} at the {'last step' if self.mode == 'cascading' else 'output-side layer'}, "
                    f"fail if it is entirely at or above, inconclusive otherwise or on fewer than {MIN_N} photos")}


def model_randomization(model: FaceModel, inputs: torch.Tensor | np.ndarray | Sequence[Any], method: MethodSpec, *,
                        mode: Literal["cascading", "independent"] = "cascading", **kwargs: Any) -> SanityResult:
    """One-call cascading (or independent) randomization check on a batch of inputs."""
    chips = kwargs.pop("chips", None)
    targets = kwargs.pop("targets", None)
    metric = ModelRandomization(model, method, mode=mode, targets=targets, **kwargs)
    metric.update(inputs, chips=chips)
    return metric.result()


# -- data randomization -----------------------------------------------------------------------------------------
class ProbeHead(nn.Module):
    """A trained network followed by a linear probe: features → logits.

    A binary probe (one weight vector ``w``) gives the two logits ``(−z/2, z/2)`` with
    ``z = w·f + b``, so the softmax equals the probe's sigmoid and both classes have a
    non-zero gradient.
    """

    def __init__(self, trunk: nn.Module, weight: np.ndarray, bias: np.ndarray) -> None:
        super().__init__()
        self.trunk = trunk
        w = torch.as_tensor(np.atleast_2d(weight), dtype=torch.float32)
        b = torch.as_tensor(np.atleast_1d(bias), dtype=torch.float32)
        self.binary = w.shape[0] == 1
        self.probe = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            self.probe.weight.copy_(w)
            self.probe.bias.copy_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.probe(self.trunk(x).flatten(1))
        return torch.cat([-z / 2, z / 2], dim=1) if self.binary else z


def _features(net: nn.Module, x: torch.Tensor, batch_size: int) -> np.ndarray:
    with torch.inference_mode():
        return torch.cat([net(x[i:i + batch_size]).flatten(1) for i in range(0, len(x), batch_size)]).double().numpy()


def _head_model(model: FaceModel, trunk: nn.Module, probe: Any, classes: list[str], label: str) -> FaceModel:
    head = ProbeHead(trunk, probe.coef_, probe.intercept_)
    return dataclasses.replace(model, name=f"{model.name}+{label}-probe", task="classification", net=head,
                               class_names=classes, layers={k: f"trunk.{v}" for k, v in model.layers.items()})


class DataRandomization(Metric):
    """True-label probe vs shuffled-label probe maps, over a stream of batches to explain.

    `fit` trains both probes once (scikit-learn logistic regression on the network's
    features of labelled photos); each `update` adds maps of a batch for the two heads.
    ``regularization`` is the inverse strength ``C``; the default (100, weak) lets the
    shuffled-label probe memorize its labels, as the paper's network memorized randomized
    labels, and the true-label probe's cross-validated accuracy shows what it learned.
    For a classifier the probe reads its logits.
    """

    name = "data_randomization"

    def __init__(self, model: FaceModel, method: MethodSpec, *, seed: int = 0, threshold: float = PASS_THRESHOLD,
                 batch_size: int = DEFAULT_BATCH_SIZE, settings: dict[str, object] | None = None,
                 regularization: float = 100.0) -> None:
        super().__init__()
        self.model, self.method = model, method
        self.seed, self.threshold, self.batch_size = int(seed), float(threshold), int(batch_size)
        self.settings = dict(settings or {})
        self.regularization = float(regularization)
        self.heads: dict[str, FaceModel] = {}
        self.classes: list[str] = []
        self.fit_info: dict[str, object] = {}
        self.add_state("rows", [])
        self.add_state("images", 0)

    def fit(self, inputs: torch.Tensor | np.ndarray | Sequence[Any], labels: Sequence[Any]) -> dict[str, object]:
        """Train the true-label and the shuffled-label probe; returns their accuracies."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import cross_val_score

        x = _as_inputs(self.model, inputs)
        y_raw = np.asarray([str(v) for v in labels])
        if len(y_raw) != x.shape[0]:
            raise ModelError(f"{len(y_raw)} labels for {x.shape[0]} inputs")
        self.classes, y = np.unique(y_raw, return_inverse=True)
        self.classes = [str(c) for c in self.classes]
        if len(self.classes) < 2:
            raise ModelError("data randomization needs at least two distinct labels")
        trunk = copy.deepcopy(self.model.net).eval()
        feats = _features(trunk, x, self.batch_size)
        shuffled = np.random.default_rng(self.seed).permutation(y)

        def probe(labels_: np.ndarray) -> Any:
            return LogisticRegression(C=self.regularization, max_iter=5000).fit(feats, labels_)

        true_probe, shuffled_probe = probe(y), probe(shuffled)
        folds = int(min(5, np.bincount(y).min()))
        cv = float(cross_val_score(LogisticRegression(C=self.regularization, max_iter=5000), feats, y,
                                   cv=folds).mean()) if folds >= 2 else float("nan")
        self.heads = {"true": _head_model(self.model, trunk, true_probe, self.classes, "true-label"),
                      "shuffled": _head_model(self.model, trunk, shuffled_probe, self.classes, "shuffled-label")}
        self.fit_info = {
            "n_train": len(y), "classes": self.classes,
            "true_probe_train_accuracy": float(true_probe.score(feats, y)),
            "true_probe_cv_accuracy": cv,
            "shuffled_probe_train_accuracy": float(shuffled_probe.score(feats, shuffled)),
            "shuffled_labels_agreeing_with_true": float(np.mean(shuffled == y)),
        }
        return self.fit_info

    def update(self, inputs: torch.Tensor | np.ndarray | Sequence[Any], labels: Sequence[Any],
               chips: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        """Maps of both heads for a batch; the target is each image's true label in both heads."""
        if not self.heads:
            raise ModelError("call fit() before update()")
        x = _as_inputs(self.model, inputs)
        idx = [self.classes.index(str(v)) if str(v) in self.classes else -1 for v in labels]
        if -1 in idx or len(idx) != x.shape[0]:
            raise ModelError(f"labels must be one of {self.classes} per input")
        targets = [ClassScore(i, name=self.classes[i]) for i in idx]

        def maps_of(m: FaceModel) -> np.ndarray:
            return _maps(m, self.method, x, targets, chips, self.settings, self.batch_size, self.seed)

        base = maps_of(self.heads["true"])
        rows = []
        for step, label, maps in ((0, "true labels", maps_of(self.heads["true"])),
                                  (1, "shuffled labels", maps_of(self.heads["shuffled"]))):
            rows += [{"image": self.images + i, "step": step, "layer": label, "flat": bool(np.ptp(maps[i]) == 0),
                      **map_similarity(base[i], maps[i])}
                     for i in range(x.shape[0])]
        self.rows.extend(rows)
        self.images += x.shape[0]
        return rows

    def result(self) -> SanityResult:
        steps, estimates = _aggregate(self.rows, self.seed)
        if len(steps) < 2:
            raise ModelError("no batch was added: call update() first")
        return SanityResult(
            method=_method_name(self.method), model=self.model.name, check="data", steps=steps,
            threshold=self.threshold, decision=_decide(estimates[1], self.threshold, "data", steps[1].flat_maps),
            decisive_step=1,
            n_images=int(self.images), settings={**self.settings, "seed": self.seed,
                                                 "regularization": self.regularization},
            extras=dict(self.fit_info))

    def compute(self) -> dict[str, Any]:
        if not self.rows:
            return {"metric": self.name, "n": 0}
        res = self.result()
        return {"metric": self.name, **res.summary(), "steps": [dataclasses.asdict(s) for s in res.steps],
                "how_measured": ("logistic-regression probes on the network's features, trained on true and on "
                                 "shuffled labels; maps of each head for the true label compared by rank "
                                 "correlation (signed and |map|), SSIM and HOG with 95% bootstrap intervals over "
                                 f"photos; pass if the whole interval of the rank correlation is below "
                                 f"{self.threshold:g}, fail if entirely at or above, else inconclusive")}


def data_randomization(model: FaceModel, inputs: torch.Tensor | np.ndarray | Sequence[Any], labels: Sequence[Any],
                       method: MethodSpec, *, explain: Sequence[int] | None = None,
                       chips: Sequence[Any] | None = None, **kwargs: Any) -> SanityResult:
    """Train true- and shuffled-label probes on ``inputs`` and compare the method's maps of the two heads.

    ``explain``: indices of the inputs to explain (default all of them); their true labels are
    the targets in both heads.
    """
    metric = DataRandomization(model, method, **kwargs)
    x = _as_inputs(model, inputs)
    metric.fit(x, labels)
    sel = list(range(x.shape[0])) if explain is None else [int(i) for i in explain]
    metric.update(x[sel], [labels[i] for i in sel], chips=[chips[i] for i in sel] if chips is not None else None)
    return metric.result()


# -- the figure -------------------------------------------------------------------------------------------------
def plot(results: SanityResult | Sequence[SanityResult], title: str | None = None) -> np.ndarray:
    """Adebayo-style curves: each similarity measure across randomization steps, one line per method.

    The first panel shows the decisive measure (rank correlation of the maps, sign kept) with its
    95 % interval as a band, and, dashed, the rank correlation of |map| where it differs; SSIM and HOG
    are on absolute maps. Results are drawn against their step
    number, labelled with the longest result's layers, so pass results of one model and
    one check. Returns an RGB ``uint8`` array (matplotlib Agg, no display needed).
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    res = [results] if isinstance(results, SanityResult) else list(results)
    if not res:
        raise ModelError("nothing to plot")
    cmap = colormaps["tab10" if len(res) <= 10 else "tab20"]
    panels = (("rank correlation (decides)", "rank_corr"), ("SSIM of |map|", "ssim_of_abs_maps"),
              ("HOG correlation of |map|", "hog_of_abs_maps"))
    labels = [s.layer for s in max(res, key=lambda r: len(r.steps)).steps]
    width = max(11.0, 5.0 + 0.25 * len(labels) * 3)
    fig = Figure(figsize=(width, 4.6), dpi=100)
    axes = fig.subplots(1, 3, sharey=True)
    handles = []
    for ax, (name, key) in zip(axes, panels, strict=True):
        for k, r in enumerate(res):
            x = [s.step for s in r.steps]
            color = cmap(k % cmap.N)
            (line,) = ax.plot(x, [getattr(s, key) for s in r.steps], color=color, marker="o", markersize=3,
                              linewidth=1.5, label=f"{r.method} [{r.verdict}]")
            if key == "rank_corr":
                handles.append(line)
                lo = np.array([s.rank_corr_ci[0] for s in r.steps], float)
                hi = np.array([s.rank_corr_ci[1] for s in r.steps], float)
                if np.isfinite(lo).any():
                    ax.fill_between(x, lo, hi, color=color, alpha=0.15, linewidth=0)
                absolute = [s.rank_corr_of_abs_maps for s in r.steps]
                if not np.allclose(absolute, [s.rank_corr for s in r.steps]):
                    ax.plot(x, absolute, color=color, linestyle="--", linewidth=1.0, alpha=0.7)
        if key == "rank_corr":
            ax.axhline(res[0].threshold, color="gray", linewidth=0.8, linestyle=":")
        ax.set_title(name, fontsize=10)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=90, fontsize=6)
        ax.set_ylim(-1.05, 1.05)
        ax.grid(linestyle=":", linewidth=0.5)
    axes[0].set_ylabel("similarity to the trained model's map")
    fig.legend(handles=handles, loc="center right", fontsize=7, frameon=False,
               title="band: 95% interval; dashed: of |map|;\ndotted: pass threshold", title_fontsize=6)
    check = {r.check for r in res}
    fig.suptitle(title or f"Sanity check ({', '.join(sorted(check))}) — {res[0].model}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3])
