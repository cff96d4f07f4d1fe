"""The bias audit's statistics recover a planted disparity (also between two intersectional groups), find
none in fair data, never give a zero-width interval for a proportion (0/n and n/n included), never decide
on a group below the minimum number of people, form and name intersections, report an ``all`` row equal
to the overall rate; the probe experiment sees an unbalanced training set hurt a minority; the CLI runs
on real photos, with a pre-specified contrast."""

from __future__ import annotations

import csv
import json
import re
from typing import Any

import numpy as np
import pytest

from facelens.cli import main
from facelens.datasets import ManifestRow
from facelens.errors import FaceLensError
from facelens.studies.bias import (
    AGE_BANDS,
    Estimate,
    age_band,
    audit_predictions,
    cluster_bootstrap,
    compare_groups,
    group_of,
    paired_difference,
    probe_experiment,
    race_qualified,
    resolve_contrast,
)

Z = 1.959963984540054  # the 97.5% normal quantile: Wilson's bound at k = n is n / (n + z²)


def _predictions(acc_a: float, acc_b: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.choice(["female", "male"], 2 * n)
    right = np.r_[rng.random(n) < acc_a, rng.random(n) < acc_b]
    flip = np.where(labels == "female", "male", "female")
    return np.where(right, labels, flip), labels, np.array(["A"] * n + ["B"] * n)


def _row(sex: str | None, race: str | None, age: int | None = 30, dataset: str = "utkface") -> ManifestRow:
    return ManifestRow(path="p.jpg", identity="", sex=sex, age=age, race=race, dataset=dataset)  # type: ignore[arg-type]


def test_estimate_is_the_shared_one():
    from facelens.evaluate.stats import Estimate as Shared

    assert Estimate is Shared


def test_planted_disparity_is_recovered():
    pred, labels, groups = _predictions(0.9, 0.7, 400, seed=1)
    comp = audit_predictions(pred, labels, groups, attribute="group", n_boot=1000)
    d = comp.difference("A", "B")
    assert d.supported and d.status == "supported" and d.estimate.lo > 0
    assert d.estimate.lo <= 0.2 <= d.estimate.hi  # the planted 20 points lie inside the interval
    assert comp.group("B").n == 400 and comp.group("B").hi < comp.group("A").lo
    assert comp.difference("B", "A").estimate.hi < 0 and comp.difference("B", "A").supported
    verdict = " ".join(comp.verdicts())
    assert "A" in verdict and "better than B" in verdict and "supported" in verdict
    assert "n = 800 people" in verdict and d.estimate.text() in verdict


def test_fair_predictions_give_no_claim():
    pred, labels, groups = _predictions(0.85, 0.85, 400, seed=2)
    comp = audit_predictions(pred, labels, groups, n_boot=1000)
    d = comp.difference("A", "B")
    assert d.estimate.lo <= 0 <= d.estimate.hi and not d.supported and d.status == "inconclusive"
    assert d.verdict is not None and "contains 0" in d.verdict.reason
    assert comp.verdicts()[0].startswith("accuracy by group: no difference is supported")


def test_bootstrap_interval_covers_the_truth_and_clusters_matter():
    """Percentile intervals reach their nominal coverage; with clustered data only the cluster bootstrap does."""
    rng = np.random.default_rng(0)
    hits_cluster = hits_naive = hits_iid = 0
    reps, p = 200, 0.8
    for k in range(reps):
        iid = rng.random(150) < p
        e = cluster_bootstrap(iid, n_boot=400, seed=k)
        hits_iid += e.lo <= p <= e.hi
        person = rng.random(75) < p  # two photos per person share one outcome
        values = np.repeat(person, 2)
        people = np.repeat(np.arange(75), 2)
        hits_cluster += (lambda e: e.lo <= p <= e.hi)(cluster_bootstrap(values, None, people, n_boot=400, seed=k))
        hits_naive += (lambda e: e.lo <= p <= e.hi)(cluster_bootstrap(values, n_boot=400, seed=k))
    assert 0.88 <= hits_iid / reps <= 0.99
    assert 0.88 <= hits_cluster / reps <= 0.99
    assert hits_naive < hits_cluster  # photos resampled as if independent: intervals too narrow


def test_weighted_rates_pool_trials_and_paired_differences_keep_pairs():
    e = cluster_bootstrap([0.5, 0.0], weights=[2, 8], clusters=["a", "b"], n_boot=200)
    assert e.value == pytest.approx(0.1) and e.trials == 10 and e.n_clusters == 2
    rng = np.random.default_rng(3)
    base = rng.random(300)
    d = paired_difference(base + 0.05, base, n_boot=500)
    assert d.value == pytest.approx(0.05) and d.hi - d.lo < 1e-9  # the shared part cancels exactly


def test_proportions_at_zero_and_n_get_a_real_interval():
    """0/n and n/n: Wilson's bounds (n/(n+z²) at n/n), not the bootstrap's [1, 1] or [0, 0]."""
    n = 28
    comp = compare_groups(np.r_[np.ones(n), np.zeros(n)], ["perfect"] * n + ["never"] * n, kind="proportion",
                          n_boot=200)
    perfect, never = comp.group("perfect"), comp.group("never")
    assert perfect.value == 1.0 and perfect.hi == pytest.approx(1.0)
    assert perfect.lo == pytest.approx(n / (n + Z**2), abs=1e-9) and perfect.width > 0.1
    assert never.value == 0.0 and never.lo == pytest.approx(0.0) and never.hi == pytest.approx(Z**2 / (n + Z**2))
    # the same with people: two photos each (Wilson ∪ person bootstrap), and as per-person rates with trials
    clustered = compare_groups(np.ones(2 * n), ["g"] * (2 * n), clusters=np.repeat(np.arange(n), 2),
                               kind="proportion", n_boot=200).group("g")
    assert clustered.n_clusters == n and clustered.hi - clustered.lo > 0.05
    fmr = compare_groups(np.zeros(12), ["g"] * 12, weights=np.full(12, 5.0), clusters=np.arange(12),
                         kind="proportion", n_boot=200).group("g")
    assert fmr.trials == 60 and fmr.value == 0.0 and fmr.hi == pytest.approx(Z**2 / (60 + Z**2))


def test_a_perfect_group_never_yields_a_no_difference_from_a_zero_width_interval():
    """28/28 against 27/28: both intervals have width, the difference's interval too, and it is undecided."""
    comp = compare_groups(np.r_[np.ones(28), np.ones(27), 0.0], ["a"] * 28 + ["b"] * 28, n_boot=500)
    assert comp.kind == "proportion"
    d = comp.difference("a", "b")
    assert comp.group("a").width > 0 and d.estimate.width > 0 and d.estimate.lo < 0 < d.estimate.hi
    assert d.status == "inconclusive" and not d.supported
    # and a perfect small-ish group against a clearly worse one is decided by the rule, not waved off
    rng = np.random.default_rng(0)
    big = compare_groups(np.r_[np.ones(12), rng.random(200) < 0.6], ["perfect"] * 12 + ["other"] * 200,
                         metric="accuracy", attribute="g", n_boot=500)
    worse = big.difference("other", "perfect")
    assert big.group("perfect").lo < 1 and worse.estimate.width > 0 and not worse.degenerate
    assert worse.status == ("supported" if worse.estimate.hi < 0 else "inconclusive")


def test_groups_below_the_minimum_are_shown_but_inconclusive():
    # 4 people always right against 50 always wrong: the interval excludes 0, but 4 people decide nothing
    small = compare_groups(np.r_[np.ones(4), np.zeros(50)], ["tiny"] * 4 + ["big"] * 50, n_boot=200)
    assert small.excluded == {"tiny": 4} and [g.group for g in small.groups] == ["big", "tiny"]
    d = small.difference("tiny", "big")
    assert d.estimate.lo > 0 and d.status == "inconclusive" and not d.supported
    assert d.verdict is not None and "tiny has 4 people, fewer than the 10" in d.verdict.reason
    text = " ".join(small.verdicts())
    assert "inconclusive" in text and "tiny (4 people)" in text
    rows = small.group_rows()
    assert [r["compared"] for r in rows] == [True, False] and "fewer than 10" in rows[1]["note"]
    # a mean from one person has no interval rather than a zero-width one
    one = compare_groups([3.0, 5.0, 1.0] + [2.0] * 12, ["solo"] * 3 + ["many"] * 12,
                         clusters=["p"] * 3 + list(range(12)), kind="mean", n_boot=200)
    assert one.group("solo").n_clusters == 1 and not one.group("solo").finite
    assert not one.group("many").finite  # every value equal: no interval either
    assert one.difference("solo", "many").degenerate and one.difference("solo", "many").status == "inconclusive"
    only = compare_groups([1, 0, 1, 1] * 10, ["x:a", "y:b"] * 20,
                          comparable=lambda a, b: a.split(":")[0] == b.split(":")[0], n_boot=100)
    assert only.differences == []


def test_groups_from_manifest_labels():
    row = ManifestRow(path="p.jpg", identity="i", sex="female", age=14, race="black", dataset="utkface")  # type: ignore[arg-type]
    assert group_of(row, "sex") == "female"
    assert group_of(row, "age") == "0-14" and age_band(15) == "15-24" and age_band(90) == "65+"
    assert group_of(row, "race") == "utkface:black" and group_of(row, "race", qualify=False) == "black"
    assert group_of(row, "all") == "all"
    assert age_band(None) is None
    with pytest.raises(FaceLensError):
        group_of(row, "height")


def test_intersections_are_formed_and_named():
    row = _row("female", "asian", age=30)
    assert group_of(row, "sex × race") == "female × utkface:asian"
    assert group_of(row, "sex × race", qualify=False) == "female × asian"
    assert group_of(row, "sex × age") == "female × 25-34"
    assert group_of(_row(None, "asian"), "sex × race") is None  # a missing part: not in the intersection
    assert group_of(_row("male", "white", age=None), "sex × age") is None
    assert not race_qualified([_row("male", "white"), _row("female", "asian")])
    assert race_qualified([_row("male", "white"), _row("female", "white", dataset="frl_london")])
    # compare_groups keeps the names and forms one group per cell
    rows = [_row(s, r, a) for s in ("female", "male") for r in ("asian", "white") for a in (20, 40) for _ in range(3)]
    comp = compare_groups(np.ones(len(rows)), [group_of(r, "sex × race", qualify=False) for r in rows],
                          attribute="sex × race", n_boot=50)
    assert [g.group for g in comp.groups] == ["female × asian", "female × white", "male × asian", "male × white"]
    assert all(g.estimate.n == 6 for g in comp.groups) and len(comp.differences) == 6
    names = {"sex × race": ["female × utkface:white", "male × frl_london:white", "male × utkface:asian",
                            "female × frl_london:white"], "sex": ["female", "male"]}
    assert resolve_contrast("asian x male", "female × white", names) == ("sex × race", "male × utkface:asian",
                                                                          "female × utkface:white")
    assert resolve_contrast("female", "male", names) == ("sex", "female", "male")
    with pytest.raises(FaceLensError, match="different datasets"):
        resolve_contrast("male × utkface:asian", "female × frl_london:white", names)
    with pytest.raises(FaceLensError, match="no attribute has both"):
        resolve_contrast("male × indian", "female × white", names)


def _intersection_data(counts: dict[tuple[str, str], tuple[int, int]]) -> tuple[np.ndarray, list[str | None]]:
    """0/1 correctness with exactly ``hits`` of ``n`` per (sex, race) cell, one photo per person."""
    values: list[float] = []
    groups: list[str | None] = []
    for (sex, race), (hits, n) in counts.items():
        values += [1.0] * hits + [0.0] * (n - hits)
        groups += [group_of(_row(sex, race), "sex × race", qualify=False)] * n
    return np.array(values), groups


def test_planted_intersectional_disparity_is_supported_and_a_fair_pair_is_not():
    """Equal sex margins can hide a cell: asian men at 0.75 against white women at 0.97 (as in UTKFace)."""
    counts = {("male", "asian"): (112, 150), ("female", "white"): (145, 150), ("female", "asian"): (135, 150),
              ("male", "white"): (135, 150)}
    values, groups = _intersection_data(counts)
    comp = compare_groups(values, groups, attribute="sex × race", n_boot=500,
                          planned=[("male × asian", "female × white"), ("female × asian", "male × white")])
    planted, fair = comp.contrasts
    assert (planted.a, planted.b) == ("male × asian", "female × white")
    assert planted.estimate.value == pytest.approx(112 / 150 - 145 / 150)
    assert planted.estimate.ci == 0.95 and planted.estimate.hi < 0 and planted.status == "supported"
    assert planted.verdict is not None and "is worse than" in planted.verdict.claim
    assert fair.estimate.value == 0 and fair.estimate.lo < 0 < fair.estimate.hi and fair.status == "inconclusive"
    # in the all-pairs family the same two answers hold, at the Bonferroni level of 6 comparisons
    assert comp.tested == 6 and comp.difference_ci == pytest.approx(1 - 0.05 / 6)
    assert comp.difference("male × asian", "female × white").supported
    assert not comp.difference("female × asian", "male × white").supported
    wider = comp.difference("male × asian", "female × white").estimate
    assert wider.lo < planted.estimate.lo  # the adjusted interval is wider than the planned one


def test_all_row_equals_the_overall_rate():
    rng = np.random.default_rng(4)
    values = (rng.random(300) < 0.8).astype(float)
    comp = compare_groups(values, ["all"] * 300, attribute="all", kind="proportion", n_boot=200)
    (row,) = comp.groups
    assert row.group == "all" and row.estimate.value == pytest.approx(values.mean()) and row.estimate.n == 300
    assert comp.differences == [] and comp.verdicts() == []


def test_probe_experiment_sees_the_unbalanced_set_hurt_the_minority():
    """Sex is written along one axis for the majority and along another for the minority: a probe trained
    mostly on the majority misses the minority's axis, a balanced one learns both."""
    rng = np.random.default_rng(0)
    n_people = 120
    xs, sex, grp, people = [], [], [], []
    for g, axis in (("major", 0), ("minor", 1)):
        for i in range(n_people):
            s = i % 2
            x = rng.normal(0, 1.0, 8)
            x[axis] += 2.5 if s else -2.5
            x[1 - axis] += rng.normal(0, 2.5)  # the other axis is noise for this group
            xs.append(x)
            sex.append("male" if s else "female")
            grp.append(g)
            people.append(f"{g}{i}")
    res = probe_experiment(np.array(xs), sex, grp, people, attribute="g", repeats=5, n_boot=500, seed=0,
                           majority="major")
    assert res.train_counts["unbalanced"]["major"] == pytest.approx(0.9 * res.train_size, abs=2)
    assert res.train_counts["balanced"]["major"] == res.train_counts["balanced"]["minor"]
    diff = res.differences["minor"]
    assert diff.value > 0 and diff.excludes(0.0)
    assert res.test["balanced"]["minor"].value > res.test["unbalanced"]["minor"].value
    assert res.verdict("minor").status == "supported"
    assert any("raises" in v and "supported" in v for v in res.verdicts())
    assert all(e.width > 0 for per in res.test.values() for e in per.values())


# -- the CLI on real photos ---------------------------------------------------------------------------------
def _write(path: Any, rows: list[ManifestRow]) -> str:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "identity", "sex", "age", "race_or_skin", "dataset"])
        for r in rows:
            w.writerow([str(r.path), r.identity or "", r.sex or "", "" if r.age is None else r.age, r.race or "",
                        r.dataset])
    return str(path)


