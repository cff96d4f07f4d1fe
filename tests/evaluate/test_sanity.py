"""Sanity checks (Adebayo et al. 2018): similarity measures, randomization order, isolation, verdicts."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from facelens.errors import FaceLensError, ModelError
from facelens.evaluate import sanity
from facelens.models.registry import load_model, wrap

N_PHOTOS = 8  # the fewest photos the verdict rule decides on (MIN_N)


# -- hand-computed similarity cases ------------------------------------------------------------------------
def test_spearman_of_a_two_pixel_swap_is_the_closed_form() -> None:
    a = np.arange(1.0, 50.0).reshape(7, 7)
    b = a.copy()
    b.flat[[0, 1]] = b.flat[[1, 0]]  # swap two neighbouring ranks: Σd² = 2
    expected = 1 - 6 * 2 / (49 * (49**2 - 1))
    s = sanity.map_similarity(a, b)
    assert s["rank_corr_of_abs_maps"] == pytest.approx(expected, abs=1e-12)
    assert s["rank_corr"] == pytest.approx(expected, abs=1e-12)


def test_a_map_and_its_negation_agree_in_magnitude_and_disagree_in_sign() -> None:
    a = np.random.default_rng(1).normal(size=(9, 9))
    s = sanity.map_similarity(a, -a)
    assert s["rank_corr_of_abs_maps"] == pytest.approx(1.0)
    assert s["rank_corr"] == pytest.approx(-1.0)  # the decisive measure: an inverted map has changed
    assert s["ssim_of_abs_maps"] == pytest.approx(1.0)  # SSIM and HOG look at |map| only
    assert s["hog_of_abs_maps"] == pytest.approx(1.0)


def test_ssim_of_a_map_and_its_complement_is_the_closed_form() -> None:
    # on a 7×7 map, a 7×7 window fits once: SSIM is the formula over the whole map (unbiased moments)
    x = np.random.default_rng(0).random((7, 7))
    x = (x - x.min()) / (x.max() - x.min())  # already in [0, 1] after the check's own normalization
    y = 1.0 - x
    mx, my = x.mean(), y.mean()
    vx, vy = x.var(ddof=1), y.var(ddof=1)
    cov = ((x - mx) * (y - my)).sum() / (x.size - 1)
    c1, c2 = 0.01**2, 0.03**2
    expected = (2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert sanity.ssim_similarity(x, y) == pytest.approx(expected, rel=1e-9)
    assert expected < -0.9


def test_hog_of_a_vertical_and_a_horizontal_edge_is_minus_one_eighth() -> None:
    # one 8×8 cell, one block, 9 bins: a vertical edge puts all gradient energy in bin 0 (0°),
    # a horizontal edge in bin 4 (90°); after normalization the descriptors are unit vectors
    # e0 and e4, and Pearson(e0, e4) over 9 entries is (−1/9) / (8/9) = −1/8
    vertical = np.zeros((8, 8))
    vertical[:, 4:] = 1.0
    horizontal = vertical.T.copy()
    value = sanity.hog_similarity(vertical, horizontal, pixels_per_cell=8, cells_per_block=1)
    assert value == pytest.approx(-1.0 / 8.0, abs=1e-9)
    assert sanity.hog_similarity(vertical, vertical, pixels_per_cell=8, cells_per_block=1) == pytest.approx(1.0)


def test_flat_maps_count_as_unrelated() -> None:
    a = np.random.default_rng(2).random((16, 16))
    s = sanity.map_similarity(a, np.zeros((16, 16)))
    assert s["rank_corr_of_abs_maps"] == 0.0 and s["hog_of_abs_maps"] == 0.0


# -- layer order and randomization ---------------------------------------------------------------------------
class _Scrambled(nn.Module):
    """Declared output-first, run input-first: the order must come from the forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 2)
        self.norm = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(torch.relu(self.norm(self.conv(x)))).flatten(1)[:, :8])


