"""Where the network looks: outputs, saliency maps side by side, region attention by depth, agreement,
faithfulness and sanity verdicts for one model over the report's photos.

Everything here is computed by the library (``explain``, ``evaluate``); this module only chooses the
small, fast settings of the default report and arranges the results as numbers and figures. Numbers
keep their intervals and controls: faithfulness is measured beside the control maps and compared by
the evaluation's own paired rule, the target's range is shown with it, and every map whose method did
not pass its sanity check carries a visible warning. Only supported verdicts become findings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import FaceLensError
from ..evaluate.agreement import spearman, topk_iou
from ..evaluate.controls import CONTROLS, control_maps
from ..evaluate.deletion import DeletionInsertion
from ..evaluate.runner import compare_maps
from ..evaluate.sanity import ModelRandomization, parameterized_layers
from ..explain.api import explain, resolve_target
from ..explain.explanation import Explanation
from ..explain.render import figure_grid, figure_to_rgb, new_figure
from ..explain.target_range import mean_range, measure_range
from ..faces.regions import REGION_GROUPS
from ..models.base import FaceModel
from . import html as H
from .inputs import InputPhoto

__all__ = ["DEFAULT_METHODS", "LooksResult", "where_it_looks"]

#: the default report's methods: one CAM, one path-integral gradient, one propagation rule, one perturbation
DEFAULT_METHODS: tuple[str, ...] = ("gradcam", "integrated-gradients", "lrp", "occlusion")
#: cheap settings that keep the default report within its time budget
FAST_SETTINGS: dict[str, dict[str, object]] = {
    "gradcam": {"all_depths": True},
    "integrated-gradients": {"n_steps": 16},
    "smoothgrad": {"n_samples": 8},
    "rise": {"n_masks": 500},
    "lime": {"n_samples": 300},
    "kernelshap": {"n_samples": 300},
    "region-lime": {"n_samples": 300},
    "region-shap": {"n_samples": 256},
    "dise": {"n_masks": 500},
}
#: the report's eight bars: the landmark regions, left and right merged (from the shared region groups)
ATTENTION_GROUPS: dict[str, tuple[str, ...]] = {
    "eyes": REGION_GROUPS["eyes"], "brows": REGION_GROUPS["brows"], "nose": ("nose",), "mouth": ("mouth",),
    "cheeks": REGION_GROUPS["cheeks"], "forehead": ("forehead",), "chin/jaw": ("chin_jaw",),
    "outside face": REGION_GROUPS["outside_face"],
}


@dataclass
class LooksResult:
    """The section's numbers (``data``), its HTML, and the per-photo errors."""

    model: str
    data: dict[str, Any] = field(default_factory=dict)
    html: str = ""
    errors: list[dict[str, str]] = field(default_factory=list)


def _group_shares(mass: dict[str, float]) -> dict[str, float]:
    return {g: float(sum(mass.get(r, 0.0) for r in names)) for g, names in ATTENTION_GROUPS.items()}


def _outputs(model: FaceModel, chip: Any) -> dict[str, Any]:
    out = model.forward_chips(chip)[0]
    if model.task == "classification":
        probs = torch.softmax(torch.from_numpy(out).double(), 0).numpy()
        order = np.argsort(-probs)[:3]
        names = model.class_names or []
        top = [{"class": names[i], "probability": float(probs[i])} for i in order]
        if model.name == "dlib-age":
            from ..models.dlib_age_gender import expected_age

            return {"top3": top, "expected_age": float(expected_age(probs))}
        return {"top3": top}
    return {"embedding_norm": float(np.linalg.norm(out)), "embedding": out.astype(np.float64)}


