"""A demo root remembers how it was made: the commands `mmem demo` prints, and the README's Memory
section, run as written on the demo's root (no --tiny), and the demo fills ``memories`` too."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from schemas.config import ROOT_FILE, record_root_choice
from schemas.embed import EmbedConfig
from schemas.memory import MemoryConfig
from schemas.reminders import RemindersConfig
from storage.artifacts import ArtifactStore
from storage.lance import connect, open_table

README = Path(__file__).resolve().parents[1] / "README.md"


def _run(args: list[str]) -> str:
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, f"{shlex.join(args)}\n{res.output}"
    return res.output


def _readme_block(heading: str) -> list[list[str]]:
    text = README.read_text()
    section = text.split(f"\n{heading}\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_the_demos_printed_commands_and_the_readme_memory_section_run_on_its_root(tmp_path):
    root = tmp_path / "root"
    out = _run(["--data-root", str(root), "demo", "--dialogs", "4", "--val-dialogs", "2"])
    made = json.loads((root / ROOT_FILE).read_text())
    assert made["imagebind"]["tiny"] is True and made["llm"]["model"] == "mmem-teacher"
    assert re.search(r"memories\s+[1-9]\d* rows", out), out
    printed = [shlex.split(line.split(":", 1)[1].split("   (")[0].split("  (")[0])
               for line in out.splitlines() if re.match(r"^[a-zA-Z ]+:\s+mmem ", line)]
    assert any(cmd[3:4] == ["query"] for cmd in printed) and any(
        cmd[3:5] == ["memory", "recall"] for cmd in printed
    )
    for cmd in printed:
        assert "--tiny" not in cmd
        _run(cmd[1:])
    query = subprocess.run(
        [
            str(Path(sys.executable).with_name("mmem")),
            "--data-root",
            str(root),
            "query",
            "--text",
            "a red circle",
            "-k",
            "2",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert query.returncode == 0, query.stderr[-2000:]
    assert "warn" not in query.stderr.lower(), query.stderr  # no deprecation warnings in a normal command
    recalled = _run(
        ["--data-root", str(root), "memory", "recall", "--owner", "demo", "--text", "a red circle"]
    )
    assert recalled.startswith(" 1. "), recalled
    for cmd in _readme_block("### Memory"):
        assert cmd[0] == "mmem"
        _run(["--data-root", str(root), *cmd[1:]])

    # lineage: every table the flows wrote carries its runs' tags; after compaction and a cleanup of
    # everything older than now, each manifest's inputs open at their versions with their rows
    db = connect(root / "lance")
    for name in ("images", "dialogs", "turns", "reminders", "llm_responses", "evaluations"):
        labels = open_table(db, name).tags.list()
        assert any(not t.startswith("pinned-") for t in labels), (name, labels)
    manifests = ArtifactStore(root / "artifacts").list()
    assert {a.manifest["kind"] for a in manifests} == {"lora-adapter", "memory-model"}
    _run(["--data-root", str(root), "tables", "maintain", "--keep-hours", "0"])
    db = connect(root / "lance")
    for art in manifests:
        for name, info in art.manifest["inputs"].items():
            ds = open_table(db, name).to_lance()
            assert ds.checkout_version(info["version"]).count_rows() == info["rows"], (art.ref, name, info)
            assert open_table(db, name).tags.list()[info["tag"]]["version"] == info["version"]


def test_recorded_choices_are_defaults_below_every_explicit_setting(tmp_path, monkeypatch):
    root = tmp_path / "root"
    record_root_choice(root, "imagebind", {"tiny": True, "checkpoint": None, "seed": 3})
    record_root_choice(root, "llm", {"ollama_host": "http://127.0.0.1:11500", "model": "mmem-teacher"})
    embed = EmbedConfig.load(None, data_root=root)
    assert (embed.tiny, embed.checkpoint, embed.seed) == (True, None, 3)
    assert MemoryConfig.load(None, data_root=root).tiny is True
    rem = RemindersConfig.load(None, data_root=root)
    assert (rem.ollama_host, rem.model, rem.seed) == (
        "http://127.0.0.1:11500",
        "mmem-teacher",
        0,
    )  # LLM seed untouched
    # a flag of the group given now wins, and the group is not mixed with it
    ckpt = tmp_path / "imagebind_huge.pth"
    chosen = EmbedConfig.load(None, data_root=root, checkpoint=ckpt)
    assert (chosen.tiny, chosen.checkpoint, chosen.seed) == (False, ckpt, 0)
    monkeypatch.setenv("MMEM_REMINDERS_OLLAMA_HOST", "http://127.0.0.1:9")
    assert RemindersConfig.load(None, data_root=root).ollama_host == "http://127.0.0.1:9"
    assert EmbedConfig.load(None, data_root=tmp_path / "other").tiny is False  # another root: its own file
    (root / ROOT_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        EmbedConfig.load(None, data_root=root)
