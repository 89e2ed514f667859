"""`medistill serve`: a one-page local web app around one checkpoint (standard library HTTP server).

GET `/` is the page (no external assets); GET `/api/info` says what the checkpoint is; POST `/api/predict`
takes the raw bytes of one image (PNG, JPEG, PGM or DICOM; `X-Filename` header for the suffix) with
`question` / `locate` query parameters and answers JSON: the prediction, the image and its overlay as PNG
data (the page stacks them under an opacity slider). Errors are JSON `{"error": ...}` with a 4xx status and
the server keeps serving. Only pixels are read from DICOM files: identity fields are never shown.
"""

from __future__ import annotations

import base64
import json
import logging
import tempfile
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from medistill.data.imaging import DICOM_SUFFIXES, IMAGE_SUFFIXES
from medistill.errors import DataError, MedistillError
from medistill.explain.overlay import png_bytes, to_rgb
from medistill.predict import Predictor, checkpoint_kind, load_predictor

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD = 50 * 2**20


class App:
    """The checkpoint's predictor behind a lock (one prediction at a time) and the page."""

    def __init__(self, checkpoint: str | Path, max_upload: int = DEFAULT_MAX_UPLOAD) -> None:
        self.checkpoint = Path(checkpoint)
        self.kind = checkpoint_kind(self.checkpoint)
        self.predictor: Predictor = load_predictor(self.checkpoint)
        self.max_upload = max_upload
        self.lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"kind": self.kind, "checkpoint": "/".join(self.checkpoint.resolve().parts[-3:]),
                                "max_upload_mb": round(self.max_upload / 2**20, 1)}
        labels = getattr(self.predictor, "labels", None)
        if labels:
            info["labels"] = labels
        return info

    def predict(self, data: bytes, filename: str, question: str | None, locate: str | None) -> dict[str, Any]:
        suffix = Path(filename).suffix.lower()
        if suffix not in IMAGE_SUFFIXES:  # a DICOM file is recognised by its preamble even without a suffix
            suffix = DICOM_SUFFIXES[0] if data[128:132] == b"DICM" else ".png"
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"upload{suffix}"
            path.write_bytes(data)
            with self.lock:
                prediction = self.predictor.predict(path, question=question or None, locate=locate or None)
        result = {**prediction.as_json(), "image": Path(filename).name or "upload"}
        out: dict[str, Any] = {"result": result, "summary": prediction.summary(), "opacity": prediction.opacity}
        if prediction.grey is not None:
            out["image_png"] = base64.b64encode(png_bytes(to_rgb(prediction.grey))).decode()
        if prediction.overlay is not None:
            out["overlay_png"] = base64.b64encode(_png_rgba(prediction.overlay)).decode()
        return out


def _png_rgba(rgba: Any) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def handler_for(app: App) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "medistill"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
            log.debug("%s %s", self.address_string(), format % args)

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, data: dict[str, Any]) -> None:
            self._send(status, json.dumps(data).encode(), "application/json")

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = urlparse(self.path).path
            if path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, PAGE.encode(), "text/html; charset=utf-8")
            elif path == "/api/info":
                self._json(HTTPStatus.OK, app.info())
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {path}"})

        def do_POST(self) -> None:  # noqa: N802
            url = urlparse(self.path)
            if url.path != "/api/predict":
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no endpoint {url.path}"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > app.max_upload:
                self.close_connection = True  # the body is not read
                self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           {"error": f"the upload is {length / 2**20:.0f} MB; this server takes at most "
                                     f"{app.max_upload / 2**20:.0f} MB (medistill serve --max-upload-mb)"})
                return
            if length == 0:
                self._json(HTTPStatus.BAD_REQUEST, {"error": "no image in the request: choose or drop a file"})
                return
            data = self.rfile.read(length)
            query = {key: values[0] for key, values in parse_qs(url.query).items()}
            filename = self.headers.get("X-Filename") or "upload"
            try:
                self._json(HTTPStatus.OK, app.predict(data, filename, query.get("question"), query.get("locate")))
            except DataError:  # the upload is no image we can decode (its temporary path is not shown)
                self._json(HTTPStatus.BAD_REQUEST, {"error": f"{Path(filename).name} is not an image medistill can "
                                                             "read: upload a PNG, JPEG, PGM or DICOM file"})
            except MedistillError as error:  # e.g. a question for a classifier
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(error)})
            except Exception as error:  # the server keeps serving whatever one request did
                log.exception("prediction failed")
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"prediction failed: {type(error).__name__}"})

    return Handler


