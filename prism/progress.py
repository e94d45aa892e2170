"""Progress of long CLI work: one line rewritten in place on a terminal,
plain lines (at most one every `every_s`, and the last) anywhere else, so a
log or a CI job shows progress without a thousand carriage returns."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def bar(done: int, total: int, width: int = 30) -> str:
    filled = width * done // max(1, total)
    return f"[{'#' * filled}{'.' * (width - filled)}]"


class Progress:
    def __init__(self, stream: TextIO | None = None, every_s: float = 10.0, clock=time.monotonic):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = every_s
        self.clock = clock
        self._last_line_at: float | None = None
        self._pending = ""  # the newest text not yet written (plain lines only)

    def update(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()
            return
        now = self.clock()
        if self._last_line_at is None or now - self._last_line_at >= self.every_s:
            self._write_line(text, now)
        else:
            self._pending = text

    def close(self, text: str | None = None) -> None:
        """Ends the progress: the last text (or `text`) stays on its own line."""
        if self.tty:
            if text is not None:
                self.stream.write("\r\033[K" + text)
            self.stream.write("\n")
            self.stream.flush()
            return
        last = text if text is not None else self._pending
        if last:
            self._write_line(last, self.clock())

    def _write_line(self, text: str, now: float) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()
        self._last_line_at = now
        self._pending = ""
