"""Every odd file ends in a decoded image or a FaceLensError: never a crash, a hang or a memory blow-up.

The files go through a child process (`tests.fixtures.fuzz_worker`), so a crash in native code (dlib,
PIL's decoders, OpenCV) fails the test that caused it, naming the file, instead of killing the suite.
The corpus (`tests.fixtures.odd_inputs`) is seeded and small; hypothesis draws more from the same
builder with a fixed seed, so CI sees the same cases every run.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fixtures.odd_inputs import FORMATS, MODES, encode, flip_bytes, fuzz_corpus

REPO = Path(__file__).resolve().parents[1]
CASE_SECONDS = 60.0  # the first case also loads the model (a few seconds); dlib's largest level is < 1 s
MAX_RSS_MB = 3000.0  # torch and the model take about 0.6 GB; an unbounded upsampling would take tens


class Worker:
    """One `fuzz_worker` child; restarted after a crash so the next file still gets a fresh process."""

    def __init__(self, mode: str, out_dir: Path) -> None:
        self.mode, self.out_dir = mode, out_dir
        self._start()

    def _start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fixtures.fuzz_worker", self.mode, str(self.out_dir)], cwd=REPO,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        self.lines: queue.Queue[str | None] = queue.Queue()
        stdout = self.proc.stdout

        def pump() -> None:
            assert stdout is not None
            for line in stdout:
                self.lines.put(line)
            self.lines.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def run(self, path: Path) -> dict[str, object]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        while True:
            try:
                line = self.lines.get(timeout=CASE_SECONDS)
            except queue.Empty:
                self.close()
                self._start()
                return {"hang": f"no answer within {CASE_SECONDS:.0f} s"}
            if line is None:
                code = self.proc.wait(timeout=30)
                stderr = self.proc.stderr.read()[-2000:] if self.proc.stderr else ""
                self._start()
                return {"crash": f"exit status {code}", "stderr": stderr}
            if line.strip() != "start":
                return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


def _check(name: str, answer: dict[str, object]) -> None:
    assert "crash" not in answer and "hang" not in answer, f"{name}: {answer}"
    assert "bug" not in answer, f"{name}: not a FaceLensError:\n{answer['bug']}"
    assert float(answer["max_rss_mb"]) < MAX_RSS_MB, f"{name}: peak memory {answer['max_rss_mb']:.0f} MB"  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def api_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    worker = Worker("api", tmp_path_factory.mktemp("fuzz-api-out"))
    yield worker
    worker.close()


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("fuzz-corpus")
    paths = []
    for name, data in fuzz_corpus(seed=0):
        path = folder / name
        path.write_bytes(data)
        paths.append(path)
    return paths


def test_corpus_through_the_api(api_worker: Worker, corpus_files: list[Path]) -> None:
    endings: dict[str, int] = {}
    for path in corpus_files:
        answer = api_worker.run(path)
        _check(path.name, answer)
        if "error" in answer:
            assert str(answer["message"]).startswith(f"{path}: "), f"{path.name}: error does not name the file"
        kind = "decoded and embedded" if answer.get("ok") else str(answer["error"])
        endings[kind] = endings.get(kind, 0) + 1
    print(f"\nfuzz corpus through the API: {len(corpus_files)} files, endings {endings}")
    assert sum(endings.values()) == len(corpus_files)


def test_the_4000x3_png_is_refused_before_dlib(api_worker: Worker, corpus_files: list[Path]) -> None:
    path = next(p for p in corpus_files if p.name == "shape_4000x3.png")
    assert path.stat().st_size < 200
    answer = api_worker.run(path)
    assert answer.get("error") == "NoFaceError", answer
    assert "4000×3 is too small to hold a face" in str(answer["message"])


def test_corpus_through_the_cli(tmp_path: Path, corpus_files: list[Path]) -> None:
    """`facelens explain` in one child process per corpus: one line, naming the file, exit status 1."""
    worker = Worker("cli", tmp_path / "out")
    try:
        for path in corpus_files:
            answer = worker.run(path)
            _check(path.name, answer)
            if answer.get("ok"):
                continue
            stderr = str(answer["stderr"])
            assert answer["code"] == 1 and "Traceback" not in stderr, f"{path.name}: {answer}"
            assert stderr.count("\n") == 1 and stderr.startswith(f"facelens: error: {path}: "), stderr
    finally:
        worker.close()


@pytest.mark.parametrize("name", ["shape_4000x3.png", "random_127.png", "truncated_50.jpg"])
def test_real_cli_process_prints_one_line(tmp_path: Path, corpus_files: list[Path], name: str) -> None:
    path = next(p for p in corpus_files if p.name == name)
    proc = subprocess.run([sys.executable, "-m", "facelens.cli", "explain", str(path), "--method", "gradient",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 1, proc
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"facelens: error: {path}: "), proc.stderr


@settings(max_examples=40, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    width=st.integers(1, 5000), height=st.integers(1, 5000), mode=st.sampled_from(MODES),
    fmt=st.sampled_from(FORMATS), keep=st.one_of(st.none(), st.floats(0.0, 1.0)),
    flips=st.integers(0, 8), seed=st.integers(0, 2**16),
)
def test_drawn_images_end_well(api_worker: Worker, tmp_path_factory: pytest.TempPathFactory, width: int,
                               height: int, mode: str, fmt: str, keep: float | None, flips: int, seed: int) -> None:
    if width * height > 2_000_000:  # keep each case fast; the corpus and the bomb tests cover large ones
        width = max(1, 2_000_000 // height)
    data = encode(width, height, mode, fmt, seed)
    if keep is not None:
        data = data[: int(len(data) * keep)]
    if flips and len(data) > 8:
        data = flip_bytes(data, flips, seed)
    path = tmp_path_factory.mktemp("drawn") / f"drawn.{fmt.lower()}"
    path.write_bytes(data)
    _check(f"{width}×{height} {mode} {fmt} keep={keep} flips={flips} seed={seed}", api_worker.run(path))
