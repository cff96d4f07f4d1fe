"""Uploads against a real `facelens serve`: sessions keep their own files, no path is read that was
not uploaded, and every odd file in the fuzz corpus gets a result or a readable error.
"""

from __future__ import annotations

import html
import signal
import stat
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from facelens.web.uploads import SESSIONS, UPLOADS

from .conftest import ApiSession, Server, start_server, wait_until

PHOTO = "images/frl_canada/003f.jpg"
RESULT_TIMEOUT_MS = 120_000
REFUSED = "that is not a file this server received from your browser"
GONE = "the uploaded file is gone"


def _explain(payload: object, methods: tuple[str, ...] = ("gradient",)) -> list[object]:
    return [payload, None, "dlib-resnet", "its own embedding", list(methods)]


def _session_copies(server: Server) -> dict[Path, list[Path]]:
    return {d: sorted(d.iterdir()) for d in sorted((server.upload_dir / SESSIONS).glob("*"))}


def _panel(result: tuple[str, object]) -> str:
    event, out = result
    assert event == "complete", out
    return str(out[0])  # type: ignore[index]


def _open_page(browser: object, server: Server) -> tuple[object, object]:
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})  # type: ignore[attr-defined]
    page = ctx.new_page()
    page.goto(server.url)
    page.wait_for_selector("#explain-button", timeout=60_000)
    return ctx, page


def _upload_in_page(page: object, photo: Path) -> list[str]:
    """Upload the photo as a user does; the server paths the upload got."""
    def is_upload(r: object) -> bool:
        return urlparse(r.url).path.endswith("/gradio_api/upload") and r.request.method == "POST"  # type: ignore[attr-defined]

    with page.expect_response(is_upload) as response:  # type: ignore[attr-defined]
        page.set_input_files("#photo input[type=file]", str(photo))  # type: ignore[attr-defined]
    return list(response.value.json())


def _preview_loaded(page: object) -> bool:
    return bool(page.locator("#photo img").first.evaluate(  # type: ignore[attr-defined]
        "img => img.complete && img.naturalWidth > 0"))


def test_two_browser_sessions_with_the_same_photo_keep_their_own_files(browser: object, server: Server,
                                                                       shared_faces: Path) -> None:
    photo = shared_faces / PHOTO
    ctx1, page1 = _open_page(browser, server)
    ctx2, page2 = _open_page(browser, server)
    try:
        copies: dict[str, Path] = {}
        uploads: dict[str, list[str]] = {}
        for key, page in (("one", page1), ("two", page2)):
            before = set(_session_copies(server))
            uploads[key] = _upload_in_page(page, photo)
            page.click("#explain-button")  # type: ignore[attr-defined]
            page.wait_for_selector("#results .fl-results", timeout=RESULT_TIMEOUT_MS)  # type: ignore[attr-defined]
            (folder,) = set(_session_copies(server)) - before
            (copies[key],) = _session_copies(server)[folder]
        # the same bytes, yet two uploads in two random folders, each moved into its session's folder
        up1, up2 = uploads["one"], uploads["two"]
        assert len(up1) == len(up2) == 1 and up1 != up2
        assert all(Path(p).relative_to(server.upload_dir).parts[0] == UPLOADS for p in up1 + up2)
        assert not Path(up1[0]).exists() and not Path(up2[0]).exists()
        assert not any((server.upload_dir / UPLOADS).rglob("*.jpg"))
        for own in copies.values():
            assert own.read_bytes() == photo.read_bytes()
            assert stat.S_IMODE(own.stat().st_mode) == 0o600
            assert stat.S_IMODE(own.parent.stat().st_mode) & 0o077 == 0
        # the photo the page shows still loads, also after switching tabs
        page1.get_by_role("tab", name="Verify two photos").click()  # type: ignore[attr-defined]
        page1.get_by_role("tab", name="Explain a photo").click()  # type: ignore[attr-defined]
        assert wait_until(lambda: _preview_loaded(page1), 10), "the uploaded photo's preview broke"

        # a third client names session two's files: its upload path and its private copy
        attacker = ApiSession(server)
        try:
            for target in (up2[0], str(copies["two"])):
                payload = {"path": target, "orig_name": "theirs.jpg", "meta": {"_type": "gradio.FileData"}}
                for api, data in (("live", [payload, "dlib-resnet"]), ("explain", _explain(payload))):
                    panel = _panel(attacker.call(api, data))
                    assert 'class="fl-error"' in panel and "fl-results" not in panel and "fl-live-frame" not in panel
                    assert (GONE if target == up2[0] else REFUSED) in html.unescape(panel), panel
        finally:
            attacker.close()
        assert copies["two"].exists()

        # session one ends: its folder goes, session two's file stays and still works
        ctx1.close()
        assert wait_until(lambda: not copies["one"].parent.exists(), 30), "the closed session's copy outlived it"
        assert copies["two"].exists()
        page2.click("#anonymize-button")  # type: ignore[attr-defined]
        page2.wait_for_selector("#anon-results .fl-anon", timeout=RESULT_TIMEOUT_MS)  # type: ignore[attr-defined]
        assert page2.locator("#anon-results .fl-error").count() == 0  # type: ignore[attr-defined]
    finally:
        ctx2.close()
    assert wait_until(lambda: not copies["two"].parent.exists(), 30)


