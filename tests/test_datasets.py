"""Manifests, pairs, .tem landmarks and batch streaming: on the shared bundle and on CSVs written here."""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facelens.datasets import ManifestRow, iter_images, read_manifest, read_pairs, read_tem
from facelens.errors import FaceLensError, ImageError

KNOWN = {"path", "identity", "sex", "age", "race_or_skin", "dataset", "subset", "landmarks"}


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _photo(
    path: Path, size: tuple[int, int] = (12, 10), colour: tuple[int, int, int] = (200, 30, 60)
) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


# ---------------------------------------------------------------------------------------------------
# the shared manifest


def test_real_manifest_counts_and_paths(shared_faces: Path, manifest_rows: list[dict[str, str]]) -> None:
    rows = read_manifest(shared_faces / "manifest.csv")
    assert len(rows) == len(manifest_rows)
    assert Counter(r.dataset for r in rows) == Counter(raw["dataset"] or None for raw in manifest_rows)
    for row, raw in zip(rows, manifest_rows, strict=True):
        assert row.path.is_absolute()
        assert row.path == (shared_faces / raw["path"]).absolute()
        assert row.path.is_file()
        assert row.identity == (raw["identity"] or None)
        assert row.sex == (raw["sex"] or None)
        assert row.age == (int(raw["age"]) if raw["age"] else None)
        assert row.race == (raw["race_or_skin"] or None)
        assert row.subset == (raw["subset"] or None)
        if raw["landmarks"]:
            assert row.landmarks_path == (shared_faces / raw["landmarks"]).absolute()
            assert row.landmarks_path.is_file()
        else:
            assert row.landmarks_path is None
        assert row.extra == {key: value for key, value in raw.items() if key not in KNOWN}
    assert {row: i for i, row in enumerate(rows[:3])}, "rows must be hashable despite their extra dict"


def test_real_manifest_dataset_filter(shared_faces: Path, manifest_rows: list[dict[str, str]]) -> None:
    counts = Counter(raw["dataset"] for raw in manifest_rows)
    picked = sorted(counts)[:2]
    rows = read_manifest(shared_faces / "manifest.csv", datasets=picked)
    assert len(rows) == sum(counts[name] for name in picked)
    assert {r.dataset for r in rows} == set(picked)
    with pytest.raises(FaceLensError, match="no rows for dataset"):
        read_manifest(shared_faces / "manifest.csv", datasets=[picked[0], "no_such_set"])


def test_real_pairs(shared_faces: Path) -> None:
    with open(shared_faces / "pairs_verification.csv", newline="") as f:
        raw_pairs = list(csv.DictReader(f))
    pairs = read_pairs(shared_faces / "pairs_verification.csv")
    assert len(pairs) == len(raw_pairs)
    for (path_a, path_b, same, dataset), raw in zip(pairs, raw_pairs, strict=True):
        assert path_a == (shared_faces / raw["path_a"]).absolute() and path_a.is_file()
        assert path_b == (shared_faces / raw["path_b"]).absolute() and path_b.is_file()
        assert same is (raw["same_identity"] == "1")
        assert dataset == raw["dataset"]
    assert Counter(p[2] for p in pairs) == Counter(raw["same_identity"] == "1" for raw in raw_pairs)


def test_real_tem_files(shared_faces: Path) -> None:
    rows = [r for r in read_manifest(shared_faces / "manifest.csv") if r.landmarks_path is not None]
    assert rows, "the bundle lists landmark files"
    for row in rows:
        assert row.landmarks_path is not None
        lines = row.landmarks_path.read_text().splitlines()
        count = int(lines[0])
        points = read_tem(row.landmarks_path)
        assert points.shape == (count, 2) and points.dtype == np.float64
        first_x, first_y = (float(v) for v in lines[1].split())
        assert tuple(points[0]) == (first_x, first_y)
        width, height = int(row.extra["width"]), int(row.extra["height"])
        inside = (
            (points[:, 0] >= 0) & (points[:, 0] <= width) & (points[:, 1] >= 0) & (points[:, 1] <= height)
        )
        assert inside.mean() > 0.9, f"{row.landmarks_path}: most landmarks should lie on the image"


def test_streaming_real_photos_gives_their_declared_sizes(shared_faces: Path) -> None:
    rows = read_manifest(shared_faces / "manifest.csv")[::9]
    stream = iter_images(rows, batch_size=16)
    seen = 0
    for batch_rows, images in stream:
        assert 1 <= len(images) <= 16 and len(batch_rows) == len(images)
        for row, image in zip(batch_rows, images, strict=True):
            assert image.shape == (int(row.extra["height"]), int(row.extra["width"]), 3)
        seen += len(images)
    assert seen == len(rows)
    assert stream.failures == []


