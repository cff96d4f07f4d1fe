"""``facelens gallery``: an encrypted, consent-bound face gallery (enroll, identify, forget, export, purge, list).

The key comes from ``$FACELENS_GALLERY_KEY``, ``$FACELENS_GALLERY_KEY_FILE`` or ``--key-file``; it is never
stored in the gallery. ``facelens gallery keygen --out FILE`` writes a new one, readable by its owner only.
Every file written here (key, gallery with its WAL and index, export) is created mode 0600, never widened
first and narrowed later.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..cli import print_json, register_command
from ..errors import FaceLensError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", required=True, help="the gallery's SQLite file")
    p.add_argument("--key-file", default=None, help="file holding the base64 key (else $FACELENS_GALLERY_KEY)")


def _add_args(p: argparse.ArgumentParser) -> None:
    from ..gallery import LEGAL_BASES

    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    k = sub.add_parser("keygen", help="write a new random key to a file (mode 600)")
    k.add_argument("--out", required=True)

    e = sub.add_parser("enroll", help="add a person's face, with their consent record")
    e.add_argument("image")
    e.add_argument("--subject", required=True, help="the person's identifier")
    e.add_argument("--purpose", required=True, help="what the enrollment is for, as told to the person")
    e.add_argument("--legal-basis", required=True, choices=sorted(LEGAL_BASES), help="the GDPR Art. 9(2) basis")
    e.add_argument("--consent-time", default=None, help="ISO 8601 time consent was given (default: now)")
    e.add_argument("--face", type=int, default=None, help="index of the face in the photo (default: largest)")
    e.add_argument("--create", action="store_true", help="create the gallery if the file does not exist")
    e.add_argument("--retention-days", type=float, default=365.0, help="with --create: how long templates are kept")
    e.add_argument("--model", default="dlib-resnet", help="with --create: the embedding model")
    _common(e)

    i = sub.add_parser("identify", help="who is this? nearest enrolled person within the threshold")
    i.add_argument("image")
    i.add_argument("--face", type=int, default=None)
    i.add_argument("--threshold", type=float, default=None, help="override the gallery's threshold (distance)")
    _common(i)

    f = sub.add_parser("forget", help="erase every record of a person and scrub the file (GDPR Art. 17)")
    f.add_argument("subject")
    _common(f)

    x = sub.add_parser("export", help="everything held on a person, as JSON (GDPR Art. 15)")
    x.add_argument("subject")
    x.add_argument("--out", default=None, help="write the JSON here (mode 600) instead of printing it")
    _common(x)

    pu = sub.add_parser("purge", help="delete templates past the retention period")
    _common(pu)

    li = sub.add_parser("list", help="enrolled people, templates held, expiry")
    _common(li)


def _keygen(out: Path) -> None:
    """Create the key file 0600 in one ``O_EXCL`` open: never readable by others, never over an existing key
    (an atomic replace would overwrite a key made meanwhile, and lose the gallery it opens)."""
    from ..gallery import generate_key

    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    except FileExistsError:
        raise FaceLensError(f"{out}: already exists; a key is never overwritten "
                            "(that would lose the gallery it opens)") from None
    except OSError as exc:
        raise FaceLensError(f"{out}: cannot create key file ({exc.strerror})") from None
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask
        with os.fdopen(fd, "w") as fh:
            fh.write(generate_key() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        out.unlink(missing_ok=True)  # no half-written key left behind
        raise


def _embed(model_name: str, image: str, face: int | None) -> object:
    from ..models import load_model

    return load_model(model_name).embed(image, face=face)


def _run(args: argparse.Namespace) -> int:
    from ..gallery import SCRUB_WAIT_S, Consent, Gallery
    from ..gallery.consent import parse_time, utc_now

    if args.action == "keygen":
        _keygen(Path(args.out))
        print(args.out)
        return 0
    db = Path(args.db)
    if args.action == "enroll":
        consent = Consent(args.subject, args.purpose, args.legal_basis,
                          parse_time(args.consent_time) if args.consent_time else utc_now())
        created = False
        if not db.exists():
            if not args.create:
                raise FaceLensError(f"{db}: no gallery here; pass --create to start one")
            from ..models import load_model

            model = load_model(args.model)
            if model.task != "embedding":
                raise FaceLensError(f"{args.model} is a classifier; a gallery needs an embedding model")
            Gallery.create(db, key_file=args.key_file, model=model.name, threshold=model.match_threshold,
                           dim=int(_embed_dim(model)), retention_days=args.retention_days).close()
            created = True
        with Gallery.open(db, key_file=args.key_file) as g:
            vec = _embed(g.model, args.image, args.face)
            ids = g.enroll(consent, vec, source=Path(args.image).name)
            print_json({"gallery": str(db), "created": created, "subject": args.subject, "templates": ids})
        return 0
    with Gallery.open(db, key_file=args.key_file) as g:
        if args.action == "identify":
            vec = _embed(g.model, args.image, args.face)
            print_json({"image": args.image, **g.identify(vec, threshold=args.threshold)[0].as_json()})
        elif args.action == "forget":
            r = g.forget(args.subject)
            print_json({"subject": r.subject, "templates_deleted": r.templates, "consents_deleted": r.consents,
                        "file_scrubbed": r.scrubbed, "scrub_pending": not r.scrubbed})
            if r.scrubbed:
                print("scrub finished: no copy of the deleted rows is left in the database, its WAL or its "
                      "journal", file=sys.stderr)
            else:
                print(f"scrub PENDING: the rows are deleted, but other connections kept read transactions open "
                      f"for {SCRUB_WAIT_S:g} s, so their old pages are still in {db} or its WAL. The scrub is "
                      "recorded in the gallery and finishes on its own at the next open of it (any `facelens "
                      "gallery` command) or its next write, once those readers are done.", file=sys.stderr)
        elif args.action == "export":
            data = g.export(args.subject)
            if args.out:
                from ..outputs import write_json

                print(write_json(args.out, data, permissions=0o600))  # 0600 from creation, never wider
            else:
                print_json(data)
        elif args.action == "purge":
            print_json(g.purge())
        elif args.action == "list":
            print_json(g.subjects())
    return 0


def _embed_dim(model: object) -> int:
    """The embedding size, from one forward pass on a blank chip (models do not declare it)."""
    import numpy as np

    h, w = model.input_size  # type: ignore[attr-defined]
    return int(model.forward_chips(np.zeros((1, h, w, 3), np.uint8)).shape[-1])  # type: ignore[attr-defined]


register_command("gallery", "an encrypted, consent-bound face gallery: enroll, identify, forget, export, purge, list",
                 _add_args, _run)
