"""Face-specific methods: landmark regions, pair maps, DISE and canonical maps."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from facelens.errors import ModelError
from facelens.explain import face as FX
from facelens.explain.api import explain
from facelens.explain.base import Method
from facelens.explain.engine import EMBEDDINGS
from facelens.explain.explanation import Explanation
from facelens.explain.perturbation import fill_image
from facelens.faces.align import AlignRecipe, Chip, align
from facelens.faces.canonical import canonical_face, to_canonical
from facelens.faces.detect import pick_face
from facelens.faces.regions import REGION_NAMES, chip_region_masks
from facelens.image import load_image
from facelens.models import FaceModel, load_model, wrap
from facelens.targets import Contrastive, Similarity
from tests.fixtures.synthetic import mass_inside, region_only_model

SIDE = 64  # small chips keep the synthetic models fast
RECIPE = AlignRecipe(size=SIDE, padding=0.25, method="dlib5")
FAR_FROM_MOUTH = ("forehead", "left_brow", "right_brow", "left_eye", "right_eye")


@pytest.fixture(scope="module")
def london_pair(manifest_rows: list[dict[str, str]], shared_faces: Path) -> tuple[Path, Path]:
    """Neutral and smiling photos of the first FRL London identity that has both."""
    by_id: dict[str, dict[str, Path]] = {}
    for r in manifest_rows:
        if r["dataset"] == "frl_london":
            by_id.setdefault(r["identity"], {})[r["subset"]] = shared_faces / r["path"]
    photos = next(v for _, v in sorted(by_id.items()) if {"neutral", "smiling"} <= set(v))
    return photos["neutral"], photos["smiling"]


@pytest.fixture(scope="module")
def other_london(manifest_rows: list[dict[str, str]], shared_faces: Path,
                 london_pair: tuple[Path, Path]) -> list[Path]:
    """Neutral photos of three other London identities (non-mates)."""
    rows = [r for r in manifest_rows if r["dataset"] == "frl_london" and r["subset"] == "neutral"]
    return [shared_faces / r["path"] for r in rows if shared_faces / r["path"] != london_pair[0]][:3]


@pytest.fixture(scope="module")
def chips(london_pair: tuple[Path, Path]) -> tuple[Chip, Chip]:
    out = []
    for path in london_pair:
        rgb = load_image(path)
        out.append(align(rgb, pick_face(rgb), RECIPE))
    return out[0], out[1]


@pytest.fixture(scope="module")
def mouth_model(chips: tuple[Chip, Chip]) -> tuple[FaceModel, np.ndarray]:
    """A recognizer whose embedding depends only on the mouth region of the neutral chip."""
    mouth = chip_region_masks(chips[0])["mouth"]
    return region_only_model(mouth, task="embedding", recipe=RECIPE), mouth


@pytest.fixture(scope="module")
def whole_model() -> FaceModel:
    """The same small network looking at the whole chip (for pair maps)."""
    return region_only_model(np.ones((SIDE, SIDE), bool), task="embedding", recipe=RECIPE)


def _self_similarity(model: FaceModel, chip: Chip) -> Similarity:
    return Similarity(torch.from_numpy(model.forward_chips(chip)[0]))


# -- regions ---------------------------------------------------------------------------------------------
def test_region_occlusion_puts_the_top_region_on_the_mouth(mouth_model: tuple[FaceModel, np.ndarray],
                                                           chips: tuple[Chip, Chip]) -> None:
    model, _ = mouth_model
    chip = chips[0]
    x = model.to_tensor(chip)
    target = _self_similarity(model, chip)
    method = FX.RegionOcclusion(model)
    saliency = method.attribute(x, target, chips=[chip])[0].numpy()
    regions = method.extras["regions"]
    assert max(regions, key=lambda k: abs(regions[k])) == "mouth"
    for name in FAR_FROM_MOUTH:  # beyond the receptive field of the mouth: removing them changes nothing
        assert abs(regions[name]) < 1e-6, name
    # the mouth value is the hand-computed drop, painted on the mouth's pixels
    labels, _ = FX.region_labels(chip)
    keep = torch.from_numpy(labels != REGION_NAMES.index("mouth")).float()[None, None]
    filled = fill_image(x, "mean") + keep * (x - fill_image(x, "mean"))
    with torch.no_grad():
        expected = float(target(model.net(x))[0] - target(model.net(filled))[0])
    assert regions["mouth"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert np.allclose(saliency[labels == REGION_NAMES.index("mouth")], regions["mouth"])


def test_region_shap_and_lime_rank_the_mouth_first(mouth_model: tuple[FaceModel, np.ndarray],
                                                   chips: tuple[Chip, Chip]) -> None:
    """The mouth leads by far; regions within the receptive field (chin, nose, cheeks) follow, and
    regions beyond it (brows, eyes, forehead) get nothing but sampling noise."""
    model, _ = mouth_model
    chip = chips[0]
    x = model.to_tensor(chip)
    target = _self_similarity(model, chip)
    for cls, settings in ((FX.RegionShap, {"n_samples": 256}), (FX.RegionLime, {"n_samples": 256})):
        method = cls(model, **settings)
        method.attribute(x, target, chips=[chip])
        regions = method.extras["regions"]
        ranked = sorted(regions, key=lambda k: -abs(regions[k]))
        assert ranked[0] == "mouth", cls.name
        assert regions["mouth"] > 3 * abs(regions[ranked[1]]), cls.name
        assert max(abs(regions[k]) for k in FAR_FROM_MOUTH) < 0.1 * regions["mouth"], cls.name


def test_region_shap_is_exact_with_every_coalition(chips: tuple[Chip, Chip]) -> None:
    """With n_samples ≥ 2^F the values are the Shapley values, checked by brute force on a cheap
    nonlinear net (a 4× average pool, a 1×1 convolution, then a 4×4 pool that mixes regions)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.AvgPool2d(4), nn.Conv2d(3, 6, 1), nn.Tanh(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                        nn.Linear(96, 5))
    model = wrap(net, task="embedding", input_size=SIDE, align=RECIPE)
    chip = chips[1]
    x = model.to_tensor(chip)
    target = _self_similarity(model, chip)
    method = FX.RegionShap(model, n_samples=4096, batch_size=512)
    method.attribute(x, target, chips=[chip])
    labels, names = FX.region_labels(chip)
    present = sorted(set(np.unique(labels).tolist()))
    n = len(present)
    fill = fill_image(x, "mean")
    members = torch.stack([torch.from_numpy(labels == k) for k in present]).float()  # (F, H, W)
    codes = torch.arange(2 ** n)
    coalition = ((codes[:, None] >> torch.arange(n)) & 1).float()  # (2^F, F): 1 keeps the region
    values = torch.empty(2 ** n, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, 2 ** n, 512):
            keep = torch.einsum("bf,fhw->bhw", coalition[start:start + 512], members)[:, None]
            values[start:start + 512] = target(model.net(fill + keep * (x - fill))).double()
    shapley = np.zeros(n)
    for i in range(n):
        without = codes[(codes >> i) & 1 == 0]
        sizes = coalition[without].sum(1).numpy().astype(int)
        weights = np.array([math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in sizes])
        shapley[i] = float((weights * (values[without | (1 << i)] - values[without]).numpy()).sum())
    ours = np.array([method.extras["regions"][names[k]] for k in present])
    np.testing.assert_allclose(ours, shapley, atol=2e-5)
    assert ours.sum() == pytest.approx(float(values[-1] - values[0]), abs=1e-5)


