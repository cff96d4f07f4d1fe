from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facelens.errors import ModelError
from facelens.faces import AlignRecipe, align, detect_faces
from facelens.faces.align import template5_points
from facelens.models.dlib_resnet import DlibResNet
from facelens.models.layers import Normalize
from facelens.models.presets import (
    ARCFACE_TEMPLATE,
    PRESETS,
    Preset,
    SwapRB,
    arcface_template,
    get_preset,
)

ARCFACE_DST = [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
SHIFT_128 = np.array([8.0, 0.0])  # estimate_norm shifts the template right by 8 px at 128
CUSTOM = {"name": "mine", "source": "our config", "size": 128, "method": "template5", "template": "arcface",
          "mean": [104.0, 117.0, 123.0], "std": 58.0, "channels": "BGR"}


@pytest.fixture(scope="module")
def london(shared_faces: Path, manifest_rows: list[dict[str, str]]) -> list[tuple[str, np.ndarray, object]]:
    rows = [r for r in manifest_rows if r["dataset"] == "frl_london" and r["subset"] == "neutral"][:4]
    assert rows, "the bundle should hold neutral London photos"
    out = []
    for r in rows:
        image = np.asarray(Image.open(shared_faces / r["path"]).convert("RGB"))
        out.append((r["path"], image, detect_faces(image)[0]))
    return out


def test_builtin_presets_hold_the_families_numbers() -> None:
    assert set(PRESETS) == {"arcface", "facenet", "dlib"}
    arc = PRESETS["arcface"]
    assert arc.recipe.method == "template5" and arc.recipe.size == 112
    assert np.array_equal(np.array(arc.recipe.template), ARCFACE_DST) and arc.recipe.template == ARCFACE_TEMPLATE
    assert arc.mean == (127.5,) * 3 and arc.std == (127.5,) * 3 and arc.channels == "RGB"
    assert "swapRB=True" in arc.source and "face_align.py" in arc.source
    fn = PRESETS["facenet"]
    assert (fn.recipe.method, fn.recipe.size) == ("box", 160) and fn.std == (128.0,) * 3 and fn.mean == (127.5,) * 3
    # margin 20 of the final 160 px: the crop is box · 160 / 140, i.e. 10/140 of the box per side.
    assert fn.recipe.padding == pytest.approx(10 / 140)
    dl = PRESETS["dlib"]
    assert dl.recipe == AlignRecipe(150, 0.25, "dlib5") and dl.std == (256.0,) * 3
    for preset in PRESETS.values():
        assert get_preset(preset.name) is preset and get_preset(preset.name.upper()) is preset
        assert get_preset(preset) is preset
        assert get_preset(preset.as_dict()) == preset
        assert preset.name in preset.describe() and preset.source in preset.describe()


def test_normalizer_known_answers() -> None:
    x = torch.full((1, 3, 2, 2), 0.5)  # pixel 127.5
    assert torch.equal(PRESETS["arcface"].normalizer()(x), torch.zeros(1, 3, 2, 2))
    white = PRESETS["facenet"].normalizer()(torch.ones(1, 3, 1, 1))
    assert torch.allclose(white, torch.full((1, 3, 1, 1), 127.5 / 128))
    assert torch.allclose(PRESETS["arcface"].normalizer()(torch.zeros(1, 3, 1, 1)), -torch.ones(1, 3, 1, 1))
    assert isinstance(PRESETS["arcface"].normalizer(), Normalize)
    # BGR: the network's channel 0 is blue, and mean/std are in the network's (BGR) order.
    bgr = Preset("bgr", AlignRecipe(64), mean=(10.0, 20.0, 30.0), std=(1.0, 2.0, 4.0), channels="BGR", source="t")
    rgb = torch.tensor([50.0, 100.0, 200.0]).view(1, 3, 1, 1) / 255
    out = bgr.normalizer()(rgb).flatten()
    assert torch.allclose(out, torch.tensor([(200 - 10) / 1, (100 - 20) / 2, (50 - 30) / 4]))
    net = bgr.normalizer()
    assert isinstance(net, torch.nn.Sequential) and isinstance(net.swap_rb, SwapRB)
    assert isinstance(net.normalize, Normalize)


def test_dlib_preset_normalizes_as_the_dlib_network_does() -> None:
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(PRESETS["dlib"].normalizer()(x), DlibResNet().normalize(x), atol=1e-6)


def test_arcface_template_scales_as_insightface_does() -> None:
    assert arcface_template(112) == ARCFACE_TEMPLATE
    assert np.allclose(arcface_template(224), np.array(ARCFACE_DST) * 2)
    t128 = np.array(arcface_template(128))
    assert np.allclose(t128, np.array(ARCFACE_DST) + SHIFT_128)  # estimate_norm's 128 variant
    with pytest.raises(ModelError, match="112 or 128"):
        arcface_template(150)


def test_custom_preset_from_dict_and_toml(tmp_path: Path) -> None:
    preset = get_preset(CUSTOM)
    assert preset.name == "mine" and preset.channels == "BGR" and preset.std == (58.0,) * 3
    assert preset.recipe.size == 128 and np.allclose(preset.recipe.template, np.array(ARCFACE_DST) + SHIFT_128)
    assert get_preset(preset.as_dict()) == preset
    box = get_preset({"size": 96, "method": "box", "padding": 0.1, "mean": 0, "std": 255, "channels": "rgb"})
    assert box.recipe == AlignRecipe(96, 0.1, "box") and box.name == "custom" and box.channels == "RGB"
    whole = get_preset({"size": 64, "method": "none", "mean": [0, 0, 0], "std": [1, 1, 1], "channels": "RGB"})
    assert whole.recipe.method == "none"

    path = tmp_path / "my-family.toml"
    path.write_text('size = 112\nmethod = "template5"\n'
                    'template = [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], '
                    '[41.5493, 92.3655], [70.7299, 92.2041]]\n'
                    'mean = [127.5, 127.5, 127.5]\nstd = 127.5\nchannels = "RGB"\n')
    from_file = get_preset(path)
    assert from_file.name == "my-family" and from_file.recipe == PRESETS["arcface"].recipe
    assert from_file.mean == PRESETS["arcface"].mean and from_file.std == PRESETS["arcface"].std
    assert get_preset(str(path)) == from_file


@pytest.mark.parametrize("change, key", [
    ({"colour": "RGB"}, "colour"),
    ({"size": 0}, "size"),
    ({"size": "112"}, "size"),
    ({"size": True}, "size"),
    ({"method": "mtcnn"}, "method"),
    ({"template": "vggface"}, "template"),
    ({"template": [[1, 2], [3, 4]]}, "template"),
    ({"template": [[73.5, 51.5], [38.3, 51.7], [56.0, 71.7], [41.5, 92.4], [70.7, 92.2]]}, "template"),
    ({"padding": 0.2}, "padding"),
    ({"mean": [1, 2]}, "mean"),
    ({"mean": "grey"}, "mean"),
    ({"std": [1, 0, 1]}, "std"),
    ({"std": float("nan")}, "std"),
    ({"channels": "RGBA"}, "channels"),
    ({"name": ""}, "name"),
    ({"source": 3}, "source"),
])
def test_bad_keys_are_named(change: dict, key: str) -> None:
    with pytest.raises(ModelError, match=f"'{key}'"):
        get_preset({**CUSTOM, **change})


def test_missing_keys_and_bad_specs_are_named(tmp_path: Path) -> None:
    for key in ("size", "method", "mean", "std", "channels"):
        spec = {k: v for k, v in CUSTOM.items() if k != key}
        with pytest.raises(ModelError, match=f"'{key}' is missing"):
            get_preset(spec)
    with pytest.raises(ModelError, match="'template' is missing"):
        get_preset({k: v for k, v in CUSTOM.items() if k != "template"})
    with pytest.raises(ModelError, match="'template' only applies"):
        get_preset({**CUSTOM, "method": "box"})
    with pytest.raises(ModelError, match="unknown preset 'vgg'"):
        get_preset("vgg")
    with pytest.raises(ModelError, match="does not exist"):
        get_preset(tmp_path / "absent.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("size = = 3\n")
    with pytest.raises(ModelError, match="could not be read"):
        get_preset(broken)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('size = 112\nmethod = "box"\nmean = 0\nstd = 1\nchannels = "BGRA"\n')
    with pytest.raises(ModelError, match=r"wrong\.toml: preset key 'channels'"):
        get_preset(wrong)
    with pytest.raises(ModelError):
        get_preset(42)  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="channels"):
        Preset("x", AlignRecipe(64), (0, 0, 0), (1, 1, 1), "RGBA", "t")  # type: ignore[arg-type]


def test_presets_cut_real_faces(london: list) -> None:
    for path, image, face in london:
        arc = PRESETS["arcface"]
        chip = align(image, face, arc.recipe)
        assert chip.image.shape == (112, 112, 3)
        mapped = chip.points_to_chip(template5_points(face.landmarks))
        assert np.hypot(*(mapped - np.array(ARCFACE_DST)).T).max() < 8.0, path
        x = torch.from_numpy(chip.image).permute(2, 0, 1)[None].float() / 255
        y = arc.normalizer()(x)
        assert y.shape == (1, 3, 112, 112) and y.min() >= -1 and y.max() <= 1
        fn = PRESETS["facenet"]
        chip = align(image, face, fn.recipe)
        assert chip.image.shape == (160, 160, 3)
        # The detector box spans 140 of the 160 chip pixels, as facenet-pytorch's margin 20 makes it.
        left, right = chip.points_to_chip(np.array([[face.box[0] - 0.5, 0.0], [face.box[2] + 0.5, 0.0]]))[:, 0]
        assert abs((right - left) - 140) < 1.5, path