@pytest.fixture(scope="module")
def small_manifest(tmp_path_factory, shared_rows) -> str:
    """8 London people (2 photos each) and 16 UTKFace photos, with sex, age and race labels."""
    london = sorted((r for r in shared_rows if r.dataset == "frl_london"), key=lambda r: str(r.path))[:16]
    utk = sorted((r for r in shared_rows if r.dataset == "utkface"), key=lambda r: str(r.path))[:16]
    return _write(tmp_path_factory.mktemp("bias") / "m.csv", london + utk)


@pytest.fixture(scope="module")
def contrast_run(tmp_path_factory, shared_rows) -> dict[str, Any]:
    """UTKFace only: 6 asian men and 6 white women (plus 4 others), with the contrast of the issue."""
    utk = sorted((r for r in shared_rows if r.dataset == "utkface"), key=lambda r: str(r.path))
    pick = ([r for r in utk if (r.sex, r.race) == ("male", "asian")][:6]
            + [r for r in utk if (r.sex, r.race) == ("female", "white")][:6]
            + [r for r in utk if (r.sex, r.race) == ("female", "black")][:4])
    tmp = tmp_path_factory.mktemp("bias_contrast")
    out = tmp / "out"
    assert main(["audit", "bias", "--manifest", _write(tmp / "m.csv", pick), "--n-boot", "200", "--attention-n", "0",
                 "--probe-attribute", "none", "--min-people", "5", "--contrast", "asian x male", "female × white",
                 "--out", str(out)]) == 0
    return json.loads((out / "bias.json").read_text()) | {"_out": out, "_n": len(pick)}


