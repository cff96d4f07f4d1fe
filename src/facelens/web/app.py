"""The gradio page of `facelens serve`: explain a photo, anonymize it, verify a pair, go live.

Layout only: every number comes from `facelens.web.compute` (the public API) and every panel
from `facelens.web.views`. Per-user data lives in each session's ``gr.State`` (its own copies of
the files it sent, see `facelens.web.uploads`; its webcam tracking state); the only module-level
object is a lock, because the zoo's models are shared by all sessions and hook-based methods
(Grad-CAM) must not run two at once on the same network: two overlapping calls would read each
other's activations. Handlers read a photo only through `SessionFiles.claim`, which refuses any
path that is not one of this server's uploads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ..errors import FaceLensError
from .config import ServeConfig
from .inputs import UploadError
from .uploads import SessionFiles

__all__ = ["SessionFiles", "build_app"]

_COMPUTE = threading.Lock()


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
    from .inputs import payload_name, read_photo
    from .live import LiveState, process_frame

    config = config or ServeConfig()
    limit = config.max_upload_bytes
    models = compute.face_models()
    if not models:
        raise FaceLensError("no face model has its weights on this machine; run `facelens models` to see which")
    default_model = compute.REID_MODEL if compute.REID_MODEL in models else models[0]

    upload_dir = config.upload_dir or _gradio_upload_dir()

    def new_files() -> SessionFiles:
        return SessionFiles(upload_dir, config.keep_uploads)

    def read_own(files: SessionFiles, payload: Any, what: str) -> Any:
        """The photo as a pixel array, read from the session's own copy of the file."""
        return read_photo(files.claim(payload, what), limit, what)

    def read_optional(files: SessionFiles, payload: Any, what: str, used: bool) -> Any:
        """A photo the settings may not use: taken into the session all the same (so it is deleted
        with it), read only when used, and then its errors are the user's to see."""
        try:
            claimed = files.claim(payload, what)
        except UploadError:
            if used:
                raise
            return None
        return read_photo(claimed, limit, what) if used else None

    # -- handlers ------------------------------------------------------------------------------
    def targets_for(model_name: str) -> Any:
        from ..models.registry import load_model

        choices = compute.target_choices(load_model(model_name))
        return gr.Dropdown(choices=choices, value=choices[0])

    def explain_photo(photo_in: Any, reference: Any, model_name: str, target: str, methods: list[str],
                      files: SessionFiles) -> tuple[str, SessionFiles]:
        img = read_own(files, photo_in, "photo")
        ref = read_optional(files, reference, "reference photo", target == compute.REFERENCE_PHOTO)
        names = (payload_name(photo_in, "photo"), payload_name(reference, "reference photo"))
        return views.analysis_html(compute.analyze(model_name, img, methods or [], target, ref, names=names)), files

    def anonymize_photo(photo_in: Any, reference: Any, model_name: str, target: str, methods: list[str],
                        anonymization: str, strength: float, files: SessionFiles) -> tuple[str, SessionFiles]:
        img = read_own(files, photo_in, "photo")
        ref = read_optional(files, reference, "reference photo", target == compute.REFERENCE_PHOTO)
        names = (payload_name(photo_in, "photo"), payload_name(reference, "reference photo"))
        method = (methods or list(compute.DEFAULT_METHODS))[0]
        fx = compute.anonymization_effect(model_name, img, method, anonymization, float(strength), target, ref,
                                          names=names)
        return views.anonymization_html(fx), files

    def verify_pair(photo_a: Any, photo_b: Any, detail: str, files: SessionFiles) -> tuple[str, SessionFiles]:
        a = read_own(files, photo_a, "photo A")
        b = read_own(files, photo_b, "photo B")
        names = (payload_name(photo_a, "photo A"), payload_name(photo_b, "photo B"))
        return views.verification_html(compute.verify(compute.REID_MODEL, a, b, detail, names=names)), files

    for fn in (explain_photo, anonymize_photo, verify_pair):
        fn.returns_state = True  # type: ignore[attr-defined]

    def live_frame(frame: Any, state: LiveState | None, model_name: str,
                   files: SessionFiles) -> tuple[str, LiveState, SessionFiles]:
        state = state if isinstance(state, LiveState) else LiveState()
        try:
            img = read_photo(files.claim(frame, "webcam frame"), limit, "webcam frame")
        finally:
            files.drop(frame)  # only the session's own copy; a frame is never needed twice
        with _COMPUTE:
            result = process_frame(state, img, model_name, max_side=config.live_max_side,
                                   detect_every=config.live_detect_every)
        face = "face found" if result.face_found else "no face in view"
        stats = (f"{state.rate():.1f} frames/s processed, {state.mean_compute_ms():.0f} ms per frame on the server "
                 f"({face}; face re-detected every {config.live_detect_every} frames, frames scaled to "
                 f"{config.live_max_side} px)")
        return views.live_html(result.image, stats, state.frames), state, files

    def live_guarded(frame: Any, state: LiveState | None, model_name: str,
                     files: SessionFiles) -> tuple[str, LiveState, SessionFiles]:
        try:
            return live_frame(frame, state, model_name, files)
        except FaceLensError as exc:
            return views.error_html(str(exc)), state if isinstance(state, LiveState) else LiveState(), files

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
        # the session's files are an output too: gradio calls a State's delete callback only once an
        # event has returned it, and a webcam-only session must get its folder deleted as well
        cam.stream(live_guarded, [cam, live_state, live_model, files], [live_out, live_state, files],
                   preprocess=False,
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


def _gradio_upload_dir() -> str:
    """Where gradio stores uploads when the app is built without `facelens.web.server.launch`."""
    from gradio.utils import get_upload_folder

    return get_upload_folder()


def _delete_cache(config: ServeConfig) -> tuple[int, int] | None:
    """A backstop for sessions that never end cleanly: uploads older than an hour are deleted."""
    return None if config.keep_uploads else (600, 3600)
