import numpy as np
import pytest
import torch

from facelens.errors import ModelError
from facelens.models.cohort import cohort_from_embeddings
from facelens.targets import (
    ClassScore,
    CohortSimilarity,
    Contrastive,
    GallerySimilarity,
    Similarity,
    ThresholdMargin,
    UserTarget,
    as_target,
)


def test_class_score_logit_and_probability():
    out = torch.tensor([[1.0, 3.0], [2.0, 0.0]])
    assert torch.equal(ClassScore(1)(out), torch.tensor([3.0, 0.0]))
    p = ClassScore(1, "probability")(out)
    assert torch.allclose(p, torch.softmax(out, 1)[:, 1])
    assert ClassScore(0)(out[0]).dim() == 0  # a single row, as pytorch-grad-cam passes it
    with pytest.raises(ModelError):
        ClassScore(5)(out)


def test_similarity_metrics():
    ref = np.array([3.0, 4.0])
    out = torch.tensor([[3.0, 4.0], [0.0, 0.0], [-3.0, -4.0]])
    cos = Similarity(ref)(out)
    assert torch.allclose(cos, torch.tensor([1.0, 0.0, -1.0]))
    dot = Similarity(ref, "dot")(out)
    assert torch.allclose(dot, torch.tensor([5.0, 0.0, -5.0]))
    l2 = Similarity(ref, "neg_l2")(out)
    assert torch.allclose(l2, torch.tensor([0.0, -5.0, -10.0]))
    with pytest.raises(ModelError):
        Similarity(ref)(torch.zeros(1, 3))


def test_gallery_is_mean_of_enrolled():
    emb = np.array([[1.0, 0.0], [0.0, 1.0]])
    g = GallerySimilarity(emb, "neg_l2")
    assert g.n_enrolled == 2
    assert torch.allclose(g(torch.tensor([[0.5, 0.5]])), torch.tensor([0.0]))


def test_contrastive_is_mate_minus_mean_nonmate():
    t = Contrastive(np.array([1.0, 0.0]), np.array([[0.0, 1.0], [0.0, -1.0]]))
    out = torch.tensor([[1.0, 1.0]])
    expect = torch.nn.functional.cosine_similarity(out, torch.tensor([[1.0, 0.0]]))
    assert torch.allclose(t(out), expect)  # the two non-mates cancel
    assert "2 non-mate" in t.describe()


def test_user_callable_must_give_one_scalar_per_image():
    t = as_target(lambda out: out.sum(1))
    assert torch.equal(t(torch.ones(2, 3)), torch.tensor([3.0, 3.0]))
    with pytest.raises(ModelError, match="one scalar per image"):
        UserTarget(lambda out: out)(torch.ones(2, 3))
    with pytest.raises(ModelError):
        as_target(42)


def test_cohort_similarity_removes_the_shared_component_and_has_a_gradient_at_itself():
    rng = np.random.default_rng(0)
    common = rng.normal(size=8) * 4
    people = rng.normal(size=(40, 8))
    emb = np.concatenate([common + p + 0.1 * rng.normal(size=(2, 8)) for p in people])
    cohort = cohort_from_embeddings("toy", emb, [str(i // 2) for i in range(80)])
    t = CohortSimilarity(emb[0], cohort)
    scores = t(torch.as_tensor(emb, dtype=torch.float32))
    assert torch.allclose(scores.double(), torch.as_tensor(cohort.z(emb, emb[0])), atol=1e-4)
    assert scores[1] > 2 and abs(float(scores[2:].median())) < 0.5  # same person high, strangers about 0
    x = torch.as_tensor(emb[:1], dtype=torch.float32).requires_grad_(True)
    t(x).sum().backward()
    assert float(x.grad.abs().max()) > 1e-3  # unlike cosine to itself, which is at its maximum
    assert t.unit.startswith("impostor SDs") and t.impostor_level == cohort.impostor_quantiles["median"]
    with pytest.raises(ModelError):
        CohortSimilarity(np.ones(3), cohort)


def test_threshold_margin_is_positive_for_a_match():
    t = ThresholdMargin(torch.tensor([0.0, 0.0]), 0.6)
    assert torch.allclose(t(torch.tensor([[0.3, 0.4], [0.0, 0.0]])), torch.tensor([0.1, 0.6]))
    assert t.unit == "L2 distance below the threshold"
