"""``facelens serve``: the local web app (explain, anonymize, verify, live webcam)."""

from __future__ import annotations

import argparse

from ..cli import register_command


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this computer only; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest photo accepted, in MB (default 10)")
    p.add_argument("--keep-uploads", action="store_true",
                   help="keep the photos sent by browsers after their session and after the server stops")


def _run(args: argparse.Namespace) -> int:
    from ..web import ServeConfig, serve

    serve(ServeConfig(host=args.host, port=args.port, max_upload_mb=args.max_upload_mb,
                      keep_uploads=args.keep_uploads))
    return 0


register_command("serve", "a local web app: explain your own photo or webcam, anonymize, verify two photos",
                 _add_args, _run)
