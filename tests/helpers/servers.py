"""Local network endpoints for the tracker tests, all on 127.0.0.1: a port that refuses connections, one
that accepts and never answers, and a small stand-in for an MLflow tracking server that can fall silent
mid-run. Nothing here reaches beyond the machine."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


def refused_port() -> int:
    """A port nothing listens on (bound, then closed): a connection to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def silent_port():
    """A port that accepts every connection and never sends a byte (a hung server); yields the port."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:  # closed: the test is over
                return
    threading.Thread(target=accept, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        server.close()
        for conn in held:
            conn.close()


class FakeMLflow(ThreadingHTTPServer):
    """The few MLflow REST calls coupled_net's tracker makes, answered from memory: an experiment, runs,
    params and metrics (`metrics`: (key, step) pairs logged). `silent_after`: after that many metric
    batches, every request waits without answering until the server is closed (a server that died
    mid-run); None: never."""

    daemon_threads = True

    def __init__(self, silent_after: int | None = None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.silent_after, self.metric_batches = silent_after, 0
        self.runs, self.metrics, self.closing = {}, [], threading.Event()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.closing.set()
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: FakeMLflow

    def log_message(self, *args):  # no request lines on the test's stderr
        pass

    def _answer(self, body: dict | str, status: int = 200) -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _silent(self) -> bool:
        fake = self.server
        if fake.silent_after is not None and fake.metric_batches >= fake.silent_after:
            fake.closing.wait()
            return True
        return False

    def do_GET(self):
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path == "/health":
            return self._answer("OK")
        if self._silent():
            return None
        if url.path.endswith("/experiments/get-by-name"):
            return self._answer({"experiment": {"experiment_id": "1", "name": query["experiment_name"],
                                                "lifecycle_stage": "active"}})
        if url.path.endswith("/runs/get"):
            return self._answer({"run": self.server.runs[query["run_id"]]})
        if url.path.endswith("/metrics/get-history"):
            return self._answer({"metrics": []})
        return self._answer({"error_code": "ENDPOINT_NOT_FOUND", "message": url.path}, 404)

    def do_POST(self):
        url = urlparse(self.path)
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if self._silent():
            return None
        fake = self.server
        if url.path.endswith("/runs/create"):
            run_id = uuid.uuid4().hex
            info = {"run_id": run_id, "run_uuid": run_id, "experiment_id": body.get("experiment_id", "1"),
                    "run_name": body.get("run_name", ""), "status": "RUNNING", "lifecycle_stage": "active",
                    "start_time": body.get("start_time", 0)}
            fake.runs[run_id] = {"info": info, "data": {"params": [], "tags": body.get("tags", [])}}
            return self._answer({"run": fake.runs[run_id]})
        if url.path.endswith("/runs/log-batch"):
            run = fake.runs[body["run_id"]]
            run["data"]["params"] += body.get("params", [])
            if body.get("metrics"):
                fake.metrics += [(m["key"], int(m.get("step", 0))) for m in body["metrics"]]
                fake.metric_batches += 1
            return self._answer({})
        if url.path.endswith("/runs/update"):
            return self._answer({"run_info": fake.runs[body["run_id"]]["info"]})
        return self._answer({"error_code": "ENDPOINT_NOT_FOUND", "message": url.path}, 404)