# ---------------------------------------------------------------------------------------------------
# CSVs written here


def test_one_column_list_relative_to_the_csv(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    elsewhere = tmp_path / "elsewhere.png"
    csv_path = _write_csv(
        tmp_path / "list.csv", ["path"], [["photos/a.jpg"], [str(elsewhere)], ["../up.png"]]
    )
    rows = read_manifest(csv_path)
    assert [r.path for r in rows] == [tmp_path / "photos" / "a.jpg", elsewhere, tmp_path.parent / "up.png"]
    assert rows[0] == ManifestRow(path=tmp_path / "photos" / "a.jpg")
    other_root = tmp_path / "root"
    assert read_manifest(csv_path, root=other_root)[0].path == other_root / "photos" / "a.jpg"


def test_optional_columns_and_extras(tmp_path: Path) -> None:
    csv_path = tmp_path / "m.csv"
    csv_path.write_text(
        "\ufeff path , age, race ,dataset,camera\n"  # BOM and padded names, as spreadsheets write them
        "a.jpg, 34 ,asian,mine,phone\n"
        "\n"
        "b.jpg,,,mine,\n",
        encoding="utf-8",
    )
    rows = read_manifest(csv_path)
    assert [(r.age, r.race, r.dataset, r.extra) for r in rows] == [
        (34, "asian", "mine", {"camera": "phone"}),
        (None, None, "mine", {"camera": ""}),
    ]
    assert rows[0].identity is None and rows[0].landmarks_path is None


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("file,identity\na.jpg,x\n", "missing required column(s) 'path'"),
        ("", "empty file"),
        ("path,age\na.jpg,twelve\n", "line 2: age must be a whole number"),
        ("path,age\na.jpg,-3\n", "line 2: age"),
        ("path,age\na.jpg,3,extra\n", "line 2: 3 fields"),
        ("path,age\n,3\n", "line 2: empty 'path'"),
    ],
)
def test_bad_manifests(tmp_path: Path, content: str, words: str) -> None:
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text(content)
    with pytest.raises(FaceLensError) as excinfo:
        read_manifest(csv_path)
    assert str(csv_path) in str(excinfo.value)
    assert words in str(excinfo.value)


def test_missing_manifest_and_filter_without_dataset_column(tmp_path: Path) -> None:
    with pytest.raises(FaceLensError, match="file not found"):
        read_manifest(tmp_path / "absent.csv")
    csv_path = _write_csv(tmp_path / "m.csv", ["path"], [["a.jpg"]])
    with pytest.raises(FaceLensError, match="no 'dataset' column"):
        read_manifest(csv_path, datasets=["orl"])


def test_pairs_from_a_written_csv(tmp_path: Path) -> None:
    csv_path = _write_csv(
        tmp_path / "pairs.csv",
        ["path_a", "path_b", "same_identity"],
        [["a.jpg", "b.jpg", "1"], ["a.jpg", "c.jpg", "false"]],
    )
    assert read_pairs(csv_path) == [
        (tmp_path / "a.jpg", tmp_path / "b.jpg", True, ""),
        (tmp_path / "a.jpg", tmp_path / "c.jpg", False, ""),
    ]
    _write_csv(csv_path, ["path_a", "path_b", "same_identity"], [["a.jpg", "b.jpg", "maybe"]])
    with pytest.raises(FaceLensError, match="same_identity"):
        read_pairs(csv_path)
    _write_csv(csv_path, ["path_a", "path_b"], [["a.jpg", "b.jpg"]])
    with pytest.raises(FaceLensError, match="'same_identity'"):
        read_pairs(csv_path)


# ---------------------------------------------------------------------------------------------------
# .tem


def test_tem_points_then_line_definitions(tmp_path: Path) -> None:
    tem = tmp_path / "face.tem"
    tem.write_bytes(b"3\r\n10.5\t20\r\n30\t40.25\r\n-1\t7e1\r\n2\r\n0\r\n2\r\n0 1\r\n0\r\n")
    np.testing.assert_array_equal(read_tem(tem), [[10.5, 20.0], [30.0, 40.25], [-1.0, 70.0]])


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("", "empty landmark file"),
        ("three\n1\t2\n", "first line must be the number of points"),
        ("3\n1\t2\n3\t4\n", "declares 3 points but has only 2"),
        ("2\n1\t2\n3\tx\n", "line 3"),
        ("2\n1\t2\n3\n", "line 3"),
        ("1\nnan\t2\n", "finite"),
        ("0\n", "declares 0 points"),
    ],
)
def test_bad_tem_files(tmp_path: Path, content: str, words: str) -> None:
    tem = tmp_path / "bad.tem"
    tem.write_text(content)
    with pytest.raises(FaceLensError, match=words) as excinfo:
        read_tem(tem)
    assert str(tem) in str(excinfo.value)


