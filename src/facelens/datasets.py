"""Read photo manifests, verification pairs and FRL landmark files, and stream the photos in batches.

A manifest is a CSV with a header row. Only ``path`` is required, so a one-column list of photos works;
the columns of the shared face bundle (``identity, sex, age, race_or_skin, dataset, subset,
landmarks``) are understood when present, and every other column is kept in :attr:`ManifestRow.extra`.
Relative paths are relative to the CSV's folder (or to ``root``), so a manifest travels with its photos.

Files are not opened while reading a manifest: a study over thousands of photos should report the few
bad ones at the end (see :func:`iter_images`), not stop at the first.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from .errors import FaceLensError, ImageError
from .image import load_image

__all__ = [
    "ImageBatches",
    "ManifestRow",
    "iter_images",
    "read_manifest",
    "read_pairs",
    "read_tem",
]

_KNOWN_COLUMNS = ("path", "identity", "sex", "age", "race_or_skin", "race", "dataset", "subset", "landmarks")
_PAIR_COLUMNS = ("path_a", "path_b", "same_identity")
_TRUE = frozenset({"1", "true", "yes", "y", "t"})
_FALSE = frozenset({"0", "false", "no", "n", "f"})


@dataclass(frozen=True)
class ManifestRow:
    """One photo of a manifest; labels the source did not give are None."""

    path: Path
    identity: str | None = None
    sex: str | None = None
    age: int | None = None
    race: str | None = None  # from ``race_or_skin`` (or ``race``): a label of the source, not ours
    dataset: str | None = None
    subset: str | None = None
    landmarks_path: Path | None = None
    extra: dict[str, str] = field(default_factory=dict, hash=False)


def read_manifest(
    csv_path: str | os.PathLike,
    *,
    datasets: Sequence[str] | None = None,
    root: str | os.PathLike | None = None,
) -> list[ManifestRow]:
    """The rows of a manifest CSV, optionally only those of the named ``datasets``, with absolute paths.

    A name in ``datasets`` that matches no row is an error, so a typo cannot silently give an empty study.
    """
    csv_file = Path(csv_path)
    base = Path(root) if root is not None else csv_file.parent
    if isinstance(datasets, str):
        datasets = [datasets]
    header, records = _read_csv(csv_file, required=("path",))
    if datasets is not None and "dataset" not in header:
        raise FaceLensError(f"{csv_file}: cannot select datasets, the manifest has no 'dataset' column")
    wanted = None if datasets is None else set(datasets)
    rows: list[ManifestRow] = []
    seen_datasets: set[str] = set()
    for line, record in records:
        dataset = record.get("dataset") or None
        if dataset is not None:
            seen_datasets.add(dataset)
        if wanted is not None and dataset not in wanted:
            continue
        rows.append(_manifest_row(record, csv_file, line, base))
    if wanted is not None and (missing := sorted(wanted - seen_datasets)):
        raise FaceLensError(
            f"{csv_file}: no rows for dataset(s) {', '.join(missing)}; "
            f"the manifest has {', '.join(sorted(seen_datasets)) or 'none'}"
        )
    return rows


def _manifest_row(record: dict[str, str], csv_file: Path, line: int, base: Path) -> ManifestRow:
    path = record["path"]
    if not path:
        raise FaceLensError(f"{csv_file}, line {line}: empty 'path'")
    landmarks = record.get("landmarks") or None
    race = record.get("race_or_skin") or record.get("race") or None
    return ManifestRow(
        path=_absolute(base, path),
        identity=record.get("identity") or None,
        sex=record.get("sex") or None,
        age=_parse_age(record.get("age", ""), csv_file, line),
        race=race,
        dataset=record.get("dataset") or None,
        subset=record.get("subset") or None,
        landmarks_path=_absolute(base, landmarks) if landmarks else None,
        extra={key: value for key, value in record.items() if key not in _KNOWN_COLUMNS},
    )


def _parse_age(text: str, csv_file: Path, line: int) -> int | None:
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number != int(number) or number < 0:
        raise FaceLensError(f"{csv_file}, line {line}: age must be a whole number of years, got {text!r}")
    return int(number)


def read_pairs(
    csv_path: str | os.PathLike, *, root: str | os.PathLike | None = None
) -> list[tuple[Path, Path, bool, str]]:
    """Verification pairs ``(path_a, path_b, same_identity, dataset)``; dataset is "" when not given."""
    csv_file = Path(csv_path)
    base = Path(root) if root is not None else csv_file.parent
    _header, records = _read_csv(csv_file, required=_PAIR_COLUMNS)
    pairs = []
    for line, record in records:
        if not record["path_a"] or not record["path_b"]:
            raise FaceLensError(f"{csv_file}, line {line}: empty 'path_a' or 'path_b'")
        flag = record["same_identity"].lower()
        if flag not in _TRUE | _FALSE:
            raise FaceLensError(
                f"{csv_file}, line {line}: same_identity must be 1/0 or true/false, "
                f"got {record['same_identity']!r}"
            )
        pairs.append(
            (
                _absolute(base, record["path_a"]),
                _absolute(base, record["path_b"]),
                flag in _TRUE,
                record.get("dataset", ""),
            )
        )
    return pairs


def _absolute(base: Path, path: str) -> Path:
    """``path`` relative to ``base``, made absolute and normalised without following symlinks."""
    return Path(os.path.abspath(base / Path(path).expanduser()))


def _read_csv(
    csv_file: Path, *, required: Sequence[str]
) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and ``(line number, stripped record)`` pairs; errors name the file and the line."""
    try:
        with open(csv_file, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            try:
                header = [name.strip() for name in next(reader)]
            except StopIteration:
                raise FaceLensError(
                    f"{csv_file}: empty file, expected a header row naming the columns"
                ) from None
            missing = [name for name in required if name not in header]
            if missing:
                raise FaceLensError(
                    f"{csv_file}: missing required column(s) {', '.join(repr(m) for m in missing)}; "
                    f"the header row has {', '.join(repr(h) for h in header)}"
                )
            records = []
            for values in reader:
                if not any(value.strip() for value in values):
                    continue  # blank line
                if len(values) > len(header):
                    raise FaceLensError(
                        f"{csv_file}, line {reader.line_num}: {len(values)} fields, "
                        f"but the header has {len(header)}"
                    )
                padded = values + [""] * (len(header) - len(values))
                records.append((reader.line_num, {k: v.strip() for k, v in zip(header, padded, strict=True)}))
    except FileNotFoundError:
        raise FaceLensError(f"{csv_file}: file not found") from None
    except IsADirectoryError:
        raise FaceLensError(f"{csv_file}: is a directory, not a CSV file") from None
    except UnicodeDecodeError as exc:
        raise FaceLensError(f"{csv_file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise FaceLensError(f"{csv_file}: malformed CSV ({exc})") from None
    return header, records


def read_tem(path: str | os.PathLike) -> np.ndarray:
    """The N×2 (x, y) points of an FRL/WebMorph ``.tem`` template; the line definitions after them are unread.

    Written here because no maintained library reads the format: the first line holds N, then N lines
    hold ``x<tab>y`` in pixels of the image.
    """
    tem = Path(path)
    try:
        lines = tem.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise FaceLensError(f"{tem}: landmark file not found") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise FaceLensError(f"{tem}: cannot read landmark file ({exc})") from None
    if not lines or not lines[0].strip():
        raise FaceLensError(f"{tem}: empty landmark file, expected the number of points on the first line")
    try:
        count = int(lines[0].strip())
    except ValueError:
        raise FaceLensError(
            f"{tem}: first line must be the number of points, got {lines[0].strip()!r}"
        ) from None
    if count <= 0:
        raise FaceLensError(f"{tem}: declares {count} points")
    if len(lines) - 1 < count:
        raise FaceLensError(f"{tem}: declares {count} points but has only {len(lines) - 1} more lines")
    points = np.empty((count, 2), dtype=np.float64)
    for index, text in enumerate(lines[1 : count + 1]):
        fields = text.split()
        try:
            if len(fields) != 2:
                raise ValueError
            points[index] = float(fields[0]), float(fields[1])
        except ValueError:
            raise FaceLensError(f"{tem}, line {index + 2}: expected 'x<tab>y', got {text!r}") from None
    if not np.all(np.isfinite(points)):
        raise FaceLensError(f"{tem}: landmark coordinates must be finite numbers")
    return points


class ImageBatches(Iterator[tuple[list[ManifestRow], list[np.ndarray]]]):
    """Iterator over ``(rows, images)`` batches; photos that fail to load land in :attr:`failures`.

    Every batch but the last holds exactly ``batch_size`` loaded images, and only one batch is held at
    a time, so memory stays bounded however long the manifest is. Inspect :attr:`failures`, a list of
    ``(row, error message)``, after (or during) the loop.
    """

    def __init__(
        self,
        rows: Iterable[ManifestRow | str | os.PathLike],
        *,
        batch_size: int = 32,
        on_error: Literal["skip", "raise"] = "skip",
        max_pixels: int | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        self.batch_size = batch_size
        self.on_error = on_error
        self.max_pixels = max_pixels
        self.failures: list[tuple[ManifestRow, str]] = []
        self._rows = iter(rows)

    def __iter__(self) -> ImageBatches:
        return self

    def __next__(self) -> tuple[list[ManifestRow], list[np.ndarray]]:
        batch_rows: list[ManifestRow] = []
        images: list[np.ndarray] = []
        for item in self._rows:
            row = item if isinstance(item, ManifestRow) else ManifestRow(path=Path(item))
            try:
                image = load_image(row.path, max_pixels=self.max_pixels)
            except ImageError as exc:
                self.failures.append((row, str(exc)))
                if self.on_error == "raise":
                    raise
                continue
            batch_rows.append(row)
            images.append(image)
            if len(images) == self.batch_size:
                break
        if not images:
            raise StopIteration
        return batch_rows, images


def iter_images(
    rows: Iterable[ManifestRow | str | os.PathLike],
    *,
    batch_size: int = 32,
    on_error: Literal["skip", "raise"] = "skip",
    max_pixels: int | None = None,
) -> ImageBatches:
    """Load the photos of ``rows`` (manifest rows or plain paths) lazily, ``batch_size`` images at a time.

    With ``on_error='skip'`` a photo that cannot be read is recorded in the returned iterator's
    ``failures`` and the stream goes on; with ``'raise'`` its :class:`ImageError` stops the loop
    (after being recorded too).
    """
    return ImageBatches(rows, batch_size=batch_size, on_error=on_error, max_pixels=max_pixels)
