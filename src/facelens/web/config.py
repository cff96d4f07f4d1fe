"""Settings of one `facelens serve` run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import FaceLensError

__all__ = ["ServeConfig"]


@dataclass(frozen=True)
class ServeConfig:
    """How the web app runs.

    ``host`` is 127.0.0.1 unless the user asks otherwise: the app shows faces and should not be
    reachable from the network by accident. ``max_upload_mb`` bounds every photo (gradio refuses
    larger uploads, and the app checks again). ``keep_uploads`` keeps the photos sent by the
    browser in ``upload_dir`` after the session and the server end; by default they are deleted
    when the browser session ends and the whole directory when the server stops.
    ``live_max_side``/``live_detect_every``/``live_stream_every`` set the webcam mode's speed.
    """

    host: str = "127.0.0.1"
    port: int = 7860
    max_upload_mb: float = 10.0
    keep_uploads: bool = False
    upload_dir: Path | None = None
    live_max_side: int = 320
    live_detect_every: int = 5
    live_stream_every: float = 0.1

    def __post_init__(self) -> None:
        if not self.max_upload_mb > 0:
            raise FaceLensError(f"--max-upload-mb must be positive, got {self.max_upload_mb}")
        if not 0 <= self.port <= 65535:
            raise FaceLensError(f"--port must be in 0..65535, got {self.port}")
        if self.live_max_side < 64 or self.live_detect_every < 1 or self.live_stream_every <= 0:
            raise FaceLensError("live settings: max side ≥ 64 px, detect every ≥ 1 frame, stream every > 0 s")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1e6)