def _tiny_model() -> object:
    torch.manual_seed(0)
    body = _Scrambled()
    with torch.no_grad():  # a "trained" norm layer: non-trivial scale and shift
        body.norm.weight.copy_(torch.linspace(0.5, 2.0, 4))
        body.norm.bias.copy_(torch.linspace(-0.3, 0.3, 4))
    return wrap(body, task="classification", input_size=16, class_names=["a", "b"], align=None,
                name="tiny")


def test_layers_run_from_output_to_input() -> None:
    model = _tiny_model()
    x = torch.rand(1, 3, 16, 16)
    assert sanity.parameterized_layers(model.net, x) == ["model.head", "model.norm", "model.conv"]
    # without a forward pass only the declaration order is known
    assert sanity.parameterized_layers(model.net) == ["model.conv", "model.norm", "model.head"]


def _changed(a: nn.Module, b: nn.Module) -> set[str]:
    sa, sb = a.state_dict(), b.state_dict()
    return {k.rsplit(".", 1)[0] for k in sa if not torch.equal(sa[k], sb[k])}


def test_cascading_accumulates_and_independent_restores() -> None:
    model = _tiny_model()
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    steps = [(n, [n]) for n in ("model.head", "model.norm", "model.conv")]
    cascade = [(_changed(model.net, m.net), m is model) for _, _, m in
               sanity.randomized_models(model, "cascading", steps)]
    assert [c for c, _ in cascade] == [{"model.head"}, {"model.head", "model.norm"},
                                       {"model.head", "model.norm", "model.conv"}]
    alone = [_changed(model.net, m.net) for _, _, m in sanity.randomized_models(model, "independent", steps)]
    assert alone == [{"model.head"}, {"model.norm"}, {"model.conv"}]
    assert not any(same for _, same in cascade)
    assert all(torch.equal(before[k], v) for k, v in model.net.state_dict().items())


def test_randomization_is_seeded_and_leaves_global_rng_alone() -> None:
    conv_a, conv_b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
    state = torch.random.get_rng_state()
    sanity.randomize_layer(conv_a, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    sanity.randomize_layer(conv_b, seed=7)
    assert torch.equal(conv_a.weight, conv_b.weight)


def test_norm_layers_get_a_random_scale_and_shift_not_the_identity() -> None:
    bn = nn.BatchNorm2d(64)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.2, 3.0, 64))
        bn.bias.copy_(torch.linspace(-1.0, 1.0, 64))
    trained_w, mean_buf = bn.weight.detach().clone(), bn.running_mean.clone()
    sanity.randomize_layer(bn, seed=3)
    bn.requires_grad_(False)
    assert not torch.allclose(bn.weight, trained_w)
    assert not torch.allclose(bn.weight, torch.ones(64))  # reset_parameters would give the identity
    # drawn from N(mean, std²) of the trained scale: same range, pattern gone
    assert abs(float(bn.weight.mean() - trained_w.mean())) < 4 * float(trained_w.std()) / 64**0.5
    assert 0.5 < float(bn.weight.std() / trained_w.std()) < 2.0
    assert torch.equal(bn.running_mean, mean_buf)


def test_unknown_layer_is_refused() -> None:
    model = _tiny_model()
    with pytest.raises(ModelError, match="no layer"):
        sanity.model_randomization(model, torch.rand(1, 3, 16, 16), "gradient", layers=["model.nope"])


# -- real model, real photos ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gender_batch(shared_faces: Path) -> tuple[object, torch.Tensor, list[object]]:
    with open(shared_faces / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["dataset"] == "frl_london" and r["subset"] == "neutral"]
    model = load_model("dlib-gender")
    chips = [model.chip(shared_faces / r["path"]) for r in rows[:N_PHOTOS]]
    return model, model.to_tensor(chips), chips


@pytest.fixture(scope="module")
def gradcam_cascade(gender_batch: tuple[object, torch.Tensor, list[object]]) -> sanity.SanityResult:
    model, x, chips = gender_batch
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    res = sanity.model_randomization(model, x, "gradcam", chips=chips)
    after = model.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the cached zoo model was modified"
    assert load_model("dlib-gender") is model
    return res


