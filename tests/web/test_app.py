"""`facelens serve` end to end in headless Chromium: explain, anonymize, verify, errors, webcam, privacy.

The page's numbers are compared with the Python API called here on the same file, so the app
can only pass by showing what the library computes.
"""

from __future__ import annotations

import csv
import html
import json
import re
import threading
import time
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import urlopen

import numpy as np
import pytest

from .conftest import CHROMIUM_ARGS, MAX_UPLOAD_MB, Server, wait_until, write_y4m

PHOTO = "images/frl_canada/003f.jpg"
METHODS = ["gradcam", "gradient"]  # the page's default selection
RESULT_TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def photo(shared_faces: Path) -> Path:
    return shared_faces / PHOTO


@pytest.fixture(scope="module")
def pair(shared_faces: Path) -> tuple[Path, Path]:
    with open(shared_faces / "pairs_verification.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["same_identity"] == "1")
    return shared_faces / row["path_a"], shared_faces / row["path_b"]


def _open(browser: object, server: Server, **context_args: object) -> tuple[object, object, list[str]]:
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000}, **context_args)  # type: ignore[attr-defined]
    page = ctx.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(server.url)
    page.wait_for_selector("#explain-button", timeout=60_000)
    return ctx, page, requests


def _numbers(page: object, kind: str) -> dict:
    text = page.locator(f'pre.fl-numbers[data-kind="{kind}"]').first.text_content()  # type: ignore[attr-defined]
    return json.loads(text)


def _external(requests: list[str]) -> list[str]:
    return [u for u in requests
            if urlparse(u).scheme not in ("data", "blob") and urlparse(u).hostname not in ("127.0.0.1", "localhost")]


