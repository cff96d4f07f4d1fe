"""Anonymization audit: is hiding the eyes (the CNIL guideline), the face or its detail enough against a CNN?

Every mask is placed by the face's landmarks on the aligned chip the network sees
(:mod:`facelens.faces.anonymize`): eye bar, eyes + nose, mouth, full face, Gaussian blur and pixelation at
several strengths, and a user-given mask (a PNG in chip coordinates, or a list of facial regions). The
chip is cut from the *unmasked* photo, so the network gets the alignment an attacker with a good detector
(or a human clicking the eyes) would get: an upper bound on what survives the mask.

* **Recognizers** (``dlib-resnet``): re-identification. Each identity's reference photo is enrolled
  unaltered (FRL London: the neutral photo; ORL: the first of ten); its other photo(s) are anonymized and
  identified among all enrolled identities (the one-shot protocol of :mod:`facelens.studies.recognition`).
  We report rank-1, the share of anonymized photos still verified as the same person at the model's own
  threshold (0.6 L2 for dlib), and TAR at FAR = 1e-2 and 1e-3 (n/a when there are too few impostor
  pairs), each rate with a 95 % interval and its sample size.
* **Classifiers** (``dlib-gender``, ``dlib-age``, ``fer-emotion``): the workshop's table, i.e. the
  confidence in the class predicted on the unmasked face, how much masking drops it, and how often the
  predicted class changes.

Verdicts come from :func:`facelens.evaluate.verdict.decide` on 95 % intervals (Wilson, widened to the
identity-cluster bootstrap; never of zero width), never from point estimates, and read *supported*, *not
supported* or *inconclusive*:

* recognizers, per setting and dataset: "the anonymized photos are still re-identified" = rank-1 above
  chance + :data:`~facelens.studies.recognition.REID_MARGIN` (20 %) of the way from chance to certain.
  Supported: the anonymization is not enough; not supported: it defeats re-identification on these
  photos; inconclusive: the interval straddles the bar, or fewer than 8 identities. A full-face mask at
  chance therefore reads "not supported" (or "inconclusive" on a handful of people), never "partial";
* classifiers: "keeps its unmasked answer" (over :data:`CLASS_KEPT` of photos keep the class), "the
  confidence drops by over :data:`CLASS_DROP`", and for ordered classes (ages) "the expected value barely
  moves" (below :data:`CLASS_SHIFT_SHARE` × the spread between people).

The self-test on images without a manifest is labelled an illustration and decides nothing. A saliency
figure shows where the network looked on the masked faces (a cheap method, Grad-CAM by default).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
import tempfile
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..datasets import ManifestRow
from ..errors import FaceLensError
from ..evaluate.stats import Estimate, mean_interval, rate_interval
from ..evaluate.verdict import Verdict, decide
from ..evaluate.verification import VerificationRates, verification_rates
from ..faces.anonymize import ANONYMIZATIONS, DEFAULT_STRENGTHS, Anonymization, anonymize
from ..matching import Matcher, Metric, pairwise_scores
from .base import StudyResult, StudySpec, register_study
from .features import Variant, extract
from .recognition import (
    ALTERATIONS,
    FARS,
    REID_MARGIN,
    above_chance,
    add_protocol_args,
    columns,
    illustration_label,
    images_to_rows,
    is_rows,
    manifest_rows,
    one_shot_splits,
    pct,
    tiny_note,
)

if TYPE_CHECKING:
    from ..models.base import FaceModel

__all__ = ["CLASS_DROP", "CLASS_KEPT", "CLASS_SHIFT_SHARE", "DEFAULT_METHODS", "Reidentification", "UserMask",
           "anonymization_audit", "anonymization_settings", "anonymization_variants", "load_user_mask", "reidentify"]

#: every built-in method but the user mask, in the order tables show them
DEFAULT_METHODS: tuple[str, ...] = ("eye_bar", "eyes_nose", "mouth", "full_face", "blur", "pixelate")
ORIGINAL = "original"


# -- settings and masks -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class UserMask:
    """A user-given mask: facial regions (placed per face by landmarks) or a fixed PNG in chip coordinates."""

    label: str
    regions: tuple[str, ...] | None = None
    pixels: np.ndarray | None = dataclasses.field(default=None, compare=False, hash=False)


def load_user_mask(spec: str) -> UserMask:
    """``spec`` is a PNG file (white = hide; any size, scaled to the chip) or comma-separated region names
    (``eyes,nose``; see :data:`facelens.faces.regions.REGION_NAMES` and ``REGION_GROUPS``)."""
    from ..faces.regions import REGION_GROUPS, REGION_NAMES

    path = Path(spec).expanduser()
    if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff") or path.is_file():
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                gray = np.asarray(im.convert("L"))
        except FileNotFoundError:
            raise FaceLensError(f"{path}: mask file not found") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise FaceLensError(f"{path}: not a readable mask image ({exc})") from None
        mask = gray > 127
        if not mask.any():
            raise FaceLensError(f"{path}: the mask hides nothing (no pixel brighter than 127; white = hide)")
        return UserMask(f"mask {path.stem}", None, mask)
    names = tuple(n.strip() for n in spec.split(",") if n.strip())
    unknown = [n for n in names if n not in REGION_NAMES and n not in REGION_GROUPS]
    if not names or unknown:
        raise FaceLensError(f"--mask {spec!r}: not a mask file, and {', '.join(unknown) or 'no name'} is not a region; "
                            f"regions: {', '.join(REGION_NAMES)}; groups: {', '.join(REGION_GROUPS)}")
    return UserMask("mask " + "+".join(names), names, None)


def _user_mask_variant(image: np.ndarray, landmarks68: np.ndarray, *, regions: tuple[str, ...] | None = None,
                       pixels: np.ndarray | None = None) -> np.ndarray:
    """Black over the user's regions (placed by this face's landmarks) or over the PNG scaled to the chip."""
    import cv2

    from ..faces.regions import region_masks, regions_union

    h, w = image.shape[:2]
    if regions is not None:
        area = regions_union(region_masks((h, w), landmarks68), regions)
    else:
        area = cv2.resize(np.asarray(pixels, np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
    return anonymize(image, landmarks68, "mask", mask=area)


def anonymization_settings(methods: Sequence[str] = DEFAULT_METHODS,
                           strengths: Mapping[str, Sequence[float]] | None = None) -> list[Anonymization]:
    """One :class:`Anonymization` per method, and per strength for blur and pixelation."""
    out: list[Anonymization] = []
    for m in methods:
        if m == "mask":
            raise FaceLensError("give the user mask with --mask (a PNG file or region names), not in --methods")
        if m not in ANONYMIZATIONS:
            raise FaceLensError(f"unknown anonymization {m!r}; choose from {', '.join(DEFAULT_METHODS)}")
        if m in DEFAULT_STRENGTHS:
            levels = (strengths or {}).get(m, DEFAULT_STRENGTHS[m])
            out.extend(Anonymization(m, float(s)) for s in levels)
        else:
            out.append(Anonymization(m))
    return out


def anonymization_variants(settings: Sequence[Anonymization], masks: Sequence[UserMask] = ()) -> list[Variant]:
    """Picklable chip variants for :func:`facelens.studies.features.extract`: the original first."""
    out: list[Variant] = [(ORIGINAL, None)]
    for s in settings:
        out.append((s.label, functools.partial(anonymize, method=s.method, strength=s.strength)))
    for m in masks:
        out.append((m.label, functools.partial(_user_mask_variant, regions=m.regions, pixels=m.pixels)))
    return out


def parse_strengths(items: Sequence[str] | None) -> dict[str, list[float]]:
    """``["blur=0.05,0.15", "pixelate=0.1"]`` → ``{"blur": [0.05, 0.15], "pixelate": [0.1]}``."""
    out: dict[str, list[float]] = {}
    for item in items or ():
        name, _, values = item.partition("=")
        name = name.strip()
        if name not in DEFAULT_STRENGTHS or not values:
            raise FaceLensError(f"--strengths {item!r}: use METHOD=S1,S2 with METHOD one of "
                                f"{', '.join(DEFAULT_STRENGTHS)} (strengths × inter-ocular distance)")
        try:
            out[name] = [float(v) for v in re.split(r"[,/ ]+", values.strip()) if v]
        except ValueError:
            raise FaceLensError(f"--strengths {item!r}: strengths must be numbers") from None
    return out


# -- recognizers: re-identification ---------------------------------------------------------------------------
def _reid(rows: Sequence[ManifestRow], model_name: str, fm: FaceModel, variants: Sequence[Variant], res: StudyResult,
          *, reference_subset: str | None, probe_subset: str | None, executor: str, address: str | None,
          batch_size: int, seed: int, n_boot: int, illustration: int) -> list[tuple[ManifestRow, ManifestRow]]:
    """Fill ``res`` with the re-identification table and verdicts; returns (probe, reference) examples.

    ``illustration`` is the number of self-test portraits (0 for a manifest run): their results are labelled
    and decide nothing.
    """
    splits, notes = one_shot_splits(rows, reference_subset=reference_subset, probe_subset=probe_subset)
    res.notes.extend(notes)
    if not splits:
        raise FaceLensError("no dataset in these rows has ≥2 identities with a second photo, so re-identification "
                            "cannot be measured. " + " ".join(notes))
    ref_rows = [rows[i] for s in splits for i in s.references]
    probe_rows = [rows[i] for s in splits for i in s.probes]
    refs = extract(ref_rows, model_name, executor=executor, address=address, batch_size=batch_size)
    probes = extract(probe_rows, model_name, variants, executor=executor, address=address, batch_size=batch_size)
    res.failures = [f.as_dict() for f in (*refs.failures, *probes.failures)]
    ref_rec = {r.path: rec for r, rec in zip(refs.rows, refs.records, strict=True)}
    probe_rec = {r.path: rec for r, rec in zip(probes.rows, probes.records, strict=True)}
    matcher = Matcher.for_model(fm)
    thr = matcher.score_threshold
    thr_text = f"{fm.match_threshold:g} L2" if fm.match_threshold is not None else "its threshold"
    names = [n for n, _ in variants]
    table: list[dict[str, Any]] = []
    found: dict[str, list[Reidentification]] = defaultdict(list)
    examples: list[tuple[ManifestRow, ManifestRow]] = []
    for split in splits:
        g_idx = [i for i in split.references if rows[i].path in ref_rec]
        lost = {rows[i].identity for i in split.references if rows[i].path not in ref_rec}
        p_idx = [i for i in split.probes if rows[i].path in probe_rec and rows[i].identity not in lost]
        if lost:
            res.notes.append(f"{split.dataset}: {len(lost)} identities lost their reference photo (unreadable or no "
                             f"face), so their probes were dropped")
        if len(g_idx) < 2 or not p_idx:
            res.notes.append(f"{split.dataset}: too few usable photos after failures; skipped")
            continue
        res.settings.setdefault("protocol", {})[split.dataset] = split.rule
        g_labels = [str(rows[i].identity) for i in g_idx]
        p_labels = [str(rows[i].identity) for i in p_idx]
        gallery = np.stack([ref_rec[rows[i].path].outputs[ORIGINAL] for i in g_idx])
        ref_of = {str(rows[i].identity): rows[i] for i in g_idx}
        seen: set[str] = set()
        for i in p_idx:
            ident = str(rows[i].identity)
            if ident not in seen and len(examples) < 2:
                examples.append((rows[i], ref_of[ident]))
                seen.add(ident)
        for name in names:
            queries = np.stack([probe_rec[rows[i].path].outputs[name] for i in p_idx])
            r = reidentify(gallery, g_labels, queries, p_labels, metric=matcher.metric, score_threshold=thr,
                           model=fm.name, dataset=split.dataset, setting=name, n_boot=n_boot, seed=seed,
                           illustration=bool(illustration))
            table.append(r.row())
            found[name].append(r)
            res.summary.setdefault("rank1", {}).setdefault(split.dataset, {})[name] = r.rank1.as_dict()
            if r.verified is not None:
                res.summary.setdefault("verified_at_threshold", {}).setdefault(split.dataset, {})[name] = \
                    r.verified.as_dict()
        unresolved = [f for f in FARS if len(p_idx) * (len(g_idx) - 1) * f < 1]
        if unresolved:
            res.notes.append(f"{split.dataset}: TAR at FAR {', '.join(f'{f:g}' for f in unresolved)} is n/a: "
                             f"{len(p_idx) * (len(g_idx) - 1)} impostor pairs cannot resolve a false accept rate "
                             f"that small")
    if not table:
        raise FaceLensError("no dataset had enough usable photos for re-identification; see the skipped photos")
    res.tables["reidentification"] = table
    base = {r.dataset: r.rank1 for r in found.get(ORIGINAL, [])}
    decided: list[dict[str, Any]] = []
    if illustration:  # said once, before the numbers it qualifies
        res.verdicts.append(f"{illustration_label(illustration)}: the lines below are numbers, not findings.")
    for name in names:
        for r in found[name]:
            res.verdicts.append(_reid_sentence(name, r, base.get(r.dataset), fm.name, thr_text, illustration))
            decided.append({"setting": name, "dataset": r.dataset, **r.verdict.as_dict()})
    res.summary["verdicts"] = decided
    res.settings["reid_margin"] = REID_MARGIN
    res.add_figure("reidentification", _reid_figure(table, names, thr_text, bool(illustration)),
                   _REID_CAPTION.format(thr=thr_text, margin=100 * REID_MARGIN))
    res.counts.update({"reference_photos": len(ref_rows), "probe_photos": len(probe_rows),
                       "variants_per_probe": len(variants)})
    return examples


@dataclasses.dataclass(frozen=True)
class Reidentification:
    """One setting on one dataset: rank-1, verification at the threshold, and the decided claim."""

    dataset: str
    setting: str
    verdict: Verdict
    rank1: Estimate
    verified: Estimate | None  # genuine pairs accepted at the threshold
    false_accepts: Estimate | None  # impostor pairs accepted at the threshold
    identities: int
    probes: int
    chance: float
    bar: float
    rates: VerificationRates
    mean_genuine_distance: float | None

    def row(self) -> dict[str, Any]:
        """The table row (CSV columns; every rate with its interval)."""
        method, strength = _setting_of(self.setting)
        row: dict[str, Any] = {
            "dataset": self.dataset, "setting": self.setting, "method": method, "strength": strength,
            "identities": self.identities, "probes": self.probes, **columns("rank1", self.rank1),
            "chance_rank1": self.chance, "reid_bar": self.bar, "still_reidentified": self.verdict.status,
        }
        if self.verified is not None and self.false_accepts is not None:
            row.update(**columns("verified_at_threshold", self.verified),
                       **columns("false_accepts_at_threshold", self.false_accepts))
        for f in FARS:
            row[f"tar_at_far_{f:g}"] = self.rates.tar_at_far[f]
        row.update(auc=self.rates.auc, genuine_pairs=self.rates.n_genuine, impostor_pairs=self.rates.n_impostor,
                   mean_genuine_distance=self.mean_genuine_distance)
        return row


def reidentify(gallery: np.ndarray, gallery_labels: Sequence[str], queries: np.ndarray, probe_labels: Sequence[str],
               *, metric: Metric, score_threshold: float | None, model: str = "the model", dataset: str = "data",
               setting: str = ORIGINAL, n_boot: int = 1000, seed: int = 0,
               illustration: bool = False) -> Reidentification:
    """Match (anonymized) probe features against the enrolled gallery and decide "still re-identified".

    The claim is rank-1 above chance + :data:`~facelens.studies.recognition.REID_MARGIN` of the way to
    certain (:func:`~facelens.studies.recognition.above_chance`), decided on the identity-cluster interval
    of rank-1; ``illustration`` marks a self-test, which decides nothing.
    """
    g_labels, p_labels = [str(g) for g in gallery_labels], [str(p) for p in probe_labels]
    s = pairwise_scores(np.asarray(queries), np.asarray(gallery), metric)
    mates = np.asarray([[g == p for g in g_labels] for p in p_labels], bool)
    imp_owner = np.broadcast_to(np.asarray(p_labels, dtype=object)[:, None], mates.shape)[~mates]
    hits = np.asarray([g_labels[j] == p for j, p in zip(s.argmax(1), p_labels, strict=True)])
    gen, imp = s[mates], s[~mates]
    opts = dict(n_boot=n_boot, seed=seed)
    r1 = rate_interval(hits, p_labels, **opts)
    ver = rate_interval(gen >= score_threshold, p_labels, **opts) if score_threshold is not None else None
    fa = rate_interval(imp >= score_threshold, imp_owner, **opts) if score_threshold is not None else None
    chance = 1 / len(set(g_labels))
    bar = above_chance(chance)
    verdict = decide(_reid_claim(setting, dataset, model, bar, chance), r1, bar, unit="identities",
                     illustration=illustration)
    return Reidentification(dataset, setting, verdict, r1, ver, fa, len(set(g_labels)), len(p_labels), chance, bar,
                            verification_rates(gen, imp, fars=FARS, score_threshold=score_threshold),
                            float(-gen.mean()) if metric == "l2" and len(gen) else None)


def _setting_of(label: str) -> tuple[str, float | None]:
    method, _, strength = label.partition(" ")
    try:
        return method, float(strength) if strength else None
    except ValueError:
        return label, None


def _reid_claim(name: str, dataset: str, model: str, bar: float, chance: float) -> str:
    """The claim decided per setting: the anonymized photos are still re-identified (see :func:`above_chance`)."""
    what = "the unmasked photos" if name == ORIGINAL else f"photos anonymized with '{name.replace('_', ' ')}'"
    return (f"{dataset}: {model} still re-identifies {what} (rank-1 above {bar:.3f}, i.e. chance {chance:.3f} + "
            f"{100 * REID_MARGIN:.0f}% of the way to certain)")


def _reid_sentence(name: str, r: Reidentification, base: Estimate | None, model: str, thr_text: str,
                   illustration: int) -> str:
    """The verdict sentence with plain words that follow from its status alone, then the context numbers."""
    label = "unmasked baseline" if name == ORIGINAL else name.replace("_", " ")
    status = r.verdict.status
    if illustration:
        words = ""
    elif name == ORIGINAL:
        words = {"supported": " The unmasked photos are re-identified, so the settings below are measured against "
                              "a working recognizer.",
                 "not supported": " Even unmasked photos are not re-identified: the settings below say little."
                 }.get(status, " Cannot tell whether the unmasked photos are re-identified.")
    else:
        words = {"supported": f" So '{label}' is not enough against {model}.",
                 "not supported": f" So '{label}' defeats {model}'s re-identification on these photos (at best "
                                  f"alignment; see the note on placement)."
                 }.get(status, f" Cannot tell from these photos whether '{label}' is enough against {model}.")
    context = [f"{r.probes} probes"]
    if base is not None and name != ORIGINAL:
        context.append(f"unmasked {pct(base)}")
    if r.verified is not None and r.false_accepts is not None:
        context.append(f"{pct(r.verified)} still verified as the same person at {thr_text}, against "
                       f"{pct(r.false_accepts)} of impostor pairs")
    if illustration:  # no claim to state: the numbers only (the section says once that they decide nothing)
        return (f"{label}: rank-1 {pct(r.rank1)} among {r.identities} identities (chance {100 * r.chance:.0f}%); "
                f"{'; '.join(context)}.")
    return f"{label} — {r.verdict.sentence()}{words} ({'; '.join(context)}.)"


_REID_CAPTION = ("How often an anonymized photo is still matched to the right person. Top: the enrolled "
                 "(unmasked) photo of the same person is the closest of all enrolled people (rank-1); dashes mark "
                 "chance (guessing among the enrolled people), dots the bar a setting must clear to count as still "
                 "re-identified (chance + {margin:.0f}% of the way to certain). Bottom: the anonymized photo is still "
                 "accepted as the same person at the model's own threshold ({thr}). Bars show the share, whiskers "
                 "the 95% interval.")


def _reid_figure(table: list[dict[str, Any]], names: Sequence[str], thr_text: str,
                 illustration: bool = False) -> np.ndarray:
    from ..explain.render import figure_to_rgb, new_figure

    datasets = list(dict.fromkeys(r["dataset"] for r in table))
    wide = min(14.0, max(7.0, 0.5 * len(names) * len(datasets) + 3))
    fig, axes = new_figure(2, 1, figsize=(wide, 7.2), squeeze=False)
    width = 0.8 / len(datasets)
    x = np.arange(len(names))
    tag = " (illustration: self-test without a manifest)" if illustration else ""
    panels = [("rank1", "rank-1 re-identification")]
    if "verified_at_threshold" in table[0]:
        panels.append(("verified_at_threshold", f"still verified at {thr_text}"))
    for panel, (key, title) in enumerate(panels):
        ax = axes[panel, 0]
        for d, ds in enumerate(datasets):
            rows = {r["setting"]: r for r in table if r["dataset"] == ds}
            v = np.array([rows[n][key] if n in rows else np.nan for n in names], float)
            lo = np.array([rows[n][f"{key}_ci_low"] if n in rows else np.nan for n in names], float)
            hi = np.array([rows[n][f"{key}_ci_high"] if n in rows else np.nan for n in names], float)
            pos = x - 0.4 + width * (d + 0.5)
            first = next(iter(rows.values()))
            ax.bar(pos, v, width, color=f"C{d}", label=f"{ds} ({first['probes']} probes, {first['identities']} "
                                                       f"identities)")
            ax.errorbar(pos, v, yerr=[np.clip(v - lo, 0, None), np.clip(hi - v, 0, None)], fmt="none", ecolor="k",
                        capsize=2, lw=0.8)
            if key == "rank1":  # chance and the bar of this dataset, drawn across each of its bars
                ok = np.isfinite(v)
                ax.hlines(np.full(ok.sum(), first["chance_rank1"]), pos[ok] - width / 2, pos[ok] + width / 2,
                          colors="k", linestyles="--", lw=1, zorder=3)
                ax.hlines(np.full(ok.sum(), first["reid_bar"]), pos[ok] - width / 2, pos[ok] + width / 2,
                          colors="k", linestyles=":", lw=1.5, zorder=3)
        ax.set_xticks(x)
        ax.set_xticklabels([n.replace("_", " ") for n in names], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.set_ylabel("share of anonymized photos")
        ax.set_title(title + tag, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        if panel == 0:
            ax.plot([], [], "k--", lw=1, label="chance")
            ax.plot([], [], "k:", lw=1.5, label=f"bar: chance + {100 * REID_MARGIN:.0f}% of the way to certain")
            ax.legend(fontsize=8, loc="upper right", framealpha=0.9)
    if len(panels) == 1:
        axes[1, 0].axis("off")
    return figure_to_rgb(fig)


# -- classifiers: confidence drop and class change ---------------------------------------------------------
def _numeric_classes(names: Sequence[str]) -> np.ndarray | None:
    """Class values when every class name is a number or a range ('0-1' → 0.5), e.g. dlib-age's years."""
    vals = []
    for n in names:
        try:
            parts = [float(p) for p in str(n).rstrip("+").split("-")]
        except ValueError:
            return None
        vals.append(float(np.mean(parts)))
    return np.asarray(vals)


