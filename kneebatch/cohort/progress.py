"""Progress of a cohort run: a bar on a terminal, a line every N subjects or minutes in a batch log."""

from __future__ import annotations

import time
from collections.abc import Callable

from kneebatch.cohort.outcome import SubjectOutcome


def duration(seconds: float) -> str:
    """``1h05m`` or ``3m07s``."""
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """Counts outcomes and reports them through ``write``.

    Args:
        total: subjects to compute in this run.
        write: where text goes (the CLI passes ``sys.stderr.write``).
        tty: redraw one bar in place; else write a line every ``every_n`` subjects or
            ``every_s`` seconds, whichever comes first.
    """

    def __init__(self, total: int, write: Callable[[str], object], *, tty: bool,
                 every_n: int = 0, every_s: float = 300.0) -> None:
        self.total, self.write, self.tty = total, write, tty
        self.every_n_asked = every_n
        self.every_s = every_s
        self.start(total)

    def start(self, total: int) -> None:
        """Count from now, towards the ``total`` subjects this run computes (not the skipped)."""
        self.total = total
        self.every_n = self.every_n_asked or max(1, total // 20)
        self.ok = self.failed = 0
        self.start_time = self.last_line = time.monotonic()

    def text(self) -> str:
        """``done/total, ok, failed, rate, ETA``."""
        done = self.ok + self.failed
        elapsed = max(time.monotonic() - self.start_time, 1e-9)
        rate = done / elapsed * 3600
        eta = (self.total - done) / (done / elapsed) if done else float("nan")
        eta_text = duration(eta) if done else "?"
        return (f"{done}/{self.total} done ({self.ok} ok, {self.failed} failed), "
                f"{rate:.0f} knees/h, ETA {eta_text}")

    def __call__(self, outcome: SubjectOutcome) -> None:
        if outcome.ok:
            self.ok += 1
        else:
            self.failed += 1
        done = self.ok + self.failed
        if self.tty:
            width = 30
            filled = width * done // max(1, self.total)
            self.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.text()}   ")
            if done == self.total:
                self.write("\n")
            return
        now = time.monotonic()
        if done % self.every_n == 0 or now - self.last_line >= self.every_s or done == self.total:
            self.last_line = now
            self.write(f"progress: {self.text()}\n")