def _intervals(obj: Any) -> list[tuple[float, float]]:
    """Every [low, high] pair under a "ci" key anywhere in the JSON."""
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "ci" and isinstance(v, list) and len(v) == 2 and all(x is not None for x in v):
                found.append((float(v[0]), float(v[1])))
            else:
                found += _intervals(v)
    elif isinstance(obj, list):
        for v in obj:
            found += _intervals(v)
    return found


def _no_zero_width(data: dict[str, Any]) -> None:
    pairs = _intervals(data["summary"])
    pairs += [(r["ci_low"], r["ci_high"]) for name, rows in data["tables"].items() for r in rows
              if r.get("ci_low") is not None and r.get("ci_high") is not None and name != "attention"]
    assert pairs and all(hi > lo for lo, hi in pairs), [p for p in pairs if not p[1] > p[0]]


def test_cli_bias_writes_files(tmp_path, small_manifest):
    out = tmp_path / "out"
    assert main(["audit", "bias", "--manifest", small_manifest, "--limit", "28", "--n-boot", "200",
                 "--attention-n", "2", "--probe-repeats", "2", "--probe-min-people", "3", "--out", str(out)]) == 0
    data = json.loads((out / "bias.json").read_text())
    assert data["counts"]["labelled"] == 28
    metrics = {(r["metric"], r["attribute"]) for r in data["tables"]["group_metrics"]}
    for m in ("dlib-gender accuracy", "dlib-age MAE (years)", "dlib-resnet FNMR", "dlib-resnet FMR"):
        assert {(m, a) for a in ("all", "sex", "age", "race", "sex × race", "sex × age")} <= metrics
    assert all(r["n"] >= 1 and r["ci_low"] <= r["value"] + 1e-12 for r in data["tables"]["group_metrics"]
               if r["ci_low"] is not None)
    # two datasets' race labels: qualified names, never compared across datasets
    cells = data["summary"]["dlib-gender accuracy | sex × race"]
    assert cells and all(" × " in g and ":" in g for g in cells)
    for r in data["tables"]["group_differences"]:
        if "race" in r["attribute"]:
            src = {p.split(":")[0] for g in (r["a"], r["b"]) for p in g.split(" × ") if ":" in p}
            assert len(src) == 1
    # the all row is the overall rate: the n-weighted mean of the sex groups, over all their photos
    for key in ("dlib-gender accuracy", "dlib-age MAE (years)"):
        (overall,) = data["summary"][f"{key} | all"].values()
        by_sex = data["summary"][f"{key} | sex"].values()
        assert overall["n"] == sum(g["n"] for g in by_sex)
        assert overall["value"] == pytest.approx(sum(g["value"] * g["n"] for g in by_sex) / overall["n"])
    _no_zero_width(data)
    assert data["verdicts"] and not any("no difference" in v and "[1.000, 1.000]" in v for v in data["verdicts"])
    assert (out / "bias_groups.png").stat().st_size > 1000
    assert (out / "bias_attention.png").stat().st_size > 1000
    assert (out / "bias_group_metrics.csv").read_text().startswith("metric,attribute,group")
    assert re.search(r"data:image/(png|webp);base64,", (out / "bias.html").read_text())


