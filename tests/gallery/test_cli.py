"""``facelens gallery`` end to end on real photos: keygen, enroll, identify, list, export, forget, purge."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from facelens.cli import main


def _json(capsys: pytest.CaptureFixture[str]) -> object:
    return json.loads(capsys.readouterr().out)


def test_gallery_cli_round_trip(tmp_path: Path, real_faces: dict, capsys: pytest.CaptureFixture[str]) -> None:
    key_file, db = tmp_path / "k", tmp_path / "g.db"
    assert main(["gallery", "keygen", "--out", str(key_file)]) == 0
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    capsys.readouterr()
    assert main(["gallery", "keygen", "--out", str(key_file)]) == 1  # never overwrites a key
    assert "already exists" in capsys.readouterr().err
    common = ["--db", str(db), "--key-file", str(key_file)]
    neutral_a, smiling_a = real_faces["images"]["001"]
    neutral_b, _ = real_faces["images"]["002"]
    enroll = ["gallery", "enroll", "--purpose", "door", "--legal-basis", "explicit-consent", *common]
    assert main([*enroll, str(neutral_a), "--subject", "ann"]) == 1  # no gallery yet, no --create
    assert "--create" in capsys.readouterr().err
    assert main([*enroll, str(neutral_a), "--subject", "ann", "--create"]) == 0
    assert _json(capsys)["created"] is True
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o600  # biometric data: the owner's only
    assert main([*enroll, str(neutral_b), "--subject", "bob"]) == 0
    capsys.readouterr()
    assert main(["gallery", "identify", str(smiling_a), *common]) == 0
    answer = _json(capsys)
    assert (answer["subject"], answer["accepted"]) == ("ann", True)
    assert main(["gallery", "list", *common]) == 0
    assert [r["subject"] for r in _json(capsys)] == ["ann", "bob"]
    out = tmp_path / "ann.json"
    assert main(["gallery", "export", "ann", "--out", str(out), *common]) == 0
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    exported = json.loads(out.read_text())
    assert len(exported["templates"][0]["embedding"]) == 128 and exported["consents"][0]["purpose"] == "door"
    capsys.readouterr()
    assert main(["gallery", "forget", "ann", *common]) == 0
    assert _json(capsys) == {"subject": "ann", "templates_deleted": 1, "consents_deleted": 1, "file_scrubbed": True,
                             "scrub_pending": False}
    assert main(["gallery", "purge", *common]) == 0
    assert _json(capsys)["templates"] == 0
    assert main(["gallery", "identify", str(smiling_a), *common]) == 0
    assert _json(capsys)["subject"] is None  # ann is gone; bob is someone else
    other = tmp_path / "other"
    assert main(["gallery", "keygen", "--out", str(other)]) == 0
    capsys.readouterr()
    assert main(["gallery", "list", "--db", str(db), "--key-file", str(other)]) == 1
    assert "wrong gallery key" in capsys.readouterr().err
