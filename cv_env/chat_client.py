"""A small client for OpenAI-compatible `/v1/chat/completions` endpoints, shared by the LLM judge
(`cv_env.judge`) and the served-model backend (`agents.openai_backend`).

    client = ChatClient("http://127.0.0.1:8000/v1", timeout_s=30, retries=2)
    response = client.post({"model": "Qwen/Qwen2.5-VL-7B-Instruct", "messages": [...]})
    response.data["choices"][0]["message"], response.attempts, response.latency_s

What it promises, whatever the server does:

* One deadline per attempt (`timeout_s`, connect to last byte), enforced by a watchdog even
  against a server that trickles bytes, and a bounded reply size (`max_reply_bytes`).
* Timeouts, connection errors, HTTP 429 and 5xx are retried (`retries` more attempts) with
  exponential backoff and jitter; a `Retry-After` header stretches the wait (up to
  `max_retry_after_s`). At most `max_concurrency` requests are in flight over all threads.
* Everything else fails at once with an `EndpointError` whose `kind` says which: "unavailable"
  (the retries ran out), "http" (another status: 400, 401, 404, ...; `status` and the server's
  own words in the message) or "reply" (HTTP 200 whose body is not a JSON object within bounds).

Only the standard library is used (http.client), so the environment stays dependency-light.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import threading
import time
import urllib.parse
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ChatClient", "ChatResponse", "EndpointError", "api_key_from_env", "chat_completions_url"]

MAX_REPLY_BYTES = 16 << 20  # a chat completion is far smaller; a bound keeps a broken server from filling memory
ERROR_EXCERPT_CHARS = 300  # how much of a refusal's body an error message quotes


def chat_completions_url(url: str) -> str:
    """The chat-completions URL of an endpoint base ("http://host:8000/v1") or of the full URL."""
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def config_from_mapping(cls, d: Mapping[str, Any], what: str):
    """The settings dataclass `cls` from a mapping (e.g. a Hydra node); unknown keys raise a
    ValueError naming them and every valid one (`what`: how the message calls a key)."""
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(valid))
    if unknown:
        raise ValueError(f"unknown {what}(s) {unknown}; valid: {', '.join(valid)}")
    return cls(**dict(d))


def api_key_from_env(name: str | None, setting: str) -> str | None:
    """The API key in the environment variable `name` (None: no auth); a clear error when unset.

    setting: how the user names the option, for the message (e.g. "judge api_key_env").
    """
    if name is None:
        return None
    key = os.environ.get(name)
    if not key:
        raise ValueError(f"{setting}={name!r} but that environment variable is not set: export it, or set "
                         f"{setting.split()[-1]} to null for an endpoint without auth")
    return key


@dataclass(frozen=True)
class ChatResponse:
    """An HTTP 200 reply: its JSON object, the attempts it took and the seconds they took."""

    data: dict[str, Any]
    attempts: int
    latency_s: float


class EndpointError(Exception):
    """A request that got no usable reply. kind: "unavailable" | "http" | "reply" (module docstring)."""

    def __init__(self, message: str, kind: str, attempts: int, status: int | None = None):
        super().__init__(message)
        self.kind, self.attempts, self.status = kind, attempts, status


class _Retry(Exception):
    """This attempt failed in a way another attempt may not (timeout, connection, 429/5xx)."""

    def __init__(self, message: str, wait_s: float = 0.0):
        super().__init__(message)
        self.wait_s = wait_s


class ChatClient:
    """POSTs JSON to one chat-completions endpoint under the guarantees of the module docstring.

    Thread-safe: one client serves every thread (its `max_concurrency` bounds them all).
    """

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 30.0, retries: int = 2,
                 backoff_s: float = 0.5, max_concurrency: int = 16, max_reply_bytes: int = MAX_REPLY_BYTES,
                 max_retry_after_s: float = 60.0):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"endpoint url {url!r} must start with http:// or https://")
        self.endpoint = chat_completions_url(url)
        self._url = urllib.parse.urlsplit(self.endpoint)
        self._api_key = api_key
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), int(retries), float(backoff_s)
        self.max_reply_bytes, self.max_retry_after_s = int(max_reply_bytes), float(max_retry_after_s)
        self._slots = threading.BoundedSemaphore(int(max_concurrency))

    def post(self, payload: dict[str, Any]) -> ChatResponse:
        """Send `payload`; the reply's JSON object, or an `EndpointError` (never another exception)."""
        body = json.dumps(payload).encode("utf-8")
        start = time.monotonic()
        last, wait_s = "no attempt", 0.0
        for attempt in range(1, self.retries + 2):
            if attempt > 1:
                delay = self.backoff_s * 2 ** (attempt - 2) * (1 + 0.5 * random.random())  # jitter spreads retries
                time.sleep(max(delay, min(wait_s, self.max_retry_after_s)))
            try:
                with self._slots:
                    status, raw, headers = self._attempt(body)
            except _Retry as error:
                last, wait_s = str(error), error.wait_s
                continue
            except EndpointError as error:  # a reply over the size bound, on this attempt
                error.attempts = attempt
                raise
            if status == 429 or status >= 500:
                last, wait_s = f"HTTP {status}", _retry_after(headers)
                continue  # overloaded or failing server: worth another try
            if status != 200:
                raise EndpointError(f"HTTP {status} from {self.endpoint}: {_excerpt(raw)}", "http", attempt, status)
            return ChatResponse(self._json_object(raw, attempt), attempt, time.monotonic() - start)
        raise EndpointError(f"no answer from {self.endpoint} after {self.retries + 1} attempts ({last})",
                            "unavailable", self.retries + 1)

    def _json_object(self, raw: bytes, attempt: int) -> dict[str, Any]:
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            data = None
        if not isinstance(data, dict):
            raise EndpointError(f"the reply of {self.endpoint} is not a JSON object: {_excerpt(raw)}", "reply", attempt)
        return data

    def _attempt(self, body: bytes) -> tuple[int, bytes, http.client.HTTPMessage]:
        """One POST under one deadline: (status, body, headers). Raises `_Retry` on timeouts and
        network errors, `EndpointError` for a reply over the size bound."""
        deadline = time.monotonic() + self.timeout_s
        connection_type = http.client.HTTPSConnection if self._url.scheme == "https" else http.client.HTTPConnection
        connection = connection_type(self._url.hostname, self._url.port, timeout=self.timeout_s)
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        path = self._url.path + (f"?{self._url.query}" if self._url.query else "")
        watchdog = None
        try:
            connection.connect()
            # The socket timeout bounds each wait; the watchdog bounds the whole attempt, so a
            # server that sends a byte now and then cannot hold a thread past the deadline.
            watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), _shut, args=(connection.sock,))
            watchdog.daemon = True
            watchdog.start()
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            chunks, size = [], 0
            while chunk := response.read1(65536):
                size += len(chunk)
                if size > self.max_reply_bytes:
                    raise EndpointError(f"the reply of {self.endpoint} is larger than {self.max_reply_bytes} bytes",
                                        "reply", 1)
                if time.monotonic() >= deadline:
                    raise TimeoutError
                chunks.append(chunk)
            if time.monotonic() >= deadline:
                raise TimeoutError
            return response.status, b"".join(chunks), response.headers
        except (OSError, http.client.HTTPException) as error:  # timeouts, refused, reset, cut off
            late = time.monotonic() >= deadline
            raise _Retry(f"no complete reply within {self.timeout_s:g} s" if late
                         else f"{type(error).__name__}: {error}") from None
        finally:
            if watchdog is not None:
                watchdog.cancel()
            connection.close()


def _retry_after(headers: http.client.HTTPMessage) -> float:
    """Seconds a `Retry-After` header asks to wait (0 when absent or not a number of seconds)."""
    try:
        return max(0.0, float(headers.get("Retry-After", 0)))
    except (TypeError, ValueError):
        return 0.0


def _excerpt(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace").strip()
    return repr(text[:ERROR_EXCERPT_CHARS] + ("..." if len(text) > ERROR_EXCERPT_CHARS else ""))


def _shut(sock: socket.socket) -> None:
    """Wake a read blocked on `sock` (the deadline passed)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed
