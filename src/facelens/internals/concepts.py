"""Facial concepts with TCAV: is "smiling", "female" or "child" a direction the model uses for its decision?

Testing with Concept Activation Vectors (Kim et al. 2018), run by :class:`captum.concept.TCAV`:

1. a **CAV** is the normal of a linear classifier separating a layer's activations on concept examples
   (aligned face chips: smiling faces, women, children, ...) from those on a random set of other faces;
2. the **TCAV score** is the fraction of probe faces whose target score (a class logit, or for a recognizer
   a similarity; any :mod:`facelens.targets` target) increases along the CAV: the sign of the directional
   derivative ``∇h(x) · v`` at that layer (captum's default plain layer gradients);
3. **significance**: the CAV is learned against ``R`` different random sets, and the ``R`` scores are compared
   with a two-sided Welch t-test against ``R`` scores of random sets posing as concepts (random_i vs
   random_{i+1}), as in Kim et al. (§3.2): a concept the model does not use scores like chance. A CAV whose
   held-out accuracy is near 0.5 did not find the concept in that layer; its score means nothing.

captum gives the CAVs, the activation caching and the scores; it has no significance test, so the t-test is
``scipy.stats.ttest_ind`` as in captum's TCAV tutorial. Our :class:`LinearCAVClassifier` replaces captum's
default classifier because that one shuffles with Python's global ``random`` and cannot be seeded.

Concepts from a manifest (:func:`concept_rows`): ``smiling``/``neutral`` (Face Research Lab London has the
same people both ways), ``female``/``male`` (``sex`` column) and age bands (``child``, ``young_adult``,
``senior`` from ``age``). Random sets and probes are drawn from the other photos of the manifest.
"""

from __future__ import annotations

import functools
import math
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from captum.concept import TCAV, Classifier, Concept
from torch import nn

from ..errors import FaceLensError, ModelError
from ..targets import ClassScore, Similarity, Target, UserTarget, as_target

__all__ = [
    "AGE_BANDS",
    "CONCEPT_GROUPS",
    "ConceptSet",
    "ConceptsReport",
    "LinearCAVClassifier",
    "TCAVResult",
    "TCAVScore",
    "chip_worker",
    "concept_rows",
    "concepts_report",
    "default_target",
    "expand_concepts",
    "tcav",
]

AGE_BANDS: dict[str, tuple[int, int]] = {"child": (0, 12), "young_adult": (18, 30), "senior": (60, 150)}
CONCEPT_GROUPS: dict[str, tuple[str, ...]] = {
    "smiling": ("smiling", "neutral"),
    "sex": ("female", "male"),
    "age": ("child", "senior"),
}


# -- concept examples ------------------------------------------------------------------------------
def _selector(name: str) -> Callable[[Any], bool]:
    if name == "smiling":
        return lambda r: r.dataset == "frl_london" and r.subset == "smiling"
    if name == "neutral":
        return lambda r: r.dataset == "frl_london" and r.subset == "neutral"
    if name in ("female", "male"):
        return lambda r: (r.sex or "").lower() == name
    if name in AGE_BANDS:
        lo, hi = AGE_BANDS[name]
        return lambda r: r.age is not None and lo <= r.age <= hi
    known = ", ".join([*CONCEPT_GROUPS, "neutral", "female", "male", *AGE_BANDS])
    raise FaceLensError(f"unknown concept {name!r}; concepts: {known}")


def expand_concepts(names: Sequence[str]) -> list[str]:
    """``smiling,sex,age`` → the concepts tested: smiling, neutral, female, male, child, senior."""
    out: list[str] = []
    for name in names:
        for c in CONCEPT_GROUPS.get(name, (name,)):
            _selector(c)
            if c not in out:
                out.append(c)
    if not out:
        raise FaceLensError("give at least one concept")
    return out


def concept_rows(rows: Sequence[Any], name: str) -> list[Any]:
    """The manifest rows that are examples of concept ``name``."""
    return [r for r in rows if _selector(name)(r)]


