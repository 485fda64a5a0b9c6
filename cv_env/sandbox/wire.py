"""The wire between the host and a sandbox process: length-prefixed JSON messages.

Both directions use one framing (a 4-byte big-endian length, then UTF-8 JSON); nothing is ever
pickled. The two ends do not trust each other equally:

* a worker reads the host's requests with `recv_msg` (the host is trusted);
* the host reads a worker's replies with `recv_reply`, which assumes the worker is hostile:
  one deadline for the whole message (a worker that drips one byte at a time cannot hold the
  host past it), a size bound checked before the body is read, and `parse_json`, which refuses
  non-finite numbers, huge integers and nesting deeper than the interpreter can parse.
"""

from __future__ import annotations

import json
import math
import socket
import struct
import time
from typing import Any

HEADER = struct.Struct("!I")
MAX_MESSAGE = 8 * 1024 * 1024


class WireError(ValueError):
    """A reply that breaks the protocol (oversized, not JSON, non-finite numbers, ...)."""


def send_msg(sock: socket.socket, obj: Any) -> None:
    """Send one message (blocking until written)."""
    data = json.dumps(obj, allow_nan=False).encode()
    sock.sendall(HEADER.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int, deadline: float | None) -> bytes | None:
    """`n` bytes, or None at end of stream; `TimeoutError` once `deadline` (monotonic) passes."""
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the peer did not send the whole message in time")
            sock.settimeout(remaining)
        try:
            chunk = sock.recv(n - len(buf))
        except socket.timeout:
            raise TimeoutError("the peer did not send the whole message in time") from None
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def recv_msg(sock: socket.socket, limit: int = MAX_MESSAGE, deadline: float | None = None) -> Any:
    """One message, or None at end of stream (a peer that closed or died).

    Raises `TimeoutError` when the whole message has not arrived by `deadline` (monotonic
    seconds), and `WireError` when it is larger than `limit` bytes or not valid bounded JSON.
    """
    head = _recv_exact(sock, HEADER.size, deadline)
    if head is None:
        return None
    (n,) = HEADER.unpack(head)
    if n > limit:
        raise WireError(f"a message of {n} bytes exceeds the {limit}-byte limit")
    body = _recv_exact(sock, n, deadline)
    if body is None:
        return None
    return parse_json(body)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise WireError(f"a non-finite number ({text[:20]}) is not allowed")
    return value


def _no_constant(name: str) -> float:
    raise WireError(f"{name} is not allowed")


def parse_json(data: bytes) -> Any:
    """JSON with finite numbers only; nesting or integers too large to parse are a `WireError`."""
    try:
        return json.loads(data, parse_float=_finite_float, parse_constant=_no_constant)
    except WireError:
        raise
    except (ValueError, RecursionError, MemoryError) as exc:  # UnicodeDecodeError is a ValueError
        raise WireError(f"not a valid message ({type(exc).__name__})") from None
