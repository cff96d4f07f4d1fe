"""A perfect oracle map scores better than a random map, and both better than an inverted one."""

import numpy as np
import pytest
import torch

from facelens.evaluate.deletion import DeletionInsertion
from facelens.evaluate.masking import MaskedConfidence
from facelens.targets import Similarity
from tests.fixtures.synthetic import region_only_model


def test_oracle_beats_random_beats_inverted():
    size = 48
    mask = np.zeros((size, size), bool)
    mask[20:34, 12:36] = True
    # a matcher's similarity to its own embedding is positive evidence that only the region carries
    matcher = region_only_model(mask, "embedding")
    torch.manual_seed(0)
    x = torch.rand(6, 3, size, size)
    own = [Similarity(e, "dot") for e in matcher.net(x).detach()]
    ramp = torch.linspace(0, 1, size * size).view(size, size)
    oracle = torch.as_tensor(mask, dtype=torch.float32) + 0.01 * ramp
    rng = torch.Generator().manual_seed(1)
    maps = {"oracle": oracle.expand(6, size, size), "random": torch.rand(6, size, size, generator=rng),
            "inverted": (1 - oracle).expand(6, size, size)}
    auc = {}
    for name, m in maps.items():
        metric = DeletionInsertion(matcher.net, mode="deletion", baseline="blur", steps=12)
        metric.update(x, m, own)
        auc[name] = metric.compute()["auc_normalized_mean"]
    assert auc["oracle"] < auc["random"] < auc["inverted"], auc
    # masking blacks pixels out (x · (1 − map)): use a net for which black carries no evidence
    matcher = region_only_model(mask, "embedding", mean=0.0)
    own = [Similarity(e, "dot") for e in matcher.net(x).detach()]
    masked = MaskedConfidence(matcher.net, mass=float(mask.mean()))
    masked.update(x, {k: v.numpy() for k, v in maps.items()}, own)
    drops = {k: v["average_drop_pct"] for k, v in masked.compute()["methods"].items()}
    assert drops["oracle"] > drops["random"] > drops["inverted"], drops


def test_the_random_control_must_lose_to_the_oracle_and_the_verdict_says_so():
    """Through the evaluation's own comparison: oracle vs the random control vs an inverted map, 12 photos."""
    from facelens.evaluate.controls import random_map
    from facelens.evaluate.runner import compare_maps

    size, n = 48, 12
    mask = np.zeros((size, size), bool)
    mask[20:34, 12:36] = True
    matcher = region_only_model(mask, "embedding")
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    own = [Similarity(e, "dot") for e in matcher.net(x).detach()]
    ramp = torch.linspace(0, 1, size * size).view(size, size)
    oracle = (torch.as_tensor(mask, dtype=torch.float32) + 0.01 * ramp).expand(n, size, size)
    random = torch.stack([torch.from_numpy(random_map((size, size), 0, f"photo{i}")) for i in range(n)])
    aucs = {}
    for name, m in {"oracle": oracle, "random": random, "inverted": 1 - oracle}.items():
        metric = DeletionInsertion(matcher.net, mode="deletion", baseline="blur", steps=12)
        metric.update(x, m, own)
        aucs[name] = metric.per_image_auc()
    rows = compare_maps(aucs, [f"photo{i}" for i in range(n)], better="below", claim="has a lower deletion AUC",
                        pairs=[("oracle", "random"), ("inverted", "random"), ("random", "oracle")])
    status = {(r["a"], r["b"]): r["status"] for r in rows}
    assert status[("oracle", "random")] == "supported"
    assert status[("inverted", "random")] == "not supported"  # worse than random: the interval is above 0
    assert status[("random", "oracle")] == "not supported"
    assert all(r["level"] == pytest.approx(1 - 0.05 / 3) for r in rows)  # Bonferroni over the three pairs
    few = compare_maps({k: v[:5] for k, v in aucs.items()}, [f"p{i}" for i in range(5)], better="below",
                       claim="has a lower deletion AUC", pairs=[("oracle", "random")])
    assert few[0]["status"] == "inconclusive"  # 5 photos: below the minimum n whatever the gap