def test_missing_tem(tmp_path: Path) -> None:
    with pytest.raises(FaceLensError, match="landmark file not found"):
        read_tem(tmp_path / "none.tem")


# ---------------------------------------------------------------------------------------------------
# streaming


@pytest.fixture
def mixed_manifest(tmp_path: Path) -> Path:
    """Five good photos, with a missing file, a truncated JPEG and a text file among them."""
    (tmp_path / "img").mkdir()
    names = []
    for i in range(5):
        _photo(tmp_path / "img" / f"good{i}.png", size=(10 + i, 8), colour=(i * 40, 10, 20))
        names.append(f"img/good{i}.png")
    full = tmp_path / "img" / "full.jpg"
    _photo(full, size=(64, 64))
    (tmp_path / "img" / "cut.jpg").write_bytes(full.read_bytes()[:300])
    (tmp_path / "img" / "notes.jpg").write_text("not a photo")
    order = [
        names[0],
        "img/missing.jpg",
        names[1],
        "img/cut.jpg",
        names[2],
        names[3],
        "img/notes.jpg",
        names[4],
    ]
    return _write_csv(tmp_path / "m.csv", ["path", "identity"], [[p, f"id{i}"] for i, p in enumerate(order)])


def test_bad_files_are_reported_and_skipped(mixed_manifest: Path) -> None:
    rows = read_manifest(mixed_manifest)
    stream = iter_images(rows, batch_size=2)
    batches = list(stream)
    assert [len(images) for _rows, images in batches] == [2, 2, 1]
    loaded = [row.path.name for batch_rows, _ in batches for row in batch_rows]
    assert loaded == [f"good{i}.png" for i in range(5)]
    for batch_rows, images in batches:
        for row, image in zip(batch_rows, images, strict=True):
            width = 10 + int(row.path.stem[-1])
            assert image.shape == (8, width, 3)
    reasons = {row.path.name: message for row, message in stream.failures}
    assert set(reasons) == {"missing.jpg", "cut.jpg", "notes.jpg"}
    assert reasons["missing.jpg"].endswith("missing.jpg: file not found")
    assert reasons["cut.jpg"].endswith("truncated image data")
    assert reasons["notes.jpg"].endswith("not an image file (PIL cannot identify it)")
    assert all(isinstance(row, ManifestRow) and row.identity for row, _ in stream.failures)


def test_on_error_raise_stops_at_the_first_bad_file(mixed_manifest: Path) -> None:
    stream = iter_images(read_manifest(mixed_manifest), batch_size=10, on_error="raise")
    with pytest.raises(ImageError) as excinfo:
        next(stream)
    assert excinfo.value.reason == "file not found"
    assert len(stream.failures) == 1


def test_rows_are_pulled_lazily_one_batch_at_a_time(tmp_path: Path) -> None:
    photos = [_photo(tmp_path / f"p{i}.png") for i in range(7)]
    pulled: list[Path] = []

    def rows() -> Iterator[Path]:
        for photo in photos:
            pulled.append(photo)
            yield photo  # plain paths are accepted too

    stream = iter_images(rows(), batch_size=3)
    first_rows, first_images = next(stream)
    assert len(pulled) == 3, "a batch must not read ahead"
    assert [r.path for r in first_rows] == photos[:3] and len(first_images) == 3
    assert [len(images) for _rows, images in stream] == [3, 1]
    assert list(stream) == []


def test_stream_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="on_error"):
        iter_images([], on_error="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        iter_images([], batch_size=0)


def test_pixel_limit_reaches_the_stream(tmp_path: Path) -> None:
    big, small = _photo(tmp_path / "big.png", size=(100, 100)), _photo(tmp_path / "small.png", size=(10, 10))
    stream = iter_images([big, small], max_pixels=5000)
    assert [[r.path for r in batch_rows] for batch_rows, _ in stream] == [[small]]
    assert "exceeds the limit" in stream.failures[0][1]
