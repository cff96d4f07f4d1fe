"""A biometric gallery in one SQLite file: encrypted templates, consent, retention, erasure, audit.

What the file holds, and in what form (see :mod:`.crypto` for the keys):

* ``meta``: schema version, the key-check value, the model, metric, threshold, embedding size and the
  gallery's retention period. No key material.
* ``consents``: one record per enrollment: subject reference (keyed HMAC), the subject's name and the
  purpose sealed with AES-GCM, the legal basis code and the time consent was given.
* ``templates``: the embeddings, sealed, each tied to its consent record, with enrollment and expiry
  times. An expired template is never used for identification, even before ``purge`` removes it.
* ``audit``: an append-only log of enrollments, identifications, exports, purges and erasures. SQLite
  triggers abort any UPDATE or DELETE on it, and every entry carries ``HMAC(previous link ‖ entry)``
  so that a log rewritten with the triggers dropped no longer verifies (:meth:`Gallery.verify_audit`).
  The log names people only by subject reference, so it keeps no name once the person is forgotten.

Durability and concurrency: WAL journal with ``synchronous=FULL`` (a committed enrollment survives
SIGKILL and power loss), ``busy_timeout`` so that writers queue instead of failing, every write in a
``BEGIN IMMEDIATE`` transaction (a deferred one could fail to upgrade under load), and every read as a
single statement over one snapshot, so an identification sees a whole enrollment or none of it.

Erasure (``forget``): rows are deleted with ``secure_delete=ON`` (SQLite zeroes the freed bytes), the
WAL is checkpointed and truncated, the file is rebuilt by ``VACUUM`` and the WAL truncated again, with
temporary tables kept in memory, so no copy of the ciphertext remains in the database, its WAL or its
journal. What this cannot reach: backups, copies made by others, and blocks the filesystem or an SSD
keeps after a file shrinks.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FaceLensError
from ..matching import Match, Matcher
from .consent import LEGAL_BASES, Consent, parse_time, utc_now
from .crypto import GalleryKey, resolve_key

__all__ = ["SCHEMA_VERSION", "AuditEntry", "ForgetResult", "Gallery", "GalleryError", "Identification"]

SCHEMA_VERSION = 1
_BUSY_MS = 30_000

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE consents (
    id INTEGER PRIMARY KEY,
    subject_ref TEXT NOT NULL,
    subject_enc BLOB NOT NULL,
    purpose_enc BLOB NOT NULL,
    legal_basis TEXT NOT NULL,
    given_at TEXT NOT NULL,
    recorded_at TEXT NOT NULL
);
CREATE INDEX consents_subject ON consents(subject_ref);
CREATE TABLE templates (
    id INTEGER PRIMARY KEY,
    subject_ref TEXT NOT NULL,
    consent_id INTEGER NOT NULL REFERENCES consents(id),
    enrolled_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    subject_enc BLOB NOT NULL,
    embedding_enc BLOB NOT NULL,
    source_enc BLOB
);
CREATE INDEX templates_subject ON templates(subject_ref);
CREATE INDEX templates_expiry ON templates(expires_at);
CREATE TABLE audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    action TEXT NOT NULL,
    subject_ref TEXT,
    detail TEXT NOT NULL,
    chain TEXT NOT NULL
);
CREATE INDEX audit_subject ON audit(subject_ref);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""


class GalleryError(FaceLensError):
    """The gallery file is missing, not a gallery, damaged, or the request does not fit it."""


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    at: str
    action: str
    subject_ref: str | None
    detail: dict[str, Any]
    chain: str


@dataclass(frozen=True)
class Identification:
    """The answer to one query: the matched subject (None when rejected) and the nearest one's distance."""

    subject: str | None
    nearest: str
    score: float
    accepted: bool
    metric: str
    threshold: float | None

    @property
    def distance(self) -> float:
        """For L2 galleries, the Euclidean distance to the nearest template."""
        return -self.score

    def as_json(self) -> dict[str, Any]:
        finite = np.isfinite(self.score)  # an empty gallery has no nearest face and no score
        return {"subject": self.subject, "nearest": self.nearest or None, "score": self.score if finite else None,
                "accepted": self.accepted, "metric": self.metric, "threshold": self.threshold}