def test_region_methods_need_a_face_and_report_through_explain(mouth_model: tuple[FaceModel, np.ndarray],
                                                               london_pair: tuple[Path, Path]) -> None:
    model, _ = mouth_model
    e = explain(model, london_pair[0], "region-occlusion")
    assert set(e.extras["regions"]) <= set(REGION_NAMES) and "mouth" in e.extras["regions"]
    assert e.signed and e.chip_map.shape == (SIDE, SIDE)
    with pytest.raises(ModelError, match="needs face landmarks"):
        FX.RegionOcclusion(model).attribute(torch.rand(1, 3, SIDE, SIDE), Similarity(torch.ones(8)))


# -- pair maps -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("anchors", ["grid", "landmarks"])
def test_pair_maps_swap_exactly_with_the_photos(whole_model: FaceModel, chips: tuple[Chip, Chip],
                                                anchors: str) -> None:
    a, b = chips
    ab = FX.pair_maps(whole_model, a, b, mode="both", anchors=anchors, window=12, stride=6)
    ba = FX.pair_maps(whole_model, b, a, mode="both", anchors=anchors, window=12, stride=6)
    assert ab.map_a is not None and ab.map_b is not None and ba.map_a is not None and ba.map_b is not None
    assert np.abs(ab.map_a).max() > 1e-4  # not trivially symmetric
    np.testing.assert_allclose(ab.map_a, ba.map_b, rtol=0, atol=1e-7)
    np.testing.assert_allclose(ab.map_b, ba.map_a, rtol=0, atol=1e-7)
    assert ab.similarity == pytest.approx(ba.similarity, abs=1e-7)
    if anchors == "grid":  # the same chip patch in both photos: one drop per patch, the same map
        np.testing.assert_array_equal(ab.map_a, ab.map_b)
    else:
        assert not np.allclose(ab.map_a, ab.map_b)


