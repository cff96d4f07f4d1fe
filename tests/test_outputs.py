"""Atomic outputs: right content, old file intact after errors, and never a partial file after SIGKILL."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import facelens.outputs as outputs
from facelens.outputs import (
    atomic_dir,
    atomic_open,
    atomic_write_bytes,
    atomic_write_text,
    save_npy,
    save_png,
    to_jsonable,
    write_json,
)


def _leftovers(folder: Path, final_names: set[str]) -> list[str]:
    """Everything in ``folder`` that is not one of the expected final entries (temp files, .old dirs)."""
    return sorted(name for name in os.listdir(folder) if name not in final_names)


def _fresh_file_mode(folder: Path) -> int:
    """The permission bits a plain ``open(..., "w")`` gives under the current umask."""
    probe = folder / "probe-permissions"
    probe.write_bytes(b"")
    mode = stat.S_IMODE(probe.stat().st_mode)
    probe.unlink()
    return mode


# ---------------------------------------------------------------------------------------------------
# files


def test_write_bytes_and_text(tmp_path: Path) -> None:
    target = tmp_path / "deeper" / "still" / "out.bin"
    data = bytes(range(256)) * 3
    assert atomic_write_bytes(target, data) == target
    assert target.read_bytes() == data
    text = "Grüße\r\nline two\n"
    atomic_write_text(tmp_path / "out.txt", text)
    assert (tmp_path / "out.txt").read_bytes() == text.encode("utf-8")  # no newline translation
    atomic_write_bytes(target, b"second version")
    assert target.read_bytes() == b"second version"
    assert _leftovers(target.parent, {"out.bin"}) == []


def test_new_files_get_ordinary_permissions(tmp_path: Path) -> None:
    expected = _fresh_file_mode(tmp_path)
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == expected


def test_atomic_open_streams_text(tmp_path: Path) -> None:
    target = tmp_path / "rows.csv"
    with atomic_open(target, "w") as f:
        for i in range(3):
            f.write(f"{i},ü\n")
        assert not target.exists(), "the target must not appear before the block ends"
    assert target.read_text(encoding="utf-8") == "0,ü\n1,ü\n2,ü\n"
    with pytest.raises(ValueError, match="mode"), atomic_open(target, "a"):
        pass


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_error_mid_write_keeps_old_file_and_no_temp(tmp_path: Path, error: BaseException) -> None:
    target = tmp_path / "report.json"
    target.write_text("old complete version")
    with pytest.raises(type(error)), atomic_open(target, "wb") as f:
        f.write(b"half of the new ver")
        raise error
    assert target.read_text() == "old complete version"
    assert _leftovers(tmp_path, {"report.json"}) == []


def test_failing_fsync_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(target, b"new" * 1000)
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path, {"data.bin"}) == []


# ---------------------------------------------------------------------------------------------------
# JSON


def test_write_json_converts_numpy_and_paths(tmp_path: Path) -> None:
    obj = {
        "int": np.int64(7),
        "float": np.float32(0.25),
        "bool": np.bool_(True),
        "array": np.arange(6, dtype=np.int16).reshape(2, 3),
        "path": tmp_path / "x.png",
        "tuple": (1, 2),
        "set": {3, 1, 2},
        np.int32(5): "numpy key",
        "nested": [{"deep": np.float64(1.5)}],
    }
    target = write_json(tmp_path / "out.json", obj)
    text = target.read_text(encoding="utf-8")
    assert text.endswith("}\n")
    assert '\n  "int": 7' in text  # indent=2
    assert json.loads(text) == {
        "int": 7,
        "float": 0.25,
        "bool": True,
        "array": [[0, 1, 2], [3, 4, 5]],
        "path": str(tmp_path / "x.png"),
        "tuple": [1, 2],
        "set": [1, 2, 3],
        "5": "numpy key",
        "nested": [{"deep": 1.5}],
    }


def test_non_finite_numbers_become_null(tmp_path: Path) -> None:
    obj = {"auc": math.nan, "ratio": np.float64(np.inf), "maps": np.array([0.5, np.nan, -np.inf]), "ok": 1.0}
    text = write_json(tmp_path / "m.json", obj).read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"auc": None, "ratio": None, "maps": [0.5, None, None], "ok": 1.0}
    assert to_jsonable([float("nan")]) == [None]


def test_unserialisable_object_leaves_old_json(tmp_path: Path) -> None:
    target = tmp_path / "s.json"
    write_json(target, {"version": 1})
    with pytest.raises(TypeError, match="object"):
        write_json(target, {"version": 2, "bad": object()})
    with pytest.raises(TypeError, match="complex"):
        write_json(target, {"version": 3, "bad": np.array([1j])})
    assert json.loads(target.read_text()) == {"version": 1}
    assert _leftovers(tmp_path, {"s.json"}) == []


# ---------------------------------------------------------------------------------------------------
# PNG and NPY


@pytest.mark.parametrize(
    ("array", "mode"),
    [
        (np.arange(35, dtype=np.uint8).reshape(5, 7) * 7, "L"),
        (np.arange(35, dtype=np.uint8).reshape(5, 7, 1), "L"),
        (np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8), "RGB"),
        (np.random.default_rng(2).integers(0, 256, (5, 7, 4), dtype=np.uint8), "RGBA"),
        (np.random.default_rng(3).integers(0, 65536, (5, 7), dtype=np.uint16), "I;16"),
    ],
)
def test_save_png_round_trip(tmp_path: Path, array: np.ndarray, mode: str) -> None:
    target = save_png(tmp_path / "img.png", array)
    with Image.open(target) as img:
        assert img.format == "PNG"
        assert img.mode == mode
        expected = array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array
        np.testing.assert_array_equal(np.asarray(img), expected)


def test_save_png_bool_and_refusals(tmp_path: Path) -> None:
    mask = np.eye(4, dtype=bool)
    with Image.open(save_png(tmp_path / "mask.png", mask)) as img:
        np.testing.assert_array_equal(np.asarray(img), np.where(mask, 255, 0))
    for bad in [
        np.zeros((4, 4), dtype=np.float32),
        np.zeros((4, 4, 2), dtype=np.uint8),
        np.zeros((0, 4), np.uint8),
    ]:
        with pytest.raises(ValueError):
            save_png(tmp_path / "bad.png", bad)
    assert not (tmp_path / "bad.png").exists()
    assert _leftovers(tmp_path, {"mask.png"}) == []


def test_save_npy_round_trip_without_pickle(tmp_path: Path) -> None:
    array = np.random.default_rng(4).normal(size=(3, 4, 5)).astype(np.float32)
    target = save_npy(tmp_path / "maps.npy", array)
    assert target.name == "maps.npy"
    loaded = np.load(target, allow_pickle=False)
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, array)
    with pytest.raises(ValueError, match="object"):
        save_npy(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))
    assert _leftovers(tmp_path, {"maps.npy"}) == []


# ---------------------------------------------------------------------------------------------------
# directories


def _fill(folder: Path, files: dict[str, str]) -> None:
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(content)


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_atomic_dir_creates(tmp_path: Path) -> None:
    target = tmp_path / "report"
    with atomic_dir(target) as building:
        assert building.parent == tmp_path and building != target
        _fill(building, {"index.html": "<html>", "maps/a.txt": "a"})
        assert not target.exists()
    assert _snapshot(target) == {"index.html": "<html>", "maps/a.txt": "a"}
    assert _leftovers(tmp_path, {"report"}) == []
    probe = tmp_path / "probe-dir"
    probe.mkdir()
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE(probe.stat().st_mode)


@pytest.mark.parametrize("swap", ["renameat2", "two renames"])
def test_atomic_dir_replaces_existing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swap: str) -> None:
    if swap == "two renames":
        monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    target = tmp_path / "report"
    target.mkdir()
    _fill(target, {"old.txt": "old", "sub/old2.txt": "old2"})
    with atomic_dir(target) as building:
        _fill(building, {"new.txt": "new"})
        assert _snapshot(target) == {"old.txt": "old", "sub/old2.txt": "old2"}, (
            "old report stays until the end"
        )
    assert _snapshot(target) == {"new.txt": "new"}
    assert _leftovers(tmp_path, {"report"}) == []


def test_atomic_dir_error_keeps_old_directory(tmp_path: Path) -> None:
    target = tmp_path / "report"
    target.mkdir()
    _fill(target, {"old.txt": "old"})
    with pytest.raises(RuntimeError), atomic_dir(target) as building:
        _fill(building, {"half.txt": "half"})
        raise RuntimeError("explainer crashed")
    assert _snapshot(target) == {"old.txt": "old"}
    assert _leftovers(tmp_path, {"report"}) == []
    with pytest.raises(KeyboardInterrupt), atomic_dir(tmp_path / "never") as building:
        _fill(building, {"x": "x"})
        raise KeyboardInterrupt
    assert not (tmp_path / "never").exists()
    assert _leftovers(tmp_path, {"report"}) == []


def test_atomic_dir_refuses_a_file_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "report").write_text("a file")
    with pytest.raises(NotADirectoryError), atomic_dir(tmp_path / "report"):
        pass
    assert (tmp_path / "report").read_text() == "a file"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux-only")
def test_exchange_swaps_directories(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "from_a").write_text("a")
    (b / "from_b").write_text("b")
    if not outputs._exchange(a, b):
        pytest.skip("this kernel or filesystem has no RENAME_EXCHANGE; the two-rename path is tested above")
    assert [p.name for p in a.iterdir()] == ["from_b"]
    assert [p.name for p in b.iterdir()] == ["from_a"]


# ---------------------------------------------------------------------------------------------------
# SIGKILL while writing


PAYLOAD_SIZE = 16 * 1024 * 1024
CHUNK = 1024 * 1024

CHILD = textwrap.dedent(
    """
    import importlib.util, struct, sys, time
    spec = importlib.util.spec_from_file_location("outputs_under_test", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    target, size, chunk, how = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]

    def payload(version):
        mark = struct.pack(">Q", version)
        return mark + bytes([version % 251]) * size + mark

    def stream(f, data, version):
        for start in range(0, len(data), chunk):
            f.write(data[start : start + chunk])
            if version == 2:
                if start == 0:
                    f.flush()
                    print("writing", flush=True)  # the parent kills us from here on
                time.sleep(0.01)  # a slow disk: the kill lands well inside this write

    version = 0
    while True:
        version += 1
        data = payload(version)
        if how == "bytes":
            module.atomic_write_bytes(target, data)
        elif how == "stream":
            with module.atomic_open(target, "wb") as f:
                stream(f, data, version)
        else:  # naive: what the module exists to avoid
            with open(target, "wb") as f:
                stream(f, data, version)
        if version == 1:
            print("ready", flush=True)
    """
)


def _payload(version: int) -> bytes:
    mark = struct.pack(">Q", version)
    return mark + bytes([version % 251]) * PAYLOAD_SIZE + mark


def _complete_version(path: Path) -> int | None:
    """The version number of a complete payload file, or None when it is absent or damaged."""
    if not path.exists():
        return None
    data = path.read_bytes()
    if len(data) != PAYLOAD_SIZE + 16 or data[:8] != data[-8:]:
        return None
    version = struct.unpack(">Q", data[:8])[0]
    return version if data[8:-8].count(bytes([version % 251])) == PAYLOAD_SIZE else None


def _kill_while_writing(folder: Path, how: str, delay: float) -> tuple[int | None, list[str]]:
    """Run a writer loop, SIGKILL it; (complete version left at the target or None, leftover entries)."""
    folder.mkdir()
    target = folder / "big.bin"
    target.write_bytes(_payload(0))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, outputs.__file__, str(target), str(PAYLOAD_SIZE), str(CHUNK), how],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        if how != "bytes":
            assert child.stdout.readline().strip() == "writing"
        time.sleep(delay)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        if child.stdout is not None:
            child.stdout.close()
    return _complete_version(target), _leftovers(folder, {"big.bin"})


needs_sigkill = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")


@needs_sigkill
def test_sigkill_inside_a_streamed_write_leaves_the_complete_old_file(tmp_path: Path) -> None:
    for trial, delay in enumerate([0.0, 0.03, 0.08]):
        version, leftovers = _kill_while_writing(tmp_path / f"stream{trial}", "stream", delay)
        assert version == 1, f"trial {trial}: the target must be the complete previous version, got {version}"
        assert len(leftovers) == 1 and leftovers[0].endswith(".tmp"), "the kill must have hit a write"


@needs_sigkill
def test_sigkill_at_random_moments_never_leaves_a_partial_file(tmp_path: Path) -> None:
    rng = random.Random(7)
    for trial in range(4):
        version, leftovers = _kill_while_writing(tmp_path / f"bytes{trial}", "bytes", rng.uniform(0.0, 0.15))
        assert version is not None and version >= 1, f"trial {trial}: the target is damaged after SIGKILL"
        assert all(name.endswith(".tmp") for name in leftovers)


@needs_sigkill
def test_sigkill_check_catches_a_naive_writer(tmp_path: Path) -> None:
    """Control: the same check on plain open/write finds the damage, so the checks above are not blind."""
    version, _ = _kill_while_writing(tmp_path / "naive", "naive", 0.03)
    assert version is None