def _classify(rows: Sequence[ManifestRow], model_name: str, fm: FaceModel, variants: Sequence[Variant],
              res: StudyResult, *, executor: str, address: str | None, batch_size: int, seed: int,
              n_boot: int, illustration: int) -> list[tuple[ManifestRow, ManifestRow | None]]:
    """Fill ``res`` with the workshop's table: confidence in the unmasked class, its drop, class changes.

    Intervals resample people (a person's photos are not independent); ``illustration`` as in :func:`_reid`.
    """
    mr = extract(rows, model_name, variants, executor=executor, address=address, batch_size=batch_size)
    res.failures = [f.as_dict() for f in mr.failures]
    if not mr.records:
        raise FaceLensError("no photo could be used (all unreadable or without a face); see the skipped photos")
    classes = list(fm.class_names or [])
    names = [n for n, _ in variants]

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    probs = {n: softmax(np.stack([np.asarray(r.outputs[n], np.float64) for r in mr.records])) for n in names}
    top0 = probs[ORIGINAL].argmax(1)
    ar = np.arange(len(top0))
    conf0 = probs[ORIGINAL][ar, top0]
    values = _numeric_classes(classes)
    truth = [str(r.sex).lower() if r.sex else None for r in mr.rows]
    has_truth = set(classes) == {"female", "male"} and sum(t in classes for t in truth) >= 2
    people = [f"{r.dataset}:{r.identity}" if r.identity else str(r.path) for r in mr.rows]
    unit = "identities" if len(set(people)) < len(people) else "photos"
    opts = dict(n_boot=n_boot, seed=seed)
    spread = float(np.std(probs[ORIGINAL] @ values)) if values is not None else float("nan")
    table, examples_rows, decided = [], [], []
    for n in names:
        p = probs[n]
        conf = p[ar, top0]
        changed = p.argmax(1) != top0
        drop = _spread_or_none(mean_interval(conf0 - conf, people, **opts))
        ch = rate_interval(changed, people, **opts)
        kept = rate_interval(~changed, people, **opts)
        row: dict[str, Any] = {"setting": n, "photos": len(conf), unit: len(set(people)),
                               "confidence_unmasked": float(conf0.mean()), "confidence_after": float(conf.mean()),
                               **columns("confidence_drop", drop), **columns("class_changed", ch)}
        shift = None
        if values is not None:
            shift = _spread_or_none(mean_interval(np.abs(p @ values - probs[ORIGINAL] @ values), people, **opts))
            row.update(columns("mean_abs_shift", shift))
            aged = [i for i, r in enumerate(mr.rows) if r.age is not None]
            if len(aged) >= 2:  # the manifest's own ages: how far off the estimate is, masked vs unmasked
                err = np.abs(p[aged] @ values - np.asarray([mr.rows[i].age for i in aged], float))
                mae = _spread_or_none(mean_interval(err, [people[i] for i in aged], **opts))
                row.update(**columns("mae_vs_label", mae), labelled_photos=len(aged))
        if has_truth:
            ok = [i for i, t in enumerate(truth) if t in classes]
            acc = rate_interval([classes[int(p[i].argmax())] == truth[i] for i in ok], [people[i] for i in ok],
                                **opts)
            row.update({**columns("accuracy_vs_label", acc), "labelled_photos": acc.n})
        if n == ORIGINAL:
            verdicts: list[Verdict] = []
        elif shift is not None:
            verdicts = [decide(f"{n.replace('_', ' ')}: {fm.name}'s expected value barely moves (mean shift below "
                               f"{CLASS_SHIFT_SHARE:g} × the spread between people, {CLASS_SHIFT_SHARE * spread:.2f})",
                               shift, CLASS_SHIFT_SHARE * spread, direction="below", unit=unit,
                               illustration=bool(illustration))]
        else:
            verdicts = [decide(f"{n.replace('_', ' ')}: {fm.name} keeps its unmasked answer (for over "
                               f"{100 * CLASS_KEPT:.0f}% of photos)", kept, CLASS_KEPT, unit=unit,
                               illustration=bool(illustration)),
                        decide(f"{fm.name}'s confidence in that answer drops by over {CLASS_DROP:g}", drop,
                               CLASS_DROP, unit=unit, illustration=bool(illustration))]
        if verdicts:
            row["verdict"] = verdicts[0].status
        table.append(row)
        decided.extend({"setting": n, **v.as_dict()} for v in verdicts)
        res.summary.setdefault("class_changed", {})[n] = ch.as_dict()
        res.summary.setdefault("confidence_drop", {})[n] = drop.as_dict()
        res.verdicts.append(_class_sentence(n, fm.name, verdicts, ch, drop, shift, spread, len(conf), illustration))
    res.tables["classifier"] = table
    res.summary["verdicts"] = decided
    res.settings.update(class_kept=CLASS_KEPT, confidence_drop_threshold=CLASS_DROP,
                        shift_share_of_spread=CLASS_SHIFT_SHARE)
    for i, r in enumerate(mr.rows[:6]):
        ex: dict[str, Any] = {"photo": Path(r.path).name}
        for n in names:
            k = int(probs[n][i].argmax())
            ex[n] = f"{classes[k]} ({probs[n][i, k]:.2f})"
        examples_rows.append(ex)
    res.tables["examples"] = examples_rows
    res.add_figure("classifier", _class_figure(table, bool(illustration)), _CLASS_CAPTION.format(model=fm.name))
    if values is not None:
        res.notes.append("mean_abs_shift: mean absolute change of the expected value over the classes "
                         "(for dlib-age: years), masked vs unmasked.")
    res.notes.append("Class changes are measured against the model's own prediction on the unmasked face, not "
                     "against the truth" + (" (accuracy_vs_label compares with the manifest's self-reported sex)."
                                            if has_truth else ".")
                     + f" Verdicts: 'keeps its answer' is supported when the whole interval of the share of photos "
                       f"keeping the unmasked class lies above {CLASS_KEPT:g}; 'confidence drops' when the whole "
                       f"interval of the mean drop lies above {CLASS_DROP:g}; for ordered classes (ages), 'barely "
                       f"moves' when the mean shift's interval lies below {CLASS_SHIFT_SHARE:g} × the spread of the "
                       f"unmasked estimates between people. The unmasked row has no interval for drop and shift: "
                       f"they are 0 by definition.")
    res.counts.update({"photos": len(mr.rows), "variants_per_photo": len(variants)})
    return [(r, None) for r in mr.rows[:2]]


