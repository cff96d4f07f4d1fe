"""One call for "what do the filters of this model detect at each depth?": :func:`filters_report`.

It runs, with one small budget, the three parts of the workshop's first section on one model:
activation maximization at the named depths (the grid), filter statistics across depth on real faces
(table, plot, verdicts, first-layer kernels), and the dataset view of a few of the visualized channels.
``facelens filters`` and ``facelens report`` both call it; the result writes JSON, CSV, PNG and an
HTML fragment through :class:`facelens.studies.base.StudyResult`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import FaceLensError

if TYPE_CHECKING:
    from ..models.base import FaceModel
    from ..studies.base import StudyResult
    from .activation_max import ActivationMaxResult
    from .dataset_view import DatasetView
    from .filter_stats import FilterStats

__all__ = ["FiltersResult", "filters_report"]

HOW = ("Activation maximization: Adam on a decorrelated-colour Fourier image with random jitter/scale/rotation "
       "(priors listed in the JSON), compared with the unit's response to uniform noise. Statistics: "
       "activations of face chips cut by the model's own alignment; entropy = Shannon entropy of 32-bin "
       "histograms per channel (bits), correlation = mean |Pearson r| between channels over faces × positions, "
       "spatial spread = positional variance of each map relative to a uniform map; trends = Spearman ρ "
       "against depth. Receptive fields: gradient support through a linearized copy of the network.")


@dataclass
class FiltersResult:
    """Activation maximization, filter statistics and dataset views of one model."""

    model: str
    settings: dict[str, Any]
    am: ActivationMaxResult
    stats: FilterStats | None
    views: list[DatasetView] = field(default_factory=list)
    faces: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rows_in: int = 0
    seconds: float = 0.0

    def verdicts(self) -> list[str]:
        from .filter_stats import depth_verdicts

        out = []
        gains = self.am.gain
        z = self.am.z_score
        for depth in dict.fromkeys(u.layer for u in self.am.units):
            idx = [i for i, u in enumerate(self.am.units) if u.layer == depth]
            finite = [float(gains[i]) for i in idx if np.isfinite(gains[i])]
            gtxt = (f"{np.median(finite):.1f}× as much as random noise does (median)" if finite
                    else "while noise gives no positive response")
            out.append(f"{self.model} {depth}: the synthesized images excite their filters {gtxt}; "
                       f"median z = {np.median(z[idx]):.0f} noise SDs over {len(idx)} images.")
        if self.stats is not None:
            out.extend(depth_verdicts(self.stats))
        return out

    def study(self) -> StudyResult:
        """The result as a :class:`StudyResult` (figures with captions, tables, verdicts, counts)."""
        from ..studies.base import StudyResult

        s = StudyResult(study="filters", model=self.model, settings=self.settings, seconds=self.seconds)
        s.summary = {"am_seconds": round(self.am.seconds, 3), "faces": self.faces,
                     "median_gain_vs_noise": {d: float(np.median([g for u, g in zip(self.am.units, self.am.gain,
                                                                                      strict=True)
                                                                  if u.layer == d and np.isfinite(g)] or [np.nan]))
                                              for d in dict.fromkeys(u.layer for u in self.am.units)}}
        if self.stats is not None:
            s.summary["trends"] = self.stats.as_json()["trends"]
        s.verdicts = self.verdicts()
        depths = " → ".join(dict.fromkeys(u.layer for u in self.am.units))
        s.add_figure("am_grid", self.am.grid(title=f"{self.model}: images that maximize single filters"),
                     f"Images synthesized so that one filter of {self.model} responds as strongly as possible, "
                     f"one row per depth ({depths}), one column per filter (channel number above). The number "
                     "above each image says how many times more the filter responds to it than to random noise "
                     "(z = in noise standard deviations, when noise gives no positive response). Read each image "
                     "as 'the pattern this filter looks for', repeated wherever the filter can see it."
                     + (" The network sees only grey, so the images are shown in grey." if self.am.grayscale else ""))
        if self.stats is not None:
            if self.stats.kernels is not None:
                s.add_figure("kernels", self.stats.kernels, self.stats.kernels_caption)
            s.add_figure("stats", self.stats.plot(),
                         f"How the filters change from shallow (left) to deep (right) layers of {self.model}, "
                         f"measured on {self.stats.faces} real face photos. Left: entropy, how evenly spread the "
                         "filters' responses (blue) and their synthesized images (red) are. Middle: how much "
                         "filters of one layer respond together (1 = redundant). Right: how spread over the face "
                         "a filter's response is (1 = everywhere, 0 = one spot).")
            s.tables["layers"] = self.stats.rows()
        for v in self.views:
            s.add_figure(f"dataset_{v.layer}", v.figure(),
                         f"The face photos that excite {len(v.patches)} filters of the {v.layer} layer "
                         f"({v.module}) most, out of {v.rows_used} photos: each patch is the part of the photo "
                         "the filter can see (its receptive field) around its strongest response, cut from the "
                         "original photo; the number is that response.")
        s.tables["units"] = self.am.rows()
        if self.views:
            s.tables["patches"] = [{**p, "layer": v.layer} for v in self.views for p in v.rows()]
        s.notes = list(self.notes)
        s.failures = list(self.failures)
        s.counts = {"rows_in": self.rows_in, "faces_used": self.faces, "failed": len(self.failures)}
        return s

    def as_json(self, study: StudyResult | None = None) -> dict[str, Any]:
        """Every number and setting: the study's JSON plus the full per-part records."""
        data = (study or self.study()).as_json()
        data["activation_max"] = self.am.as_json()
        if self.stats is not None:
            data["filter_stats"] = self.stats.as_json()
        data["dataset_views"] = [v.as_json() for v in self.views]
        return data

    def html(self, *, level: int = 2) -> str:
        return self.study().html(level=level, how=HOW)

    def write(self, out: str | os.PathLike) -> dict[str, Path]:
        """``filters.json`` (all numbers and settings), CSV tables, PNG figures and ``filters.html``."""
        from ..outputs import write_json
        from ..report.html import write_fragment

        study = self.study()
        paths = study.write(out)
        paths["html"] = write_fragment(Path(out) / "filters.html", study.html(how=HOW))
        data = self.as_json(study)
        data["files"] = {k: p.name for k, p in paths.items()}
        paths["json"] = write_json(Path(out) / "filters.json", data)
        return paths