@pytest.fixture(scope="module")
def explained(browser: object, server: Server, photo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One browser session that uploads a face and explains it with two methods."""
    ctx, page, requests = _open(browser, server)
    page.set_input_files("#photo input[type=file]", str(photo))
    page.click("#explain-button")
    page.wait_for_selector("#results .fl-results", timeout=RESULT_TIMEOUT_MS)
    shot = tmp_path_factory.mktemp("web") / "explain.png"
    page.screenshot(path=str(shot), full_page=True)
    yield {"ctx": ctx, "page": page, "requests": requests, "screenshot": shot}
    ctx.close()


def test_explain_shows_two_overlays_and_the_api_numbers(explained: dict, photo: Path) -> None:
    from facelens.explain.api import explain_methods
    from facelens.models import load_model

    page = explained["page"]
    assert explained["screenshot"].stat().st_size > 10_000
    figures = page.locator("#results .fl-overlays figure img")
    assert figures.count() == 1 + len(METHODS)  # the aligned input, then one overlay per method
    embedded = ("data:image/png;base64,", "data:image/webp;base64,")
    assert all(figures.nth(i).get_attribute("src").startswith(embedded) for i in range(figures.count()))
    assert all(figures.nth(i).evaluate("img => img.naturalWidth") > 0 for i in range(figures.count()))

    api = {e.method: e for e in explain_methods("dlib-resnet", photo, METHODS)}
    shown = _numbers(page, "analysis")
    assert shown["model"] == "dlib-resnet"
    assert list(shown["methods"]) == METHODS
    for method, e in api.items():
        got = shown["methods"][method]
        assert got["score"] == pytest.approx(e.score, rel=1e-5)
        mass = e.region_attention().mass
        assert got["region_attention"] == pytest.approx(mass, abs=1e-5)
        # the visible bars and captions print the same numbers, rounded
        bars = page.locator(f'#results .fl-bars[data-method="{method}"] .fl-bar')
        visible = {bars.nth(i).get_attribute("data-region"): bars.nth(i).locator(".val").inner_text()
                   for i in range(bars.count())}
        assert visible == {r: f"{100 * v:.1f} %" for r, v in mass.items()}
        assert f"score {e.score:.3g} " in page.locator("#results .fl-overlays").inner_text()
    norm = float(np.linalg.norm(load_model("dlib-resnet").embed(photo).astype(np.float64)))
    assert shown["outputs"]["embedding_norm"] == pytest.approx(norm, rel=1e-5)
    assert f"{norm:.4f}" in page.locator("#results table.fl").inner_text()


def test_page_requests_nothing_but_the_local_server(explained: dict, server: Server) -> None:
    requests = explained["requests"]
    assert len(requests) > 5
    assert _external(requests) == []
    # nor does anything the page loads point elsewhere: stylesheets, scripts, fonts
    page_html = urlopen(server.url, timeout=30).read().decode("utf-8")
    loaded = re.findall(r'<(?:link|script)[^>]+(?:href|src)="(https?://[^"]+)"', page_html)
    assert loaded == []
    css_urls = [u for u in requests if urlparse(u).path.endswith(".css")]
    assert css_urls, "the page loaded no stylesheet?"
    for u in css_urls:
        css = urlopen(u, timeout=30).read().decode("utf-8", "replace")
        assert not re.search(r"(?:url\(|@import)\s*['\"]?\s*https?://", css), u
        assert "fonts.googleapis" not in css


def test_anonymization_shows_score_and_reidentification_change(explained: dict, photo: Path) -> None:
    from facelens.explain.api import explain
    from facelens.faces.anonymize import anonymize
    from facelens.image import load_image
    from facelens.models import load_model

    page = explained["page"]
    page.locator("#anonymization").get_by_text("eye_bar").click()
    page.click("#anonymize-button")
    page.wait_for_selector("#anon-results .fl-anon", timeout=RESULT_TIMEOUT_MS)
    shown = _numbers(page, "anonymization")

    model = load_model("dlib-resnet")
    img = load_image(photo)
    face = model.chip(img).face
    masked = anonymize(img, face.landmarks, "eye_bar")
    e_before = explain(model, img, "gradcam", face=face)
    distance = model.distance(model.embed(img, face=face), model.embed(masked, face=face))
    assert shown["method"] == "eye_bar"
    assert shown["score_before"] == pytest.approx(e_before.score, rel=1e-5)
    assert shown["reid"]["distance"] == pytest.approx(distance, rel=1e-4)
    assert shown["reid"]["same_person"] == (distance < model.match_threshold)
    assert shown["score_after"] != pytest.approx(shown["score_before"], rel=1e-6)  # the bar changes the score
    verdict = page.locator("#anon-results .fl-verdict").inner_text()
    assert ("still recognized" if distance < 0.6 else "no longer recognized") in verdict


def test_verification_mode(browser: object, server: Server, pair: tuple[Path, Path]) -> None:
    from facelens.models import load_model

    ctx, page, requests = _open(browser, server)
    try:
        page.get_by_role("tab", name="Verify two photos").click()
        page.set_input_files("#photo-a input[type=file]", str(pair[0]))
        page.set_input_files("#photo-b input[type=file]", str(pair[1]))
        page.click("#verify-button")
        page.wait_for_selector("#verify-results .fl-verify", timeout=RESULT_TIMEOUT_MS)
        shown = _numbers(page, "verification")
        model = load_model("dlib-resnet")
        a, b = model.embed(pair[0]), model.embed(pair[1])
        distance = model.distance(a, b)
        cosine = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
        assert shown["distance"] == pytest.approx(distance, rel=1e-4)
        assert shown["similarity"] == pytest.approx(cosine, abs=1e-5)
        decision = "same person" if distance < model.match_threshold else "different people"
        assert shown["same_person"] == (distance < model.match_threshold)
        assert decision in page.locator("#verify-results .fl-decision").inner_text()
        assert page.locator("#verify-results figure img").count() == 1  # the pair maps
        assert _external(requests) == []
    finally:
        ctx.close()


def test_corrupt_and_oversize_uploads_give_readable_errors(browser: object, server: Server, photo: Path,
                                                            tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG" + bytes(range(256)) * 8)
    big = tmp_path / "huge.png"
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (800, 900, 3), dtype=np.uint8)).save(big)  # noise: ~2 MB as PNG
    assert big.stat().st_size > MAX_UPLOAD_MB * 1e6

    ctx, page, _ = _open(browser, server)
    try:
        page.set_input_files("#photo input[type=file]", str(broken))
        page.click("#explain-button")
        page.wait_for_selector("#results .fl-error", timeout=RESULT_TIMEOUT_MS)
        message = page.locator("#results .fl-error").inner_text()
        assert "broken.jpg" in message and re.search(r"not an image|corrupt|truncated", message), message

        page.set_input_files("#photo input[type=file]", str(big))
        # gradio refuses it before it is sent, naming the file and the limit
        assert wait_until(lambda: re.search(r'exceeds? the maximum allowed size.*huge\.png', page.inner_text("body")),
                          30), "no message about the size limit"
        shot = tmp_path / "oversize.png"
        page.screenshot(path=str(shot))

        # the server keeps serving: a good photo still works in the same session
        page.set_input_files("#photo input[type=file]", str(photo))
        page.click("#explain-button")
        page.wait_for_selector("#results .fl-results", timeout=RESULT_TIMEOUT_MS)
    finally:
        ctx.close()
    assert server.process.poll() is None


def test_ten_concurrent_sessions_get_their_own_results(server: Server, shared_faces: Path) -> None:
    from gradio_client import Client, handle_file

    from facelens.explain.api import explain

    photos = [shared_faces / p for p in (PHOTO, "images/frl_canada/008f.jpg", "images/frl_canada/010f.jpg")]
    expected = {p.name: explain("dlib-resnet", p, "gradcam").score for p in photos}
    assert len({round(v, 6) for v in expected.values()}) == len(photos)  # the photos are distinguishable
    results: dict[int, object] = {}

    def session(i: int) -> None:
        try:
            client = Client(server.url, verbose=False, download_files=False)
            p = photos[i % len(photos)]
            out = client.predict(handle_file(str(p)), None, "dlib-resnet", "its own embedding", ["gradcam"],
                                 api_name="/explain")
            results[i] = (p.name, out[0] if isinstance(out, (list, tuple)) else out)
        except Exception as exc:  # recorded and reported below
            results[i] = exc

    threads = [threading.Thread(target=session, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    errors = {i: r for i, r in results.items() if isinstance(r, Exception)}
    assert not errors and len(results) == 10, errors
    for name, page_html in results.values():  # type: ignore[misc]
        match = re.search(r'<pre class="fl-numbers" data-kind="analysis">(.*?)</pre>', page_html, re.S)
        assert match, page_html[:500]
        numbers = json.loads(html.unescape(match.group(1)))
        assert numbers["methods"]["gradcam"]["score"] == pytest.approx(expected[name], rel=1e-5), name


def test_webcam_live_overlays_arrive(playwright: object, chromium: Path, server: Server, photo: Path,
                                    tmp_path: Path) -> None:
    import cv2

    from facelens.faces.detect import detect_faces
    from facelens.image import load_image

    # a 640×480 "webcam" view of the photo, the face about a third of the width
    img = load_image(photo)
    face = max(detect_faces(img), key=lambda f: f.area)
    cx, cy = face.center
    w = min(img.shape[1], int(face.width * 3.2))
    h = min(img.shape[0], w * 3 // 4)
    w = h * 4 // 3
    x0 = int(np.clip(cx - w / 2, 0, img.shape[1] - w))
    y0 = int(np.clip(cy - h / 2, 0, img.shape[0] - h))
    view = cv2.resize(img[y0:y0 + h, x0:x0 + w], (640, 480), interpolation=cv2.INTER_AREA)
    video = write_y4m(tmp_path / "face.y4m", view)

    args = [*CHROMIUM_ARGS, "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-video-capture={video}"]
    b = playwright.chromium.launch(executable_path=str(chromium), args=args)  # type: ignore[attr-defined]
    try:
        ctx, page, requests = _open(b, server, permissions=["camera"])
        page.get_by_role("tab", name="Live webcam").click()
        page.locator("#cam").get_by_text("Click to Access Webcam").click()
        before = {p for p in server.upload_dir.rglob("*") if p.is_file()}
        page.locator("#cam button", has_text="Record").click()

        def frame() -> int:
            value = page.evaluate("() => document.querySelector('#live-out .fl-live')?.dataset.frame ?? '0'")
            return int(value)

        assert wait_until(lambda: frame() >= 3, 60), "no live overlay arrived"
        n0, t0 = frame(), time.monotonic()
        time.sleep(6)
        n1, t1 = frame(), time.monotonic()
        rate = (n1 - n0) / (t1 - t0)
        stats = page.locator("#live-out .fl-live-stats").inner_text()
        src = page.locator("#live-out img.fl-live-frame").get_attribute("src")
        page.screenshot(path=str(tmp_path / "live.png"))
        print(f"\nlive webcam: {rate:.1f} overlays/s seen by the browser over {t1 - t0:.1f} s; server: {stats}")
        assert n1 > n0
        assert "face found" in stats, stats
        assert src.startswith("data:image/jpeg;base64,")
        assert _external(requests) == []
        left = {p for p in server.upload_dir.rglob("*") if p.is_file()} - before
        assert not left, f"webcam frames were left on disk: {sorted(left)[:3]}"
        ctx.close()
    finally:
        b.close()


def test_closing_the_tab_and_stopping_the_server_delete_the_photos(browser: object, server: Server,
                                                                     shared_faces: Path) -> None:
    photo = shared_faces / "images/frl_canada/019f.jpg"
    data = photo.read_bytes()

    def copies() -> list[Path]:  # the session's copy has a random name: found by its bytes
        return [p for p in server.upload_dir.rglob("*") if p.is_file() and p.read_bytes() == data]

    ctx, page, _ = _open(browser, server)
    page.set_input_files("#photo input[type=file]", str(photo))
    page.click("#explain-button")
    page.wait_for_selector("#results .fl-results", timeout=RESULT_TIMEOUT_MS)
    assert copies(), "the upload was not where the server said"
    ctx.close()
    assert wait_until(lambda: not copies(), 30), "the photo outlived its browser session"
    assert server.stop() == 0
    assert not server.upload_dir.exists()
    assert "stopped" in "\n".join(server.log)