@pytest.fixture(scope="module")
def gbp_independent(gender_batch: tuple[object, torch.Tensor, list[object]]) -> sanity.SanityResult:
    model, x, chips = gender_batch
    return sanity.model_randomization(model, x, "guided-backprop", mode="independent",
                                      layers=["body.fc2", "body.conv1"], chips=chips)


def test_randomizing_a_trained_model_changes_gradcam(gradcam_cascade: sanity.SanityResult) -> None:
    res = gradcam_cascade
    assert res.steps[0].rank_corr == pytest.approx(1.0)  # a deterministic method agrees with itself
    assert [s.layer for s in res.steps[1:3]] == ["body.fc2", "body.fc1"]  # output side first
    assert res.steps[-1].layer == "body.conv1"
    lo, hi = res.decisive.rank_corr_ci
    assert lo <= res.decisive.rank_corr <= hi < sanity.PASS_THRESHOLD  # the whole interval is below 0.5
    assert res.verdict == "pass" and res.decision.status == "supported"
    assert res.n_images == N_PHOTOS and res.decision.estimate.n_clusters == N_PHOTOS
    rows = res.to_rows()
    assert len(rows) == len(res.steps)
    assert {"layer", "step", "ssim_of_abs_maps", "hog_of_abs_maps", "verdict"} <= set(rows[0])
    assert res.summary()["ci"] == [lo, hi] and "interval" in res.summary()["sentence"]


def test_guided_backprop_ignores_the_output_layer(gbp_independent: sanity.SanityResult,
                                                  gradcam_cascade: sanity.SanityResult) -> None:
    # Adebayo et al.'s finding: Guided Backprop barely changes when the top layer is random
    res = gbp_independent
    assert [s.layer for s in res.steps] == ["original", "body.fc2", "body.conv1"]
    assert res.decisive.layer == "body.fc2"
    assert res.decisive.rank_corr_ci[0] > 0.9  # the whole interval: a known failure must fail
    assert res.verdict == "fail" and res.decision.status == "not supported"
    # while Grad-CAM, with the same random output layer, changes a lot
    assert gradcam_cascade.steps[1].layer == "body.fc2"
    assert gradcam_cascade.steps[1].rank_corr < res.decisive.rank_corr - 0.5


def test_streamed_batches_average_like_one_batch(gender_batch: tuple[object, torch.Tensor, list[object]]) -> None:
    model, x, _ = gender_batch
    layers = ["body.fc2", "body.conv4"]
    whole = sanity.ModelRandomization(model, "gradient", layers=layers)
    whole.update(x)
    halves = sanity.ModelRandomization(model, "gradient", layers=layers)
    halves.update(x[:1])
    other = sanity.ModelRandomization(model, "gradient", layers=layers)
    other.update(x[1:])
    halves.merge(other)
    a, b = whole.compute(), halves.compute()
    for sa, sb in zip(a["steps"], b["steps"], strict=True):
        assert sa["rank_corr"] == pytest.approx(sb["rank_corr"], abs=1e-9)
        assert sa["n"] == sb["n"] == N_PHOTOS


def test_plot_draws_the_curves(gradcam_cascade: sanity.SanityResult, gbp_independent: sanity.SanityResult) -> None:
    img = sanity.plot([gradcam_cascade, gbp_independent])
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert (img < 200).any(axis=2).mean() > 0.01  # lines and text, not a blank canvas