def test_one_sided_pair_maps_swap_and_do_not_depend_on_the_batch(whole_model: FaceModel,
                                                                 chips: tuple[Chip, Chip]) -> None:
    a, b = chips
    each = FX.pair_maps(whole_model, a, b, mode="each", window=16, stride=8, batch_size=64)
    only_b = FX.pair_maps(whole_model, b, a, mode="b", window=16, stride=8, batch_size=5)
    assert only_b.map_a is None and only_b.map_b is not None and each.map_a is not None
    np.testing.assert_allclose(each.map_a, only_b.map_b, rtol=0, atol=1e-6)
    assert each.evaluations == 2 * 49 and only_b.evaluations == 49


def test_pair_map_is_the_hand_computed_similarity_drop(whole_model: FaceModel, chips: tuple[Chip, Chip]) -> None:
    """32-px patches at stride 16 (3×3 of them): a pixel carries the mean over the patches covering it
    of base − cos(occluded A, occluded B)."""
    a, b = chips
    pair = FX.pair_maps(whole_model, a, b, mode="both", window=32, stride=16, fill="zero", metric="cosine")
    xa, xb = whole_model.to_tensor(a), whole_model.to_tensor(b)
    cos = torch.nn.functional.cosine_similarity
    drops = {}
    with torch.no_grad():
        base = float(cos(whole_model.net(xa), whole_model.net(xb))[0])
        for y0 in (0, 16, 32):
            for x0 in (0, 16, 32):
                oa, ob = xa.clone(), xb.clone()
                oa[..., y0:y0 + 32, x0:x0 + 32] = 0
                ob[..., y0:y0 + 32, x0:x0 + 32] = 0
                drops[y0, x0] = base - float(cos(whole_model.net(oa), whole_model.net(ob))[0])
    assert pair.map_a is not None and pair.settings["patches"] == 9
    for y, x in ((5, 7), (20, 9), (24, 40), (60, 60)):
        covering = [d for (y0, x0), d in drops.items() if y0 <= y < y0 + 32 and x0 <= x < x0 + 32]
        assert float(pair.map_a[y, x]) == pytest.approx(float(np.mean(covering)), abs=1e-6), (y, x)
    assert pair.similarity == pytest.approx(base, abs=1e-6)
    assert pair.same_person is None


@pytest.fixture(scope="module")
def dlib_chips(london_pair: tuple[Path, Path], other_london: list[Path]) -> tuple[FaceModel, list[Chip]]:
    """dlib-resnet and its chips of: neutral, smiling (same person), three other people."""
    model = load_model("dlib-resnet")
    return model, [model.chip(p) for p in (*london_pair, *other_london)]


