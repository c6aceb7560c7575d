"""The first command a user types works on a loaded machine: with no Prefect server running, an
``mmem`` command starts a temporary one, and Prefect's default wait for it (20 s) is too short
when every core is busy. Here both cores are held by busy loops (bounded in time) while a real
``mmem ingest`` runs in its own process, with no startup limit of its own in the environment."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUSY = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


@pytest.mark.slow
def test_ingest_starts_its_temporary_server_with_every_core_busy(tmp_path, demo_dir):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")}
    env.update(PYTHONPATH=str(REPO), PREFECT_HOME=str(tmp_path / "prefect"))
    mmem = Path(sys.executable).with_name("mmem")
    cores = os.cpu_count() or 2
    busy = [subprocess.Popen([sys.executable, "-c", BUSY.format(seconds=180)]) for _ in range(cores)]
    try:
        time.sleep(1)
        assert all(p.poll() is None for p in busy)
        run = subprocess.run(
            [
                str(mmem),
                "--data-root",
                str(tmp_path / "root"),
                "ingest",
                "--visdial",
                str(demo_dir / "visdial_1.0_train.json"),
                "--images",
                str(demo_dir / "images" / "train2014"),
                "--coco",
                str(demo_dir / "captions_train2014.json"),
                "--workers",
                "1",
            ],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        still_busy = all(p.poll() is None for p in busy)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    assert run.returncode == 0, run.stderr[-3000:]
    assert still_busy, "the busy loops ended before the command did: the machine was not loaded throughout"
    assert "Starting temporary server" in run.stderr + run.stdout
    assert "waiting up to 300 s" in run.stderr + run.stdout, (
        "the CLI did not give the temporary server its limit"
    )
    assert '"dialogs_kept": 20' in run.stdout