@dataclass(frozen=True)
class ForgetResult:
    """What ``forget`` removed, and whether the file was scrubbed (WAL truncated, file rebuilt)."""

    subject: str
    templates: int
    consents: int
    scrubbed: bool


def _iso(t: datetime) -> str:
    """UTC, fixed width: such strings sort as the times they stand for, so SQL can compare them."""
    return parse_time(t).isoformat(timespec="microseconds")


class Gallery:
    """One gallery file, opened with its key. Use :meth:`create` or :meth:`open`; close it (or use ``with``)."""

    def __init__(self, path: Path, conn: sqlite3.Connection, key: GalleryKey) -> None:
        self.path = path
        self._conn = conn
        self._key = key
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        self.model = str(meta["model"])
        self.metric = str(meta["metric"])
        self.threshold = None if meta["threshold"] in (None, "") else float(meta["threshold"])
        self.dim = int(meta["dim"])
        self.retention_days = float(meta["retention_days"])

    # -- opening ----------------------------------------------------------------------------------------
    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(os.fspath(path), timeout=_BUSY_MS / 1000, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise GalleryError(f"{path}: cannot switch the database to WAL mode (got {mode})")
            for pragma in ("synchronous=FULL", "secure_delete=ON", "foreign_keys=ON", "temp_store=MEMORY"):
                conn.execute(f"PRAGMA {pragma}")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise GalleryError(f"{path}: not a usable SQLite database ({exc})") from None
        except BaseException:
            conn.close()
            raise
        return conn

    @classmethod
    def create(cls, path: str | os.PathLike, *, key: GalleryKey | str | bytes | None = None,
               key_file: str | os.PathLike | None = None, model: str = "dlib-resnet", metric: str = "l2",
               threshold: float | None = 0.6, dim: int = 128, retention_days: float = 365.0) -> Gallery:
        """A new, empty gallery at ``path`` (an existing file is an error, never overwritten)."""
        p = Path(path)
        gkey = key if isinstance(key, GalleryKey) else resolve_key(key, key_file)
        if metric not in ("l2", "cosine"):
            raise GalleryError(f"metric must be 'l2' or 'cosine', got {metric!r}")
        if not (retention_days > 0):
            raise GalleryError(f"retention period must be positive, got {retention_days} days")
        if p.exists():
            raise GalleryError(f"{p}: already exists; open it instead of creating it")
        p.parent.mkdir(parents=True, exist_ok=True)
        conn = cls._connect(p)
        try:
            conn.execute("BEGIN IMMEDIATE")
            for statement in _split(_SCHEMA):
                conn.execute(statement)
            meta = {"schema_version": str(SCHEMA_VERSION), "key_check": gkey.check_value(), "model": model,
                    "metric": metric, "threshold": "" if threshold is None else repr(float(threshold)),
                    "dim": str(int(dim)), "retention_days": repr(float(retention_days)),
                    "created_at": _iso(utc_now())}
            conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", list(meta.items()))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.close()
            raise
        g = cls(p, conn, gkey)
        g._append_audit("create", None, {"model": model, "metric": metric, "threshold": threshold,
                                         "retention_days": retention_days})
        return g

    @classmethod
    def open(cls, path: str | os.PathLike, *, key: GalleryKey | str | bytes | None = None,
             key_file: str | os.PathLike | None = None) -> Gallery:
        """An existing gallery; a wrong key raises :class:`GalleryKeyError` before any row is read."""
        p = Path(path)
        if not p.is_file():
            raise GalleryError(f"{p}: no gallery file here (create one with `facelens gallery enroll --create`)")
        gkey = key if isinstance(key, GalleryKey) else resolve_key(key, key_file)
        conn = cls._connect(p)
        try:
            try:
                meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            except sqlite3.DatabaseError as exc:
                raise GalleryError(f"{p}: not a facelens gallery ({exc})") from None
            if str(meta.get("schema_version")) != str(SCHEMA_VERSION):
                raise GalleryError(f"{p}: gallery schema {meta.get('schema_version')!r}, this facelens reads "
                                   f"{SCHEMA_VERSION}")
            gkey.verify_check_value(bytes(meta["key_check"]), str(p))
            return cls(p, conn, gkey)
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions and audit -------------------------------------------------------------------------
    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction taken up front (``BEGIN IMMEDIATE``), so it waits instead of failing later."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise

    def _append_audit(self, action: str, subject_ref: str | None, detail: dict[str, Any],
                      conn: sqlite3.Connection | None = None) -> None:
        if conn is None:
            with self._write() as c:
                self._append_audit(action, subject_ref, detail, c)
            return
        last = conn.execute("SELECT seq, chain FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        seq, previous = (last[0] + 1, last[1]) if last else (1, "")
        at = _iso(utc_now())
        text = json.dumps(detail, sort_keys=True, separators=(",", ":"), default=str)
        chain = self._key.chain(previous, _entry_bytes(seq, at, action, subject_ref, text))
        conn.execute("INSERT INTO audit (seq, at, action, subject_ref, detail, chain) VALUES (?, ?, ?, ?, ?, ?)",
                     (seq, at, action, subject_ref, text, chain))

    def audit_log(self, subject: str | None = None) -> list[AuditEntry]:
        """The audit log (only the entries about ``subject`` when given), oldest first."""
        if subject is None:
            rows = self._conn.execute("SELECT seq, at, action, subject_ref, detail, chain FROM audit ORDER BY seq")
        else:
            rows = self._conn.execute("SELECT seq, at, action, subject_ref, detail, chain FROM audit "
                                      "WHERE subject_ref = ? ORDER BY seq", (self._key.subject_ref(subject),))
        return [AuditEntry(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5]) for r in rows.fetchall()]

    def verify_audit(self) -> tuple[bool, int | None]:
        """Recompute the log's HMAC chain: ``(True, None)`` or ``(False, first bad seq)``."""
        previous = ""
        expected_seq = 1
        for seq, at, action, ref, detail, chain in self._conn.execute(
                "SELECT seq, at, action, subject_ref, detail, chain FROM audit ORDER BY seq"):
            if seq != expected_seq or self._key.chain(previous, _entry_bytes(seq, at, action, ref, detail)) != chain:
                return False, seq
            previous, expected_seq = chain, seq + 1
        return True, None

    # -- enrollment ---------------------------------------------------------------------------------------
    def enroll(self, consent: Consent, embeddings: np.ndarray, *, source: str | None = None,
               now: datetime | None = None) -> list[int]:
        """Store one or more embeddings (D or K×D) of ``consent.subject`` with its consent record, in one
        transaction; returns the template ids. Refused without a valid :class:`Consent`."""
        if not isinstance(consent, Consent):
            raise GalleryError("enrollment needs a Consent record (subject, purpose, legal basis, time)")
        emb = np.atleast_2d(np.asarray(embeddings, dtype=np.float32))
        if emb.ndim != 2 or emb.shape[1] != self.dim or len(emb) == 0:
            raise GalleryError(f"{self.path}: expected {self.dim}-d embeddings, got shape {np.shape(embeddings)}")
        if not np.all(np.isfinite(emb)):
            raise GalleryError("refusing to enroll an embedding with NaN or infinite values")
        t = parse_time(now) if now is not None else utc_now()
        if consent.given_at > t:
            raise GalleryError(f"consent for {consent.subject!r} is dated after the enrollment")
        ref = self._key.subject_ref(consent.subject)
        name = consent.subject.encode("utf-8")
        expires = t + timedelta(days=self.retention_days)
        ids: list[int] = []
        with self._write() as c:
            cid = c.execute(
                "INSERT INTO consents (subject_ref, subject_enc, purpose_enc, legal_basis, given_at, recorded_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (ref, self._key.seal(name, _aad("consents", "subject", ref)),
                 self._key.seal(consent.purpose.encode("utf-8"), _aad("consents", "purpose", ref)),
                 consent.legal_basis, _iso(consent.given_at), _iso(t))).lastrowid
            for vec in emb:
                ids.append(int(c.execute(
                    "INSERT INTO templates (subject_ref, consent_id, enrolled_at, expires_at, subject_enc, "
                    "embedding_enc, source_enc) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (ref, cid, _iso(t), _iso(expires), self._key.seal(name, _aad("templates", "subject", ref)),
                     self._key.seal(vec.astype("<f4").tobytes(), _aad("templates", "embedding", ref)),
                     None if source is None else self._key.seal(source.encode("utf-8"),
                                                                _aad("templates", "source", ref)))).lastrowid))
            self._append_audit("enroll", ref, {"templates": ids, "consent_id": cid, "legal_basis": consent.legal_basis,
                                               "expires_at": _iso(expires)}, c)
        return ids

    # -- reading ------------------------------------------------------------------------------------------
    def _templates(self, now: datetime | None = None) -> tuple[list[str], np.ndarray, list[str]]:
        """Subjects, embeddings and refs of every unexpired template, read in one statement (one snapshot)."""
        t = _iso(parse_time(now) if now is not None else utc_now())
        rows = self._conn.execute("SELECT subject_ref, subject_enc, embedding_enc FROM templates "
                                  "WHERE expires_at > ? ORDER BY id", (t,)).fetchall()
        names, vecs, refs = [], [], []
        for ref, subject_enc, emb_enc in rows:
            names.append(self._key.open(subject_enc, _aad("templates", "subject", ref), what="a subject").decode())
            raw = self._key.open(emb_enc, _aad("templates", "embedding", ref), what="an embedding")
            vecs.append(np.frombuffer(raw, dtype="<f4"))
            refs.append(ref)
        emb = np.stack(vecs) if vecs else np.zeros((0, self.dim), np.float32)
        return names, emb, refs

    def identify(self, embeddings: np.ndarray, *, threshold: float | None = None, audit: bool = True,
                 now: datetime | None = None) -> list[Identification]:
        """Nearest enrolled subject of each query (D or Q×D), rejected beyond the gallery's threshold.

        Uses :class:`facelens.matching.Matcher`; an empty gallery answers "no match" for every query.
        Each query is logged (the matched subject by reference only).
        """
        q = np.atleast_2d(np.asarray(embeddings, dtype=np.float64))
        if q.shape[1] != self.dim:
            raise GalleryError(f"{self.path}: expected {self.dim}-d query embeddings, got {q.shape[1]}")
        thr = self.threshold if threshold is None else float(threshold)
        names, emb, refs = self._templates(now)
        out: list[Identification] = []
        if len(names) == 0:
            out = [Identification(None, "", float("-inf"), False, self.metric, thr) for _ in q]
            matched_refs: list[str | None] = [None] * len(q)
        else:
            matcher = Matcher(self.metric, thr)  # type: ignore[arg-type]
            matcher.enroll(list(range(len(names))), emb)
            matches: list[Match] = matcher.identify(q)
            out = [Identification(names[m.index] if m.accepted else None, names[m.index], m.score, m.accepted,
                                  self.metric, thr) for m in matches]
            matched_refs = [refs[m.index] if m.accepted else None for m in matches]
        if audit:
            with self._write() as c:
                for r, ident in zip(matched_refs, out, strict=True):
                    self._append_audit("identify", r, {"accepted": ident.accepted, "score": round(ident.score, 6),
                                                       "templates": len(names)}, c)
        return out

    def subjects(self, now: datetime | None = None) -> list[dict[str, Any]]:
        """One row per enrolled subject: templates held, first enrollment, last expiry, legal bases."""
        rows = self._conn.execute(
            "SELECT t.subject_ref, t.subject_enc, COUNT(*), MIN(t.enrolled_at), MAX(t.expires_at), "
            "GROUP_CONCAT(DISTINCT c.legal_basis) FROM templates t JOIN consents c ON c.id = t.consent_id "
            "GROUP BY t.subject_ref ORDER BY MIN(t.id)").fetchall()
        t = _iso(parse_time(now) if now is not None else utc_now())
        return [{"subject": self._key.open(enc, _aad("templates", "subject", ref), what="a subject").decode(),
                 "templates": n, "first_enrolled": first, "expires": last, "expired": last <= t,
                 "legal_bases": sorted(bases.split(","))} for ref, enc, n, first, last, bases in rows]

    def __len__(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM templates").fetchone()[0])

    def export(self, subject: str) -> dict[str, Any]:
        """Everything held on ``subject`` (GDPR Art. 15): consent records, templates with their
        embeddings, the audit entries about them, and the gallery's purpose-relevant settings."""
        ref = self._key.subject_ref(subject)
        consents = []
        for cid, p_enc, basis, given, recorded in self._conn.execute(
                "SELECT id, purpose_enc, legal_basis, given_at, recorded_at FROM consents WHERE subject_ref = ? "
                "ORDER BY id", (ref,)):
            consents.append({"id": cid, "purpose": self._key.open(p_enc, _aad("consents", "purpose", ref)).decode(),
                             "legal_basis": basis, "legal_basis_text": LEGAL_BASES.get(basis, basis),
                             "given_at": given, "recorded_at": recorded})
        templates = []
        for tid, cid, enrolled, expires, e_enc, s_enc in self._conn.execute(
                "SELECT id, consent_id, enrolled_at, expires_at, embedding_enc, source_enc FROM templates "
                "WHERE subject_ref = ? ORDER BY id", (ref,)):
            vec = np.frombuffer(self._key.open(e_enc, _aad("templates", "embedding", ref)), dtype="<f4")
            src = None if s_enc is None else self._key.open(s_enc, _aad("templates", "source", ref)).decode()
            templates.append({"id": tid, "consent_id": cid, "enrolled_at": enrolled, "expires_at": expires,
                              "source": src, "embedding": [float(v) for v in vec]})
        self._append_audit("export", ref, {"consents": len(consents), "templates": len(templates)})
        audit = [e.__dict__ for e in self.audit_log(subject)]
        return {"subject": subject, "subject_ref": ref, "gallery": str(self.path), "model": self.model,
                "metric": self.metric, "threshold": self.threshold, "retention_days": self.retention_days,
                "consents": consents, "templates": templates, "audit": audit}

    # -- deleting -----------------------------------------------------------------------------------------
    def forget(self, subject: str) -> ForgetResult:
        """Erase every row of ``subject`` (GDPR Art. 17) and scrub the file so no copy stays recoverable."""
        ref = self._key.subject_ref(subject)
        with self._write() as c:
            n_t = c.execute("DELETE FROM templates WHERE subject_ref = ?", (ref,)).rowcount
            n_c = c.execute("DELETE FROM consents WHERE subject_ref = ?", (ref,)).rowcount
            self._append_audit("forget", ref, {"templates": n_t, "consents": n_c}, c)
        return ForgetResult(subject, n_t, n_c, self.scrub())

    def purge(self, now: datetime | None = None) -> dict[str, int | bool]:
        """Delete every template past the gallery's retention period, and consent records left without one."""
        t = _iso(parse_time(now) if now is not None else utc_now())
        with self._write() as c:
            refs = [r[0] for r in c.execute("SELECT DISTINCT subject_ref FROM templates WHERE expires_at <= ?", (t,))]
            n_t = c.execute("DELETE FROM templates WHERE expires_at <= ?", (t,)).rowcount
            n_c = c.execute("DELETE FROM consents WHERE id NOT IN (SELECT consent_id FROM templates)").rowcount
            for ref in refs:
                self._append_audit("purge", ref, {"reason": "retention period over", "before": t}, c)
            self._append_audit("purge", None, {"templates": n_t, "consents": n_c, "before": t}, c)
        scrubbed = self.scrub() if n_t or n_c else True
        return {"templates": n_t, "consents": n_c, "scrubbed": scrubbed}

    def scrub(self, attempts: int = 50) -> bool:
        """Truncate the WAL, rebuild the file (VACUUM), truncate again; False if readers kept the WAL busy."""
        def checkpoint() -> bool:
            for _ in range(attempts):
                busy, _log, _done = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                if busy == 0:
                    return True
                time.sleep(0.05)
            return False

        first = checkpoint()
        self._conn.execute("VACUUM")
        return checkpoint() and first

    def integrity_check(self) -> str:
        return str(self._conn.execute("PRAGMA integrity_check").fetchone()[0])


def _aad(table: str, column: str, ref: str) -> bytes:
    """What a sealed value belongs to: moving it to another column or person makes it fail to open."""
    return f"facelens-gallery/{table}/{column}/{ref}".encode("ascii")


def _entry_bytes(seq: int, at: str, action: str, ref: str | None, detail: str) -> bytes:
    return json.dumps([seq, at, action, ref, detail], separators=(",", ":")).encode("utf-8")


def _split(script: str) -> Sequence[str]:
    """The statements of the schema, triggers kept whole (``executescript`` would commit on its own)."""
    out: list[str] = []
    buf: list[str] = []
    for line in script.strip().splitlines():
        buf.append(line)
        text = "\n".join(buf).strip()
        if text.endswith(";") and (not text.upper().startswith("CREATE TRIGGER") or text.upper().endswith("END;")):
            out.append(text)
            buf = []
    return out