def test_pair_maps_of_a_real_london_pair(london_pair: tuple[Path, Path],
                                         dlib_chips: tuple[FaceModel, list[Chip]]) -> None:
    model, faces = dlib_chips
    before = EMBEDDINGS.hits
    pair = FX.pair_maps(model, *london_pair, mode="both", window=50, stride=50)
    assert pair.similarity > 0.9 and pair.distance < 0.6 and pair.same_person is True
    assert pair.map_a is not None and np.isfinite(pair.map_a).all() and np.abs(pair.map_a).max() > 0
    assert pair.photo_map_a is not None and pair.photo_a is not None
    assert pair.photo_map_a.shape == pair.photo_a.shape[:2] and np.isfinite(pair.photo_map_a).all()
    again = FX.pair_maps(model, faces[0], faces[1], mode="a", window=50, stride=50)
    assert EMBEDDINGS.hits >= before + 2  # the intact embeddings were cached
    assert again.similarity == pair.similarity and again.photo_map_a is not None and again.photo_a is None
    impostor = FX.pair_maps(model, faces[0], faces[2], mode="a", window=75, stride=75)
    assert impostor.similarity < pair.similarity
    figure = pair.render(on="photo")
    assert figure.ndim == 3 and figure.shape[2] == 3 and figure.shape[1] > figure.shape[0]


def test_pair_maps_refuse_bad_settings(whole_model: FaceModel, chips: tuple[Chip, Chip]) -> None:
    with pytest.raises(ModelError, match="mode"):
        FX.pair_maps(whole_model, *chips, mode="all")  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="anchors"):
        FX.pair_maps(whole_model, *chips, anchors="dense")  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="fill"):
        FX.pair_maps(whole_model, *chips, fill="noise")
    with pytest.raises(ModelError, match="render it on='chip'"):
        FX.pair_maps(whole_model, *chips, window=32, stride=32).render(on="photo")


# -- DISE ------------------------------------------------------------------------------------------------
def test_dise_same_seed_same_map_whatever_the_batch(mouth_model: tuple[FaceModel, np.ndarray],
                                                    chips: tuple[Chip, Chip]) -> None:
    model, mouth = mouth_model
    chip = chips[0]
    x = model.to_tensor(chip)
    target = _self_similarity(model, chip)
    first = FX.Dise(model, n_masks=96, batch_size=32, seed=3).attribute(x, target, chips=[chip])[0]
    again = FX.Dise(model, n_masks=96, batch_size=32, seed=3).attribute(x, target, chips=[chip])[0]
    other_batch = FX.Dise(model, n_masks=96, batch_size=7, seed=3).attribute(x, target, chips=[chip])[0]
    other_seed = FX.Dise(model, n_masks=96, batch_size=32, seed=4).attribute(x, target, chips=[chip])[0]
    assert torch.equal(first, again)
    torch.testing.assert_close(first, other_batch, rtol=1e-4, atol=1e-6 * float(first.abs().max()))
    assert not torch.allclose(first, other_seed)
    assert mass_inside(first.numpy(), mouth) > 0.9