def make_server(app: App, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    return ThreadingHTTPServer((host, port), handler_for(app))


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>medistill</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:60rem;color:#222;padding:0 1rem}
h1{font-size:1.4rem}#drop{border:2px dashed #888;border-radius:8px;padding:1.5rem;text-align:center;margin:1rem 0}
#drop.over{background:#eef}label{display:block;margin:.5rem 0}input[type=text]{width:30rem;max-width:100%}
#stack{position:relative;width:384px;height:384px;margin-top:1rem;background:#000}
#stack img{position:absolute;left:0;top:0;width:384px;height:384px}
#error{color:#b00020;font-weight:bold}#answer{font-size:1.2rem;margin:.5rem 0}
table{border-collapse:collapse}td{padding:.1rem .6rem;border-bottom:1px solid #ddd}
.note{color:#666;font-size:.9rem}[hidden]{display:none !important}
</style></head><body>
<h1>medistill: <span id="kind">loading</span> checkpoint <code id="checkpoint"></code></h1>
<div id="drop">Drop an image here (PNG, JPEG, PGM or DICOM), or <input type="file" id="file"></div>
<label id="questionRow">Question <input type="text" id="question" placeholder="Is there a pleural effusion?"></label>
<label id="locateRow">Locate <input type="text" id="locate" placeholder="effusion"></label>
<button id="run">Predict</button>
<p id="error" role="alert"></p>
<p id="answer"></p>
<table id="table"></table>
<label id="opacityRow">Overlay opacity <input type="range" id="opacity" min="0" max="100" value="50"></label>
<div id="stack"><img id="base" alt=""><img id="overlay" alt=""></div>
<p class="note">Runs on this machine only; nothing is sent elsewhere. DICOM files are read for their pixels
alone: no identity field is shown.</p>
<script>
const $ = id => document.getElementById(id);
let info = {}, chosen = null;
fetch('/api/info').then(r => r.json()).then(i => {
  info = i; $('kind').textContent = i.kind; $('checkpoint').textContent = i.checkpoint;
  $('questionRow').hidden = i.kind === 'classifier'; $('locateRow').hidden = i.kind !== 'grounding';
});
function choose(file) { chosen = file; $('error').textContent = ''; return predict(); }
$('file').addEventListener('change', e => e.target.files.length && choose(e.target.files[0]));
const drop = $('drop');
drop.addEventListener('dragover', e => { e.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', e => { e.preventDefault(); drop.classList.remove('over');
  if (e.dataTransfer.files.length) choose(e.dataTransfer.files[0]); });
$('run').addEventListener('click', () => predict());
$('opacity').addEventListener('input', () => { $('overlay').style.opacity = $('opacity').value / 100; });
function show(data) {
  $('answer').textContent = data.summary;
  const table = $('table'); table.innerHTML = '';
  const rows = data.result.labels ? Object.entries(data.result.labels).sort((a, b) => b[1] - a[1])
    : (data.result.alternatives || []).map(a => [a.answer, a.probability]);
  for (const [name, p] of rows) { const tr = table.insertRow(); tr.insertCell().textContent = name;
    tr.insertCell().textContent = Number(p).toFixed(3); }
  $('base').src = data.image_png ? 'data:image/png;base64,' + data.image_png : '';
  $('overlay').src = data.overlay_png ? 'data:image/png;base64,' + data.overlay_png : '';
  $('overlay').hidden = !data.overlay_png; $('opacityRow').hidden = !data.overlay_png;
  $('opacity').value = Math.round(100 * data.opacity); $('overlay').style.opacity = data.opacity;
  document.body.dataset.state = 'done';
}
async function predict() {
  if (!chosen) { $('error').textContent = 'Choose or drop an image first.'; return; }
  if (chosen.size > (info.max_upload_mb || 50) * 1048576) {
    $('error').textContent = `${chosen.name} is larger than this server takes (${info.max_upload_mb} MB).`; return; }
  const query = new URLSearchParams();
  if ($('question').value) query.set('question', $('question').value);
  if ($('locate').value) query.set('locate', $('locate').value);
  document.body.dataset.state = 'busy'; $('error').textContent = ''; $('answer').textContent = 'Working...';
  const response = await fetch('/api/predict?' + query, {method: 'POST', body: chosen,
    headers: {'X-Filename': chosen.name, 'Content-Type': 'application/octet-stream'}});
  const data = await response.json();
  if (!response.ok) { $('error').textContent = data.error; $('answer').textContent = '';
    document.body.dataset.state = 'error'; return; }
  show(data);
}
</script></body></html>
"""
