"""A small static server for `onnxgen web`: the page, the browser runtime, and one export folder.

    /                       the page (static/index.html)
    /static/...             its script and style
    /vendor/transformers/   transformers.js's bundled browser build (node_modules/@huggingface/transformers/dist)
    /vendor/ort/            onnxruntime-web's WASM files (node_modules/onnxruntime-web/dist)
    /models/NAME/...        the export folder, read by transformers.js as a local model
    /export.json            what the page needs to know about the export (variants, sizes, chat template)

Nothing else is served: a request path is resolved and must stay inside its root (no '..', no symlink
out, no hidden files), and directories are never listed. The page is cross-origin isolated (COOP/COEP),
so onnxruntime-web may use WASM threads.
"""
from __future__ import annotations

import json
import logging
import posixpath
import shutil
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pipeline.errors import UserError
from pipeline.exports import (TRANSFORMERS_JS_DTYPES, read_config, read_json, present_variants, variant_files,
                              variant_path)

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
NODE_MODULES = HERE / "node_modules"
TRANSFORMERS_DIST = NODE_MODULES / "@huggingface" / "transformers" / "dist"
ORT_DIST = NODE_MODULES / "onnxruntime-web" / "dist"
# the one browser bundle the page imports: onnxruntime-web's JavaScript is inside it, its WASM is not
BUNDLE = "transformers.min.js"

MIME = {
    ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
    ".json": "application/json", ".wasm": "application/wasm", ".png": "image/png", ".svg": "image/svg+xml",
    ".jinja": "text/plain; charset=utf-8", ".md": "text/markdown; charset=utf-8", ".txt": "text/plain; charset=utf-8",
}


def runtime_missing() -> str | None:
    """Why the browser runtime cannot be served, or None when it can."""
    for path in (TRANSFORMERS_DIST / BUNDLE, ORT_DIST):
        if not path.exists():
            return (f"{path} does not exist: the browser runtime is installed by `make install` "
                    f"(or `npm ci` in {HERE})")
    return None


def chat_template(folder: Path) -> dict | None:
    """Where the export's chat template is, if it has one: chat_template.jinja (which transformers.js's
    tokenizer does not read by itself, so the page passes it) or tokenizer_config.json's chat_template."""
    if (folder / "chat_template.jinja").is_file():
        return {"file": "chat_template.jinja"}
    tok = folder / "tokenizer_config.json"
    if tok.is_file() and read_json(tok, "tokenizer config").get("chat_template"):
        return {"file": None}
    return None


def describe(folder: Path) -> dict:
    """/export.json: the export as the page sees it."""
    shape = read_config(folder)
    variants = {}
    for v in present_variants(folder):
        files = variant_files(folder, v)
        variants[v] = {"dtype": TRANSFORMERS_JS_DTYPES[v], "files": files,
                       "bytes": sum((folder / f).stat().st_size for f in files)}
    shared = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    return {
        "name": folder.name, "model_path": "/models/", "model_type": shape.model_type, "context": shape.context,
        "layers": shape.layers, "hidden": shape.hidden, "vocab": shape.vocab, "variants": variants,
        "shared_bytes": sum((folder / f).stat().st_size for f in shared if (folder / f).is_file()),
        "chat_template": chat_template(folder),
        "runtime": {"transformers.js": _npm_version("@huggingface/transformers"),
                    "onnxruntime-web": _npm_version("onnxruntime-web")},
    }


def _npm_version(package: str) -> str | None:
    path = NODE_MODULES / package / "package.json"
    return json.loads(path.read_text()).get("version") if path.is_file() else None


def check_export(folder: Path) -> None:
    if not folder.is_dir():
        raise UserError(f"export {folder}: folder does not exist")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if not (folder / name).is_file():
            raise UserError(f"export {folder}: {name} does not exist (transformers.js needs it)")
    if not present_variants(folder):
        raise UserError(f"export {folder}: no graph in onnx/ (expected {variant_path(folder, 'fp32')})")


@dataclass(frozen=True)
class Roots:
    """URL prefix -> folder, and which names in it may be served."""
    export: Path

    def resolve(self, url_path: str) -> Path | None:
        path = posixpath.normpath(unquote(url_path))
        if path in ("/", "/index.html"):
            return STATIC / "index.html"
        for prefix, root, allowed in (
            ("/static/", STATIC, lambda p: True),
            ("/vendor/transformers/", TRANSFORMERS_DIST, lambda p: p.name.startswith("transformers")
             and not p.name.startswith("transformers.node")),
            ("/vendor/ort/", ORT_DIST, lambda p: p.name.startswith("ort-wasm")),
            (f"/models/{self.export.name}/", self.export, lambda p: True),
        ):
            if path.startswith(prefix):
                rel = path[len(prefix):]
                if not rel or any(part.startswith(".") for part in rel.split("/")):
                    return None
                candidate = (root / rel).resolve()
                if candidate.is_relative_to(root.resolve()) and candidate.is_file() and allowed(candidate):
                    return candidate
                return None
        return None


class Handler(BaseHTTPRequestHandler):
    server_version = "onnxgen-web"
    roots: Roots
    export_json: bytes

    def do_GET(self):
        self._serve(body=True)

    def do_HEAD(self):
        self._serve(body=False)

    def _serve(self, body: bool):
        url_path = urlsplit(self.path).path
        if url_path == "/export.json":
            return self._send(HTTPStatus.OK, "application/json", len(self.export_json), body,
                              lambda out: out.write(self.export_json))
        path = self.roots.resolve(url_path)
        if path is None:
            message = b"not found\n"
            return self._send(HTTPStatus.NOT_FOUND, "text/plain", len(message), body, lambda out: out.write(message))
        mime = MIME.get(path.suffix, "application/octet-stream")  # .onnx, .onnx_data and its chunks

        def copy(out):
            with open(path, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
        self._send(HTTPStatus.OK, mime, path.stat().st_size, body, copy)

    def _send(self, status, mime: str, length: int, body: bool, write):
        self.send_response(status)
        self.send_header("Content-Type", mime)
        self.send_header("Content-Length", str(length))
        # cross-origin isolation: SharedArrayBuffer, hence onnxruntime-web's WASM threads
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-cache")  # an export re-made under the same name is re-read
        self.end_headers()
        if body:
            try:
                write(self.wfile)
            except (BrokenPipeError, ConnectionResetError):  # the page was closed mid-download
                pass

    def log_message(self, format, *args):
        log.info("%s %s", self.address_string(), format % args)


def make_server(export: str | Path, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """A server for `export` bound to host:port (port 0: any free port); call serve_forever() on it."""
    folder = Path(export).resolve()
    check_export(folder)
    missing = runtime_missing()
    if missing:
        raise UserError(missing)
    handler = type("ExportHandler", (Handler,), {"roots": Roots(folder),
                                                  "export_json": json.dumps(describe(folder)).encode()})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    server.daemon_threads = True
    return server


def url_of(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/"


def serve_in_thread(export: str | Path, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """For tests and notebooks: the server running in a daemon thread; call shutdown() when done."""
    server = make_server(export, host, port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
