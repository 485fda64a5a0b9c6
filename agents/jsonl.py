"""JSON-lines helpers shared by trajectory and transcript files (no torch)."""

from __future__ import annotations

import json
import os


def json_lines(path: str | os.PathLike):
    """Yield the JSON object of each non-empty line; a bad line is an error naming file and line."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number} is not a JSON line ({error.msg})") from error


def safe_name(text: str) -> str:
    """A file-name-safe stem for `text` (used for image files next to a JSONL)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:120]
