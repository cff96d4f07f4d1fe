"""The bias audit's statistics recover a planted disparity, find none in fair data, cover the truth at the
stated rate, never claim a difference from a degenerate interval; the probe experiment sees an unbalanced
training set hurt a minority; the CLI runs on real photos."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from facelens.cli import main
from facelens.datasets import ManifestRow
from facelens.studies.bias import (
    age_band,
    audit_predictions,
    cluster_bootstrap,
    compare_groups,
    group_of,
    paired_difference,
    probe_experiment,
)


def _predictions(acc_a: float, acc_b: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.choice(["female", "male"], 2 * n)
    right = np.r_[rng.random(n) < acc_a, rng.random(n) < acc_b]
    flip = np.where(labels == "female", "male", "female")
    return np.where(right, labels, flip), labels, np.array(["A"] * n + ["B"] * n)


def test_planted_disparity_is_recovered():
    pred, labels, groups = _predictions(0.9, 0.7, 400, seed=1)
    comp = audit_predictions(pred, labels, groups, attribute="group", n_boot=1000)
    d = comp.difference("A", "B")
    assert d.supported and d.estimate.lo > 0
    assert d.estimate.lo <= 0.2 <= d.estimate.hi  # the planted 20 points lie inside the interval
    assert comp.group("B").n == 400 and comp.group("B").hi < comp.group("A").lo
    verdict = " ".join(comp.verdicts())
    assert "A" in verdict and "better than B" in verdict and "excludes 0" in verdict


def test_fair_predictions_give_no_claim():
    pred, labels, groups = _predictions(0.85, 0.85, 400, seed=2)
    comp = audit_predictions(pred, labels, groups, n_boot=1000)
    d = comp.difference("A", "B")
    assert d.estimate.lo <= 0 <= d.estimate.hi and not d.supported
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


def test_degenerate_and_small_groups_are_not_claimed():
    correct = np.r_[np.ones(12), np.random.default_rng(0).random(200) < 0.6]
    groups = ["perfect"] * 12 + ["other"] * 200
    comp = compare_groups(correct, groups, metric="accuracy", attribute="g", n_boot=500)
    d = comp.difference("other", "perfect")
    assert d.estimate.hi < 0 and d.degenerate and not d.supported
    assert "rule of three" in " ".join(comp.verdicts())
    small = compare_groups(np.r_[np.ones(4), np.zeros(50)], ["tiny"] * 4 + ["big"] * 50, n_boot=200)
    assert small.differences == [] and small.excluded == {"tiny": 4}
    only = compare_groups([1, 0, 1, 1] * 10, ["x:a", "y:b"] * 20,
                          comparable=lambda a, b: a.split(":")[0] == b.split(":")[0], n_boot=100)
    assert only.differences == []


def test_groups_from_manifest_labels():
    row = ManifestRow(path="p.jpg", identity="i", sex="female", age=14, race="black", dataset="utkface")  # type: ignore[arg-type]
    assert group_of(row, "sex") == "female"
    assert group_of(row, "age") == "0-14" and age_band(15) == "15-24" and age_band(90) == "65+"
    assert group_of(row, "race") == "utkface:black"
    assert age_band(None) is None


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
    assert any("raises" in v for v in res.verdicts())


@pytest.fixture(scope="module")
def small_manifest(tmp_path_factory, shared_rows) -> str:
    """8 London people (2 photos each) and 16 UTKFace photos, with sex, age and race labels."""
    london = sorted((r for r in shared_rows if r.dataset == "frl_london"), key=lambda r: str(r.path))[:16]
    utk = sorted((r for r in shared_rows if r.dataset == "utkface"), key=lambda r: str(r.path))[:16]
    path = tmp_path_factory.mktemp("bias") / "m.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "identity", "sex", "age", "race_or_skin", "dataset"])
        for r in london + utk:
            w.writerow([str(r.path), r.identity or "", r.sex or "", "" if r.age is None else r.age, r.race or "",
                        r.dataset])
    return str(path)


def test_cli_bias_writes_files(tmp_path, small_manifest):
    out = tmp_path / "out"
    assert main(["audit", "bias", "--manifest", small_manifest, "--limit", "28", "--n-boot", "200",
                 "--attention-n", "2", "--probe-repeats", "2", "--probe-min-people", "3", "--out", str(out)]) == 0
    data = json.loads((out / "bias.json").read_text())
    assert data["counts"]["labelled"] == 28
    metrics = {(r["metric"], r["attribute"]) for r in data["tables"]["group_metrics"]}
    assert ("dlib-gender accuracy", "sex") in metrics and ("dlib-age MAE (years)", "age") in metrics
    assert ("dlib-resnet FMR", "sex") in metrics and ("dlib-resnet FNMR", "sex") in metrics
    assert all(r["n"] >= 1 and r["ci_low"] <= r["value"] + 1e-12 for r in data["tables"]["group_metrics"])
    assert data["verdicts"]
    assert (out / "bias_groups.png").stat().st_size > 1000
    assert (out / "bias_attention.png").stat().st_size > 1000
    assert (out / "bias_group_metrics.csv").read_text().startswith("metric,attribute,group")
    assert "data:image/png;base64" in (out / "bias.html").read_text()
