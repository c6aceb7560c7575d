"""What the crash-and-resume tests share: the fork server of ``_stage_runner.py`` that starts a
stage run in its own process and SIGKILLs it, and readers of the tables it leaves."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import suppress
from pathlib import Path

import torch
from prefect.settings import PREFECT_API_URL

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SEEDS = (0, 1, 2)
CONCURRENCY = 4


class Runner:
    """The fork server of ``_stage_runner.py``: starts a stage run, kills it when told."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": PREFECT_API_URL.value()}
        self.proc = subprocess.Popen([sys.executable, str(HERE / "_stage_runner.py")], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.ready = False  # its imports overlap with the reference runs; the first start waits for them
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def _next(self, timeout: float) -> dict:
        msg = self.lines.get(timeout=timeout)
        assert msg is not None, "the stage runner died"
        return msg

    def start(self, stage: str, config: dict, log: Path) -> int:
        if not self.ready:
            assert self._next(180) == {"ready": True}
            self.ready = True
        job = {"stage": stage, "config": config, "threads": torch.get_num_threads(), "log": str(log)}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return self._next(60)["pid"]

    def kill_after(self, pid: int, log: Path, progressed, delay: float, timeout: float = 120) -> None:
        """SIGKILL the run ``delay`` s after ``progressed()`` turns true; fail if it ended by itself first."""
        deadline = time.monotonic() + timeout
        while not progressed():
            assert self.lines.empty(), f"the run ended before doing the work to kill it in:\n{tail(log)}"
            assert time.monotonic() < deadline, f"no progress in {timeout} s:\n{tail(log)}"
            time.sleep(0.005)
        time.sleep(delay)
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self.expect_killed(pid, log)

    def expect_killed(self, pid: int, log: Path) -> None:
        end = self._next(60)
        assert end == {"pid": pid, "exit": None, "signal": signal.SIGKILL}, (
            f"{end}: not killed mid-run\n{tail(log)}"
        )

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def tail(log: Path, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else "(no log)"


def copy_root(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def unique(table, key: list[str]):
    """The table sorted by ``key``, after checking that no key occurs twice."""
    assert len(table.group_by(key).aggregate([])) == table.num_rows, f"duplicate keys {key}"
    return table.sort_by([(k, "ascending") for k in key])


