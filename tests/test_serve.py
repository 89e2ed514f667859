"""`medistill serve`: the HTTP API with a client, and the page itself in a real headless Chromium."""

from __future__ import annotations

import base64
import http.client
import io
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent / "data" / "formats"))
from format_layouts import FAKE_PATIENT, FAKE_PATIENT_ID, write_dicom  # noqa: E402

from medistill.serve import App, make_server  # noqa: E402


@pytest.fixture
def server(classifier_checkpoint):
    """The app on a free loopback port, with a 1 MB upload limit; stopped after the test."""
    app = App(classifier_checkpoint, max_upload=2**20)
    httpd = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def post(url: str, body: bytes, filename: str = "image.png", query: str = "") -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/api/predict{query}", data=body, method="POST",
                                     headers={"X-Filename": filename, "Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.slow
def test_api_predicts_and_rejects_bad_uploads_while_serving_on(server, cxr_images, tmp_path):
    with urllib.request.urlopen(server + "/", timeout=10) as response:
        page = response.read().decode()
    assert 'id="opacity"' in page and "http://" not in page.replace("http://' +", "") and "https://" not in page
    with urllib.request.urlopen(server + "/api/info", timeout=10) as response:
        info = json.loads(response.read())
    assert info["kind"] == "classifier" and info["labels"]

    status, data = post(server, cxr_images[0].read_bytes())
    assert status == 200 and set(data["result"]["labels"]) == set(info["labels"])
    for key in ("image_png", "overlay_png"):
        picture = Image.open(io.BytesIO(base64.b64decode(data[key])))
        assert picture.size == (384, 384)
    assert Image.open(io.BytesIO(base64.b64decode(data["overlay_png"]))).mode == "RGBA"

    grey = np.asarray(Image.open(cxr_images[0]).convert("L"))
    dicom = write_dicom(tmp_path / "scan.dcm", grey).read_bytes()
    status, data = post(server, dicom, filename="")  # recognised by its DICM preamble
    assert status == 200 and FAKE_PATIENT not in json.dumps(data) and FAKE_PATIENT_ID not in json.dumps(data)

    status, data = post(server, b"%PDF-1.4 not an image", filename="report.pdf")
    assert status == 400 and "report.pdf is not an image" in data["error"]
    status, data = post(server, cxr_images[0].read_bytes(), query="?question=Is%20there%20a%20mass%3F")
    assert status == 400 and "takes no --question" in data["error"]

    host, port = server.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.putrequest("POST", "/api/predict")
    connection.putheader("Content-Length", str(200 * 2**20))  # 200 MB announced; the server reads none of it
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and "at most 1 MB" in json.loads(response.read())["error"]
    connection.close()

    status, data = post(server, cxr_images[1].read_bytes())  # still serving
    assert status == 200


class Browser:
    """Headless Chromium driven over the DevTools protocol (websocket-client)."""

    def __init__(self, profile: Path) -> None:
        import websocket

        self.process = subprocess.Popen(
            [shutil.which("chromium"), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1000,1100", "about:blank"],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        endpoint = None
        deadline = time.monotonic() + 60
        while endpoint is None and time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if "DevTools listening on" in line:
                endpoint = line.split("listening on ")[1].strip()
        assert endpoint, "Chromium did not start its DevTools endpoint"
        port = endpoint.split(":")[2].split("/")[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            page = next(t for t in json.loads(response.read()) if t["type"] == "page")
        self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60)
        self.next_id = 0

    def call(self, method: str, **params: object) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return message.get("result", {})

    def evaluate(self, expression: str) -> object:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, seconds: float = 90) -> object:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {expression}")

    def upload(self, selector: str, path: Path) -> None:
        root = self.call("DOM.getDocument")["root"]["nodeId"]
        node = self.call("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        self.call("DOM.setFileInputFiles", files=[str(path)], nodeId=node)

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.mark.slow
def test_the_page_in_headless_chromium(server, cxr_images, tmp_path):
    if shutil.which("chromium") is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    pytest.importorskip("websocket", reason="websocket-client drives Chromium: pip install 'medistill[dev]'")
    browser = Browser(tmp_path / "profile")
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=server + "/")
        browser.wait_for("document.getElementById('kind').textContent === 'classifier'")
        hidden = "getComputedStyle(document.getElementById('{}')).display === 'none'"
        assert browser.evaluate(hidden.format("questionRow")) and browser.evaluate(hidden.format("locateRow"))
        browser.upload("#file", cxr_images[0])  # the file chooser's path: a change event, then the upload
        finished = "['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state"
        assert browser.wait_for(finished) == "done", browser.evaluate("document.getElementById('error').textContent")
        answer = browser.evaluate("document.getElementById('answer').textContent")
        labels = json.loads(urllib.request.urlopen(server + "/api/info", timeout=10).read())["labels"]
        assert any(label in answer for label in labels)
        assert browser.evaluate("document.getElementById('overlay').src.startsWith('data:image/png;base64,')")
        assert browser.evaluate("document.getElementById('overlay').naturalWidth") == 384
        browser.evaluate("const s = document.getElementById('opacity'); s.value = 20;"
                         "s.dispatchEvent(new Event('input'))")
        assert browser.evaluate("document.getElementById('overlay').style.opacity") == "0.2"
        shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
        (tmp_path / "serve.png").write_bytes(shot)
        assert Image.open(tmp_path / "serve.png").size[0] >= 800

        junk = tmp_path / "notes.txt"
        junk.write_text("not an image")
        browser.upload("#file", junk)
        assert browser.wait_for("document.body.dataset.state === 'error'")
        assert "notes.txt is not an image" in browser.evaluate("document.getElementById('error').textContent")
    finally:
        browser.close()
