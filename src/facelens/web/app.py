"""The gradio page of `facelens serve`: explain a photo, anonymize it, verify a pair, go live.

Layout only: every number comes from `facelens.web.compute` (the public API) and every panel
from `facelens.web.views`. Per-user data lives in each session's ``gr.State`` (the files it
uploaded, its webcam tracking state); the only module-level object is a lock, because the zoo's
models are shared by all sessions and hook-based methods (Grad-CAM) must not run two at once on
the same network: two overlapping calls would read each other's activations.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..errors import FaceLensError
from .config import ServeConfig

__all__ = ["SessionFiles", "build_app"]

_COMPUTE = threading.Lock()


class SessionFiles:
    """The files one browser session sent, deleted when gradio drops the session's state.

    Only paths inside the server's private upload directory are ever deleted.
    """

    def __init__(self, root: Path | None = None, keep: bool = False) -> None:
        self.root = root
        self.keep = keep
        self.paths: set[str] = set()

    def add(self, payloads: Iterable[object]) -> None:
        from .inputs import payload_path

        for p in payloads:
            path = payload_path(p)
            if path:
                self.paths.add(path)

    def delete(self) -> None:
        if self.keep or self.root is None:
            return
        root = os.path.realpath(self.root)
        for path in list(self.paths):
            real = os.path.realpath(path)
            if real.startswith(root + os.sep):
                try:
                    os.remove(real)
                    os.rmdir(os.path.dirname(real))  # gradio keeps each upload in its own hash folder
                except OSError:
                    pass
        self.paths.clear()


def _delete_session_files(files: object) -> None:
    if isinstance(files, SessionFiles):
        files.delete()


def _readable(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run under the compute lock; a user error becomes the panel's message, not a traceback."""
    from .views import error_html

    def run(*args: Any) -> Any:
        try:
            with _COMPUTE:
                return fn(*args)
        except FaceLensError as exc:
            return _error_outputs(fn, error_html(str(exc)), args)

    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


def _error_outputs(fn: Callable[..., Any], html: str, args: tuple[Any, ...]) -> Any:
    """The error panel in the HTML output and the session state passed through unchanged."""
    files = next((a for a in args if isinstance(a, SessionFiles)), None)
    return (html, files) if getattr(fn, "returns_state", False) else html


