"""Real servers on 127.0.0.1 for the remote tests and benchmark: an S3 API server (moto's server mode) and a
static HTTP server with Range support, both counting requests, adding latency, and injecting faults."""

from __future__ import annotations

import dataclasses
import email.utils
import http.server
import os
import re
import threading
import time
from typing import Any


@dataclasses.dataclass
class Faults:
    """What the HTTP server does wrong, for the next ``count`` GETs (or always with ``count=-1``)."""

    kind: str = ""  # "500", "reset", "truncate", "ignore-range", "slow"
    count: int = 0
    slow: float = 0.0

    def take(self) -> str:
        if self.count == 0:
            return ""
        if self.count > 0:
            self.count -= 1
        return self.kind


class RangeServer:
    """Files under ``root`` over HTTP/1.1 on 127.0.0.1: HEAD, GET with ``Range``, ETag and ``If-Match``."""

    def __init__(self, root: str, delay: float = 0.0) -> None:
        self.root, self.delay = root, delay
        self.faults = Faults()
        self.log: list[tuple[str, str, str]] = []  # (method, path, range)
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _serve(self, body: bool) -> None:
                rng = self.headers.get("Range", "")
                with server._lock:
                    server.log.append((self.command, self.path, rng))
                    fault = server.faults.take() if body else ""
                if server.delay:
                    time.sleep(server.delay)
                path = os.path.join(server.root, self.path.lstrip("/").split("?")[0])
                if not os.path.isfile(path):
                    self.send_error(404)
                    return
                st = os.stat(path)
                etag = f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
                if fault == "500":
                    self.send_error(503)
                    return
                if fault == "reset":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fault == "slow":
                    time.sleep(server.faults.slow)
                match = self.headers.get("If-Match")
                if match and match not in ("*", etag):
                    self.send_error(412)
                    return
                with open(path, "rb") as f:
                    data = f.read()
                m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng)
                if m and fault != "ignore-range":
                    start, end = int(m[1]), min(int(m[2]) + 1 if m[2] else len(data), len(data))
                    part = data[start:end]
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
                else:
                    part = data
                    self.send_response(200)
                self.send_header("Content-Length", str(len(part)))
                self.send_header("ETag", etag)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True))
                self.end_headers()
                if body:
                    if fault == "truncate":
                        self.wfile.write(part[: len(part) // 2])
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    self.wfile.write(part)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def gets(self) -> list[tuple[str, str, str]]:
        with self._lock:
            return [r for r in self.log if r[0] == "GET"]

    def sent(self, since: int = 0) -> int:
        """Bytes sent for the GETs from the ``since``-th on (a whole file for a GET with no range)."""
        sent = 0
        for _, path, byte_range in self.gets()[since:]:
            if byte_range:
                lo, hi = byte_range.removeprefix("bytes=").split("-")
                sent += int(hi) - int(lo) + 1
            elif os.path.isfile(os.path.join(self.root, path.lstrip("/"))):  # not a probe for a later version
                sent += os.path.getsize(os.path.join(self.root, path.lstrip("/")))
        return sent

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class S3Server:
    """moto's S3 API on 127.0.0.1 (its werkzeug app), counting requests and adding ``delay`` to each.

    In this process (the tests, which read its request log), or in a process of its own (``separate``: the
    benchmark, whose timings must not share a GIL with the server; then :meth:`gets` is not available and the
    delay is fixed at start).
    """

    def __init__(self, delay: float = 0.0, separate: bool = False) -> None:
        self._process = None
        if separate:
            import subprocess
            import sys

            self._process = subprocess.Popen(
                [sys.executable, __file__, "s3", str(delay)], stdout=subprocess.PIPE, text=True
            )
            assert self._process.stdout is not None
            self.url = self._process.stdout.readline().strip()
            return
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import WSGIRequestHandler, make_server

        class Quiet(WSGIRequestHandler):
            def log_request(self, *args: Any) -> None:
                pass

        app = DomainDispatcherApplication(create_backend_app)
        self.delay = delay
        self.refusing = False  # answer writes with 403, as a store whose credentials expired
        self.log: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()

        def counted(environ: dict[str, Any], start_response: Any) -> Any:
            with self._lock:
                self.log.append((environ["REQUEST_METHOD"], environ["PATH_INFO"], environ.get("HTTP_RANGE", "")))
            if self.delay:
                time.sleep(self.delay)
            if self.refusing and environ["REQUEST_METHOD"] in ("PUT", "POST", "DELETE"):
                start_response("403 Forbidden", [("Content-Type", "application/xml")])
                return [b"<Error><Code>AccessDenied</Code><Message>writes refused</Message></Error>"]
            return app(environ, start_response)

        self._server = make_server("127.0.0.1", 0, counted, threaded=True, request_handler=Quiet)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def storage_options(self) -> dict[str, Any]:
        return {
            "endpoint_url": self.url,
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"region_name": "us-east-1"},
        }

    def filesystem(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options())

    def bucket(self, name: str) -> None:
        import boto3

        boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        ).create_bucket(Bucket=name)

    def gets(self) -> list[tuple[str, str, str]]:
        with self._lock:
            return [r for r in self.log if r[0] == "GET"]

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait()
            return
        self._server.shutdown()
        self._server.server_close()


if __name__ == "__main__":  # python servers.py s3 DELAY: serve until terminated, the URL on the first line
    import sys

    server = S3Server(float(sys.argv[2]))
    print(server.url, flush=True)
    server._thread.join()