def filters_report(model: str | FaceModel, *, depths: Sequence[str] = ("early", "mid", "late"),
                   channels: int = 8, steps: int = 24, size: int | None = None, manifest: Any = None,
                   datasets: Sequence[str] | None = None, faces: int = 24, view_channels: int = 3, k: int = 6,
                   facets: int = 1, diversity: float = 1.0, executor: str = "local", address: str | None = None,
                   batch_size: int = 16, seed: int = 0) -> FiltersResult:
    """Activation-maximization grid, filter statistics and dataset views of one model, on a small budget.

    ``manifest`` (a CSV path or rows) supplies real faces: ``faces`` photos sampled across its datasets
    (new identities first) are cut through ``map_rows`` (``executor="ray"`` for a cluster). Without a
    manifest the two public-domain default portraits are used, which is enough to run but too few for
    the statistics to mean much (a note says so). The defaults take well under half a minute per zoo
    model on a laptop CPU; raise ``steps`` and ``faces`` for the printed figure.
    """
    from ..datasets import ManifestRow, read_manifest
    from ..models import load_model
    from .activation_max import AMSettings, pick_channels, visualize_depths
    from .dataset_view import FaceChip, dataset_view, load_chips, sample_rows
    from .filter_stats import filter_stats

    start = time.perf_counter()
    fm = load_model(model) if isinstance(model, str) else model
    for d in depths:
        fm.layer(d)  # a clear error for an unknown layer before any work
    if channels < 1 or faces < 0 or steps < 0:
        raise FaceLensError(f"channels must be >= 1, faces and steps >= 0 (got {channels}, {faces}, {steps})")
    notes: list[str] = []
    failures: list[dict[str, str]] = []
    chips: list[FaceChip] = []
    rows_in = 0
    if manifest is not None:
        rows = (read_manifest(manifest, datasets=datasets) if isinstance(manifest, (str, os.PathLike))
                else list(manifest))
        if not all(isinstance(r, ManifestRow) for r in rows):
            raise FaceLensError("manifest must be a CSV path or a list of ManifestRow")
        rows = sample_rows(rows, faces, seed=seed) if faces else []
        rows_in = len(rows)
        # workers load a zoo model by name (cheap to ship); a user's model travels pickled
        chips, mapped = load_chips(model if isinstance(model, str) else fm, rows, executor=executor,
                                   address=address, batch_size=batch_size)
        failures = [f.as_dict() for f in mapped.failures]
    else:
        from ..portraits import default_portraits

        for p in default_portraits():
            chip = fm.chip(p.image)
            chips.append(FaceChip(p.name, chip.image, np.asarray(chip.matrix, np.float64), tuple(chip.photo_shape)))
        rows_in = len(chips)
        notes.append("No manifest given: the statistics use only the two default portraits, too few to trust; "
                     "pass --manifest for real numbers.")
    face_tensor = fm.to_tensor([c.image for c in chips]) if chips else None
    settings = AMSettings(steps=steps, size=size, facets=facets, diversity=diversity if facets > 1 else 0.0,
                          seed=seed)
    am = visualize_depths(fm, depths, channels, settings, faces=face_tensor)
    stats = None
    views: list[DatasetView] = []
    if face_tensor is not None and len(face_tensor) >= 2:
        vis = {d: am.images[[i for i, u in enumerate(am.units) if u.layer == d]] for d in depths}
        if am.grayscale:
            vis = {d: np.repeat((v @ np.array([0.299, 0.587, 0.114], np.float32))[..., None], 3, -1)
                   for d, v in vis.items()}
        stats = filter_stats(fm, face_tensor, visualizations=vis)
        photo_chips = [c for c in chips if os.path.exists(c.path)]
        if view_channels and photo_chips:
            for d in depths:
                shown = sorted({u.channel for u in am.units if u.layer == d})
                pick = [shown[i] for i in pick_channels(len(shown), view_channels)]
                views.append(dataset_view(fm, d, pick, chips=photo_chips, k=k))
    elif face_tensor is None or len(face_tensor) < 2:
        notes.append("Fewer than two usable faces: filter statistics and dataset views were skipped.")
    run_settings = {"depths": list(depths), "channels": channels, "steps": steps, "size": size,
                    "manifest": str(manifest) if isinstance(manifest, (str, os.PathLike)) else
                    ("rows" if manifest is not None else None), "datasets": list(datasets) if datasets else None,
                    "faces": faces, "view_channels": view_channels, "k": k, "executor": executor, "seed": seed,
                    "activation_max": asdict(settings)}
    return FiltersResult(model=fm.name, settings=run_settings, am=am, stats=stats, views=views, faces=len(chips),
                         failures=failures, notes=notes, rows_in=rows_in, seconds=time.perf_counter() - start)