#: a classifier "keeps its answer" through a mask when over this share of photos keep the unmasked class
CLASS_KEPT = 0.8
#: "masking costs confidence": the mean drop in the unmasked class's probability exceeds this
CLASS_DROP = 0.1
#: ordered classes (ages): the expected value "barely moves" below this share of the spread between people
CLASS_SHIFT_SHARE = 0.25


def _spread_or_none(e: Estimate) -> Estimate:
    """A bootstrap interval of zero width means every value was equal (e.g. the unmasked row's drop of 0):
    report no interval rather than one that claims certainty."""
    if e.finite and e.width <= 0:
        return dataclasses.replace(e, lo=float("nan"), hi=float("nan"))
    return e


def _class_sentence(name: str, model: str, verdicts: Sequence[Verdict], ch: Estimate, drop: Estimate,
                    shift: Estimate | None, spread: float, n_photos: int, illustration: int) -> str:
    """Each decided claim with plain words that follow from its status alone, then the context numbers."""
    label = name.replace("_", " ")
    if name == ORIGINAL:
        extra = f"; the estimates differ between people by {spread:.1f} (standard deviation)" \
            if np.isfinite(spread) else ""
        lead = f"{illustration_label(illustration)}: the lines below are numbers, not findings. " \
            if illustration else ""
        return f"{lead}unmasked baseline: {n_photos} photos, the reference every setting is compared with{extra}."
    if illustration:  # no claim to state: the numbers only (said once, on the baseline's line)
        moved = f"; the expected value moves by {shift.text(2)}" if shift is not None else ""
        return f"{label}: class changed for {pct(ch)}; mean confidence drop {drop.text(2)}{moved}."
    words = ""
    if not illustration:
        first = verdicts[0].status
        if shift is not None:
            words = {"supported": " The estimate barely moves: masking does not hide it.",
                     "not supported": f" The estimate moves by more than {CLASS_SHIFT_SHARE:g} × the spread between "
                                      f"people: masking disturbs it."
                     }.get(first, " Cannot tell from these photos how much masking moves the estimate.")
        else:
            words = {"supported": f" So {label} does not hide the attribute from {model}.",
                     "not supported": f" {label.capitalize()} changes {model}'s answer for more than "
                                      f"{100 * (1 - CLASS_KEPT):.0f}% of photos.",
                     }.get(first, f" Cannot tell from these photos whether {label} hides the attribute from {model}.")
    body = " ".join(v.sentence() for v in verdicts)
    context = f"class changed for {pct(ch)}"
    if shift is not None:
        context += (f"; mean confidence drop {drop.text(2)}; the top one of the fine-grained classes changes "
                    f"easily, so the shift of the expected value is what is decided")
    return f"{body}{words} ({context}.)"