def test_api_sessions_cannot_read_or_delete_each_others_files(server: Server, shared_faces: Path) -> None:
    data = (shared_faces / PHOTO).read_bytes()
    before = set(_session_copies(server))
    one, two = ApiSession(server), ApiSession(server)
    one.open()
    two.open()
    try:
        p1, p2 = one.upload("me.jpg", data), two.upload("me.jpg", data)
        assert p1["path"] != p2["path"]  # gradio alone would give both the same <hash>/me.jpg
        # session one sends its own upload as a webcam frame (before the fix, that path was session two's too)
        assert "fl-live" in _panel(one.call("live", [p1, "dlib-resnet"]))
        assert "fl-results" in _panel(two.call("explain", _explain(p2)))
        mine = {d: files for d, files in _session_copies(server).items() if d not in before}
        assert sorted(len(files) for files in mine.values()) == [0, 1]  # one's frame is deleted once read
        (copy2,) = next(files for files in mine.values() if files)
        # nothing outside the uploads is read: a system file, a session's private copy
        for path in ("/etc/passwd", str(copy2), str(server.upload_dir / ".." / "x"), str(server.upload_dir)):
            panel = html.unescape(_panel(one.call("explain", _explain({"path": path, "orig_name": "x.jpg"}))))
            assert f"x.jpg: {REFUSED}" in panel, panel
            assert "root:" not in panel
        # with gradio's file marker, gradio itself refuses what was not uploaded
        event, message = one.call("explain", _explain({"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}))
        assert event == "error" and "root:" not in str(message)
        one.close()
        assert wait_until(lambda: set(_session_copies(server)) - before == {copy2.parent}, 30), _session_copies(server)
        assert copy2.exists()
        assert "fl-results" in _panel(two.call("explain", _explain(p2, ("gradcam",))))  # the same upload, again
    finally:
        one.close()
        two.close()


def test_serve_removes_the_folders_of_killed_servers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import sys
    import tempfile

    from facelens.errors import FaceLensError
    from facelens.web import ServeConfig, server
    from facelens.web.uploads import PID_FILE

    pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                             text=True, check=True).stdout)
    left = tmp_path / "facelens-serve-killed"
    left.mkdir()
    (left / PID_FILE).write_text(f"{pid} {_namespace()}\n")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def no_launch(config: ServeConfig) -> None:
        raise FaceLensError("not launched in this test")

    monkeypatch.setattr(server, "launch", no_launch)
    with pytest.raises(FaceLensError):
        server.serve(ServeConfig(port=0))
    assert not left.exists()
    assert "removed 1 upload folder(s) left by stopped servers" in capsys.readouterr().out


def _namespace() -> str:
    from facelens.web.uploads import _pid_namespace

    return _pid_namespace()


def test_every_odd_file_gets_a_result_or_a_readable_error(server: Server) -> None:
    """The fuzz corpus through the explain endpoint, one file after another, on one server.

    A file that kills the server is reported by name; the corpus then goes on on a new server
    (which must also remove the dead server's upload folder), so one run names every such file.
    """
    from tests.fixtures.odd_inputs import fuzz_corpus

    corpus = fuzz_corpus()
    srv, killers, bad, restarts, started = server, [], [], [], []
    client = ApiSession(srv)
    t0 = time.monotonic()
    try:
        for name, data in corpus:
            try:
                result = client.call("explain", _explain(client.upload(name, data)))
            except Exception as exc:  # the server died under this file, or stopped answering
                result = ("dead", repr(exc))
            if srv.process.poll() is not None or result[0] == "dead":
                try:
                    how = f"exited with {srv.process.wait(timeout=10)}"
                except subprocess.TimeoutExpired:  # hung: killed, so its folder is left as by a crash
                    how = "stopped answering"
                    srv.process.send_signal(signal.SIGKILL)
                    srv.process.wait(30)
                killers.append(f"{name} (server {how}; last log: {' | '.join(srv.log[-3:])})")
                client.close()
                restarts.append(srv.upload_dir)
                srv = start_server()
                started.append(srv)
                client = ApiSession(srv)
                continue
            event, out = result
            panel = str(out[0]) if event == "complete" else str(out)  # type: ignore[index]
            text = html.unescape(panel)
            if event != "complete" or "Traceback" in text:
                bad.append(f"{name}: gradio error {text[:300]}")
            elif 'class="fl-results"' not in panel and not ('class="fl-error"' in panel and name in text):
                bad.append(f"{name}: neither a result nor an error naming the file: {text[:300]}")
            assert client.http.get(srv.url, timeout=30).status_code == 200
    finally:
        client.close()
        for s in started:
            s.stop()
    print(f"\nfuzz corpus: {len(corpus)} files through /explain in {time.monotonic() - t0:.1f} s")
    for s, dead_dir in zip(started, restarts, strict=True):
        assert not dead_dir.exists(), f"the killed server's folder {dead_dir} was not removed by the next one"
        assert "left by stopped servers" in "\n".join(s.log)
    assert not killers, "files that killed facelens serve:\n" + "\n".join(killers)
    assert not bad, "\n".join(bad)
