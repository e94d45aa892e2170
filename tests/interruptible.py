"""A child Python that Ctrl-C (SIGINT) interrupts, without a preexec_fn.

A test run started in the background ignores SIGINT, children inherit that, and a Python started
with SIGINT ignored never turns it into KeyboardInterrupt. Restoring the default in a preexec_fn
forks the test process (it has gRPC's threads) and runs Python between fork and exec: in CI one such
child printed only gRPC's "Epoll1Poller ... Bad file descriptor" and never started the command. The
child here restores the handler itself, first thing, then runs the module as `python -m` would.
"""

from __future__ import annotations

import sys


def interruptible_python(module: str, *args: str) -> list[str]:
    """The command line of `python -m module args...` with Python's own SIGINT handler installed."""
    bootstrap = (
        "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        f"sys.argv = [{module!r}] + sys.argv[1:]; runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    )
    return [sys.executable, "-c", bootstrap, *args]