_CLASS_CAPTION = ("What masking does to {model}'s answer. Left: how often the predicted class differs from the one "
                  "it gave on the unmasked face. Right: how much the confidence in that original class drops. "
                  "Whiskers are 95% intervals over people.")


def _class_figure(table: list[dict[str, Any]], illustration: bool = False) -> np.ndarray:
    from ..explain.render import figure_to_rgb, new_figure

    names = [r["setting"] for r in table]
    tag = " (illustration)" if illustration else ""
    fig, axes = new_figure(1, 2, figsize=(min(15.0, max(8.0, 1.2 * len(names))), 3.8), squeeze=False)
    x = np.arange(len(names))
    for ax, key, title in ((axes[0, 0], "class_changed", "class changed"),
                           (axes[0, 1], "confidence_drop", "confidence drop (original class)")):
        v = np.array([r[key] for r in table], float)
        lo = np.array([r[f"{key}_ci_low"] for r in table], float)
        hi = np.array([r[f"{key}_ci_high"] for r in table], float)
        ax.bar(x, v, 0.7, color="C0" if key == "class_changed" else "C3")
        err = np.nan_to_num([np.clip(v - lo, 0, None), np.clip(hi - v, 0, None)])
        ax.errorbar(x, v, yerr=err, fmt="none", ecolor="k", capsize=2, lw=0.8)
        ax.set_xticks(x)
        ax.set_xticklabels([n.replace("_", " ") for n in names], rotation=30, ha="right", fontsize=8)
        ax.set_title(title + tag, fontsize=10)
        ax.axhline(0, color="k", lw=0.6)
        ax.grid(axis="y", alpha=0.3)
        if key == "class_changed":
            ax.set_ylim(0, 1.05)
            ax.set_ylabel("share of photos")
    return figure_to_rgb(fig)


