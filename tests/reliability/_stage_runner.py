"""Runs stage flows in forked children, one per request, for the crash-and-resume tests.

Why a fork server: a fresh ``python`` pays ~9 s of imports (torch, Prefect, Great Expectations,
LanceDB) before a flow starts, and every kill needs a fresh process. This process imports the
heavy third-party modules once, then forks a child per job, so a kill costs the flow's own
start-up only. LanceDB is deliberately not imported here: it starts an event-loop thread at
import, and a process with threads should not fork; the children import it (and our modules).

Protocol (one JSON object per line): stdin gets ``{"stage": "embed"|"reminders", "config": {...},
"threads": N, "log": PATH}``; stdout answers ``{"pid": PID}`` when the child starts and
``{"pid": PID, "exit": CODE|null, "signal": SIG|null}`` when it ends. A child's own output goes to
``log``. Run with ``PYTHONPATH`` at the repository and ``PREFECT_API_URL`` at the test server.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback

PRELOAD = ("torch", "numpy", "pyarrow", "pyarrow.compute", "PIL.Image", "httpx", "ollama", "pydantic",
           "great_expectations", "lance_namespace", "prefect", "prefect.flows", "prefect.tasks",
           "prefect.futures", "prefect.task_runners", "prefect.cache_policies", "prefect.filesystems",
           "prefect.concurrency.sync")


def run(job: dict) -> None:
    import torch

    torch.set_num_threads(job["threads"])  # the test process's: float sums depend on it
    if job["stage"] == "embed":
        from flows.embed import embed_flow
        from schemas.embed import EmbedConfig

        embed_flow(EmbedConfig(**job["config"]))
    else:
        from flows.reminders import reminders_flow
        from schemas.reminders import RemindersConfig

        reminders_flow(RemindersConfig(**job["config"]))


def child(job: dict) -> None:
    code = 1
    try:
        fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        run(job)
        code = 0
    except BaseException:  # noqa: BLE001 - a child never returns into the server's loop: log, exit non-zero
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def say(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    say({"ready": True})
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(job)
        say({"pid": pid})
        _, status = os.waitpid(pid, 0)
        say({"pid": pid, "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
             "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None})


if __name__ == "__main__":
    main()
