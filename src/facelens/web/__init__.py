"""`facelens serve`: a local web app over the Python API (gradio), with a live webcam mode.

Importing this package is cheap; gradio and torch load when the app is built.

>>> from facelens.web import ServeConfig
>>> ServeConfig().host
'127.0.0.1'
"""

from __future__ import annotations

from .config import ServeConfig

__all__ = ["ServeConfig", "build_app", "launch", "serve"]


def build_app(config: ServeConfig | None = None) -> object:
    """The app's `gr.Blocks`, not launched."""
    from .app import build_app as _build

    return _build(config)


def launch(config: ServeConfig) -> tuple[object, ServeConfig]:
    """Start the app without blocking (see `facelens.web.server.launch`)."""
    from .server import launch as _launch

    return _launch(config)


def serve(config: ServeConfig) -> None:
    """Run the app until interrupted (see `facelens.web.server.serve`)."""
    from .server import serve as _serve

    _serve(config)
