"""``videotuna review --serve``: the page on 127.0.0.1, every label written atomically to labels.json.

The server answers only for the page's own files, its plots and the dataset's videos (by number, never by a
path from the request); a path with ``..`` is refused. Requests must name this server's host (127.0.0.1 or
localhost with its port), and labels are accepted only as JSON, so another web page cannot post labels.
"""

from __future__ import annotations

import errno
import json
import mimetypes
import re
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import unquote, urlsplit

from videotuna_dpo.errors import UserError
from videotuna_dpo.fileio import write_json_atomic
from videotuna_dpo.review.labels import Label, check_identity, labels_document, pair_key, parse_entry, read_labels

HOST = "127.0.0.1"
MAX_POST_BYTES = 1 << 20  # one label is a few hundred bytes
_VIDEO = re.compile(r"/video/(\d+)")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".png": "image/png", ".json": "application/json"}


class LabelStore:
    """The labels of one page, kept in memory and written whole (atomically) to ``path`` on every change."""

    def __init__(self, path: Path, kind: str, dataset: str, videos: list[dict[str, Any]], files: list[str]):
        self.path, self.kind, self.dataset = path, kind, dataset
        self.sha = {v["path"]: v["sha256"] for v in videos}
        self.lock = threading.Lock()
        self.labels: dict[frozenset[str], Label] = {}
        if path.is_file():
            existing = read_labels(path, kind)
            by_file = {v["path"]: f for v, f in zip(videos, files)}
            sha_of_file = {f: v["sha256"] for v, f in zip(videos, files)}
            check_identity(existing, by_file, f"the data of this page ({dataset})", sha256=lambda f: sha_of_file[str(f)])
            self.labels = {pair_key(label): label for label in existing.labels}

    def document(self) -> dict[str, Any]:
        with self.lock:
            return labels_document(self.kind, self.dataset, self.labels.values())

    def _check(self, label: Label) -> None:
        for role, ref in zip(label.roles, label.refs):
            if ref.path not in self.sha:
                raise UserError(f"label: {role} video {ref.path} is not a video of this page")
            if self.sha[ref.path] != ref.sha256:
                raise UserError(f"label: {role} video {ref.path} has sha256 {self.sha[ref.path][:12]}... on this page, "
                                f"not {ref.sha256[:12]}...")

    def update(self, body: Any) -> int:
        """Apply ``{"set": label}`` or ``{"clear": [path, path]}`` and write the file; returns the label count."""
        if isinstance(body, Mapping) and "set" in body:
            label = parse_entry(body["set"], self.kind, "label")
            self._check(label)
            with self.lock:
                self.labels[pair_key(label)] = label
                return self._write()
        clear = body.get("clear") if isinstance(body, Mapping) else None
        if isinstance(clear, list) and len(clear) == 2 and all(isinstance(p, str) for p in clear):
            with self.lock:
                self.labels.pop(frozenset(clear), None)
                return self._write()
        raise UserError('expected {"set": <label>} or {"clear": [<video path>, <video path>]}')

    def _write(self) -> int:
        write_json_atomic(self.path, labels_document(self.kind, self.dataset, self.labels.values()))
        return len(self.labels)


class ReviewServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, out: Path, page: Mapping[str, Any], labels_path: Path, port: int):
        data = page["data"]
        self.routes: dict[str, Path] = {f"/{name}": out / name for name in ("index.html", "review.css", "review.js",
                                                                              "review-data.js")}
        self.routes["/"] = out / "index.html"
        self.routes.update({f"/{p['src']}": out / p["src"] for p in data["plots"]})
        self.videos = [Path(f) for f in page["media"]]  # a video's browser preview where it has one
        self.store = LabelStore(labels_path, data["kind"], data["dataset"], data["videos"], page["files"])
        try:
            super().__init__((HOST, port), ReviewHandler)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UserError(f"--port {port}: {HOST}:{port} is in use (another review server?); give another "
                                f"--port, or --port 0 for any free one") from None
            raise UserError(f"--port {port}: cannot listen on {HOST}:{port} ({exc.strerror or exc})") from None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}/"