@dataclass
class ConceptSet:
    """Examples of one concept: chips as an ``N×3×H×W`` float tensor in [0, 1] (the network's input)."""

    name: str
    images: torch.Tensor = field(repr=False)
    sources: list[str] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.shape[0] < 2:
            raise FaceLensError(f"concept {self.name!r} needs at least 2 images as N×3×H×W, "
                                f"got {tuple(self.images.shape)}")


# -- captum plumbing --------------------------------------------------------------------------------
class LinearCAVClassifier(Classifier):
    """A seeded logistic-regression CAV classifier (scikit-learn) for captum's TCAV.

    Activations are divided by one global scale before fitting (the direction of the CAV is unchanged);
    ``accs`` is the accuracy on a held-out third, so a concept the layer cannot separate is visible.
    """

    def __init__(self, seed: int = 0, test_fraction: float = 0.33) -> None:
        self.seed = seed
        self.test_fraction = test_fraction
        self._coef: np.ndarray | None = None
        self._classes: np.ndarray | None = None
        self._calls = 0

    def train_and_eval(self, dataloader: Any, **kwargs: Any) -> dict[str, Any]:
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import train_test_split

        xs, ys = zip(*[(x, y) for x, y in dataloader], strict=True)
        x = torch.cat(xs).float().numpy()
        y = torch.cat(ys).numpy()
        x = x / max(float(np.abs(x).mean()), 1e-12)
        self._calls += 1
        rs = self.seed * 1000 + self._calls
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=self.test_fraction, random_state=rs, stratify=y)
        lm = LogisticRegression(C=1.0, max_iter=2000)
        lm.fit(x_tr, y_tr)
        accs = float((lm.predict(x_te) == y_te).mean())
        self._coef = lm.coef_.astype(np.float32)
        self._classes = lm.classes_
        return {"accs": torch.tensor(accs)}

    def weights(self) -> torch.Tensor:
        if self._coef is None:
            raise ModelError("the CAV classifier has not been trained")
        w = torch.from_numpy(self._coef)
        return torch.stack([-w[0], w[0]]) if w.shape[0] == 1 else w

    def classes(self) -> list[int]:
        if self._classes is None:
            raise ModelError("the CAV classifier has not been trained")
        return [int(c) for c in self._classes]


class _Scored(nn.Module):
    """The network followed by a facelens target: one scalar per image, shaped N×1 for captum (target 0)."""

    def __init__(self, net: nn.Module, target: Target) -> None:
        super().__init__()
        self.net = net
        self.target = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.target(self.net(x)).reshape(-1, 1)


