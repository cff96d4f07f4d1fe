import numpy as np
import pytest
import torch

from facelens.errors import ModelError
from facelens.targets import ClassScore, Contrastive, GallerySimilarity, Similarity, UserTarget, as_target


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
