"""Running the app: private upload directory, offline settings, clean shutdown.

* Uploads go to a fresh private directory (``GRADIO_TEMP_DIR``), deleted with everything in it
  when the server stops, unless ``keep_uploads``; during a run, each upload gets its own random
  folder and each session its own copies, deleted when its browser tab closes (see
  `facelens.web.uploads`). A directory left by a server that was killed (SIGKILL, out of memory)
  is removed by the next `serve`, judging by the pid file inside it.
* Offline: gradio's analytics and version check are off (``GRADIO_ANALYTICS_ENABLED=False``),
  the theme uses system fonts only (no font stylesheet is fetched), and server-side rendering
  (a Node process) and the PWA manifest are off. The end-to-end tests check that the browser
  requests nothing but the local server.
* It binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

from ..errors import FaceLensError
from .config import ServeConfig
from .uploads import SERVE_PREFIX, remove_stale, separate_uploads, write_pid

__all__ = ["launch", "offline_theme", "serve"]

SYSTEM_FONTS = ("ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif")
SYSTEM_MONO = ("ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace")


def _offline_env() -> None:
    # read by gradio when it is imported and when it launches
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")


def offline_theme() -> Any:
    """Gradio's default look with system fonts only: nothing to download, nothing to serve."""
    import gradio as gr

    return gr.themes.Default(font=SYSTEM_FONTS, font_mono=SYSTEM_MONO)


def launch(config: ServeConfig) -> tuple[Any, ServeConfig]:
    """Build and start the app without blocking; returns the running `gr.Blocks` and the config used.

    Creates the private upload directory when ``config.upload_dir`` is None.
    """
    _offline_env()
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise FaceLensError("facelens serve needs Gradio: pip install -e '.[web]' in a clone "
                            "(pip install 'facelens[web]' otherwise)") from None
    created = config.upload_dir is None
    upload_dir = config.upload_dir or Path(tempfile.mkdtemp(prefix=SERVE_PREFIX))
    upload_dir.mkdir(parents=True, exist_ok=True)
    if created and not config.keep_uploads:
        write_pid(upload_dir)
    os.environ["GRADIO_TEMP_DIR"] = str(upload_dir)
    separate_uploads()
    config = ServeConfig(**{**config.__dict__, "upload_dir": upload_dir})

    from .app import build_app
    from .views import CSS

    demo = build_app(config)
    demo.queue(default_concurrency_limit=1)
    demo.launch(
        server_name=config.host, server_port=config.port, prevent_thread_lock=True, share=False,
        max_file_size=config.max_upload_bytes, show_error=True, quiet=True, ssr_mode=False, pwa=False,
        mcp_server=False, enable_monitoring=False, footer_links=[], theme=offline_theme(), css=CSS,
        inbrowser=False,
    )
    return demo, config


def serve(config: ServeConfig) -> None:
    """Run the app until Ctrl-C or SIGTERM, then stop it and delete the uploads (unless kept)."""
    stop = threading.Event()
    demo = None
    upload_dir = config.upload_dir
    created = upload_dir is None
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if created:
            stale = remove_stale(tempfile.gettempdir())
            if stale:
                print(f"facelens serve: removed {len(stale)} upload folder(s) left by stopped servers", flush=True)
        demo, config = launch(config)
        upload_dir = config.upload_dir
        kept = "kept after the server stops" if config.keep_uploads else "deleted when the server stops"
        print(f"facelens serve: http://{config.host}:{demo.server_port}/", flush=True)
        print(f"facelens serve: uploads in {upload_dir} ({kept})", flush=True)
        stop.wait()
    finally:
        if demo is not None:
            demo.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
        if upload_dir is not None and created and not config.keep_uploads:
            shutil.rmtree(upload_dir, ignore_errors=True)
        print("facelens serve: stopped", flush=True)
