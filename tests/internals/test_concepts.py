"""TCAV finds a planted concept in a synthetic model and rejects a random one; manifest concepts; the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from facelens.cli import main
from facelens.datasets import read_manifest
from facelens.errors import FaceLensError
from facelens.internals.concepts import ConceptSet, concept_rows, expand_concepts, tcav
from facelens.targets import ClassScore

SIZE = 24


def _noise(n: int, gen: torch.Generator) -> torch.Tensor:
    return 0.3 + 0.4 * torch.rand(n, 3, SIZE, SIZE, generator=gen)


def _with_red_patch(n: int, gen: torch.Generator) -> torch.Tensor:
    x = _noise(n, gen)
    for i in range(n):
        y0, x0 = (int(v) for v in torch.randint(0, SIZE - 6, (2,), generator=gen))
        x[i, :, y0:y0 + 6, x0:x0 + 6] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    return x


def _red_patch_model() -> nn.Module:
    """Class 0's logit grows with the amount of red in the image (channel 0 of ``conv`` is a red detector)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    head = nn.Linear(4, 2)
    with torch.no_grad():
        conv.weight.normal_(0, 0.2)
        conv.weight[0].zero_()
        conv.weight[0, 0, 1, 1], conv.weight[0, 1, 1, 1], conv.weight[0, 2, 1, 1] = 1.0, -0.5, -0.5
        conv.bias[0] = -0.1
        head.weight.zero_()
        head.weight[0, 0] = 5.0
        head.weight[1, 1:] = 1.0
        head.bias.zero_()
    return nn.Sequential(conv, nn.ReLU(), nn.Conv2d(4, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)


@pytest.fixture(scope="module")
def planted():
    net = _red_patch_model()
    with torch.no_grad():  # the second conv passes channel 0 on (plus a little mixing); its ReLU keeps the
        # gradients at both layers different from probe to probe, as in a real network
        net[2].weight.copy_(torch.eye(4).view(4, 4, 1, 1) + 0.05 * torch.randn(4, 4, 1, 1))
        net[2].bias.fill_(-0.05)
    gen = torch.Generator().manual_seed(1)
    red = ConceptSet("red_patch", _with_red_patch(10, gen))
    fake = ConceptSet("random_faces", _noise(10, gen))
    randoms = [_noise(10, gen) for _ in range(6)]
    probes = torch.cat([_with_red_patch(6, gen), _noise(10, gen)])
    return tcav(net, {"conv": "0", "mixed": "2"}, [red, fake], randoms, probes, ClassScore(0, name="red"), seed=0)


def test_tcav_finds_the_planted_concept(planted):
    for layer in ("conv", "mixed"):
        s = planted.get("red_patch", layer)
        assert s.score > 0.9, s
        assert s.p_value < 0.05 and s.significant, s
        assert s.cav_accuracy > 0.5, s  # chance level (held-out third of 20 examples)


def test_tcav_rejects_a_random_concept(planted):
    for layer in ("conv", "mixed"):
        s = planted.get("random_faces", layer)
        assert s.p_value >= 0.05 and not s.significant, s


def test_tcav_result_renders(planted):
    assert planted.figure().ndim == 3
    data = planted.as_json()
    assert len(data["scores"]) == 4 and len(data["scores"][0]["scores"]) == 6
    assert any("red_patch at conv" in v for v in planted.verdicts())


def test_tcav_needs_three_random_sets():
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(FaceLensError, match="random sets"):
        tcav(_red_patch_model(), ["0"], [ConceptSet("c", _noise(4, gen))], [_noise(4, gen)] * 2, _noise(2, gen),
             ClassScore(0))


def test_concept_names_expand_and_unknown_ones_fail():
    assert expand_concepts(["smiling", "sex", "age"]) == ["smiling", "neutral", "female", "male", "child", "senior"]
    with pytest.raises(FaceLensError, match="unknown concept 'beard'"):
        expand_concepts(["beard"])


def test_manifest_concepts_match_the_csv(shared_faces, manifest_rows):
    rows = read_manifest(shared_faces / "manifest.csv")
    smiling = sum(1 for r in manifest_rows if r["dataset"] == "frl_london" and r["subset"] == "smiling")
    female = sum(1 for r in manifest_rows if r["sex"] == "female")
    children = sum(1 for r in manifest_rows if r["age"] and int(r["age"]) <= 12)
    assert len(concept_rows(rows, "smiling")) == smiling > 0
    assert len(concept_rows(rows, "female")) == female > 0
    assert len(concept_rows(rows, "child")) == children > 0


def test_cli_concepts_writes_png_json_html(shared_faces, tmp_path):
    out = tmp_path / "concepts"
    rc = main(["concepts", "--manifest", str(shared_faces / "manifest.csv"), "--model", "dlib-gender",
               "--datasets", "utkface", "--concepts", "female", "--layers", "mid", "--per-concept", "4",
               "--random", "3", "--probes", "3", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "concepts.json").read_text())
    (row,) = data["tcav"]["scores"]
    assert row["concept"] == "female" and len(row["scores"]) == 3 and 0 <= row["p_value"] <= 1
    assert data["tcav"]["target"] == "logit of 'female'"
    assert (out / "tcav.png").stat().st_size > 0
    assert (out / "concepts.html").read_text().startswith("<section")


def test_cli_concepts_bad_manifest_is_one_line_error(tmp_path, capsys):
    assert main(["concepts", "--manifest", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing.csv" in err
