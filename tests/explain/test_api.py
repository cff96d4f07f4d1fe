"""Every method on every zoo model, through the one `explain()` call."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from facelens.cli import main
from facelens.errors import ModelError
from facelens.explain.api import explain, explain_methods, get_method, list_methods
from facelens.faces.regions import REGION_NAMES
from facelens.models import ZOO, load_model
from facelens.portraits import default_portraits

# Small budgets: this test is about shapes, finiteness and plumbing, not map quality.
BUDGET = {"n_samples": 6, "n_steps": 6, "n_masks": 48, "n_segments": 12, "density": 0}
CHEAP = {"lime": {"n_samples": 40}, "kernelshap": {"n_samples": 40}, "region-lime": {"n_samples": 40},
         "region-shap": {"n_samples": 40}}


@pytest.fixture(scope="module")
def portrait() -> np.ndarray:
    return default_portraits()[0].image


def _settings(name: str, size: int) -> dict[str, object]:
    defaults = get_method(name).defaults
    out = {k: v for k, v in {**BUDGET, "window": size // 3, "stride": size // 3}.items() if k in defaults}
    out.update({k: v for k, v in CHEAP.get(name, {}).items() if k in defaults})
    return out


ALL_METHODS = [m["name"] for m in list_methods()]


def test_registry_has_the_whole_toolbox():
    expected = {"gradient", "gradient-x-input", "smoothgrad", "integrated-gradients", "guided-backprop", "deeplift",
                "lrp", "ebp", "contrastive-ebp", "cam", "gradcam", "gradcam++", "layercam", "scorecam", "occlusion",
                "rise", "lime", "kernelshap", "region-occlusion", "region-lime", "region-shap", "dise"}
    assert expected <= set(ALL_METHODS)
    libraries = {m["name"]: m["library"] for m in list_methods()}
    assert libraries["gradcam"] == "pytorch-grad-cam" and libraries["lrp"] == "zennit"
    assert libraries["integrated-gradients"] == "captum"


@pytest.mark.parametrize("model_name", list(ZOO))
@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_on_every_zoo_model(model_name, method, portrait):
    model = load_model(model_name)
    if method == "cam":
        try:
            e = explain(model, portrait, method, batch_size=32, **_settings(method, model.input_size[0]))
        except ModelError as exc:  # CAM needs global average pooling right after the layer
            assert "pool" in str(exc).lower()
            return
    else:
        e = explain(model, portrait, method, batch_size=32, **_settings(method, model.input_size[0]))
    assert e.chip_map.shape == model.input_size
    assert np.isfinite(e.chip_map).all()
    assert e.photo_map.shape == portrait.shape[:2]
    assert np.isfinite(e.photo_map).all()
    assert e.seconds > 0 and e.settings["seed"] == 0 and np.isfinite(e.score)
    assert e.method == method and e.model == model_name


def test_defaults_top_class_and_self_similarity(portrait):
    g = load_model("dlib-gender")
    e = explain(g, portrait, "gradient")
    top = next(iter(g.predict(portrait)))
    assert top in e.target
    r = explain("dlib-resnet", portrait, "gradient")
    assert "own unperturbed embedding" in r.target and r.target.startswith("cohort z-score")
    m = load_model("dlib-resnet")
    own = m.embed(portrait)
    assert r.score == pytest.approx(float(m.cohort.z(own[None], own)[0]), rel=1e-4)  # the face against itself
    assert np.abs(r.chip_map).max() > 1e-4  # a real gradient, not the zero of cosine at its maximum
    rng = r.target_range
    assert rng is not None and rng.unit.startswith("impostor SDs") and rng.intact == pytest.approx(r.score)
    assert rng.deleted_blur < rng.intact - 3 and rng.impostor is not None  # removing the face removes the match
    p = explain("dlib-resnet", portrait, "gradient", target="projection")
    assert p.score == pytest.approx(float(np.linalg.norm(own)), rel=1e-4)  # the old projection, kept by name
    assert p.target_range.deleted_blur > 0.7 * p.score  # ... whose range is narrow: why it is not the default


def test_reference_photo_explains_the_match():
    a, b = default_portraits()
    e = explain("dlib-resnet", a.image, "gradcam", reference=b.image)
    genuine_low = load_model("dlib-resnet").cohort.genuine_quantiles["q05"]
    assert "reference photo" in e.target and e.score < genuine_low  # two different people: below every genuine pair
    c = explain("dlib-resnet", a.image, "gradcam", reference=b.image, target="cosine")
    assert 0.5 < c.score < 0.95  # raw cosine between strangers: high, which is why it has no range
    with pytest.raises(ModelError, match="recognizer: target must be one of"):
        explain("dlib-resnet", a.image, "gradcam", target="happy")
    with pytest.raises(ModelError, match="unknown setting"):
        explain("dlib-resnet", a.image, "gradcam", n_stepz=3)
    with pytest.raises(ModelError, match="unknown method"):
        explain("dlib-resnet", a.image, "nope")


def test_region_attention_shares_add_up(portrait):
    exps = explain_methods("dlib-resnet", portrait, ["gradcam", "gradient"])
    for e in exps:
        ra = e.region_attention()
        assert set(ra.mass) == set(REGION_NAMES)
        assert sum(ra.mass.values()) == pytest.approx(1.0, abs=1e-6)
        assert sum(ra.area.values()) == pytest.approx(1.0, abs=1e-6)
        assert all(v >= 0 for v in ra.density.values())


def test_cli_explain_writes_maps_grid_and_json(tmp_path):
    a = default_portraits()[0]
    photo = tmp_path / "astronaut.png"
    from PIL import Image

    Image.fromarray(a.image).save(photo)
    out = tmp_path / "out"
    assert main(["explain", str(photo), "--model", "dlib-gender", "--method", "gradcam,occlusion", "--out",
                 str(out)]) == 0
    data = json.loads((out / "explanations.json").read_text())
    assert [r["method"] for r in data["explanations"]] == ["gradcam", "occlusion"]
    for r in data["explanations"]:
        assert all(Path(f).is_file() for f in r["files"].values())
        assert np.load(r["files"]["chip_npy"]).shape == (32, 32)
    assert (out / "methods_grid.png").stat().st_size > 1000
    assert main(["explain", str(photo), "--method", "nope", "--out", str(out)]) == 1


def test_region_attention_at_three_depths(portrait):
    e = explain("dlib-resnet", portrait, "gradcam", all_depths=True)
    by_depth = e.depth_attention()
    assert set(by_depth) == {"early", "mid", "late"}
    for att in by_depth.values():
        assert sum(att.mass.values()) == pytest.approx(1.0, abs=1e-6)
    assert "region_attention_by_depth" in e.summary()
    with pytest.raises(ModelError, match="all_depths"):
        explain("dlib-resnet", portrait, "gradient").depth_attention()


def test_package_is_the_explain_call_and_submodules_still_import(portrait):
    import facelens
    import facelens.explain.face as face_module

    e = facelens.explain("dlib-gender", portrait, method="gradient")
    assert e.method == "gradient" and e.chip_map.shape == (32, 32)
    assert callable(face_module.pair_maps)
