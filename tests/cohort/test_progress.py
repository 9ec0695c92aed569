"""Progress reports: a bar on a terminal, periodic lines in a batch log."""

from __future__ import annotations

from kneebatch.cohort.outcome import SubjectOutcome
from kneebatch.cohort.progress import Progress


def test_batch_log_gets_a_line_every_n_subjects() -> None:
    lines: list[str] = []
    progress = Progress(10, lines.append, tty=False, every_n=4, every_s=1e9)
    for i in range(10):
        progress(SubjectOutcome(f"s{i}", "finished" if i != 3 else "failed", error=None if i != 3 else "bad"))
    assert len(lines) == 3  # after 4, 8 and the last
    assert lines[-1].startswith("progress: 10/10 done (9 ok, 1 failed)")
    assert "knees/h" in lines[0] and "ETA" in lines[0]


def test_terminal_bar_is_redrawn_in_place() -> None:
    out: list[str] = []
    progress = Progress(2, out.append, tty=True)
    progress(SubjectOutcome("a", "finished"))
    progress(SubjectOutcome("b", "finished"))
    assert out[0].startswith("\r[###############...............] 1/2")
    assert out[-1] == "\n"
