"""Worker processes for the crash and concurrency tests, run as ``python workers.py ACTION ...``.

They load ``facelens.gallery`` without running ``facelens/__init__`` (which imports torch), so that a
worker starts in a fraction of a second: the gallery itself needs only numpy, sqlite3 and cryptography.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
if "facelens" not in sys.modules:
    package = types.ModuleType("facelens")
    package.__path__ = [str(SRC / "facelens")]
    sys.modules["facelens"] = package

import numpy as np  # noqa: E402

from facelens.gallery import Consent, Gallery  # noqa: E402


def enroll_loop(db: str, key_file: str, npy: str, count: int, per_subject: int, pause: float = 0.0) -> None:
    """Enroll ``count`` subjects, ``per_subject`` templates each in one transaction; print each commit.

    ``pause`` seconds between enrollments keep the writer busy long enough for readers to see it work.
    """
    import time

    emb = np.load(npy)
    rng = np.random.default_rng(0)
    with Gallery.open(db, key_file=key_file) as g:
        for i in range(count):
            base = emb[i % len(emb)]
            vecs = base + rng.normal(scale=0.01, size=(per_subject, base.size))
            g.enroll(Consent.now(f"subject-{i:04d}", "crash test", "research"), vecs, source=f"row {i}")
            print(f"committed subject-{i:04d}", flush=True)
            time.sleep(pause)


def identify_loop(db: str, key_file: str, npy: str, per_subject: int, stop_file: str) -> None:
    """Identify until ``stop_file`` exists; fail on any subject seen with a partial enrollment."""
    emb = np.load(npy)
    rounds = 0
    seen: set[int] = set()
    stop = Path(stop_file)
    with Gallery.open(db, key_file=key_file) as g:
        while True:
            done = stop.exists()
            subjects = g.subjects()
            seen.add(len(subjects))
            for row in subjects:
                if row["templates"] != per_subject:
                    raise SystemExit(f"torn read: {row['subject']} has {row['templates']} templates")
            result = g.identify(emb[rounds % len(emb)])
            assert len(result) == 1
            rounds += 1
            if rounds == 1:
                print("ready", flush=True)  # the test starts the writer only once every reader is reading
            if done:
                break
    print(f"seen {','.join(map(str, sorted(seen)))}", flush=True)
    print(f"rounds {rounds}", flush=True)


def forget(db: str, key_file: str, subject: str) -> None:
    """Forget ``subject`` and exit; print the result and how long ``forget`` took, as JSON."""
    import json
    import time

    with Gallery.open(db, key_file=key_file) as g:
        start = time.monotonic()
        r = g.forget(subject)
        elapsed = time.monotonic() - start
    print(json.dumps({"templates": r.templates, "consents": r.consents, "scrubbed": r.scrubbed,
                      "elapsed": elapsed}), flush=True)


if __name__ == "__main__":
    action, *args = sys.argv[1:]
    if action == "enroll":
        enroll_loop(args[0], args[1], args[2], int(args[3]), int(args[4]), float(args[5]) if len(args) > 5 else 0.0)
    elif action == "identify":
        identify_loop(args[0], args[1], args[2], int(args[3]), args[4])
    elif action == "forget":
        forget(args[0], args[1], args[2])
    else:
        raise SystemExit(f"unknown action {action}")