class ReviewHandler(BaseHTTPRequestHandler):
    server: ReviewServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass  # one line per video range request would bury the URL the user needs

    def _send(self, status: int, body: bytes, content_type: str, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, value: Any) -> None:
        self._send(status, json.dumps(value).encode(), "application/json")

    def _error(self, status: HTTPStatus, message: str) -> None:
        self._json(status, {"error": message})

    def _path(self) -> str | None:
        """The request's path, or None (answered) when it names another host or leaves the page's files."""
        port = self.server.server_address[1]
        if self.headers.get("Host") not in (f"{HOST}:{port}", f"localhost:{port}"):
            self._error(HTTPStatus.FORBIDDEN, "this server answers requests for its own address only")
            return None
        path = unquote(urlsplit(self.path).path)
        if ".." in path.split("/") or "\\" in path or "\x00" in path:
            self._error(HTTPStatus.FORBIDDEN, "outside the dataset: only the page, its plots and the dataset's videos "
                                              "are served")
            return None
        return path

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self._path()
        if path is None:
            return
        if path == "/api/labels":
            self._json(HTTPStatus.OK, self.server.store.document())
            return
        match = _VIDEO.fullmatch(path)
        if match and int(match.group(1)) < len(self.server.videos):
            self._file(self.server.videos[int(match.group(1))], ranges=True)
        elif path in self.server.routes:
            self._file(self.server.routes[path])
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such file: {path}")

    do_HEAD = do_GET

    def _file(self, path: Path, ranges: bool = False) -> None:
        try:
            data = path.read_bytes()
        except OSError as exc:
            self._error(HTTPStatus.NOT_FOUND, f"cannot read {path.name}: {exc.strerror or exc}")
            return
        kind = TYPES.get(path.suffix.lower()) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        match = _RANGE.fullmatch(self.headers.get("Range", "")) if ranges else None
        if match and (match.group(1) or match.group(2)):
            start, end = match.group(1), match.group(2)
            if start:
                first, last = int(start), min(int(end) if end else len(data) - 1, len(data) - 1)
            else:  # a suffix range: the last N bytes
                first, last = max(0, len(data) - int(end)), len(data) - 1
            if first > last or first >= len(data):
                self._send(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, b"", kind, {"Content-Range": f"bytes */{len(data)}"})
                return
            self._send(HTTPStatus.PARTIAL_CONTENT, data[first:last + 1], kind,
                       {"Accept-Ranges": "bytes", "Content-Range": f"bytes {first}-{last}/{len(data)}"})
            return
        self._send(HTTPStatus.OK, data, kind, {"Accept-Ranges": "bytes"} if ranges else None)

    def do_POST(self) -> None:  # noqa: N802
        path = self._path()
        if path is None:
            return
        if path != "/api/labels":
            self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: {path}")
            return
        if self.headers.get_content_type() != "application/json":
            self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "labels are posted as application/json")
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 < length <= MAX_POST_BYTES:
            self._error(HTTPStatus.BAD_REQUEST, f"expected a JSON body of 1..{MAX_POST_BYTES} bytes")
            return
        try:
            body = json.loads(self.rfile.read(length))
            count = self.server.store.update(body)
        except ValueError as exc:
            self._error(HTTPStatus.BAD_REQUEST, f"malformed JSON: {exc}")
            return
        except UserError as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))
            return
        except OSError as exc:
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"cannot write {self.server.store.path}: {exc.strerror or exc}")
            return
        self._json(HTTPStatus.OK, {"labels": count, "file": str(self.server.store.path)})


def serve(out: Path, page: Mapping[str, Any], labels_path: Path, port: int) -> int:
    """Serve the page written under ``out`` until interrupted (Ctrl-C)."""
    server = ReviewServer(out, page, labels_path, port)
    print(f"serving {page['pairs']} pairs on {server.url} (labels are written to {labels_path}); Ctrl-C stops",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0
