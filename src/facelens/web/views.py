"""HTML for the page's result panels: overlays side by side, region bars, output tables.

Results are HTML with the images inline as data URIs (through `facelens.report.html`), so a
result never becomes a file in the server's cache: nothing derived from a user's face is left
on disk. Every number is printed rounded and, under "All numbers", at full precision as JSON,
which is what the end-to-end tests compare with the Python API.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np

from ..report.html import escape, figure, table
from .compute import Analysis, AnonymizationEffect, Verification

__all__ = ["CSS", "analysis_html", "anonymization_html", "error_html", "live_html", "numbers_block",
           "verification_html"]

CSS = """
.fl-row{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
.fl-row figure{margin:0;max-width:240px}.fl-row figure img{width:220px;height:auto;image-rendering:auto}
.fl-row figcaption{font-size:.85em}
.fl-bars{min-width:260px;max-width:360px}.fl-bars h4{margin:.2em 0;font-size:.95em}
.fl-bar{display:flex;align-items:center;gap:6px;font-size:.82em;margin:2px 0}
.fl-bar .lab{width:92px;text-align:right}.fl-bar .track{flex:1;background:#e8eaf0;height:12px;border-radius:2px}
.fl-bar .fill{height:12px;background:#d9534f;border-radius:2px}.fl-bar .val{width:52px;text-align:right}
table.fl{border-collapse:collapse;font-size:.9em;margin:.6em 0}
table.fl th,table.fl td{border:1px solid #ccd;padding:.25em .55em;text-align:right}
table.fl th{background:#f1f2f6}table.fl td.t{text-align:left}
table.fl caption{caption-side:bottom;text-align:left;font-size:.85em;color:#555;padding-top:.3em}
.fl-error{background:#fdecea;border-left:4px solid #d93025;padding:.5em .8em}
.fl-note{font-size:.85em;color:#555}
pre.fl-numbers{font-size:.75em;max-height:300px;overflow:auto;white-space:pre-wrap}
.fl-live img{max-width:100%;height:auto}
"""


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def numbers_block(numbers: Mapping[str, object], kind: str) -> str:
    """The full-precision numbers of a panel, collapsed, as JSON (``data-kind`` names the panel)."""
    text = json.dumps(numbers, indent=1, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
    return (f'<details><summary>All numbers ({escape(kind)}, full precision)</summary>'
            f'<pre class="fl-numbers" data-kind="{escape(kind)}">{escape(text)}</pre></details>')


def error_html(message: str) -> str:
    return f'<div class="fl-error" role="alert"><b>Could not do that:</b> {escape(message)}</div>'


def _bars(method: str, mass: Mapping[str, float]) -> str:
    rows = [f'<div class="fl-bars" data-method="{escape(method)}"><h4>{escape(method)}</h4>']
    top = max(mass.values(), default=0.0) or 1.0
    for region, share in sorted(mass.items(), key=lambda kv: -kv[1]):
        rows.append(
            f'<div class="fl-bar" data-region="{escape(region)}" data-value="{share!r}">'
            f'<span class="lab">{escape(region)}</span><span class="track">'
            f'<span class="fill" style="display:block;width:{100 * share / top:.1f}%"></span></span>'
            f'<span class="val">{_pct(share)}</span></div>')
    rows.append("</div>")
    return "".join(rows)


def _outputs_table(a: Analysis) -> str:
    out = a.outputs
    if a.task == "classification":
        probs = out["probabilities"]
        assert isinstance(probs, Mapping)
        rows = [{"class": k, "probability": float(v)} for k, v in probs.items()]
        return table(rows, caption=f"{a.model}: its five most probable classes for this face (softmax of its logits).",
                     digits=4)
    rows = [{"quantity": "embedding size", "value": out["embedding_size"]},
            {"quantity": "embedding length (L2 norm)", "value": out["embedding_norm"]}]
    if "distance" in out:
        rows += [{"quantity": "distance to the reference", "value": out["distance"]},
                 {"quantity": "cosine similarity to the reference", "value": out["cosine"]},
                 {"quantity": "same person?", "value": out.get("same_person")}]
    return table(rows, caption=f"{a.model}: what the recognizer outputs for this face"
                 + (f" (same person when the distance is below {out['threshold']:g})." if "distance" in out else "."),
                 digits=4)


def score_text(e: object) -> str:
    """The score with its unit and the range it lives in (intact, fully removed face, impostor level)."""
    r = getattr(e, "target_range", None)
    if r is None:
        return f"score {e.score:.4g}"  # type: ignore[attr-defined]
    imp = f", a stranger's face about {r.impostor:.3g}" if r.impostor is not None else ""
    return f"score {r.intact:.3g} {r.unit}; with the face blurred away {r.deleted_blur:.3g}{imp}"


def analysis_html(a: Analysis) -> str:
    """Overlays side by side, one bar chart of region attention per method, and the model's outputs."""
    from ..explain.render import overlay

    chip = a.explanations[0].chip
    figs = [figure(chip.image, "The aligned face the model sees.", width=220)]
    for e in a.explanations:
        figs.append(figure(overlay(e.chip.image, e.chip_map, signed=e.signed),
                           f"{e.method}: where it finds evidence for {e.target} "
                           f"({score_text(e)}; {e.seconds * 1000:.0f} ms). "
                           + ("Red: for, blue: against." if e.signed else "Red: most, blue: least."),
                           width=220))
    bars = [_bars(e.method, e.region_attention().mass) for e in a.explanations]
    return (
        f'<div class="fl-results" data-model="{escape(a.model)}">'
        f"<h3>Where {escape(a.model)} looks</h3>"
        f'<div class="fl-row fl-overlays">{"".join(figs)}</div>'
        "<h3>Share of each method's attention per face region</h3>"
        '<p class="fl-note">Each bar is the share of the map\'s (positive) mass falling in a landmark region; '
        "shares add up to 100 % over the regions.</p>"
        f'<div class="fl-row">{"".join(bars)}</div>'
        "<h3>What the model outputs</h3>"
        f"{_outputs_table(a)}"
        f"{numbers_block(a.numbers(), 'analysis')}</div>"
    )


def anonymization_html(fx: AnonymizationEffect) -> str:
    """The anonymized face with its map, and how the score and re-identification changed."""
    from ..explain.render import overlay

    e = fx.explanation
    reid = fx.reid
    label = fx.method + (f" {fx.strength:g}" if fx.strength is not None else "")
    still = reid.get("same_person")
    verdict = ("still recognized as the same person" if still else "no longer recognized as the same person"
               ) if still is not None else "no decision (no threshold)"
    rows = [
        {"quantity": f"score: {e.target}", "before": fx.score_before, "after": fx.score_after,
         "change": fx.score_after - fx.score_before},
        {"quantity": f"re-identification distance ({reid['model']})", "before": 0.0, "after": reid["distance"],
         "change": reid["distance"]},
        {"quantity": f"re-identification cosine ({reid['model']})", "before": 1.0, "after": reid["cosine"],
         "change": float(reid["cosine"]) - 1.0},  # type: ignore[arg-type]
    ]
    figs = [figure(fx.anonymized, f"The photo anonymized with {label}.", width=220),
            figure(overlay(e.chip.image, e.chip_map, signed=e.signed),
                   f"{e.method} on the anonymized face ({score_text(e)}).", width=220)]
    return (
        f'<div class="fl-anon" data-method="{escape(fx.method)}">'
        f'<div class="fl-row">{"".join(figs)}</div>'
        + table(rows, caption=f"{label}: the explained score before and after, and the recognizer's comparison of "
                "the photo with its anonymized copy (same face location).", digits=4)
        + f'<p class="fl-verdict"><b>{escape(label)}:</b> {escape(verdict)} '
        f"(distance {float(reid['distance']):.4f}, threshold {reid['threshold']}).</p>"  # type: ignore[arg-type]
        + numbers_block(fx.numbers(), "anonymization") + "</div>"
    )


def verification_html(v: Verification) -> str:
    """The decision, similarity and distance of a pair, with its pair maps."""
    from ..explain.face import render_pair

    p = v.pair
    same = p.same_person  # type: ignore[attr-defined]
    decision = "no threshold" if same is None else ("same person" if same else "different people")
    rows = [{"quantity": "cosine similarity", "value": p.similarity},  # type: ignore[attr-defined]
            {"quantity": "distance", "value": p.distance},  # type: ignore[attr-defined]
            {"quantity": "threshold", "value": p.threshold},  # type: ignore[attr-defined]
            {"quantity": "decision", "value": decision}]
    return (
        f'<div class="fl-verify"><p class="fl-decision"><b>Decision: {escape(decision)}</b></p>'
        + table(rows, caption="The recognizer's comparison: same person when the distance is below the threshold.",
                digits=4)
        + figure(render_pair(p),  # type: ignore[arg-type]
                 "Pair maps: each patch was hidden in both photos at once. Green where hiding it lowers the "
                 "similarity (what makes the faces alike), pink where it raises it (what makes them differ).")
        + numbers_block(v.numbers(), "verification") + "</div>"
    )


def live_html(image: np.ndarray, stats: str, frame: int) -> str:
    """One live frame as an inline JPEG (no file is written) with its frame-rate line."""
    import base64

    import cv2

    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 80])
    src = "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode("ascii") if ok else ""
    return (f'<div class="fl-live" data-frame="{int(frame)}">'
            f'<img class="fl-live-frame" alt="live Grad-CAM overlay" src="{src}">'
            f'<p class="fl-live-stats">{escape(stats)}</p></div>')