def test_cli_contrast_end_to_end(contrast_run):
    data = contrast_run
    assert data["counts"]["labelled"] == data["_n"] == 16
    assert data["settings"]["contrasts"] == [["asian x male", "female × white"]]
    assert data["settings"]["race_labels"].startswith("bare")
    cells = data["summary"]["dlib-gender accuracy | sex × race"]
    assert set(cells) == {"male × asian", "female × white", "female × black"}
    assert all(set(v) >= {"value", "ci", "n", "people"} for v in cells.values())
    bands = {b[0] for b in AGE_BANDS}
    by_age = data["summary"]["dlib-gender accuracy | sex × age"]
    assert by_age and all(g.split(" × ")[0] in ("female", "male") and g.split(" × ")[1] in bands for g in by_age)
    (overall,) = data["summary"]["dlib-gender accuracy | all"].values()
    assert overall["n"] == sum(v["n"] for v in cells.values()) == 16 - data["counts"]["no_face_or_unreadable"]
    by_metric = {c["metric"]: c for c in data["summary"]["contrasts"]}
    assert set(by_metric) == {"dlib-gender accuracy"}  # one planned comparison: on the one metric it names
    acc = by_metric["dlib-gender accuracy"]
    assert (acc["a"], acc["b"]) == ("male × asian", "female × white") and acc["attribute"] == "sex × race"
    a, b = acc["groups"]["male × asian"], acc["groups"]["female × white"]
    assert a == cells["male × asian"] and b == cells["female × white"]
    d = acc["difference_a_minus_b"]
    assert d["value"] == pytest.approx(a["value"] - b["value"]) and d["level"] == 0.95
    assert d["ci"][0] < d["value"] < d["ci"][1] or d["ci"][0] < d["ci"][1]
    assert "no multiplicity correction" in acc["adjustment"]
    # six people per group, below --min-people 5? no: at or above it, so the rule reads the interval
    expected = "supported" if (d["ci"][0] > 0 or d["ci"][1] < 0) else "inconclusive"
    assert acc["status"] == expected and acc["sentence"] in data["verdicts"]
    assert f"{d['ci'][0]:.3f}, {d['ci'][1]:.3f}" in acc["sentence"] and "n = " in acc["sentence"]
    rows = data["tables"]["contrasts"]
    assert {r["metric"] for r in rows} == set(by_metric) and rows[0]["a"] == "male × asian"
    assert any("FNMR" in n or "not measured" in n for n in data["notes"])
    assert any("no identity labels" in n for n in data["notes"])  # photos counted as people, said so
    assert data["model"] == "dlib-gender, dlib-age"  # the models that measured something
    _no_zero_width(data)
    assert (data["_out"] / "bias_contrast.png").stat().st_size > 1000
    assert (data["_out"] / "bias_groups.png").stat().st_size > 1000


def test_cli_contrast_rejects_unknown_groups(tmp_path, small_manifest, capsys):
    rc = main(["audit", "bias", "--manifest", small_manifest, "--n-boot", "50", "--attention-n", "0",
               "--probe-attribute", "none", "--contrast", "male × martian", "female × white",
               "--out", str(tmp_path / "o")])
    assert rc != 0 and "no attribute has both groups" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
