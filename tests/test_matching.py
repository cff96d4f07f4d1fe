"""The nearest-neighbour matcher: score conventions, open-set rejection, rank-1."""

from __future__ import annotations

import numpy as np
import pytest

from facelens.errors import FaceLensError
from facelens.matching import Matcher, pairwise_scores


def test_l2_scores_are_negated_distances_and_cosine_is_bounded():
    rng = np.random.default_rng(0)
    q, g = rng.normal(size=(5, 8)), rng.normal(size=(7, 8))
    d = np.linalg.norm(q[:, None] - g[None], axis=2)
    np.testing.assert_allclose(pairwise_scores(q, g, "l2"), -d, atol=1e-9)
    c = pairwise_scores(q, g, "cosine")
    expected = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (g / np.linalg.norm(g, axis=1, keepdims=True)).T
    np.testing.assert_allclose(c, expected, atol=1e-12)


def test_open_set_threshold_rejects_far_queries_in_the_metrics_own_unit():
    m = Matcher("l2", threshold=0.6)
    m.enroll(["a", "b"], np.array([[0.0, 0.0], [3.0, 0.0]]))
    near, far = m.identify(np.array([[0.59, 0.0], [1.5, 0.0]]))
    assert (near.label, near.accepted) == ("a", True)
    assert near.distance == pytest.approx(0.59)
    assert far.label is None and not far.accepted and far.nearest in ("a", "b")
    cos = Matcher("cosine", threshold=0.9)
    cos.enroll(["x"], np.array([[1.0, 0.0]]))
    assert cos.identify(np.array([[1.0, 0.1]]))[0].accepted
    assert not cos.identify(np.array([[0.0, 1.0]]))[0].accepted


def test_rank1_counts_nearest_labels():
    m = Matcher("cosine")
    m.enroll([1, 2, 3], np.eye(3))
    queries = np.array([[0.9, 0.1, 0], [0, 0.2, 0.8], [0.6, 0.4, 0]])
    assert m.rank1(queries, [1, 3, 2]) == pytest.approx(2 / 3)


def test_errors_are_facelens_errors():
    m = Matcher()
    with pytest.raises(FaceLensError, match="empty"):
        m.scores(np.zeros((1, 3)))
    with pytest.raises(FaceLensError, match="labels"):
        m.enroll(["a"], np.zeros((2, 3)))
    m.enroll(["a"], np.zeros((1, 3)))
    with pytest.raises(FaceLensError, match="size"):
        m.enroll(["b"], np.zeros((1, 4)))
    with pytest.raises(FaceLensError, match="metric"):
        Matcher("manhattan")  # type: ignore[arg-type]
