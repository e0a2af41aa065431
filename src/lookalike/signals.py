"""Stopping on SIGTERM: `kill PID` ends a long command at once, or, inside `deferred_sigterm` (training), at the next
safe
point with what a resume needs saved. The library only raises `Terminated`; the CLI installs the handler, prints one
line
and exits 143 (128 + SIGTERM), as a process killed by the signal would."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

EXIT_CODE = 128 + signal.SIGTERM  # 143: what shells report for a process ended by SIGTERM

_state = {"deferred": 0, "pending": False}


class Terminated(BaseException):
    """SIGTERM arrived and the command stopped; `saved` is the checkpoint kept for a resume (None: nothing to resume).

    A BaseException, as KeyboardInterrupt is: no `except Exception` on the way may swallow it."""

    def __init__(self, saved: Path | None = None) -> None:
        super().__init__(f"stopped by SIGTERM; saved {saved}" if saved else "stopped by SIGTERM")
        self.saved = saved


def stop_on_sigterm() -> None:
    """Make SIGTERM raise Terminated in the main thread: at once, or on leaving a `deferred_sigterm` block."""
    _state["pending"] = False
    signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """The SIGTERM handler: remember it; raise unless a deferred block will stop at its next safe point."""
    _state["pending"] = True
    if not _state["deferred"]:
        raise Terminated()


def sigterm_pending() -> bool:
    """Whether a SIGTERM arrived (since stop_on_sigterm) that has not yet stopped the command."""
    return bool(_state["pending"])


@contextmanager
def deferred_sigterm() -> Iterator[None]:
    """Within: SIGTERM only marks itself pending, for the code inside to stop at a safe point (Lightning after a batch);
    a SIGTERM still pending when the block ends raises Terminated there."""
    _state["deferred"] += 1
    try:
        yield
    finally:
        _state["deferred"] -= 1
    if _state["pending"] and not _state["deferred"]:
        raise Terminated()
