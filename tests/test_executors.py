"""map_rows: the local executor's contract, and the Ray executor giving the same results on a local cluster."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from facelens.datasets import ManifestRow, read_manifest
from facelens.errors import FaceLensError, ImageError
from facelens.executors import MapResult, RowFailure, map_rows


def _rows(names: list[str], root: Path = Path("/nowhere")) -> list[ManifestRow]:
    return [ManifestRow(root / n) for n in names]


# -- workers (module level: picklable) ------------------------------------------------------------
def _name_worker(calls: list[int] | None = None):
    """Returns each row's file name; raises ImageError for the whole batch when a row is named 'bad*'."""
    def fn(rows: list[ManifestRow]) -> list[object]:
        if calls is not None:
            calls.append(len(rows))
        if any(r.path.name.startswith("bad") for r in rows):
            bad = next(r for r in rows if r.path.name.startswith("bad"))
            raise ImageError(str(bad.path), "cannot decode")
        return [{"name": r.path.name} for r in rows]
    return fn


def _soft_failure_worker():
    """Reports 'nf*' rows as RowFailure itself, the way study workers report photos without a face."""
    def fn(rows: list[ManifestRow]) -> list[object]:
        return [RowFailure(str(r.path), "no face") if r.path.name.startswith("nf") else r.path.name for r in rows]
    return fn


def _wrong_count_worker():
    return lambda rows: rows[:-1]


# -- local ----------------------------------------------------------------------------------------
def test_local_keeps_order_and_counts():
    names = [f"{i:03d}.jpg" for i in range(37)]
    calls: list[int] = []
    res = map_rows(_rows(names), lambda: _name_worker(calls), batch_size=8)
    assert [r["name"] for r in res.records] == names
    assert [r.path.name for r in res.rows] == names
    assert calls == [8, 8, 8, 8, 5]
    assert (res.rows_in, res.rows_out, res.failures) == (37, 37, [])
    assert res.counts()["executor"] == "local"


def test_local_bad_row_falls_back_to_single_rows_and_keeps_neighbours():
    names = ["a.jpg", "b.jpg", "bad1.jpg", "c.jpg", "d.jpg", "bad2.jpg"]
    calls: list[int] = []
    res = map_rows(_rows(names), lambda: _name_worker(calls), batch_size=4)
    assert [r["name"] for r in res.records] == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    assert [Path(f.path).name for f in res.failures] == ["bad1.jpg", "bad2.jpg"]
    assert all("cannot decode" in f.reason for f in res.failures)
    # batch 1 of 4 fails and is retried row by row; batch 2 (d, bad2) likewise
    assert calls == [4, 1, 1, 1, 1, 2, 1, 1]
    assert res.rows_in == res.rows_out + len(res.failures) == 6


def test_local_lone_bad_row_is_a_failure_not_fatal():
    res = map_rows(_rows(["a.jpg", "bad.jpg"]), _name_worker, batch_size=1)
    assert [r["name"] for r in res.records] == ["a.jpg"]
    assert [(Path(f.path).name, "cannot decode" in f.reason) for f in res.failures] == [("bad.jpg", True)]
    assert res.rows_in == 2


def test_local_failures_returned_by_the_worker_are_counted():
    res = map_rows(_rows(["a", "nf1", "b", "nf2", "c"]), _soft_failure_worker, batch_size=2)
    assert res.records == ["a", "b", "c"]
    assert [f.as_dict()["reason"] for f in res.failures] == ["no face", "no face"]
    assert res.counts()["failed"] == 2 and res.rows_in == 5


def test_local_rejects_a_worker_that_drops_rows_and_unknown_executors():
    with pytest.raises(RuntimeError, match="returned 1 results for 2 rows"):
        map_rows(_rows(["a", "b"]), _wrong_count_worker)
    with pytest.raises(FaceLensError, match="unknown executor"):
        map_rows(_rows(["a"]), _name_worker, executor="spark")  # type: ignore[arg-type]


# -- Ray ------------------------------------------------------------------------------------------
def _embed_worker():
    """The studies' per-photo step (detect, align, embed with dlib-resnet), loaded once per worker."""
    from facelens.studies.features import model_worker

    return model_worker("dlib-resnet")()


def _crash_once_worker(flag: str):
    """Kills its own process on the first batch any worker sees (the flag file records that it did)."""
    def fn(rows: list[ManifestRow]) -> list[object]:
        try:
            fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return [(r.path.name, os.getpid()) for r in rows]
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os._exit(1)
    return fn


