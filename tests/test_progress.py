"""Progress of long CLI work (prism/progress.py): rewritten in place on a
terminal, plain throttled lines elsewhere; the replay's line says the share
of ended requests within SLO so far (prism bench)."""

from __future__ import annotations

import io

from prism.progress import Progress, bar
from prism.workload.replay import RequestResult, progress_text


class FakeTerminal(io.StringIO):
    """A stream that says it is a terminal (for the in-place line): not a real one."""

    def isatty(self) -> bool:
        return True


def test_plain_lines_off_a_terminal_are_throttled_and_the_last_is_kept():
    now = [0.0]
    out = io.StringIO()
    progress = Progress(out, every_s=10.0, clock=lambda: now[0])
    for step in range(25):
        now[0] = float(step)
        progress.update(f"step {step}")
    progress.close()
    assert out.getvalue().splitlines() == ["step 0", "step 10", "step 20", "step 24"]
    assert "\r" not in out.getvalue()


def test_on_a_terminal_one_line_is_rewritten():
    out = FakeTerminal()
    progress = Progress(out)
    progress.update("a")
    progress.update("b")
    progress.close("done")
    assert out.getvalue() == "\r\033[Ka\r\033[Kb\r\033[Kdone\n"


def test_the_replay_line_counts_what_ended():
    results = [RequestResult(i, "m", 0.0, 8, 8) for i in range(4)]
    assert "0/4 requests, none ended yet, 0 errors" in progress_text(results, 0, 0.0)
    results[0].attained = True
    results[1].error = "http 503"
    text = progress_text(results, 2, 3.2)
    assert text.startswith(bar(2, 4)) and "2/4 requests, 50.0% within SLO, 1 errors, 3s" in text