def build_app(config: ServeConfig | None = None) -> Any:
    """The `gr.Blocks` of the app (not launched; `facelens.web.server.serve` launches it)."""
    import gradio as gr

    from . import compute, views
    from .inputs import read_photo
    from .live import LiveState, process_frame

    config = config or ServeConfig()
    limit = config.max_upload_bytes
    models = compute.face_models()
    if not models:
        raise FaceLensError("no face model has its weights on this machine; run `facelens models` to see which")
    default_model = compute.REID_MODEL if compute.REID_MODEL in models else models[0]

    def new_files() -> SessionFiles:
        return SessionFiles(config.upload_dir, config.keep_uploads)

    # -- handlers ------------------------------------------------------------------------------
    def targets_for(model_name: str) -> Any:
        from ..models.registry import load_model

        choices = compute.target_choices(load_model(model_name))
        return gr.Dropdown(choices=choices, value=choices[0])

    def explain_photo(photo: Any, reference: Any, model_name: str, target: str, methods: list[str],
                      files: SessionFiles) -> tuple[str, SessionFiles]:
        files.add([photo, reference])
        img = read_photo(photo, limit, "photo")
        ref = read_photo(reference, limit, "reference photo") if target == compute.REFERENCE_PHOTO else None
        return views.analysis_html(compute.analyze(model_name, img, methods or [], target, ref)), files

    def anonymize_photo(photo: Any, reference: Any, model_name: str, target: str, methods: list[str],
                        anonymization: str, strength: float, files: SessionFiles) -> tuple[str, SessionFiles]:
        files.add([photo, reference])
        img = read_photo(photo, limit, "photo")
        ref = read_photo(reference, limit, "reference photo") if target == compute.REFERENCE_PHOTO else None
        method = (methods or list(compute.DEFAULT_METHODS))[0]
        fx = compute.anonymization_effect(model_name, img, method, anonymization, float(strength), target, ref)
        return views.anonymization_html(fx), files

    def verify_pair(photo_a: Any, photo_b: Any, detail: str, files: SessionFiles) -> tuple[str, SessionFiles]:
        files.add([photo_a, photo_b])
        a = read_photo(photo_a, limit, "photo A")
        b = read_photo(photo_b, limit, "photo B")
        return views.verification_html(compute.verify(compute.REID_MODEL, a, b, detail)), files

    for fn in (explain_photo, anonymize_photo, verify_pair):
        fn.returns_state = True  # type: ignore[attr-defined]

    def live_frame(frame: Any, state: LiveState | None, model_name: str) -> tuple[str, LiveState]:
        state = state if isinstance(state, LiveState) else LiveState()
        try:
            img = read_photo(frame, limit, "webcam frame")
        finally:
            if not config.keep_uploads:
                _drop_frame(frame, config)
        with _COMPUTE:
            result = process_frame(state, img, model_name, max_side=config.live_max_side,
                                   detect_every=config.live_detect_every)
        face = "face found" if result.face_found else "no face in view"
        stats = (f"{state.rate():.1f} frames/s processed, {state.mean_compute_ms():.0f} ms per frame on the server "
                 f"({face}; face re-detected every {config.live_detect_every} frames, frames scaled to "
                 f"{config.live_max_side} px)")
        return views.live_html(result.image, stats, state.frames), state

    def live_guarded(frame: Any, state: LiveState | None, model_name: str) -> tuple[str, LiveState]:
        try:
            return live_frame(frame, state, model_name)
        except FaceLensError as exc:
            return views.error_html(str(exc)), state if isinstance(state, LiveState) else LiveState()

    # -- layout --------------------------------------------------------------------------------
    methods_help = ("gradient methods and CAMs take well under a second; occlusion, scorecam, rise and the "
                    "region-lime/shap methods take seconds to a minute on a laptop CPU")
    privacy = ("this server keeps them (--keep-uploads)" if config.keep_uploads else
               "they are deleted when you close this tab, and all of them when the server stops")
    with gr.Blocks(title="facelens", analytics_enabled=False, delete_cache=_delete_cache(config)) as demo:
        files = gr.State(new_files(), delete_callback=_delete_session_files)
        gr.Markdown(
            "# facelens: what does a face network look at?\n"
            f"Everything runs on this computer; no photo leaves it. Photos you send: {privacy}. "
            f"Largest photo accepted: {config.max_upload_mb:g} MB.")
        with gr.Tabs():
            with gr.Tab("Explain a photo", id="explain"):
                with gr.Row():
                    photo = gr.Image(label="Photo", type="filepath", sources=["upload", "webcam", "clipboard"],
                                     elem_id="photo", height=320)
                    reference = gr.Image(label="Reference photo (recognizer target, optional)", type="filepath",
                                         sources=["upload", "webcam", "clipboard"], elem_id="reference", height=320)
                    with gr.Column():
                        model = gr.Dropdown(models, value=default_model, label="Model", elem_id="model")
                        target = gr.Dropdown(compute.target_choices(_load(default_model)), label="Target",
                                             elem_id="target", info="what the map explains")
                        methods = gr.Dropdown(list(compute.METHOD_CHOICES), value=list(compute.DEFAULT_METHODS),
                                              multiselect=True, label="Methods", info=methods_help,
                                              elem_id="methods")
                        run = gr.Button("Explain", variant="primary", elem_id="explain-button")
                results = gr.HTML(elem_id="results")
                with gr.Accordion("Anonymize on the spot", open=True):
                    with gr.Row():
                        anonymization = gr.Radio(list(compute.ANONYMIZATION_CHOICES), value="eye_bar",
                                                 label="Anonymization", elem_id="anonymization")
                        strength = gr.Slider(0.05, 0.6, value=0.15, step=0.05, elem_id="strength",
                                             label="Strength for blur and pixelate (× the distance between the eyes)")
                        anon_run = gr.Button("Anonymize and compare", elem_id="anonymize-button")
                    anon_results = gr.HTML(elem_id="anon-results")
            with gr.Tab("Verify two photos", id="verify"):
                with gr.Row():
                    photo_a = gr.Image(label="Photo A", type="filepath", elem_id="photo-a", height=300)
                    photo_b = gr.Image(label="Photo B", type="filepath", elem_id="photo-b", height=300)
                    with gr.Column():
                        detail = gr.Radio(list(compute.PAIR_DETAIL), value="coarse", label="Pair-map detail",
                                          info="fine: 4× more patches, 4× slower", elem_id="detail")
                        verify_run = gr.Button("Compare", variant="primary", elem_id="verify-button")
                verify_results = gr.HTML(elem_id="verify-results")
            with gr.Tab("Live webcam", id="live"):
                gr.Markdown("Grad-CAM on every webcam frame, computed on this computer. Allow the camera, then "
                            "start streaming.")
                with gr.Row():
                    cam = gr.Image(label="Webcam", sources=["webcam"], streaming=True, elem_id="cam")
                    with gr.Column():
                        live_model = gr.Dropdown(models, value=default_model, label="Model", elem_id="live-model")
                        live_out = gr.HTML(elem_id="live-out")
                live_state = gr.State(None)

        model.change(targets_for, model, target, api_name=False)
        run.click(_readable(explain_photo), [photo, reference, model, target, methods, files], [results, files],
                  preprocess=False, api_name="explain", concurrency_limit=1)
        anon_run.click(_readable(anonymize_photo),
                       [photo, reference, model, target, methods, anonymization, strength, files],
                       [anon_results, files], preprocess=False, api_name="anonymize", concurrency_limit=1)
        verify_run.click(_readable(verify_pair), [photo_a, photo_b, detail, files], [verify_results, files],
                         preprocess=False, api_name="verify", concurrency_limit=1)
        if not config.keep_uploads:
            demo.unload(_end_session(demo))
        cam.stream(live_guarded, [cam, live_state, live_model], [live_out, live_state], preprocess=False,
                   stream_every=config.live_stream_every, time_limit=None, concurrency_limit=4, api_name="live",
                   show_progress="hidden")
    return demo


def _end_session(demo: Any) -> Callable[..., None]:
    """When a tab closes, drop its state now (deleting its photos), not after gradio's one-hour grace."""
    import gradio as gr

    def end_session(request: gr.Request) -> None:
        holder = getattr(demo, "state_holder", None)
        if holder is not None and request.session_hash:
            holder.delete_state(request.session_hash)

    end_session.__annotations__["request"] = gr.Request  # gradio injects the request by this annotation
    return end_session


def _load(name: str) -> Any:
    from ..models.registry import load_model

    return load_model(name)


def _drop_frame(frame: object, config: ServeConfig) -> None:
    """Delete a streamed webcam frame's file at once: frames are never needed twice."""
    files = SessionFiles(config.upload_dir)
    files.add([frame])
    files.delete()


def _delete_cache(config: ServeConfig) -> tuple[int, int] | None:
    """A backstop for sessions that never end cleanly: uploads older than an hour are deleted."""
    return None if config.keep_uploads else (600, 3600)