# -- data randomization --------------------------------------------------------------------------------------
def test_shuffled_label_probe_changes_the_gradient(shared_faces: Path) -> None:
    """Sex probes on dlib-resnet embeddings of adult UTKFace crops (small photos: fast to align)."""
    with open(shared_faces / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["dataset"] == "utkface" and int(r["age"] or 0) >= 18]
    model = load_model("dlib-resnet")
    chips, labels = [], []
    for sex in ("female", "male"):
        for r in (r for r in rows if r["sex"] == sex):
            try:
                chips.append(model.chip(shared_faces / r["path"]))
            except FaceLensError:
                continue
            labels.append(sex)
            if labels.count(sex) == 12:
                break
    res = sanity.data_randomization(model, chips, labels, "gradient", explain=[0, 12])
    assert res.check == "data" and res.n_images == 2
    assert res.extras["true_probe_train_accuracy"] == 1.0
    assert res.extras["true_probe_cv_accuracy"] > 0.6  # sex is linearly readable from the embedding
    assert res.extras["shuffled_probe_train_accuracy"] == 1.0  # shuffled labels are memorized
    assert 0.2 < res.extras["shuffled_labels_agreeing_with_true"] < 0.8
    assert res.steps[0].rank_corr == pytest.approx(1.0)
    assert res.steps[1].layer == "shuffled labels"
    assert res.decisive.rank_corr < 0.99  # another head, another map
    assert res.verdict == "inconclusive"  # two explained photos: below the minimum n, whatever the value
    assert "fewer than 8" in res.decision.reason


# -- the verdict rule on known answers ---------------------------------------------------------------------------
def _edges_of_input(model: object, x: torch.Tensor, targets: object) -> torch.Tensor:
    """A "method" that ignores the model: the image's own gradient magnitude. It must fail."""
    g = x.mean(1)
    edges = (g[:, 1:, 1:] - g[:, :-1, 1:]).abs() + (g[:, 1:, 1:] - g[:, 1:, :-1]).abs()
    return torch.nn.functional.pad(edges, (0, 1, 0, 1))


def _first_conv_response(model: object, x: torch.Tensor, targets: object) -> torch.Tensor:
    """A "method" that reads the weights: the first convolution's summed response. It must change."""
    conv = dict(model.net.named_modules())["model.conv"]  # type: ignore[attr-defined]
    with torch.no_grad():
        return conv(x).sum(1)


def test_a_method_that_ignores_the_model_fails_and_one_that_reads_the_weights_passes() -> None:
    model = _tiny_model()
    x = torch.rand(N_PHOTOS, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    blind = sanity.model_randomization(model, x, _edges_of_input)
    assert blind.decisive.rank_corr == pytest.approx(1.0) and blind.verdict == "fail"
    reader = sanity.model_randomization(model, x, _first_conv_response)
    assert reader.decisive.rank_corr_ci[1] < sanity.PASS_THRESHOLD and reader.verdict == "pass"
    few = sanity.model_randomization(model, x[:3], _edges_of_input)
    assert few.verdict == "inconclusive" and "fewer than 8" in few.decision.reason  # same maps, too few photos


def test_a_map_that_goes_flat_is_counted_as_changed_and_the_sentence_says_so() -> None:
    model = _tiny_model()
    x = torch.rand(N_PHOTOS, 3, 16, 16, generator=torch.Generator().manual_seed(4))

    trained_conv = dict(model.net.named_modules())["model.conv"].weight.detach().clone()

    def vanishes(m: object, xs: torch.Tensor, targets: object) -> torch.Tensor:
        """The image on the trained weights; nothing at all once the first convolution is random."""
        conv = dict(m.net.named_modules())["model.conv"].weight  # type: ignore[attr-defined]
        trained = torch.equal(conv.detach(), trained_conv)
        return xs.mean(1) if trained else torch.zeros(xs.shape[0], *xs.shape[-2:])

    res = sanity.model_randomization(model, x, vanishes)
    assert res.steps[0].flat_maps == 0 and res.steps[0].rank_corr == pytest.approx(1.0)  # the trained map is not
    assert res.decisive.flat_maps == N_PHOTOS and res.decisive.rank_corr == 0.0
    assert res.verdict == "pass" and "became flat" in res.decision.reason
    assert res.summary()["flat_maps"] == N_PHOTOS


def test_bad_inputs_are_refused() -> None:
    model = _tiny_model()
    with pytest.raises(ModelError, match="N×3×H×W"):
        sanity.model_randomization(model, torch.rand(3, 16, 16), "gradient")
    with pytest.raises(ModelError, match="cascading"):
        sanity.ModelRandomization(model, "gradient", mode="sideways")  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="two distinct labels"):
        sanity.data_randomization(model, torch.rand(4, 3, 16, 16), ["a"] * 4, "gradient")
