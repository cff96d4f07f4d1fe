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

A connection that keeps a read transaction open pins the old pages (its snapshot still shows the
deleted rows), and no checkpoint can truncate the WAL until it ends. ``forget`` therefore waits at most
:data:`SCRUB_WAIT_S` seconds for such readers, with short busy timeouts and one deadline. If they are
still there, it returns ``scrubbed=False``: the deletion is committed (no new query sees the rows) and a
``pending_scrub`` record, written in the same transaction as the deletion, survives crashes and restarts.
The scrub is then finished by :meth:`Gallery.finish_scrub`, or on its own at the next open, write or
close of the gallery (by any process) once the readers have left.

File permissions: the database is created by :meth:`Gallery.create` with mode 0600 before SQLite opens
it, and SQLite gives its ``-wal``, ``-shm`` and ``-journal`` files the main file's mode, so no other user
can read any of them at any moment (no process-wide ``umask`` change is needed).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FaceLensError
from ..matching import Match, Matcher
from .consent import LEGAL_BASES, Consent, parse_time, utc_now
from .crypto import GalleryKey, resolve_key

__all__ = ["SCHEMA_VERSION", "SCRUB_WAIT_S", "AuditEntry", "ForgetResult", "Gallery", "GalleryError",
           "Identification"]

SCHEMA_VERSION = 1
_BUSY_MS = 30_000  # writers queue for the write lock this long