@pytest.fixture(scope="module")
def ray_cluster():
    """One local 2-CPU Ray cluster for the module; the workers above travel by value (tests is no package there)."""
    ray = pytest.importorskip("ray")
    import cloudpickle

    from facelens.executors_ray import connect

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    started = connect(None)
    yield ray
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    if started:
        ray.shutdown()


def test_ray_embeddings_identical_to_local_and_bad_photos_reported(ray_cluster, shared_faces, tmp_path):
    from functools import partial

    rows = read_manifest(shared_faces / "manifest.csv", datasets=["frl_london"])[:4]
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff not a jpeg")
    blank = tmp_path / "blank.png"
    import cv2

    cv2.imwrite(str(blank), np.full((120, 120, 3), 128, np.uint8))
    rows = [*rows[:2], ManifestRow(corrupt), *rows[2:], ManifestRow(blank)]
    local = map_rows(rows, _embed_worker, batch_size=3)
    ray = map_rows(rows, partial(_embed_worker), executor="ray", batch_size=3, workers=2)
    assert isinstance(ray, MapResult) and ray.executor == "ray" and ray.workers == 2
    assert [r.path for r in ray.rows] == [r.path for r in local.rows]
    assert len(ray.records) == len(local.records) == len(rows) - 2
    for a, b in zip(ray.records, local.records, strict=True):
        assert np.array_equal(a.outputs["original"], b.outputs["original"])
    assert ray.failures == local.failures
    assert [Path(f.path).name for f in ray.failures] == ["corrupt.jpg", "blank.png"]
    assert ray.counts()["rows_in"] == ray.rows_out + len(ray.failures) == len(rows)


def test_ray_worker_that_crashes_is_restarted_and_no_row_is_lost(ray_cluster, tmp_path):
    from functools import partial

    flag = tmp_path / "crashed"
    names = [f"{i:02d}.jpg" for i in range(12)]
    res = map_rows(_rows(names), partial(_crash_once_worker, str(flag)), executor="ray", batch_size=3, workers=1)
    assert flag.is_file(), "the worker never crashed, so the retry was not exercised"
    crashed_pid = int(flag.read_text())
    assert [name for name, _ in res.records] == names
    assert crashed_pid not in {pid for _, pid in res.records}
    assert (res.rows_in, res.rows_out, len(res.failures)) == (12, 12, 0)


def test_evaluate_on_ray_equals_local_including_gradients(ray_cluster, shared_faces, tmp_path):
    """Gradient maps differ in the last bits with torch's thread count: the workers must match the driver."""
    from facelens.evaluate.runner import evaluate

    rows = read_manifest(shared_faces / "manifest.csv", datasets=["frl_london"])[:3]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"junk")
    rows = [rows[0], ManifestRow(bad), *rows[1:]]
    kw = dict(photo_batch=2, steps=4, batch_size=16)
    local = evaluate(rows, "fer-emotion", ["gradient"], ["deletion", "masked"], **kw).to_json()
    ray = evaluate(rows, "fer-emotion", ["gradient"], ["deletion", "masked"], executor="ray", **kw).to_json()
    local.pop("seconds"), ray.pop("seconds")
    assert ray == local
    assert (ray["rows_in"], ray["rows_out"], [Path(s["path"]).name for s in ray["skipped"]]) == (4, 3, ["bad.jpg"])


def _crash_once_then_names(flag: str):
    """The first batch kills its worker; afterwards rows named 'bad*' fail as unreadable photos."""
    crash, names = _crash_once_worker(flag), _name_worker()

    def fn(rows: list[ManifestRow]) -> list[object]:
        crash(rows)  # exits the process the first time, returns harmlessly after
        return names(rows)
    return fn


def test_ray_worker_killed_mid_batch_and_bad_rows_lose_nothing(ray_cluster, tmp_path):
    from functools import partial

    flag = tmp_path / "crashed"
    names = [f"{i:02d}.jpg" for i in range(5)] + ["bad_a.jpg"] + [f"{i:02d}.jpg" for i in range(5, 9)] + ["bad_b.jpg"]
    res = map_rows(_rows(names), partial(_crash_once_then_names, str(flag)), executor="ray", batch_size=3, workers=2)
    assert flag.is_file(), "the worker never crashed, so the retry was not exercised"
    assert [r["name"] for r in res.records] == [n for n in names if not n.startswith("bad")]
    assert sorted(Path(f.path).name for f in res.failures) == ["bad_a.jpg", "bad_b.jpg"]
    assert res.rows_in == res.rows_out + len(res.failures) == len(names)


def test_ray_missing_is_one_line_saying_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(FaceLensError, match=r"--executor ray needs Ray: pip install -e '\.\[ray\]'"):
        map_rows(_rows(["a.jpg"]), _name_worker, executor="ray")
