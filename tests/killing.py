"""Killing a training subprocess at a chosen point (the resume tests of both models)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable


def sigkill_when(
    proc: subprocess.Popen, ready: Callable[[], bool], what: str, timeout_s: float = 120
) -> None:
    """SIGKILL ``proc`` as soon as ``ready()``; fails if it ended by itself first or ``what`` never came."""
    try:
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else proc.returncode
            assert time.monotonic() < deadline, f"no {what} in time"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