def test_dise_prior_hides_only_where_the_gradient_lives(mouth_model: tuple[FaceModel, np.ndarray],
                                                        chips: tuple[Chip, Chip]) -> None:
    """The default prior is the gradient map: zero away from the mouth, so no mask hides the brows."""
    model, mouth = mouth_model
    chip = chips[0]
    method = FX.Dise(model, n_masks=32)
    method.attribute(model.to_tensor(chip), _self_similarity(model, chip), chips=[chip])
    prior = method.extras["prior"]
    assert prior.shape == (19, 19) and prior.sum() == pytest.approx(1.0)
    near_mouth = cv2.resize(cv2.dilate(mouth.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(np.float32),
                            (19, 19), interpolation=cv2.INTER_AREA) > 0
    assert prior[~near_mouth].sum() < 1e-9
    uniform = FX.Dise(model, n_masks=8, prior="uniform")
    uniform.attribute(model.to_tensor(chip), _self_similarity(model, chip), chips=[chip])
    assert np.allclose(uniform.extras["prior"], 1 / 361)
    user = FX.Dise(model, n_masks=8, prior=mouth.astype(np.float32))
    user.attribute(model.to_tensor(chip), _self_similarity(model, chip), chips=[chip])
    assert user.used_settings()["prior"] == "user map (64, 64)" and user.extras["prior"][~near_mouth].sum() == 0
    with pytest.raises(ModelError, match="2-D"):
        FX.Dise(model, prior=np.ones(5)).attribute(model.to_tensor(chip), _self_similarity(model, chip), [chip])


def test_dise_mask_scores_are_xfr_triplet_scores(whole_model: FaceModel, chips: tuple[Chip, Chip]) -> None:
    """mean over non-mates of [(s(p,ref) − s(m,ref)) − (s(p,gal) − s(m,gal))], computed by hand."""
    probe, mate = chips
    g = torch.Generator().manual_seed(1)
    ref = torch.from_numpy(whole_model.forward_chips(mate)[0])
    gallery = ref + 0.5 * torch.randn(4, ref.numel(), generator=g)
    target = Contrastive(ref, gallery)
    x = whole_model.to_tensor(probe)
    method = FX.Dise(whole_model, n_masks=12, prior="uniform", seed=5)
    saliency = method.attribute(x, target, chips=[probe])[0]
    masks = method.masks(torch.full((361,), 1 / 361), (SIDE, SIDE))
    fill = fill_image(x, "blur", blur_sigma=0.04)
    cos = torch.nn.functional.cosine_similarity
    with torch.no_grad():
        p = whole_model.net(x)[0]
        for i in range(12):
            m = whole_model.net(fill + masks(i, i + 1) * (x - fill))[0]
            per_gallery = [(cos(p, ref, 0) - cos(m, ref, 0)) - (cos(p, gal, 0) - cos(m, gal, 0)) for gal in gallery]
            assert float(method.extras["mask_scores"][i]) == pytest.approx(float(torch.stack(per_gallery).mean()),
                                                                           abs=1e-5)
    # the map: mean over positively scored masks of score × hidden area (xfr's map up to its rescaling)
    scores = torch.from_numpy(method.extras["mask_scores"]).double()
    hidden = 1.0 - masks(0, 12)[:, 0].double()
    positive = scores > 0
    expected = (scores[positive, None, None] * hidden[positive]).sum(0) / int(positive.sum())
    torch.testing.assert_close(saliency.double(), expected, rtol=1e-5, atol=1e-8)


def test_dise_with_a_matcher_target_on_dlib_resnet(dlib_chips: tuple[FaceModel, list[Chip]]) -> None:
    model, faces = dlib_chips
    target = FX.contrastive_target(model, faces[1], faces[2:])
    assert isinstance(target, Contrastive) and target.nonmates.shape == (3, 128)
    x = model.to_tensor(faces[0])
    with torch.no_grad():
        assert float(target(model.net(x))[0]) > 0  # the mate is closer than the non-mates
    method = FX.Dise(model, n_masks=24, prior="uniform")
    saliency = method.attribute(x, target, chips=[faces[0]])[0].numpy()
    assert np.isfinite(saliency).all() and saliency.min() >= 0 and saliency.max() > 0
    assert 0 < method.extras["positive_masks"] <= 24


# -- canonical maps --------------------------------------------------------------------------------------
def _blob(centre: np.ndarray, sigma: float = 4.0) -> np.ndarray:
    yy, xx = np.mgrid[:SIDE, :SIDE]
    return np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * sigma ** 2)).astype(np.float32)


def test_accumulator_equals_the_batch_mean(chips: tuple[Chip, Chip]) -> None:
    from facelens.faces.canonical import chip_landmarks

    items = [(_blob(chip_landmarks(c)[k]), c) for c in chips for k in (30, 36, 48)]
    items.append((np.zeros((SIDE, SIDE), np.float32), chips[0]))  # no mass: skipped, not counted
    by_hand = []
    for m, c in items[:-1]:
        canon = np.clip(to_canonical(m, c), 0, None).astype(np.float64)
        by_hand.append(canon / canon.sum())
    batch = FX.canonical_map(([m for m, _ in items], [c for _, c in items]))
    assert batch.count == 6 and batch.skipped == 1
    np.testing.assert_allclose(batch.map, np.mean(by_hand, 0), atol=1e-7)
    first, second = FX.CanonicalMapAccumulator(), FX.CanonicalMapAccumulator()
    for i, item in enumerate(items):
        (first if i % 2 else second).update(item)
    first.merge(second)
    merged = first.compute()
    np.testing.assert_allclose(merged.map, batch.map, atol=1e-7)
    assert merged.count == batch.count and merged.map.sum() == pytest.approx(1.0, abs=1e-5)


