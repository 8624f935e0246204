"""Console progress line and the JSON-lines training log."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from .checkpoint import WorkDirError, write_failure

__all__ = ["ProgressBar", "JsonLinesLog", "format_duration", "json_safe", "read_json_lines"]


def format_duration(seconds: float) -> str:
    """1:02:03 / 2:03 style."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressBar:
    """One status line on a stream (stderr by default).

    On a terminal the line is redrawn in place with "\\r" (at most ~10 times a
    second); otherwise (CI logs, files) a full line is written every
    `line_interval` steps and at the last step.
    """

    def __init__(self, total: int, *, stream: TextIO | None = None, line_interval: int = 50,
                 enabled: bool = True, is_tty: bool | None = None, prefix: str = ""):
        self.total, self.line_interval, self.enabled, self.prefix = total, max(1, line_interval), enabled, prefix
        self.stream = stream if stream is not None else sys.stderr
        self.is_tty = is_tty if is_tty is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_draw = 0.0
        self._width = 0

    def update(self, step: int, fields: dict[str, str], force: bool = False) -> None:
        """Show `step`/total and the fields ("loss": "0.532", ...)."""
        if not self.enabled:
            return
        text = f"{self.prefix}{step}/{self.total} " + " | ".join(f"{k} {v}" for k, v in fields.items())
        if self.is_tty:
            now = time.monotonic()
            if not force and step != self.total and now - self._last_draw < 0.1:
                return
            self._last_draw = now
            pad = " " * max(0, self._width - len(text))
            self._width = len(text)
            self.stream.write("\r" + text + pad)
        elif force or step % self.line_interval == 0 or step == self.total:
            self.stream.write(text + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """Print a full line (e.g. a validation result) without garbling the status line."""
        if not self.enabled:
            return
        if self.is_tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.is_tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0


def json_safe(value: Any) -> Any:
    """`value` with non-finite floats replaced by None, recursively (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class JsonLinesLog:
    """Appends one JSON object per line (non-finite floats become null), flushed per record."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(json_safe(record), sort_keys=False) + "\n")
        except OSError as exc:
            raise WorkDirError(write_failure(exc, self.path)) from None

    def truncate_after(self, iteration: int) -> None:
        """Drop records past `iteration`: a resumed run logs again what the interrupted one did after its checkpoint."""
        if not self.path.exists():
            return
        kept = [r for r in read_json_lines(self.path) if r.get("iter", 0) <= iteration]
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "w") as f:
                for record in kept:
                    f.write(json.dumps(record) + "\n")
            tmp.replace(self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise WorkDirError(write_failure(exc, self.path)) from None


def read_json_lines(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file (a torn last line from a crash is skipped)."""
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