def _attention_figure(model: str, shares: dict[str, dict[str, float]]) -> np.ndarray:
    fig, ax = new_figure(figsize=(7.5, 2.8))
    groups = list(ATTENTION_GROUPS)
    width = 0.8 / max(len(shares), 1)
    for i, (method, s) in enumerate(shares.items()):
        ax.bar(np.arange(len(groups)) + i * width, [100 * s[g] for g in groups], width, label=method)
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups, fontsize=8)
    ax.set_ylabel("% of saliency", fontsize=8)
    ax.set_title(f"{model}: where the saliency falls (mean over photos)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    return figure_to_rgb(fig)


def where_it_looks(model: FaceModel, photos: Sequence[InputPhoto], *, methods: Sequence[str] = DEFAULT_METHODS,
                   reference: InputPhoto | None = None, sanity: bool = True, faithfulness_steps: int = 12,
                   seed: int = 0) -> LooksResult:
    """Explain every usable photo with every method and measure what the maps are worth."""
    res = LooksResult(model.name)
    ref_chip = None
    if reference is not None and reference.image is not None and model.task == "embedding":
        ref_chip = model.chip(reference.image)
    per_photo: list[dict[str, Any]] = []
    grids: list[tuple[np.ndarray, str]] = []
    ranges: list[Any] = []
    xs: list[torch.Tensor] = []
    targets: list[Any] = []
    maps: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    shares: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    chips = []
    for photo in photos:
        if photo.image is None:
            continue
        try:
            chip = model.chip(photo.image)
        except FaceLensError as exc:
            res.errors.append({"photo": photo.name, "reason": str(exc)})
            continue
        target = resolve_target(model, chip, None, ref_chip)
        entry: dict[str, Any] = {"photo": photo.name, "outputs": _outputs(model, chip), "target": target.describe()}
        levels = measure_range(model.net, model.to_tensor(chip), target)[0]  # once per face, for every method
        ranges.append(levels)
        exps: list[Explanation] = []
        for m in methods:
            e = explain(model, photo.image, m, target, face=chip.face, seed=seed, target_range=levels,
                        **FAST_SETTINGS.get(m, {}))
            exps.append(e)
            maps[m].append(e.chip_map)
        entry["methods"] = {}
        for e in exps:
            info: dict[str, Any] = {"seconds": e.seconds, "library": e.library}
            if chip.face is not None:
                att = e.region_attention()
                info["region_share"] = _group_shares(att.mass)
                info["top_regions"] = [r for r, _ in att.top(3)]
                shares[e.method].append(info["region_share"])
                if e.extras.get("depths"):
                    info["region_share_by_depth"] = {d: _group_shares(a.mass) for d, a in e.depth_attention().items()}
                    info["depth_layers"] = dict(e.extras.get("depth_layers") or {})
                    info["depth_shapes"] = dict(e.extras.get("depth_shapes") or {})
            entry["methods"][e.method] = info
        if "gradcam" in methods and "occlusion" in methods:
            g, o = exps[list(methods).index("gradcam")].chip_map, exps[list(methods).index("occlusion")].chip_map
            entry["gradcam_vs_occlusion"] = {"spearman": spearman(g, o), "top10_iou": topk_iou(g, o, 0.1)}
        per_photo.append(entry)
        xs.append(model.to_tensor(chip))
        targets.append(target)
        chips.append(chip)
        grids.append((figure_grid(exps, title=f"{model.name} · {photo.name}: {target.describe()}"),
                      f"{photo.name}, {model.name}: the maps of {len(exps)} methods on the aligned face "
                      f"the network sees. Warm colours mark the pixels that raised the score "
                      f"({target.describe()}, in {target.unit}); blue, in signed maps, those that lowered it."))
    res.data["photos"] = [{k: v for k, v in p.items() if k != "outputs"} | {"outputs": _public(p["outputs"])}
                          for p in per_photo]
    if not per_photo:
        res.html = H.section(f"Where {model.name} looks", '<p class="bad">No usable face in any input photo.</p>',
                             level=3)
        return res
    if model.task == "embedding" and len(per_photo) > 1:
        res.data["matches"] = _match_table(model, per_photo)
    x = torch.cat(xs)
    res.data["target"] = mean_range(ranges)
    res.data["faithfulness"], res.data["comparisons"] = _faithfulness(model, x, targets, chips, maps,
                                                                      faithfulness_steps, seed)
    if sanity:
        res.data["sanity"] = _sanity(model, methods, x, targets, chips, seed)
    mean_shares = {m: {g: float(np.mean([s[g] for s in v])) for g in ATTENTION_GROUPS} for m, v in shares.items() if v}
    res.data["region_share_mean"] = mean_shares
    res.data["findings"] = _findings(model, res.data)
    warnings = _sanity_warnings(res.data.get("sanity", []), sanity)
    figures = [H.figure(grid, caption) + warnings for grid, caption in grids]
    res.html = _html(model, res.data, figures, mean_shares)
    return res


def _public(outputs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in outputs.items() if k != "embedding"}


def _match_table(model: FaceModel, per_photo: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for i in range(len(per_photo)):
        for j in range(i + 1, len(per_photo)):
            a, b = per_photo[i]["outputs"]["embedding"], per_photo[j]["outputs"]["embedding"]
            d = model.distance(a, b)
            rows.append({"photo_a": per_photo[i]["photo"], "photo_b": per_photo[j]["photo"], "distance": d,
                         "threshold": model.match_threshold,
                         "same_person": bool(model.match_threshold is not None and d < model.match_threshold)})
    return rows


def _faithfulness(model: FaceModel, x: torch.Tensor, targets: list[Any], chips: list[Any],
                  maps: dict[str, list[np.ndarray]], steps: int,
                  seed: int) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Deletion and insertion AUC of every method and control map, on the explanation's own target, with
    intervals over the photos and the paired comparisons against the controls (the evaluation's rule)."""
    labels = [f"photo {i}" for i in range(len(chips))]
    all_maps = dict(maps)
    ctl = [control_maps(c.image, lab, seed) for c, lab in zip(chips, labels, strict=True)]
    all_maps.update({c: [m[c] for m in ctl] for c in CONTROLS})
    rows, per_image = [], {}
    for method, ms in all_maps.items():
        row: dict[str, Any] = {"map": method, "control": method in CONTROLS, "n_photos": len(ms)}
        for mode in ("deletion", "insertion"):
            metric = DeletionInsertion(model.net, mode=mode, baseline="blur", steps=steps, progress=False, seed=seed)
            metric.update(x, np.stack(ms).astype(np.float32), targets, labels)
            c = metric.compute()
            per_image[(mode, method)] = metric.per_image_auc()
            row[f"{mode}_auc"] = c["auc_mean"]
            row[f"{mode}_ci"] = c["ci"]
            row[f"{mode}_auc_normalized"] = c["auc_normalized_mean"]
        rows.append(row)
    methods = list(maps)
    pairs = [(m, c) for m in methods for c in CONTROLS]
    comparisons = {}
    for mode, better, claim in (("deletion", "below", "has a lower deletion AUC"),
                                ("insertion", "above", "has a higher insertion AUC")):
        values = {m: per_image[(mode, m)] for m in all_maps}
        comparisons[mode] = compare_maps(values, labels, better=better, claim=claim, pairs=pairs, seed=seed)
    return rows, comparisons


def _sanity(model: FaceModel, methods: Sequence[str], x: torch.Tensor, targets: list[Any], chips: list[Any],
            seed: int) -> list[dict[str, Any]]:
    """Cascading randomization read at its decisive step (every layer random), in one step, on every photo.

    Re-initialization uses per-layer seeds, so randomizing all layers at once gives exactly the network
    the full cascade ends with; the report skips the intermediate steps to stay fast. The targets are the
    explanations' own, fixed while the weights change.
    """
    layers = parameterized_layers(model.net, x)
    rows = []
    for m in methods:
        settings = dict(FAST_SETTINGS.get(m, {}))
        if m == "gradcam":
            settings["all_depths"] = False
        check = ModelRandomization(model, m, mode="cascading", layers=[layers], seed=seed, settings=settings,
                                   self_check=False)
        check.update(x, targets, chips=chips)
        r = check.result()
        s = r.summary()
        rows.append({"method": m, "verdict": r.verdict, "rank_corr": s["rank_corr"], "ci": s["ci"],
                     "ssim_of_abs_maps": s["ssim_of_abs_maps"], "ssim_of_abs_maps_ci": s["ssim_of_abs_maps_ci"],
                     "threshold": r.threshold, "n_photos": r.n_images, "reason": r.decision.reason,
                     "sentence": r.decision.sentence()})
    return rows


def _sanity_warnings(rows: list[dict[str, Any]], ran: bool) -> str:
    """The warning printed under every map grid: which methods did not pass their sanity check, and why."""
    if not ran:
        return ('<p class="bad">Sanity checks were switched off: nothing here shows whether these maps depend on '
                "what the network learned.</p>")
    groups: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        if r["verdict"] != "pass":
            groups.setdefault((r["verdict"], r["reason"]), []).append(r["method"])
    if not groups:
        return ""
    items = "; ".join(f"{', '.join(methods)}: {verdict} ({reason})" for (verdict, reason), methods in groups.items())
    return (f'<p class="bad">⚠ Sanity check not passed, so do not read these maps as what the network uses: '
            f"{H.escape(items)}.</p>")


def _findings(model: FaceModel, data: dict[str, Any]) -> list[str]:
    """Supported verdicts only: a method beating the random map on a faithfulness curve, a passed sanity check."""
    out = []
    for mode, comps in data.get("comparisons", {}).items():
        out.extend(f"{model.name}, {mode}: {c['sentence']}" for c in comps
                   if c["b"] == "random" and c["status"] == "supported")
    out.extend(f"{model.name}, sanity check of {r['method']}: {r['sentence']}" for r in data.get("sanity", [])
               if r["verdict"] == "pass")
    return out


def _ci(v: list[float | None] | tuple[float, float]) -> str:
    lo, hi = v
    return "—" if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)) else f"[{lo:.3g}, {hi:.3g}]"


def _html(model: FaceModel, data: dict[str, Any], figures: list[str], mean_shares: dict[str, dict[str, float]]) -> str:
    parts: list[str] = list(figures)
    out_rows = []
    for p in data["photos"]:
        o = p["outputs"]
        if "top3" in o:
            top = ", ".join(f"{t['class']} {t['probability']:.2f}" for t in o["top3"])
            extra = f"; expected age {o['expected_age']:.1f}" if "expected_age" in o else ""
            out_rows.append({"photo": p["photo"], "model output (top 3)": top + extra})
    if out_rows:
        parts.append(H.table(out_rows, caption="What the classifier answered (softmax probabilities)."))
    if data.get("matches"):
        parts.append(H.table(data["matches"], caption="Face matching between the input photos: Euclidean distance "
                                                     "of the 128-d embeddings; below the threshold means "
                                                     "'same person' by dlib's published rule."))
    if mean_shares:
        parts.append(H.figure(_attention_figure(model.name, mean_shares),
                              "Share of each method's saliency that falls on each facial region, from the 68 "
                              "landmarks. Methods that agree on the regions are more believable."))
    depth_rows = []
    for p in data["photos"]:
        g = p["methods"].get("gradcam", {})
        for depth, shares in (g.get("region_share_by_depth") or {}).items():
            layer = g.get("depth_layers", {}).get(depth, "")
            shape = g.get("depth_shapes", {}).get(depth)
            where = f"{layer}, {shape[0]}×{shape[1]}" if shape else layer
            depth_rows.append({"photo": p["photo"], "depth": depth, "layer": where}
                              | {k: round(100 * v, 1) for k, v in shares.items()})
    if depth_rows:
        parts.append(H.table(depth_rows, caption=(
            "Grad-CAM at the early, mid and late layer (layer name and map resolution given): % of the map on each "
            "region. A coarse map spreads over neighbouring regions; whether a depth concentrates on the face is "
            "what the table measures, not what it assumes.")))
    agree = [{"photo": p["photo"], **p["gradcam_vs_occlusion"]} for p in data["photos"] if "gradcam_vs_occlusion" in p]
    if agree:
        parts.append(H.table(agree, caption="Does Grad-CAM agree with occlusion (which measures the effect of hiding "
                                            "each patch directly)? Spearman rank correlation of the maps (1 = same "
                                            "order) and overlap of their top 10% pixels."))
    t = data.get("target") or {}
    if t:
        imp = (f", impostor median {t['impostor_median']:.3g} ({t.get('impostor_source', '')})"
               if t.get("impostor_median") is not None else "")
        own = ", each for its own top class" if model.task == "classification" else ""
        parts.append(f'<p class="how">Target range, means over {t["n"]} photo(s){own}, in {H.escape(t["unit"])}: '
                     f'intact {t["intact"]:.3g}, fully blurred {t["deleted_blur"]:.3g}, mean-filled '
                     f'{t["deleted_mean"]:.3g}{H.escape(imp)}. Deletion curves start at the intact level and end at '
                     "the fully blurred one (insertion the other way round); in between they can pass beyond "
                     "either, since a partly removed face can score lower than a fully removed one.</p>")
    faith = [{"map": r["map"] + (" (control)" if r["control"] else ""), "photos": r["n_photos"],
              "deletion AUC": r["deletion_auc"], "95% interval (deletion)": _ci(r["deletion_ci"]),
              "insertion AUC": r["insertion_auc"], "95% interval (insertion)": _ci(r["insertion_ci"])}
             for r in data["faithfulness"]]
    parts.append(H.table(faith, caption=(
        "Faithfulness: deletion AUC (remove the most salient pixels first, blurring them; lower is better) and "
        "insertion AUC (restore them first; higher is better), in the target's unit, with 95% bootstrap intervals "
        "over the photos. The controls (a seeded random map, the image's edges, a centre prior) show what a map "
        "must beat: a method is better than random only where the comparison below says 'supported'.")))
    comp_rows = [{"metric": mode, "comparison": f"{c['a']} vs {c['b']}", "difference": c["difference"],
                  "interval": _ci(c["ci"]), "level": f"{100 * c['level']:.3g}%", "photos": c["n"],
                  "verdict": c["status"]}
                 for mode, comps in data.get("comparisons", {}).items() for c in comps if c["b"] == "random"]
    if comp_rows:
        parts.append(H.table(comp_rows, caption=(
            "Each method against the random map on the same photos: the mean paired difference of AUC with its "
            "interval (Bonferroni-adjusted over the comparisons). Supported: the whole interval is on the better "
            "side; inconclusive: it contains 0, or fewer than 8 photos were measured.")))
    if data.get("sanity"):
        rows = [{"method": r["method"], "verdict": r["verdict"],
                 "rank correlation with the trained map": r["rank_corr"], "95% interval": _ci(r["ci"]),
                 "SSIM of |map|": r["ssim_of_abs_maps"], "photos": r["n_photos"],
                 "why": r["reason"]} for r in data["sanity"]]
        parts.append(H.table(rows, caption=(
            "Sanity check (Adebayo et al.): each map of the trained network against the map of the same network with "
            "every layer re-initialized, for the same photo and target. Pass: the whole 95% interval of the rank "
            "correlation is below 0.5 (the map changed); fail: the whole interval is at or above 0.5 (the map shows "
            "the image, not what the network learned); inconclusive: the interval contains 0.5, or fewer than 8 "
            "photos.")))
    return H.section(f"Where {model.name} looks", parts, anchor=f"looks-{model.name}", level=3,
                     how="one aligned face per photo; maps on the model's input chip; regions from dlib's "
                         "68 landmarks; timings are wall-clock on this machine")
