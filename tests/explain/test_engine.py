"""The shared perturbation engine: batching, bounded memory, seeding and the embedding cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from facelens.explain.base import PerturbationMethod
from facelens.explain.engine import EmbeddingCache, PerturbationEngine, score_rows
from facelens.models import wrap
from facelens.targets import ClassScore, Similarity


class _Recorder(nn.Module):
    """A small net that remembers the size of every batch it is given."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)
        self.batch_sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(x.shape[0])
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def _inputs(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 10, 10, generator=torch.Generator().manual_seed(seed))


def test_run_builds_at_most_batch_size_images_at_a_time_in_order() -> None:
    net, xs = _Recorder(), _inputs(23)
    requests: list[tuple[int, int]] = []

    def build(start: int, stop: int) -> torch.Tensor:
        requests.append((start, stop))
        return xs[start:stop]

    engine = PerturbationEngine(net, ClassScore(2), batch_size=5, progress=False)
    scores = engine.run(23, build)
    assert requests == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    assert max(net.batch_sizes) <= 5 and sum(net.batch_sizes) == 23
    with torch.no_grad():
        expected = net(xs)[:, 2]
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    assert engine.evaluations == 23 and not scores.requires_grad


def test_run_masks_scores_fill_plus_mask_times_difference_without_materializing_all() -> None:
    net = _Recorder()
    base, fill = _inputs(1, 1), _inputs(1, 2)
    masks = torch.rand(17, 1, 10, 10, generator=torch.Generator().manual_seed(3))
    largest: list[int] = []

    def mask_batch(start: int, stop: int) -> torch.Tensor:
        largest.append(stop - start)
        return masks[start:stop]

    engine = PerturbationEngine(net, ClassScore(0), batch_size=4)
    scores = engine.run_masks(base, fill, 17, mask_batch)
    assert max(largest) == 4 and sum(largest) == 17
    with torch.no_grad():
        expected = net(fill + masks * (base - fill))[:, 0]
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)


def test_score_batches_and_counts() -> None:
    net, xs = _Recorder(), _inputs(10)
    engine = PerturbationEngine(net, ClassScore(1), batch_size=3)
    scores = engine.score(xs)
    assert net.batch_sizes == [3, 3, 3, 1] and engine.evaluations == 10 and scores.shape == (10,)
    assert list(engine.batches(7)) == [(0, 3), (3, 6), (6, 7)]
    with pytest.raises(ValueError, match="batch_size"):
        PerturbationEngine(net, ClassScore(1), batch_size=0)


def test_batch_size_does_not_change_scores() -> None:
    net, xs = _Recorder(), _inputs(20)
    one = PerturbationEngine(net, ClassScore(0), batch_size=1).run(20, lambda a, b: xs[a:b])
    many = PerturbationEngine(net, ClassScore(0), batch_size=8).run(20, lambda a, b: xs[a:b])
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-6)


def test_score_rows_takes_one_target_or_one_per_row() -> None:
    out = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.equal(score_rows(out, ClassScore(1)), torch.tensor([2.0, 4.0]))
    assert torch.equal(score_rows(out, [ClassScore(0), ClassScore(1)]), torch.tensor([1.0, 4.0]))
    with pytest.raises(ValueError, match="targets"):
        score_rows(out, [ClassScore(0)])


class _Sampler(PerturbationMethod):
    name = "test-sampler"
    library = "facelens"

    def attribute_one(self, x: torch.Tensor, target: object, chip: object) -> torch.Tensor:
        return torch.rand(x.shape[-2:], generator=self.generator())


def test_methods_draw_from_their_seed() -> None:
    model = wrap(_Recorder(), task="classification", input_size=10, class_names=["a", "b", "c"], align=None)
    x = _inputs(1)
    a = _Sampler(model, seed=4).attribute(x, ClassScore(0))
    b = _Sampler(model, seed=4, batch_size=1).attribute(x, ClassScore(0))
    c = _Sampler(model, seed=5).attribute(x, ClassScore(0))
    assert torch.equal(a, b) and not torch.equal(a, c)
    engine = _Sampler(model, batch_size=6).engine(Similarity(torch.ones(3)))
    assert engine.batch_size == 6 and engine.desc == "test-sampler"


def _chips(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 10, 10, 3), dtype=np.uint8)


def test_embedding_cache_computes_each_chip_once() -> None:
    net, cache = _Recorder(), EmbeddingCache(capacity=8)
    chips = _chips(5, 0)
    first = cache.get(net, chips, batch_size=2)
    assert (cache.hits, cache.misses) == (0, 5) and net.batch_sizes == [2, 2, 1]
    with torch.no_grad():
        direct = net(torch.from_numpy(chips).permute(0, 3, 1, 2).float() / 255.0).numpy()
    np.testing.assert_allclose(first, direct, rtol=1e-5, atol=1e-6)
    mixed = np.concatenate([chips[3:], _chips(2, 1)])  # two known, two new
    second = cache.get(net, mixed)
    assert (cache.hits, cache.misses) == (2, 7) and net.batch_sizes[-1] == 2
    np.testing.assert_array_equal(second[:2], first[3:])
    # another network never gets this one's embeddings
    other = _Recorder()
    cache.get(other, chips[:1])
    assert cache.misses == 8


def test_embedding_cache_evicts_the_oldest_beyond_capacity() -> None:
    net, cache = _Recorder(), EmbeddingCache(capacity=3)
    chips = _chips(4, 2)
    cache.get(net, chips)  # the first chip is evicted
    cache.get(net, chips[1:])
    assert cache.hits == 3
    cache.get(net, chips[:1])
    assert cache.misses == 4 + 1