# -- where the model looked -------------------------------------------------------------------------------
def _saliency_figure(fm: FaceModel, examples: Sequence[tuple[ManifestRow, ManifestRow | None]],
                     variants: Sequence[Variant], method: str) -> tuple[np.ndarray, str] | None:
    """Rows: example faces; columns: the enrolled reference (recognizers) and the probe under each setting."""
    from ..explain.api import get_method
    from ..explain.render import figure_to_rgb, new_figure, overlay
    from ..targets import ClassScore, Similarity

    shown = _shown_variants(variants)
    cells: list[list[tuple[np.ndarray, str]]] = []
    explainer = get_method(method)(fm, batch_size=32, seed=0, progress=False)
    for probe_row, ref_row in examples:
        try:
            chip = fm.chip(probe_row.path)
            ref_chip = fm.chip(ref_row.path) if ref_row is not None else None
        except FaceLensError:
            continue
        row_cells: list[tuple[np.ndarray, str]] = []
        if ref_chip is not None:
            ref_emb = fm.forward_chips(ref_chip)[0]
            row_cells.append((ref_chip.image, f"enrolled\n{Path(ref_row.path).name}"))  # type: ignore[union-attr]
            target: Any = Similarity(ref_emb, "cosine", label="the enrolled photo")
        else:
            logits0 = fm.forward_chips(chip)[0]
            k0 = int(np.argmax(logits0))
            target = ClassScore(k0, name=(fm.class_names or [])[k0])
        for name, fn in shown:
            img = chip.image if fn is None else np.asarray(fn(chip.image, chip.landmarks))
            alt = dataclasses.replace(chip, image=img)
            sal = explainer.attribute(fm.to_tensor(img), target, chips=[alt])[0].numpy()
            out = fm.forward_chips(img)[0]
            if ref_chip is not None:
                dist = float(np.linalg.norm(out - ref_emb))
                thr = fm.match_threshold
                verdict = "" if thr is None else (" match" if dist < thr else " no match")
                title = f"{name.replace('_', ' ')}\nd={dist:.2f}{verdict}"
            else:
                p = np.exp(out - out.max())
                p /= p.sum()
                title = f"{name.replace('_', ' ')}\n{(fm.class_names or [])[int(p.argmax())]} {p.max():.2f}"
            row_cells.append((overlay(img, sal, signed=explainer.signed, alpha=0.45), title))
        cells.append(row_cells)
    if not cells:
        return None
    n_rows, n_cols = len(cells), max(len(c) for c in cells)
    fig, axes = new_figure(n_rows, n_cols, figsize=(1.75 * n_cols, 2.15 * n_rows), squeeze=False)
    for r, row_cells in enumerate(cells):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(row_cells):
                ax.imshow(row_cells[c][0])
                ax.set_title(row_cells[c][1], fontsize=7)
    rgb = figure_to_rgb(fig)
    if examples and examples[0][1] is not None:
        caption = (f"Where {fm.name} looked ({method}, warm colours = more weight) when matching an anonymized photo "
                   f"to the person's enrolled photo (left column, unmasked). Each further column is the same probe "
                   f"photo under one anonymization; 'd' is the embedding distance to the enrolled photo and "
                   f"'match' means it is still accepted as the same person.")
    else:
        caption = (f"Where {fm.name} looked ({method}, warm colours = more weight) for its unmasked answer, on the "
                   f"same face under each anonymization; titles give the class it predicts then and its confidence.")
    return rgb, caption


