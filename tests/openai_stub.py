"""A loopback OpenAI-compatible chat-completions server whose replies a Python function decides:
the stand-in for a served model in tests/test_served.py and bench/bench_served.py.

    def reply(mode, body, nth):            # mode: the first path segment of the request URL
        return {"role": "assistant", "content": "<answer>7</answer>"}
    with StubChatServer(reply) as server:
        server.url("good")                 # http://127.0.0.1:<port>/good/v1
        server.requests                    # every request: {"mode", "body", "auth"}
        server.max_inflight["good"]        # the most requests of a mode answered at once

A reply function returns a message (wrapped into a chat completion with usage), a `Raw` reply
(any status, bytes and headers) or `HANG` (read the request, never answer until the server stops).
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

HANG = object()
USAGE = {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}


@dataclass(frozen=True)
class Raw:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def completion(message: dict[str, Any], finish_reason: str = "stop") -> bytes:
    return json.dumps({"id": "stub", "object": "chat.completion", "model": "stub",
                       "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
                       "usage": USAGE}).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass

    def do_POST(self):
        server: StubChatServer = self.server.stub
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        mode = self.path.strip("/").split("/")[0]
        with server.lock:
            server.requests.append({"mode": mode, "body": body, "auth": self.headers.get("Authorization")})
            server.counts[mode] += 1
            nth = server.counts[mode]
            server.inflight[mode] += 1
            server.max_inflight[mode] = max(server.max_inflight[mode], server.inflight[mode])
        try:
            reply = server.reply(mode, body, nth)
            if reply is HANG:
                server.release.wait(60)
                return
            raw = reply if isinstance(reply, Raw) else Raw(200, completion(reply))
            self.send_response(raw.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw.body)))
            for key, value in raw.headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(raw.body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test)
        finally:
            with server.lock:
                server.inflight[mode] -= 1


class _Server(ThreadingHTTPServer):
    # A real server's listen backlog (uvicorn: 2048), not socketserver's 5: a burst of concurrent
    # connections past 5 would have its SYNs dropped and retried a second later.
    request_queue_size = 1024


class StubChatServer:
    """The server (a context manager): starts on a free loopback port, stops on exit."""

    def __init__(self, reply: Callable[[str, dict, int], Any]):
        self.reply = reply
        self.requests: list[dict[str, Any]] = []
        self.counts: Counter = Counter()
        self.lock, self.release = threading.Lock(), threading.Event()
        self.inflight: Counter = Counter()  # requests being answered now, per mode
        self.max_inflight: Counter = Counter()  # the most at once, per mode
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.stub = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def url(self, mode: str = "default") -> str:
        return f"http://127.0.0.1:{self._httpd.server_port}/{mode}/v1"

    def __enter__(self) -> "StubChatServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()  # hanging handlers return
        self._httpd.shutdown()
        self._httpd.server_close()