#: The longest ``forget``/``purge``/``finish_scrub`` wait for other connections' read transactions before
#: leaving the scrub pending (seconds). The scrub's own work (a VACUUM, proportional to the file's size)
#: and the usual queueing for the write lock come on top.
SCRUB_WAIT_S = 2.0
_SCRUB_STEP_MS = 250  # busy timeout of one checkpoint attempt: the deadline is checked between attempts
_RETRY_WAIT_S = 0.05  # the quick try at open, after a write and at close, so they are not slowed down
_PENDING_KEY = "pending_scrub"  # meta key: deleted rows whose pages may still be in the files, since when
_FILE_MODE = 0o600  # the database, and through it its -wal, -shm and -journal: the owner's only

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
    """What ``forget`` removed, and whether the file was scrubbed (WAL truncated, file rebuilt).

    ``scrubbed=False``: the deletion is committed, but readers kept the old pages within
    :data:`SCRUB_WAIT_S`; the scrub is recorded as pending and finishes at the next open, write or close
    once they have left, or with :meth:`Gallery.finish_scrub`.
    """

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
        self._closed = False
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        self.model = str(meta["model"])
        self.metric = str(meta["metric"])
        self.threshold = None if meta["threshold"] in (None, "") else float(meta["threshold"])
        self.dim = int(meta["dim"])
        self.retention_days = float(meta["retention_days"])

    # -- opening ----------------------------------------------------------------------------------------
    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        """Open an existing file (``mode=rw``: SQLite must never create one, it would be 0644)."""
        uri = f"{path.absolute().as_uri()}?mode=rw"
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=_BUSY_MS / 1000, isolation_level=None)
        except sqlite3.DatabaseError as exc:
            raise GalleryError(f"{path}: cannot open the database ({exc})") from None
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
        for suffix in ("-wal", "-journal", "-shm"):
            if Path(f"{p}{suffix}").exists():  # SQLite would replay a stale WAL into the new file
                raise GalleryError(f"{p}{suffix}: left over from an earlier database; remove it first")
        p.parent.mkdir(parents=True, exist_ok=True)
        _create_private_file(p)
        try:
            conn = cls._connect(p)
        except BaseException:
            _remove_database_files(p)
            raise
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
            _remove_database_files(p)
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
            g = cls(p, conn, gkey)
        except BaseException:
            conn.close()
            raise
        if _PENDING_KEY in meta:
            g._try_finish_scrub()  # a scrub an earlier session (or process) could not finish
        return g

    def close(self) -> None:
        """Close the connection, after a quick try at a pending scrub (it stays recorded if readers remain)."""
        if self._closed:
            return
        self._closed = True
        try:
            with suppress(sqlite3.Error):
                if self.scrub_pending:
                    self._try_finish_scrub()
        finally:
            self._conn.close()

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions and audit -------------------------------------------------------------------------
    @contextmanager
    def _write(self, *, finish_scrub: bool = True) -> Iterator[sqlite3.Connection]:
        """A write transaction taken up front (``BEGIN IMMEDIATE``), so it waits instead of failing later.

        After it commits, a scrub left pending (by this process or another) gets a quick try: readers
        that blocked it may have left since.
        """
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
            pending = finish_scrub and _pending_since(self._conn) is not None
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise
        if pending:
            self._try_finish_scrub()

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
        """Erase every row of ``subject`` (GDPR Art. 17) and scrub the file so no copy stays recoverable.

        Returns within :data:`SCRUB_WAIT_S` seconds of waiting for readers (plus the VACUUM itself and
        any queueing for the write lock). If readers still hold old snapshots then, ``scrubbed`` is
        False and the scrub stays pending, recorded in the same transaction as the deletion.
        """
        ref = self._key.subject_ref(subject)
        with self._write(finish_scrub=False) as c:
            n_t = c.execute("DELETE FROM templates WHERE subject_ref = ?", (ref,)).rowcount
            n_c = c.execute("DELETE FROM consents WHERE subject_ref = ?", (ref,)).rowcount
            self._append_audit("forget", ref, {"templates": n_t, "consents": n_c}, c)
            if n_t or n_c:
                _mark_scrub_pending(c)
        return ForgetResult(subject, n_t, n_c, self._scrub(SCRUB_WAIT_S, log=False))

    def purge(self, now: datetime | None = None) -> dict[str, int | bool]:
        """Delete every template past the gallery's retention period, and consent records left without one."""
        t = _iso(parse_time(now) if now is not None else utc_now())
        with self._write(finish_scrub=False) as c:
            refs = [r[0] for r in c.execute("SELECT DISTINCT subject_ref FROM templates WHERE expires_at <= ?", (t,))]
            n_t = c.execute("DELETE FROM templates WHERE expires_at <= ?", (t,)).rowcount
            n_c = c.execute("DELETE FROM consents WHERE id NOT IN (SELECT consent_id FROM templates)").rowcount
            for ref in refs:
                self._append_audit("purge", ref, {"reason": "retention period over", "before": t}, c)
            self._append_audit("purge", None, {"templates": n_t, "consents": n_c, "before": t}, c)
            if n_t or n_c:
                _mark_scrub_pending(c)
        scrubbed = self._scrub(SCRUB_WAIT_S, log=False) if n_t or n_c else True
        return {"templates": n_t, "consents": n_c, "scrubbed": scrubbed}

    @property
    def scrub_pending(self) -> bool:
        """True while deleted rows may still sit in the files: a scrub was left for later."""
        return _pending_since(self._conn) is not None

    def finish_scrub(self, wait_s: float = SCRUB_WAIT_S) -> bool:
        """Finish a scrub that ``forget`` or ``purge`` left pending; True when none is owed any more.

        Waits at most ``wait_s`` seconds for other connections' read transactions to end.
        """
        if not self.scrub_pending:
            return True
        return self._scrub(wait_s, log=True)

    def scrub(self, wait_s: float = SCRUB_WAIT_S) -> bool:
        """Truncate the WAL, rebuild the file (VACUUM), truncate again; False if readers kept the WAL busy
        for ``wait_s`` seconds. Clears a pending scrub when it succeeds."""
        return self._scrub(wait_s, log=True)

    def _scrub(self, wait_s: float, *, log: bool) -> bool:
        """The scrub under one deadline, with short busy timeouts; ``log``: audit a pending one finished."""
        deadline = time.monotonic() + max(0.0, wait_s)
        try:
            done = self._checkpoint(deadline) and self._vacuum(deadline) and self._checkpoint(deadline)
        finally:
            self._conn.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
        if not done:
            return False
        with self._write(finish_scrub=False) as c:
            since = _pending_since(c)
            if since is not None:
                c.execute("DELETE FROM meta WHERE key = ?", (_PENDING_KEY,))
                if log:
                    self._append_audit("scrub", None, {"pending_since": since}, c)
        if since is not None:  # that commit is a WAL frame too (no personal data): empty the WAL if nobody reads
            try:
                self._checkpoint(time.monotonic())
            finally:
                self._conn.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
        return True

    def _checkpoint(self, deadline: float) -> bool:
        """``wal_checkpoint(TRUNCATE)`` until it succeeds or the deadline passes (one try if already past)."""
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            self._conn.execute(f"PRAGMA busy_timeout={min(max(left_ms, 0), _SCRUB_STEP_MS)}")
            try:
                busy = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
                busy = 1
            if busy == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(0.01, max(0.0, deadline - time.monotonic())))

    def _vacuum(self, deadline: float) -> bool:
        """Rebuild the file; False if another writer held the lock past the deadline."""
        self._conn.execute(f"PRAGMA busy_timeout={max(int((deadline - time.monotonic()) * 1000), 0)}")
        try:
            self._conn.execute("VACUUM")
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc):
                raise
            return False
        return True

    def _try_finish_scrub(self) -> None:
        """A quick, quiet try at a pending scrub: it must not fail or slow down the open, write or close."""
        with suppress(sqlite3.Error):  # if it fails it stays recorded: the next open, write or close tries again
            self._scrub(_RETRY_WAIT_S, log=True)

    def integrity_check(self) -> str:
        return str(self._conn.execute("PRAGMA integrity_check").fetchone()[0])


def _create_private_file(path: Path) -> None:
    """Create the empty database file readable by its owner only, before SQLite touches it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), _FILE_MODE)
    except FileExistsError:
        raise GalleryError(f"{path}: already exists; open it instead of creating it") from None
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, _FILE_MODE)  # exactly 0600 whatever the umask (which could only have narrowed it)
    finally:
        os.close(fd)


def _remove_database_files(path: Path) -> None:
    """Undo a failed :meth:`Gallery.create`: the file it made, and the WAL and index SQLite added."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        with suppress(FileNotFoundError):
            Path(f"{path}{suffix}").unlink()


def _pending_since(conn: sqlite3.Connection) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (_PENDING_KEY,)).fetchone()
    return None if row is None else str(row[0])


def _mark_scrub_pending(conn: sqlite3.Connection) -> None:
    """Record, in the deleting transaction, that a scrub is owed (the earliest such time is kept)."""
    conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (_PENDING_KEY, _iso(utc_now())))


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED (any extended code): someone else holds a lock; try again later."""
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


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