def _shown_variants(variants: Sequence[Variant]) -> list[Variant]:
    """The original, every fixed mask, and the middle strength of each graded method."""
    graded: dict[str, list[Variant]] = defaultdict(list)
    out: list[Variant] = []
    for v in variants:
        method, strength = _setting_of(v[0])
        if strength is not None and method in DEFAULT_STRENGTHS:
            graded[method].append(v)
        else:
            out.append(v)
    for vs in graded.values():
        out.append(vs[len(vs) // 2])
    return out


# -- the study --------------------------------------------------------------------------------------------
def anonymization_audit(rows_or_images: Sequence[ManifestRow] | Sequence[Any] | None = None,
                        model: str | FaceModel = "dlib-resnet", *, methods: Sequence[str] = DEFAULT_METHODS,
                        strengths: Mapping[str, Sequence[float]] | None = None, masks: Sequence[UserMask | str] = (),
                        reference_subset: str | None = None, probe_subset: str | None = None,
                        saliency: str | None = "gradcam", executor: str = "local", address: str | None = None,
                        batch_size: int = 16, seed: int = 0, n_boot: int = 1000) -> StudyResult:
    """Audit anonymizations against ``model`` on manifest rows, or on a few images as an illustration.

    Recognizers get the re-identification audit, classifiers the confidence/class-change table (see the
    module docstring). With images (arrays, paths or :class:`~facelens.portraits.Portrait`; ``None`` = the two
    default portraits) each image is its own identity, enrolled unaltered and probed with anonymized, altered
    copies of itself (flip, crop, side light); every result is labelled an illustration and gives no verdict.
    ``saliency`` names an explanation method for the where-it-looked figure (None to skip).
    """
    from ..models import load_model

    start = time.perf_counter()
    if rows_or_images is None:
        from ..portraits import default_portraits

        rows_or_images = default_portraits()
    fm = load_model(model) if isinstance(model, str) else model
    model_name: Any = model if isinstance(model, str) else fm
    if saliency and saliency != "none":
        from ..explain.api import get_method

        get_method(saliency)  # an unknown method fails now, not after the whole run
    user_masks = [m if isinstance(m, UserMask) else load_user_mask(m) for m in masks]
    settings = anonymization_settings(methods, strengths)
    variants = anonymization_variants(settings, user_masks)
    tiny = not is_rows(rows_or_images)
    res = StudyResult("anonymization", fm.name, settings={
        "settings": [n for n, _ in variants], "strengths_unit": "× inter-ocular distance",
        "placement": "landmark-placed on the aligned chip cut from the unmasked photo", "seed": seed,
        "saliency": saliency, "task": fm.task})
    with tempfile.TemporaryDirectory(prefix="facelens-anon-") as tmp:
        if tiny:
            images = list(rows_or_images)  # type: ignore[arg-type]
            if fm.task == "embedding" and len(images) < 2:
                raise FaceLensError("re-identification needs at least 2 images (2 identities)")
            rows = images_to_rows(images, tmp)
            reference_subset, probe_subset = "reference", "altered"
            res.settings["input"] = f"{len(images)} given images with {len(ALTERATIONS)} altered copies each"
        else:
            rows = list(rows_or_images)  # type: ignore[arg-type]
        n_tiny = len(rows_or_images) if tiny else 0  # type: ignore[arg-type]
        common = dict(executor="local" if tiny else executor, address=address, batch_size=batch_size, seed=seed,
                      n_boot=n_boot, illustration=n_tiny)
        if fm.task == "embedding":
            examples: Sequence[tuple[ManifestRow, ManifestRow | None]] = _reid(
                rows, model_name, fm, variants, res, reference_subset=reference_subset, probe_subset=probe_subset,
                **common)  # type: ignore[arg-type]
        else:
            examples = _classify(rows, model_name, fm, variants, res, **common)  # type: ignore[arg-type]
        if saliency and saliency != "none":
            fig = _saliency_figure(fm, examples, variants, saliency)
            if fig is not None:
                res.add_figure("saliency", fig[0], fig[1])
    if fm.task == "embedding":
        res.notes.insert(0, "How: per dataset, each identity's reference photo is enrolled unmasked; every other photo "
                            "of that identity is anonymized and compared with all enrolled photos. Rank-1 = the "
                            "right person is the closest; verified = the distance to the own enrolled photo is below "
                            "the model's threshold; TAR at FAR = genuine pairs accepted at the threshold where that "
                            "share of impostor pairs is accepted. Intervals (95%): Wilson, widened to an identity "
                            "bootstrap where a person has several probes; never of zero width. Verdict per setting "
                            "and dataset: 'still re-identifies' is supported when the whole rank-1 interval lies "
                            f"above chance + {100 * REID_MARGIN:.0f}% of the way from chance to certain (then the "
                            "anonymization is not enough), not supported when it lies below (the anonymization "
                            "defeats re-identification on these photos), and inconclusive when it straddles that bar "
                            "or rests on fewer than 8 identities.")
    if tiny:
        n = len(rows_or_images)  # type: ignore[arg-type]
        res.notes.insert(0, tiny_note(n, len(ALTERATIONS), "anonymization") if fm.task == "embedding" else
                         f"{illustration_label(n)}. {n} photos and {n * len(ALTERATIONS)} altered copies of them: "
                         f"it shows the pipeline runs and measures nothing; for real numbers run `facelens audit "
                         f"anonymization --manifest ../shared/faces/manifest.csv`.")
        res.failures = [{"path": Path(f["path"]).name.split("__")[0], "reason": f["reason"]} for f in res.failures]
    res.notes.append("Masks are placed on the aligned chip cut from the unmasked photo: the network gets the "
                     "alignment an attacker with a good detector (or a human marking the eyes) would get, so these "
                     "numbers are what survives the mask at best alignment. A real masked photo may also defeat the "
                     "face detector, which is a weaker protection than it looks.")
    res.counts = {"rows_in": len(rows), "failed": len(res.failures), **res.counts}
    res.seconds = time.perf_counter() - start
    return res


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated anonymizations: {', '.join(DEFAULT_METHODS)}")
    p.add_argument("--strengths", action="append", default=None, metavar="METHOD=S1,S2",
                   help="strengths (× inter-ocular distance) for blur/pixelate, e.g. --strengths blur=0.05,0.15,0.4 "
                        f"(defaults: {'; '.join(f'{k} {v}' for k, v in DEFAULT_STRENGTHS.items())})")
    p.add_argument("--mask", action="append", default=[], metavar="PNG|REGIONS",
                   help="a user mask: a PNG in chip coordinates (white = hide, scaled to the chip) or facial "
                        "regions, e.g. 'eyes,nose' (repeatable)")
    p.add_argument("--saliency", default="gradcam",
                   help="explanation method for the where-it-looked figure (gradcam, occlusion, ...; 'none' to skip)")
    add_protocol_args(p)


def _run(args: argparse.Namespace) -> StudyResult:
    rows = manifest_rows(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    return anonymization_audit(rows, args.model, methods=methods, strengths=parse_strengths(args.strengths),
                               masks=args.mask, reference_subset=args.reference_subset,
                               probe_subset=args.probe_subset, saliency=args.saliency, executor=args.executor,
                               address=args.address, batch_size=args.batch_size, seed=args.seed,
                               n_boot=args.bootstrap)


register_study(StudySpec("anonymization", "is masking the eyes (CNIL), the face, or blurring enough? re-identification "
                         "for recognizers, confidence drop and class change for classifiers", _run, _add_args))