def _batches(images: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [images[i:i + batch_size] for i in range(0, images.shape[0], batch_size)]


def _ttest(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided Welch t-test p-value; exact 0/1 when both samples have no spread (all runs agree)."""
    from scipy.stats import ttest_ind

    a_arr, b_arr = np.asarray(a, float), np.asarray(b, float)
    if a_arr.std() == 0 and b_arr.std() == 0:
        return 1.0 if a_arr.mean() == b_arr.mean() else 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy's precision note when one sample is constant
        return float(ttest_ind(a_arr, b_arr, equal_var=False).pvalue)


# -- results --------------------------------------------------------------------------------------
@dataclass
class TCAVScore:
    """TCAV of one concept at one layer: mean score over the random counterparts, null scores, p-value."""

    concept: str
    layer: str
    score: float
    score_std: float
    random_score: float
    random_std: float
    p_value: float
    significant: bool
    cav_accuracy: float
    scores: list[float] = field(default_factory=list)
    random_scores: list[float] = field(default_factory=list)
    magnitude: float = math.nan

    def row(self) -> dict[str, Any]:
        return {"concept": self.concept, "layer": self.layer, "tcav_score": self.score, "score_std": self.score_std,
                "random_score": self.random_score, "random_std": self.random_std, "p_value": self.p_value,
                "significant": self.significant, "cav_accuracy": self.cav_accuracy}


@dataclass
class TCAVResult:
    """TCAV scores with significance for concepts × layers, for one model and target."""

    model: str
    target: str
    layers: dict[str, str]
    scores: list[TCAVScore]
    n_examples: dict[str, int]
    n_random: int
    n_probes: int
    alpha: float
    seconds: float = 0.0

    def rows(self) -> list[dict[str, Any]]:
        return [s.row() for s in self.scores]

    def get(self, concept: str, layer: str) -> TCAVScore:
        for s in self.scores:
            if s.concept == concept and (s.layer == layer or self.layers.get(s.layer) == layer):
                return s
        raise KeyError(f"no TCAV score for {concept!r} at {layer!r}")

    def verdicts(self) -> list[str]:
        out = []
        for s in self.scores:
            verdict = "significant" if s.significant else "not significant"
            out.append(f"{s.concept} at {s.layer}: TCAV {s.score:.2f} ± {s.score_std:.2f} vs random "
                       f"{s.random_score:.2f} ± {s.random_std:.2f}, p = {s.p_value:.3g} ({verdict}; "
                       f"CAV accuracy {s.cav_accuracy:.2f})")
        return out

    def figure(self) -> np.ndarray:
        from ..explain.render import figure_to_rgb, new_figure

        concepts = list(dict.fromkeys(s.concept for s in self.scores))
        layers = list(dict.fromkeys(s.layer for s in self.scores))
        fig, ax = new_figure(figsize=(max(5.0, 1.3 * len(concepts) * max(1, len(layers)) * 0.55 + 2), 3.6))
        width = 0.8 / max(1, len(layers))
        colors = ["#9ecae1", "#4292c6", "#08519c", "#08306b", "#6baed6"]
        for j, layer in enumerate(layers):
            xs, ys, es, stars = [], [], [], []
            for i, c in enumerate(concepts):
                s = self.get(c, layer)
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(s.score)
                es.append(s.score_std)
                stars.append(s.significant)
                ax.plot([xs[-1] - width / 2, xs[-1] + width / 2], [s.random_score] * 2, color="#777", lw=1.5)
            ax.bar(xs, ys, width * 0.9, yerr=es, color=colors[j % len(colors)], label=layer, capsize=2)
            for x, y, e, st in zip(xs, ys, es, stars, strict=True):
                if st:
                    ax.text(x, min(1.02, y + e + 0.02), "*", ha="center", fontsize=11)
        ax.axhline(0.5, color="#bbb", lw=0.8, ls=":")
        ax.set_xticks(range(len(concepts)), concepts, fontsize=8)
        ax.set_ylim(0, 1.1)
        ax.set_ylabel("TCAV score", fontsize=8)
        ax.legend(fontsize=7, title="layer", title_fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.set_title(f"{self.model}: concept sensitivity of {self.target}", fontsize=9)
        return figure_to_rgb(fig)

    def caption(self) -> str:
        return (f"TCAV score: the share of {self.n_probes} probe faces whose '{self.target}' would rise if their "
                f"features at a layer moved toward the concept (e.g. more smiling). Bars: mean over {self.n_random} "
                f"CAVs, each learned against a different random set of other faces (error bar: spread); grey tick: "
                f"the same for a random set posing as a concept (chance). * = different from chance, two-sided "
                f"t-test p < {self.alpha:g}. A score near 1 means the concept pushes the output up, near 0 down.")

    def as_json(self) -> dict[str, Any]:
        return {"model": self.model, "target": self.target, "layers": self.layers, "n_examples": self.n_examples,
                "n_random": self.n_random, "n_probes": self.n_probes, "alpha": self.alpha,
                "scores": [{**s.row(), "scores": s.scores, "random_scores": s.random_scores,
                            "magnitude": s.magnitude} for s in self.scores],
                "seconds": round(self.seconds, 3)}


def tcav(net: nn.Module, layers: Sequence[str] | dict[str, str], concepts: Sequence[ConceptSet],
         randoms: Sequence[torch.Tensor] | Mapping[str, Sequence[torch.Tensor]], probes: torch.Tensor,
         target: Target | Callable[..., Any], *, alpha: float = 0.05, seed: int = 0, batch_size: int = 32,
         model_name: str = "model") -> TCAVResult:
    """TCAV of every concept at every layer with captum, and Kim et al.'s t-test against random concepts.

    ``layers``: module names of ``net`` (or ``{label: module name}``). ``randoms``: ``R ≥ 3`` random image sets,
    shared by all concepts or given per concept name (e.g. random faces that are *not* female for "female").
    Concept ``c`` gets one CAV against each random set; the null distribution comes from the random sets posing
    as concepts against the next one (``random_i`` vs ``random_{i+1 mod R}``), so it has the same number of
    runs. ``probes``: the images whose target score is differentiated.
    """
    start = time.perf_counter()
    per_concept = {c.name: list(randoms[c.name]) if isinstance(randoms, Mapping) else list(randoms) for c in concepts}
    for name, rs in per_concept.items():
        if len(rs) < 3:
            raise FaceLensError(f"TCAV's t-test needs at least 3 random sets, got {len(rs)} for {name!r}")
    if probes.dim() != 4 or probes.shape[0] < 1:
        raise FaceLensError(f"probes must be N×3×H×W with N ≥ 1, got {tuple(probes.shape)}")
    layer_map = dict(layers) if isinstance(layers, dict) else {name: name for name in layers}
    modules = dict(net.named_modules())
    for label, name in layer_map.items():
        if name not in modules:
            raise ModelError(f"no layer {name!r} ({label}) in the network")
    tgt = as_target(target)
    scored = _Scored(net, tgt).eval()
    captum_layers = [f"net.{name}" for name in layer_map.values()]
    torch.manual_seed(seed)
    ids = iter(range(1_000_000))
    made: dict[int, Concept] = {}

    def random_concepts(rs: list[torch.Tensor]) -> list[Concept]:
        out = []
        for r in rs:  # the same tensor (shared random sets) → the same captum Concept, so activations are reused
            if id(r) not in made:
                made[id(r)] = Concept(next(ids), f"random_{len(made)}", _batches(r, batch_size))
            out.append(made[id(r)])
        return out

    plan: list[tuple[Concept, list[Concept]]] = []
    experiments: list[list[Concept]] = []
    null_pairs: dict[str, list[list[Concept]]] = {}
    for c in concepts:
        cobj = Concept(next(ids), c.name, _batches(c.images, batch_size))
        counterparts = random_concepts(per_concept[c.name])
        plan.append((cobj, counterparts))
        experiments += [[cobj, r] for r in counterparts]
        pairs = [[counterparts[i], counterparts[(i + 1) % len(counterparts)]] for i in range(len(counterparts))]
        null_pairs[c.name] = pairs
        for pair in pairs:
            if pair not in experiments:
                experiments.append(pair)
    with tempfile.TemporaryDirectory(prefix="facelens-tcav-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        runner = TCAV(scored, captum_layers, model_id="m", classifier=LinearCAVClassifier(seed), save_path=tmp)
        raw = runner.interpret(probes, experiments, target=0)
        accs = {key: {layer: float(cav.stats.get("accs", math.nan)) for layer, cav in by_layer.items()}
                for key, by_layer in runner.cavs.items()}

    def key(pair: list[Concept]) -> str:
        return "-".join(str(c.id) for c in pair)

    scores = []
    for label, cl in zip(layer_map, captum_layers, strict=True):
        for cobj, counterparts in plan:
            null_scores = [float(raw[key(p)][cl]["sign_count"][0]) for p in null_pairs[cobj.name]]
            sc = [float(raw[key([cobj, r])][cl]["sign_count"][0]) for r in counterparts]
            mag = [float(raw[key([cobj, r])][cl]["magnitude"][0]) for r in counterparts]
            p = _ttest(sc, null_scores)
            acc = float(np.mean([accs[key([cobj, r])][cl] for r in counterparts]))
            scores.append(TCAVScore(
                concept=cobj.name, layer=label, score=float(np.mean(sc)), score_std=float(np.std(sc)),
                random_score=float(np.mean(null_scores)), random_std=float(np.std(null_scores)), p_value=p,
                significant=bool(p < alpha), cav_accuracy=acc, scores=sc, random_scores=null_scores,
                magnitude=float(np.mean(mag))))
    n_random = min(len(rs) for rs in per_concept.values())
    return TCAVResult(model=model_name, target=tgt.describe(), layers=layer_map, scores=scores,
                      n_examples={c.name: int(c.images.shape[0]) for c in concepts},
                      n_random=n_random, n_probes=int(probes.shape[0]), alpha=alpha,
                      seconds=time.perf_counter() - start)


# -- targets for zoo models ------------------------------------------------------------------------
def default_target(model: Any, probes: torch.Tensor, target: str | int | None = None) -> Target:
    """What TCAV differentiates: a class logit for classifiers (``fer-emotion``: happy, ``dlib-gender``: female,
    ``dlib-age``: the expected age over the 81 bins); for a recognizer the cosine similarity of each face to the
    mean embedding of the probes (the typical face of the set)."""
    if model.task == "classification":
        names = list(model.class_names or [])
        if target is None:
            if model.name == "dlib-age":
                ages = torch.arange(len(names), dtype=torch.float32)
                return UserTarget(lambda out: torch.softmax(out, 1) @ ages.to(out.dtype), label="expected age")
            target = {"fer-emotion": "happy", "dlib-gender": "female"}.get(model.name, names[0])
        if isinstance(target, str) and target.lstrip("-").isdigit():
            target = int(target)
        if isinstance(target, int):
            if not 0 <= target < len(names):
                raise ModelError(f"{model.name}: class index {target} out of range 0..{len(names) - 1}")
            return ClassScore(target, name=names[target])
        if target not in names:
            raise ModelError(f"{model.name} has no class {target!r}; classes: {', '.join(names)}")
        return ClassScore(names.index(target), name=str(target))
    if target is not None:
        raise ModelError(f"{model.name} is a recognizer: its TCAV target is similarity to the mean probe face; "
                         f"--target applies to classifiers")
    with torch.no_grad():
        ref = model.net(probes).mean(0)
    return Similarity(ref, metric="cosine", label="the mean probe face")


def _chip_batch(model: Any) -> Callable[[list[Any]], list[Any]]:
    """map_rows worker: the aligned chip of each photo (a RowFailure when it has no usable face)."""
    from ..executors import RowFailure
    from ..models import load_model

    fm = load_model(model)

    def run(rows: list[Any]) -> list[Any]:
        out: list[Any] = []
        for row in rows:
            try:
                out.append(fm.chip(row.path).image)
            except FaceLensError as exc:
                out.append(RowFailure(str(row.path), str(exc)))
        return out

    return run


def chip_worker(model: Any) -> Callable[[], Callable[[list[Any]], list[Any]]]:
    """A picklable ``make_worker`` for :func:`facelens.executors.map_rows` that cuts chips for ``model``."""
    return functools.partial(_chip_batch, model)


# -- a manifest-level report ----------------------------------------------------------------------
@dataclass
class ConceptsReport:
    """TCAV of facial concepts on a manifest, optionally with unit–region dissection (``facelens concepts``)."""

    model: str
    tcav: TCAVResult
    settings: dict[str, Any]
    dissection: Any = None  # DissectionResult
    failures: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {"model": self.model, "settings": self.settings, "tcav": self.tcav.as_json(),
                "verdicts": self.tcav.verdicts(), "notes": self.notes, "failures": self.failures,
                "dissection": self.dissection.as_json() if self.dissection is not None else None,
                "seconds": round(self.seconds, 3)}

    def html(self, *, level: int = 2) -> str:
        from ..report import html as H

        t = self.tcav
        parts = [H.figure(t.figure(), t.caption()),
                 H.table(t.rows(), caption=(f"TCAV per concept and layer (mean ± spread over {t.n_random} random "
                                            f"counterparts), chance level from a random set, two-sided t-test "
                                            f"p-value, and the held-out accuracy of the concept classifier."))]
        for note in self.notes:
            parts.append(f'<p class="note">{H.escape(note)}</p>')
        if self.dissection is not None:
            parts.append(self.dissection.html(level=level + 1))
        if self.failures:
            items = "".join(f"<li>{H.escape(f['path'])}: {H.escape(f['reason'])}</li>" for f in self.failures[:20])
            parts.append(f'<div class="bad">Photos skipped ({len(self.failures)}):<ul>{items}</ul></div>')
        how = (f"captum TCAV with plain layer gradients; CAVs by logistic regression on "
               f"{', '.join(f'{k} {v}' for k, v in t.n_examples.items())} aligned chips against {t.n_random} random "
               f"sets of other photos; {t.n_probes} probe faces; Welch t-test against a random set's scores. "
               f"Took {self.seconds:.1f} s.")
        return H.section(f"Facial concepts (TCAV) — {self.model}", parts, anchor="concepts", level=level, how=how)

    def write(self, out: Any) -> dict[str, Any]:
        from pathlib import Path

        from ..outputs import save_png, write_json
        from ..report.html import write_fragment

        out = Path(out)
        paths = {"png": save_png(out / "tcav.png", self.tcav.figure())}
        if self.dissection is not None:
            paths["dissection_png"] = save_png(out / "dissection.png", self.dissection.figure())
        paths["json"] = write_json(out / "concepts.json", self.as_json())
        paths["html"] = write_fragment(out / "concepts.html", self.html())
        return paths


def _draw(rows: Sequence[Any], k: int, rng: np.random.Generator) -> list[Any]:
    idx = rng.permutation(len(rows))[:k]
    return [rows[i] for i in idx]


def concepts_report(manifest: Any, *, model: Any = "fer-emotion", concepts: Sequence[str] = ("smiling", "sex", "age"),
                    layers: Sequence[str] = ("early", "mid", "late"), target: str | int | None = None,
                    per_concept: int = 20, n_random: int = 5, n_probes: int = 20, datasets: Sequence[str] | None = None,
                    dissect: bool = False, dissect_photos: int = 48, top: float = 0.05, iou_threshold: float = 0.1,
                    alpha: float = 0.05, executor: str = "local", address: str | None = None, batch_size: int = 16,
                    seed: int = 0) -> ConceptsReport:
    """TCAV of manifest concepts (see :func:`expand_concepts`) for a zoo model, plus optional dissection.

    Each concept gets ``per_concept`` photos; ``n_random`` random sets of the same size and ``n_probes`` probe
    faces are drawn from the other photos; a concept's random sets exclude photos of that concept (no women
    among the random faces of "female"). Chips are cut by :func:`facelens.executors.map_rows`.
    """
    from ..datasets import ManifestRow, read_manifest
    from ..executors import map_rows
    from ..models import load_model

    start = time.perf_counter()
    if per_concept < 4:
        raise FaceLensError(f"per_concept must be at least 4 (CAVs are tested on a held-out third), got {per_concept}")
    if n_random < 3:
        raise FaceLensError(f"n_random must be at least 3 for a t-test, got {n_random}")
    fm = load_model(model)
    names = expand_concepts(list(concepts))
    rows: list[ManifestRow] = read_manifest(manifest, datasets=datasets)
    depth_layers = {d: fm.layers.get(d, d) for d in layers}
    for name in depth_layers.values():
        fm.layer(name)
    rng = np.random.default_rng(seed)
    # Draw a margin of extra photos: some have no detectable face.
    margin = lambda k: k + max(3, math.ceil(0.4 * k))  # noqa: E731
    picks: dict[str, list[ManifestRow]] = {}
    used: set[str] = set()
    notes: list[str] = []
    for name in names:
        pool = [r for r in concept_rows(rows, name) if str(r.path) not in used]
        if len(pool) < 4:
            notes.append(f"concept '{name}' skipped: only {len(pool)} photos in the manifest")
            continue
        picks[name] = _draw(pool, margin(per_concept), rng)
        used.update(str(r.path) for r in picks[name])
    if not picks:
        raise FaceLensError(f"{manifest}: no concept has enough photos ({', '.join(notes)})")
    others = [r for r in rows if str(r.path) not in used]
    # Random sets exclude the concept's own kind (no women among the random faces of "female"), so some of the
    # pool is unusable for each concept: draw 1.8 × what one concept needs, plus the probes.
    need_random = math.ceil(1.8 * n_random * per_concept) + n_probes
    other_pick = _draw(others, margin(need_random), rng)
    todo = [r for v in picks.values() for r in v] + other_pick
    res = map_rows(todo, chip_worker(model if isinstance(model, str) else fm), executor=executor,  # type: ignore[arg-type]
                   address=address, batch_size=batch_size)
    chips = {str(r.path): c for r, c in zip(res.rows, res.records, strict=True)}
    sets = []
    for name, pr in picks.items():
        got = [r for r in pr if str(r.path) in chips][:per_concept]
        if len(got) < 4:
            notes.append(f"concept '{name}' skipped: only {len(got)} photos with a detectable face")
            continue
        if len(got) < per_concept:
            notes.append(f"concept '{name}': {len(got)} photos with a face (asked for {per_concept})")
        sets.append(ConceptSet(name, fm.to_tensor([chips[str(r.path)] for r in got]), [str(r.path) for r in got]))
    if not sets:
        raise FaceLensError(f"{manifest}: no concept kept at least 4 photos with a detectable face")
    pool = [r for r in other_pick if str(r.path) in chips]
    if len(pool) <= n_probes:
        raise FaceLensError(f"{manifest}: only {len(pool)} other photos with a face; need more than the "
                            f"{n_probes} probes to draw random sets")
    probes = fm.to_tensor([chips[str(r.path)] for r in pool[:n_probes]])
    rest = pool[n_probes:]
    randoms: dict[str, list[torch.Tensor]] = {}
    size = per_concept
    kept = []
    for cs in sets:
        eligible = [r for r in rest if not _selector(cs.name)(r)]
        k = min(per_concept, len(eligible) // n_random)
        if k < 4:
            notes.append(f"concept '{cs.name}' skipped: only {len(eligible)} other photos for {n_random} random sets")
            continue
        size = min(size, k)
        order = rng.permutation(len(eligible))
        randoms[cs.name] = [fm.to_tensor([chips[str(eligible[order[i * k + m]].path)] for m in range(k)])
                            for i in range(n_random)]
        kept.append(cs)
    if not kept:
        raise FaceLensError(f"{manifest}: too few other photos with a face for {n_random} random sets")
    sets = kept
    if size < per_concept:
        notes.append(f"some random sets have only {size} photos (too few other photos for {per_concept})")
    tgt = default_target(fm, probes, target)
    result = tcav(fm.net, depth_layers, sets, randoms, probes, tgt, alpha=alpha, seed=seed, model_name=fm.name)
    dis = None
    if dissect:
        from .dissection import dissect_manifest

        dis_rows = _draw(rows, dissect_photos, np.random.default_rng(seed + 1))
        dis = dissect_manifest(dis_rows, model if isinstance(model, str) else fm, layers=list(layers), top=top,
                               iou_threshold=iou_threshold, executor=executor, address=address,
                               batch_size=batch_size, seed=seed)
    if "smiling" in result.n_examples:
        notes.append("Smiling and neutral examples are the same Face Research Lab London people photographed both "
                     "ways; both are tested against random other faces, so a style shared by the whole London set "
                     "shows up in both, and only the difference between them is about the smile.")
    settings = {"manifest": str(manifest), "concepts": names, "layers": depth_layers, "target": result.target,
                "per_concept": per_concept, "n_random": n_random, "n_probes": n_probes, "datasets": datasets,
                "dissect": dissect, "dissect_photos": dissect_photos if dissect else 0, "top": top,
                "iou_threshold": iou_threshold, "alpha": alpha, "seed": seed, "executor": executor,
                "random_set_size": size}
    return ConceptsReport(model=fm.name, tcav=result, settings=settings, dissection=dis,
                          failures=[f.as_dict() for f in res.failures], notes=notes,
                          seconds=time.perf_counter() - start)
