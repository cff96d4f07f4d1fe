"""The dlib face-recognition ResNet port against dlib itself, on real photos.

Faces are found and chipped with dlib directly (HOG detector, 5-point landmarks,
``get_face_chip(img, shape, 150, 0.25)``), so parity does not depend on facelens'
own alignment code. dlib's descriptors come from its Python binding, which runs
the same ``.dat`` file through dlib's C++ network.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path

import dlib
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from facelens.errors import ModelError, WeightsError
from facelens.models.dlib_dat import Conv, read_network
from facelens.models.dlib_resnet import WEIGHTS_KEY, DlibResNet, _fill, build, load_dlib_resnet
from facelens.models.layers import Add, Affine, PadAdd
from facelens.weights import weight_path

PARITY_ATOL = 1e-4
THRESHOLD = 0.6  # dlib's documented decision threshold for this network
# London: identities with a neutral and a smiling photo; the rest: a mix of sources and sizes
SAMPLE = {"frl_london": 10, "demo": 2, "utkface": 3, "orl": 3}


@dataclass
class FacePhoto:
    path: str
    identity: str
    chip: np.ndarray  # 150×150×3 uint8, cut by dlib
    dlib_chip_descriptor: np.ndarray  # compute_face_descriptor(chip)
    dlib_full_descriptor: np.ndarray  # compute_face_descriptor(img, shape)


def _pick_rows(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    picked: list[dict[str, str]] = []
    for dataset, count in SAMPLE.items():
        candidates = [r for r in rows if r["dataset"] == dataset]
        if dataset == "orl":  # one photo each from different people
            candidates = list({r["identity"]: r for r in reversed(candidates)}.values())
        picked += candidates[:count]
    return picked


def _rgb(path: Path) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(Image.open(path).convert("RGB")))


@pytest.fixture(scope="module")
def net() -> DlibResNet:
    return load_dlib_resnet()


@pytest.fixture(scope="module")
def photos(shared_faces: Path, manifest_rows: list[dict[str, str]]) -> list[FacePhoto]:
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(weight_path("shape_predictor_5_face_landmarks.dat")))
    recognizer = dlib.face_recognition_model_v1(str(weight_path(WEIGHTS_KEY)))
    out = []
    rows = _pick_rows(manifest_rows)
    for row in rows:
        img = _rgb(shared_faces / row["path"])
        upsample = 1 if max(img.shape[:2]) < 300 else 0  # small photos (ORL, UTKFace) need one upsampling
        boxes = list(detector(img, upsample))
        if not boxes:
            continue
        shape = predictor(img, max(boxes, key=lambda b: b.area()))
        chip = dlib.get_face_chip(img, shape, 150, 0.25)
        out.append(FacePhoto(
            path=row["path"], identity=row["identity"] or row["path"], chip=chip,
            dlib_chip_descriptor=np.array(recognizer.compute_face_descriptor(chip)),
            dlib_full_descriptor=np.array(recognizer.compute_face_descriptor(img, shape)),
        ))
    assert len(out) >= max(10, 0.8 * len(rows)), f"dlib found faces in {len(out)} of {len(rows)} photos"
    return out


def _ours(net: DlibResNet, chips: list[np.ndarray]) -> np.ndarray:
    x = torch.from_numpy(np.stack(chips)).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        return net(x).numpy().astype(np.float64)


# -- parity ---------------------------------------------------------------------------------------
def test_matches_dlib_on_real_photos(net: DlibResNet, photos: list[FacePhoto]) -> None:
    ours = _ours(net, [p.chip for p in photos])
    chip_ref = np.stack([p.dlib_chip_descriptor for p in photos])
    full_ref = np.stack([p.dlib_full_descriptor for p in photos])
    per_chip = np.abs(ours - chip_ref).max(axis=1)
    per_full = np.abs(ours - full_ref).max(axis=1)
    print(f"\ndlib-resnet parity, max |Δ| over 128 dims ({len(photos)} photos):")
    for p, dc, df in zip(photos, per_chip, per_full, strict=True):
        print(f"  {p.path:58s} vs dlib(chip) {dc:.2e}   vs dlib(img, shape) {df:.2e}")
    print(f"  overall: vs dlib(chip) {per_chip.max():.2e}, vs dlib(img, shape) {per_full.max():.2e}")
    assert len({p.path.split("/")[1] for p in photos}) >= 4, "mix London, demo, UTKFace and ORL"
    assert per_chip.max() <= PARITY_ATOL
    assert per_full.max() <= PARITY_ATOL
    # the descriptors are not trivially small: the comparison means something
    assert np.linalg.norm(chip_ref, axis=1).min() > 0.5


def test_same_person_close_different_people_far(net: DlibResNet, photos: list[FacePhoto]) -> None:
    london = [p for p in photos if p.path.startswith("images/frl_london/")]
    emb = dict(zip([p.path for p in london], _ours(net, [p.chip for p in london]), strict=True))
    genuine, impostor = [], []
    for a, b in itertools.combinations(london, 2):
        d = float(np.linalg.norm(emb[a.path] - emb[b.path]))
        (genuine if a.identity == b.identity else impostor).append(d)
    print(f"\nLondon neutral vs smiling, same person: {np.round(genuine, 3).tolist()}")
    print(f"different people: min {min(impostor):.3f}, median {np.median(impostor):.3f}, "
          f"{np.mean(np.array(impostor) > THRESHOLD):.0%} above {THRESHOLD}")
    assert len(genuine) >= 4 and len(impostor) >= 20
    assert max(genuine) < THRESHOLD
    assert np.mean(np.array(impostor) > THRESHOLD) >= 0.9


# -- structure ------------------------------------------------------------------------------------
def test_architecture_matches_dlib_definition(net: DlibResNet) -> None:
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 29
    sizes = {}
    hooks = [getattr(net, f"stage{s}").register_forward_hook(
        lambda _m, _i, out, s=s: sizes.__setitem__(s, tuple(out.shape[1:]))) for s in range(1, 6)]
    with torch.no_grad():
        out = net(torch.rand(2, 3, 150, 150))
    for h in hooks:
        h.remove()
    assert out.shape == (2, 128)
    # unpadded strided layers: 150 → 72 (7×7/2) → 35 (3×3/2 pool) → 17 → 8 → 4 (avg-pool branch) → 2
    assert sizes == {1: (32, 35, 35), 2: (64, 17, 17), 3: (128, 8, 8), 4: (256, 4, 4), 5: (256, 2, 2)}


def test_canonical_form_for_hook_based_explainers(net: DlibResNet) -> None:
    all_modules = list(net.named_modules(remove_duplicate=False))
    assert len({id(m) for _, m in all_modules}) == len(all_modules), "a module is used twice"
    relus = [m for _, m in all_modules if isinstance(m, nn.ReLU)]
    assert len(relus) == 1 + 2 * 14 and not any(r.inplace for r in relus)
    assert sum(isinstance(m, Add) for _, m in all_modules) == 14
    calls: dict[str, int] = {}
    leaves = [(n, m) for n, m in all_modules if not list(m.children())]
    hooks = [m.register_forward_hook(lambda *_a, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
             for n, m in leaves]
    with torch.no_grad():
        net(torch.rand(1, 3, 150, 150))
    for h in hooks:
        h.remove()
    assert calls == {n: 1 for n, _ in leaves}, "every leaf module runs exactly once per forward"
    names = dict(net.named_modules())
    for name in ("normalize", "stem.conv", "stage1.block0.conv1", "stage2.block0.shortcut",
                 "stage5.block0.add", "embedding"):
        assert name in names


def test_pad_add_zero_pads_at_the_end_like_dlib() -> None:
    a = torch.arange(1 * 2 * 3 * 3, dtype=torch.float32).view(1, 2, 3, 3) + 1
    b = -torch.ones(1, 1, 4, 4)
    out = PadAdd()(a, b)
    assert out.shape == (1, 2, 4, 4)
    assert torch.equal(out[:, :1, :3, :3], a[:, :1] - 1)  # overlap: both
    assert torch.equal(out[:, 1:, :3, :3], a[:, 1:])  # channel only in a
    assert torch.equal(out[:, :1, 3, :], -torch.ones(1, 1, 4))  # row only in b
    assert torch.equal(out[:, :1, :, 3], -torch.ones(1, 1, 4))  # column only in b
    assert torch.equal(out[:, 1:, 3, :], torch.zeros(1, 1, 4))  # in neither
    with pytest.raises(ModelError):
        PadAdd()(torch.zeros(1, 2, 3, 3), torch.zeros(2, 2, 3, 3))


def test_affine_layers_stay_frozen_and_fold_into_convs(net: DlibResNet) -> None:
    block = net.stage2[1]
    with torch.no_grad():
        feats = net.stage2[0](net.stage1(net.stem(net.normalize(torch.rand(1, 3, 150, 150)))))
        expected = block.affine1(block.conv1(feats))
        fused = fuse_conv_bn_eval(block.conv1, block.affine1)  # generic conv-BN folding applies as is
        torch.testing.assert_close(fused(feats), expected, rtol=1e-5, atol=1e-5)
        net.train()
        try:
            assert torch.equal(block.affine1(block.conv1(feats)), expected), "train() changed an affine layer"
        finally:
            net.eval()
    assert isinstance(block.affine1, Affine) and torch.all(block.affine1.running_var == 1)


# -- loading --------------------------------------------------------------------------------------
def test_means_come_from_the_file(net: DlibResNet) -> None:
    means = net.normalize.mean.flatten().tolist()
    np.testing.assert_allclose(means, [122.782, 117.001, 104.298], rtol=0, atol=1e-4)


def test_each_load_is_an_independent_copy(net: DlibResNet) -> None:
    other = load_dlib_resnet()
    with torch.no_grad():
        other.embedding.weight.zero_()
    assert net.embedding.weight.abs().sum() > 0


def test_corrupt_files_raise_weights_error(tmp_path: Path) -> None:
    data = weight_path(WEIGHTS_KEY).read_bytes()
    truncated = tmp_path / "truncated.dat"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"truncated\.dat.*ends early"):
        load_dlib_resnet(truncated)
    renamed = tmp_path / "renamed.dat"
    renamed.write_bytes(data.replace(b"relu_", b"relu#", 1))
    with pytest.raises(WeightsError, match=r"renamed\.dat.*'relu#'"):
        load_dlib_resnet(renamed)
    with pytest.raises(WeightsError, match=r"missing\.dat"):
        load_dlib_resnet(tmp_path / "missing.dat")


def test_stored_padding_is_checked_against_the_architecture() -> None:
    """A strided convolution padded like a stride-1 one would shift every later layer: refuse it."""
    model = DlibResNet()
    order = list(model.dlib_layers())
    parsed = read_network(weight_path(WEIGHTS_KEY).read_bytes(), [k for k, _, _ in order], WEIGHTS_KEY)
    computing = [(where, module) for kind, where, module in order if kind == "add_layer"]
    index = next(i for i, (where, _) in enumerate(computing) if where == "stage2.block0.conv1")
    record = parsed.layers[index]
    assert isinstance(record, Conv) and (record.stride_y, record.padding_y) == (2, 0)
    where, module = computing[index]
    assert module is not None
    with pytest.raises(WeightsError, match=r"stage2\.block0\.conv1.*padding"):
        _fill(module, dataclasses.replace(record, padding_y=1, padding_x=1), where, WEIGHTS_KEY)
    with pytest.raises(WeightsError, match=r"stage2\.block0\.conv1.*Relu"):
        _fill(module, parsed.layers[index + 2], where, WEIGHTS_KEY)


# -- the zoo entry --------------------------------------------------------------------------------
def test_build_gives_the_documented_face_model(net: DlibResNet, photos: list[FacePhoto]) -> None:
    model = build()
    assert (model.name, model.task, model.input_size, model.match_threshold) == (
        "dlib-resnet", "embedding", (150, 150), 0.6)
    assert (model.recipe.size, model.recipe.padding, model.recipe.method) == (150, 0.25, "dlib5")
    assert model.license == "CC0-1.0" and WEIGHTS_KEY in model.source
    assert model.preprocessing == "(RGB − [122.782, 117.001, 104.298]) / 256"
    assert set(model.layers) == {"early", "mid", "late", "cam"}
    for alias in model.layers:
        assert model.layer(alias) is not None
    chips = [p.chip for p in photos[:3]]
    np.testing.assert_allclose(model.forward_chips(chips), _ours(net, chips), rtol=0, atol=1e-6)
