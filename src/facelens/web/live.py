"""Live webcam mode: a Grad-CAM overlay on every frame, fast enough for a 2-core CPU.

Three things keep it above 5 frames per second without a GPU:

* the frame is downscaled so its longer side is ``max_side`` (320 px) before anything else;
* the face is detected only every ``detect_every`` frames (and whenever none is known): in
  between, the last face's landmarks are reused, which is right for a person sitting in front
  of a camera;
* the map is Grad-CAM on the aligned chip, through `facelens.explain.api.explain` with the
  face and the target passed in: the target (the top class, or the projection on the face's
  own embedding) is resolved when the face is detected and kept until the next detection, so a
  frame costs an alignment, a forward/backward pass and the forward that scores the target.

Everything a session needs between frames lives in a `LiveState` that the app keeps in the
session's ``gr.State``, never in a global, so two people streaming at once never share a face.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..errors import FaceLensError
from ..faces.detect import Face

__all__ = ["LiveFrame", "LiveState", "downscale", "process_frame"]

LIVE_METHOD = "gradcam"


@dataclass
class LiveState:
    """One session's webcam state: the face being tracked and the timing of recent frames."""

    frames: int = 0
    face: Face | None = None
    model: str | None = None
    target: object = None
    arrivals: deque[float] = field(default_factory=lambda: deque(maxlen=30))
    compute_ms: deque[float] = field(default_factory=lambda: deque(maxlen=30))

    def rate(self) -> float:
        """Frames per second processed over the recent frames (0 until two frames are in)."""
        if len(self.arrivals) < 2:
            return 0.0
        span = self.arrivals[-1] - self.arrivals[0]
        return (len(self.arrivals) - 1) / span if span > 0 else 0.0

    def mean_compute_ms(self) -> float:
        return float(np.mean(self.compute_ms)) if self.compute_ms else 0.0


@dataclass
class LiveFrame:
    """One processed frame: the overlay (or the frame itself when no face is seen) and what was done."""

    image: np.ndarray
    face_found: bool
    detected: bool
    score: float | None
    compute_ms: float


def downscale(frame: np.ndarray, max_side: int) -> np.ndarray:
    """The frame with its longer side at most ``max_side`` (area interpolation, no upscaling)."""
    import cv2

    h, w = frame.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return np.ascontiguousarray(frame)
    return cv2.resize(frame, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def process_frame(state: LiveState, frame: np.ndarray, model_name: str, *, max_side: int = 320,
                  detect_every: int = 5) -> LiveFrame:
    """Overlay Grad-CAM on one webcam frame, updating ``state`` (the caller's, per session)."""
    from ..explain.api import explain, resolve_target
    from ..explain.render import overlay
    from ..faces.detect import detect_faces
    from ..image import load_image
    from ..models.registry import load_model

    t0 = time.perf_counter()
    state.arrivals.append(t0)
    rgb = downscale(load_image(frame), max_side)
    if model_name != state.model:
        state.model, state.face, state.target = model_name, None, None
    model = load_model(model_name)
    detected = state.face is None or state.frames % max(1, detect_every) == 0
    state.frames += 1
    if detected:
        faces = detect_faces(rgb, upsample=0) or detect_faces(rgb, upsample=1)
        state.face = max(faces, key=lambda f: f.area) if faces else None
        state.target = None
    if state.face is None:
        ms = (time.perf_counter() - t0) * 1000
        state.compute_ms.append(ms)
        return LiveFrame(rgb, face_found=False, detected=detected, score=None, compute_ms=ms)
    try:
        if state.target is None:
            state.target = resolve_target(model, model.chip(rgb, state.face))
        e = explain(model, rgb, LIVE_METHOD, state.target, face=state.face)
    except FaceLensError:
        state.face, state.target = None, None  # the tracked face left the frame: detect again next time
        ms = (time.perf_counter() - t0) * 1000
        state.compute_ms.append(ms)
        return LiveFrame(rgb, face_found=False, detected=detected, score=None, compute_ms=ms)
    image = overlay(rgb, e.photo_map, signed=e.signed, region=e.chip_region_on_photo())
    ms = (time.perf_counter() - t0) * 1000
    state.compute_ms.append(ms)
    return LiveFrame(image, face_found=True, detected=detected, score=e.score, compute_ms=ms)
