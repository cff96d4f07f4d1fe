import numpy as np
import pytest
import torch
from torch import nn

from facelens import list_models, load_model, wrap
from facelens.errors import ModelError, WeightsError
from facelens.models import ZOO
from facelens.models.torchvision_models import torchvision_weight_file


def test_list_models_covers_zoo_with_license_and_cache_state():
    rows = {r["name"]: r for r in list_models()}
    for name in ZOO:
        assert rows[name]["license"] and rows[name]["source"] and isinstance(rows[name]["cached"], bool)
    assert "torchvision:vgg16" in rows
    assert rows["dlib-resnet"]["task"] == "embedding"


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ModelError, match=r"unknown model 'nope'"):
        load_model("nope")


def test_torchvision_without_weights_says_how_to_supply_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert not torchvision_weight_file("vgg16").exists()
    with pytest.raises(WeightsError, match="never downloads"):
        load_model("torchvision:vgg16")


def test_torchvision_random_only_when_explicit_and_user_file_loads(tmp_path):
    rnd = load_model("torchvision:resnet18", weights=None, fresh=True)
    assert "random" in rnd.name and rnd.class_names and len(rnd.class_names) == 1000
    assert not any(getattr(m, "inplace", False) for m in rnd.net.modules())  # hooks need no in-place ops
    path = tmp_path / "my_resnet18.pth"
    torch.save(rnd.net.model.state_dict(), path)
    loaded = load_model("torchvision:resnet18", weights=str(path))
    for a, b in zip(rnd.net.parameters(), loaded.net.parameters(), strict=True):
        assert torch.equal(a, b)
    x = torch.rand(1, 3, 224, 224)
    assert torch.allclose(rnd.net(x), loaded.net(x), atol=1e-5)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    with pytest.raises(WeightsError, match=r"bad\.pth"):
        load_model("torchvision:resnet18", weights=str(bad))


def test_wrap_normalizes_inside_the_network_and_picks_layers():
    body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 2))
    m = wrap(body, task="classification", input_size=32, mean=(0.5, 0.5, 0.5), std=0.25,
             class_names=["x", "y"], align=None)
    assert not body[1].inplace
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(m.net(x), body((x - 0.5) / 0.25))
    assert set(m.layers) == {"early", "mid", "late"} and m.layer("late") is body[2]
    img = (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)
    probs = m.predict(img)  # align=None: whole image, no face needed
    assert set(probs) == {"x", "y"} and abs(sum(probs.values()) - 1) < 1e-9
    with pytest.raises(ModelError, match="class_names"):
        wrap(body, task="classification", input_size=32, align=None)
    with pytest.raises(ModelError, match="not a module"):
        wrap(body, task="embedding", input_size=32, align=None, layers={"late": "nope"})