def test_canonical_map_goes_back_onto_any_face(chips: tuple[Chip, Chip]) -> None:
    from facelens.faces.canonical import chip_landmarks

    nose_tips = FX.canonical_map(([_blob(chip_landmarks(chips[0])[30], 2.0)], [chips[0]]))
    on_other = nose_tips.to_face(chips[1])
    peak = np.array(np.unravel_index(on_other.argmax(), on_other.shape)[::-1], np.float64)
    assert np.hypot(*(peak - chip_landmarks(chips[1])[30])) < 2.0


def _explanation(method: Method, model: FaceModel, chip: Chip) -> Explanation:
    saliency = method.attribute(model.to_tensor(chip), _self_similarity(model, chip), chips=[chip])[0]
    return Explanation(method=method.name, model=model.name, target="self", score=1.0,
                       chip_map=saliency.numpy(), chip=chip, photo=chip.image, settings=method.used_settings(),
                       seconds=0.0, signed=method.signed, extras=method.extras)


def test_accumulator_refuses_to_mix_methods(mouth_model: tuple[FaceModel, np.ndarray],
                                            chips: tuple[Chip, Chip]) -> None:
    model, _ = mouth_model
    acc = FX.CanonicalMapAccumulator()
    acc.update(_explanation(FX.RegionOcclusion(model), model, chips[0]))
    cis = _explanation(FX.CanonicalOcclusion(model, density=0), model, chips[0])
    with pytest.raises(ModelError, match="method"):
        acc.update(cis)
    # a canonical-occlusion explanation is averaged from its own canonical map, not re-warped
    own = np.clip(cis.extras["canonical"], 0, None)
    np.testing.assert_allclose(FX.canonical_map([cis]).map, own / own.sum(), atol=1e-7)
    with pytest.raises(ModelError, match="no map"):
        FX.CanonicalMapAccumulator().compute()


def test_canonical_occlusion_lands_on_the_template_mouth(mouth_model: tuple[FaceModel, np.ndarray],
                                                         chips: tuple[Chip, Chip]) -> None:
    model, mouth = mouth_model
    chip = chips[0]
    method = FX.CanonicalOcclusion(model)
    saliency = method.attribute(model.to_tensor(chip), _self_similarity(model, chip), chips=[chip])[0].numpy()
    canon = method.extras["canonical"]
    assert len(method.extras["vertices"]) > 300  # landmarks, edge midpoints, centroids
    assert mass_inside(saliency, mouth) > 0.8
    face = canonical_face(canon.shape[0])
    template_mouth = np.zeros(canon.shape, np.uint8)
    cv2.fillPoly(template_mouth, [np.round(face.landmarks[48:60]).astype(np.int32)], 1)
    grown = cv2.dilate(template_mouth, np.ones((15, 15), np.uint8)) > 0
    positive = np.clip(canon, 0, None)
    assert positive[grown].sum() / positive.sum() > 0.8 and grown.mean() < 0.1


def test_splat_sums_each_box_over_its_pixels() -> None:
    """The difference-image splat against the plain loop, with boxes cut at the border and empty ones."""
    rng = np.random.default_rng(0)
    h, w = 23, 31
    y0 = rng.integers(0, h + 1, 60)
    x0 = rng.integers(0, w + 1, 60)
    y1, x1 = np.minimum(h, y0 + rng.integers(0, 9, 60)), np.minimum(w, x0 + rng.integers(0, 9, 60))
    boxes = np.stack([y0, y1, x0, x1], 1)
    boxes[:3] = [[0, h, 0, w], [5, 5, 2, 9], [h - 1, h, w - 1, w]]
    values = rng.normal(size=60)
    want_total, want_hits = np.zeros((h, w)), np.zeros((h, w))
    for v, (a, b, c, d) in zip(values, boxes, strict=True):
        want_total[a:b, c:d] += v
        want_hits[a:b, c:d] += 1
    total, hits = FX._splat(values, torch.as_tensor(boxes), h, w)
    np.testing.assert_allclose(total, want_total, atol=1e-12)
    np.testing.assert_array_equal(hits, want_hits)
    with pytest.raises(ModelError, match="values"):
        FX._splat(values[:5], torch.as_tensor(boxes), h, w)
