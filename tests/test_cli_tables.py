"""``mmem tables``, ``mmem sql`` (joins, past versions, errors) over really ingested tables, and
``mmem pipeline run --profile FILE`` end to end on a tiny demo profile, through the CLI."""

from __future__ import annotations

import asyncio
import hashlib
import re
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from typer.testing import CliRunner

from cli.main import app
from storage.lance import connect

DIALOGS = 20 + 6  # conftest's demo dataset: 20 train + 6 val dialogs, 10 turns each
TRAIN_TURNS, ALL_TURNS = 20 * 10, DIALOGS * 10


def _mmem(root: Path, *args: str) -> str:
    res = CliRunner().invoke(app, ["--data-root", str(root), *args])
    assert res.exit_code == 0, res.output
    return res.output


def _error(root: Path, *args: str) -> str:
    res = CliRunner().invoke(app, ["--data-root", str(root), *args])
    assert res.exit_code == 1, res.output
    assert res.output.startswith("error: "), res.output
    return res.output


def _frame(output: str) -> list[list[str]]:
    """A printed result frame's rows, without the header and the index column."""
    return [line.split()[1:] for line in output.splitlines()[1:] if line.strip() and not line.startswith("(")]


def test_tables_lists_rows_version_tags_and_columns(data_root):
    out = _mmem(data_root, "tables")
    db = connect(data_root / "lance")
    names = sorted(db.list_tables().tables)
    assert {"images", "dialogs", "turns", "quarantine"} <= set(names)
    listed = re.findall(r"^(\w+)\s+rows=(\d+)\s+version=(\d+)\s+tags=(\S+)$", out, re.MULTILINE)
    assert [n for n, *_ in listed] == names
    by_name = {n: (int(r), int(v), t) for n, r, v, t in listed}
    # Two ingests (train, then val): version 1 is the empty table, 2 train, 3 train + val; each tagged
    # by its run.
    rows, version, tags = by_name["turns"]
    assert (rows, version) == (ALL_TURNS, 3)
    assert len(tags.split(",")) == 2 and all(t.startswith("ingest-") for t in tags.split(","))
    assert by_name["dialogs"][:2] == (DIALOGS, 3)
    columns = re.search(r"^turns\s.*\n\s+columns: (.*)$", out, re.MULTILINE).group(1).split(", ")
    assert columns == db.open_table("turns").schema.names
    assert {"image_id", "turn", "question", "answer", "gt_index", "answer_options"} <= set(columns)


def test_tables_on_an_empty_root_says_so(tmp_path):
    assert "no tables under" in _mmem(tmp_path, "tables")


def test_sql_joins_tables_and_reads_past_versions(data_root):
    join = "SELECT d.split, count(*) AS n FROM turns t JOIN dialogs d USING (image_id) GROUP BY 1 ORDER BY 1"
    assert _frame(_mmem(data_root, "sql", join)) == [
        ["train", str(TRAIN_TURNS)],
        ["val", str(ALL_TURNS - TRAIN_TURNS)],
    ]

    count = "SELECT count(*) AS n FROM turns"
    assert _frame(_mmem(data_root, "sql", count)) == [[str(ALL_TURNS)]]
    assert _frame(_mmem(data_root, "sql", count, "--version", "turns=2")) == [[str(TRAIN_TURNS)]]
    assert _frame(_mmem(data_root, "sql", count, "--version", "turns=1")) == [["0"]]
    # A tag works like its version number; a pinned table joins with the latest of another.
    tag = next(
        t
        for t, v in connect(data_root / "lance").open_table("turns").tags.list().items()
        if v["version"] == 2
    )
    assert _frame(_mmem(data_root, "sql", count, "--version", f"turns={tag}")) == [[str(TRAIN_TURNS)]]
    assert _frame(_mmem(data_root, "sql", join, "--version", "turns=2")) == [["train", str(TRAIN_TURNS)]]
    # Two pins at once: dialogs at its train-only version as well.
    both = "SELECT count(*) AS n FROM dialogs d JOIN turns t USING (image_id)"
    assert _frame(_mmem(data_root, "sql", both, "--version", "turns=3", "--version", "dialogs=2")) == [
        [str(TRAIN_TURNS)]
    ]

    out = _mmem(data_root, "sql", "SELECT image_id, turn FROM turns ORDER BY 1, 2", "--limit", "3")
    assert len(_frame(out)) == 3 and f"({ALL_TURNS} rows; the first 3 shown" in out


def test_sql_errors_are_clear(data_root):
    assert "Parser Error" in _error(data_root, "sql", "SELEC count(*) FROM turns")
    out = _error(data_root, "sql", "SELECT * FROM no_such_table")
    assert "no_such_table does not exist" in out and "Lance tables: dialogs, images, quarantine, turns" in out
    assert "--version wants TABLE=VERSION, got 'turns'" in _error(
        data_root, "sql", "SELECT 1", "--version", "turns"
    )
    out = _error(data_root, "sql", "SELECT count(*) FROM turns", "--version", "turns=9")
    assert "turns has no version 9; versions: 1, 2, 3; tags: ingest-" in out
    out = _error(data_root, "sql", "SELECT count(*) FROM turns", "--version", "turns=no-such-tag")
    assert "turns has no version 'no-such-tag'" in out
    out = _error(data_root, "sql", "SELECT count(*) FROM turns", "--version", "nope=1")
    assert "--version names no such table: nope" in out


def _hashes(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (names and bytes), to prove that nothing changed on disk."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sql_is_read_only_and_changes_nothing_on_disk(data_root, tmp_path):
    lance = data_root / "lance"
    manifest = next((lance / "turns.lance" / "_versions").iterdir())
    outside = tmp_path / "outside"
    before, listing = _hashes(lance), sorted(p.name for p in tmp_path.iterdir())
    attempts = [
        f"COPY (SELECT 1 AS x) TO '{manifest}'",  # overwrite a Lance manifest so the table no longer opens
        f"COPY turns TO '{outside}.csv'",
        # refused before it runs
        f"SELECT * FROM turns; COPY dialogs TO '{outside}.parquet' (FORMAT parquet)",
        "SELECT * FROM read_csv('/etc/passwd')",
        f"SELECT * FROM read_blob('{manifest}')",
        f"SELECT * FROM glob('{lance}/*')",
        "SELECT count(*) FROM turns t JOIN read_text('/etc/hostname') h ON true",
        "SELECT * FROM read_parquet('https://127.0.0.1:9/x.parquet')",
        f"ATTACH '{outside}.duckdb' AS other",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SET enable_external_access = true",
        "PRAGMA threads = 1",
        "CALL enable_logging()",
        "CREATE TABLE copy_of_turns AS SELECT * FROM turns",
        f"EXPORT DATABASE '{outside}'",
    ]
    for query in attempts:
        res = CliRunner().invoke(app, ["--data-root", str(data_root), "sql", query])
        assert res.exit_code == 2, (query, res.output)
        assert res.output.startswith("error: mmem sql is read-only: "), (query, res.output)
        assert len(res.output.strip().splitlines()) == 1, (query, res.output)
        assert "Traceback" not in res.output and "root:" not in res.output, (query, res.output)
    assert _hashes(lance) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # nothing written beside it either
    out = _error_code(data_root, 2, "sql", "SELECT * FROM read_csv('/etc/passwd')")
    assert "root:" not in out and "Cannot access file \"/etc/passwd\"" in out
    assert "COPY statements are refused" in _error_code(
        data_root, 2, "sql", f"/* a note */\nCOPY turns TO '{outside}'"
    )
    assert "INSTALL statements are refused" in _error_code(data_root, 2, "sql", "INSTALL httpfs")

    # Queries still read every table the lockdown left registered, at the latest and at pinned versions.
    join = "SELECT d.split, count(*) AS n FROM turns t JOIN dialogs d USING (image_id) GROUP BY 1 ORDER BY 1"
    assert _frame(_mmem(data_root, "sql", join)) == [
        ["train", str(TRAIN_TURNS)],
        ["val", str(ALL_TURNS - TRAIN_TURNS)],
    ]
    count = "WITH t AS (FROM turns) SELECT count(*) AS n FROM t"
    assert _frame(_mmem(data_root, "sql", count, "--version", "turns=2")) == [[str(TRAIN_TURNS)]]
    assert "image_id" in _mmem(data_root, "sql", "DESCRIBE turns")
    assert _hashes(lance) == before


def _error_code(root: Path, code: int, *args: str) -> str:
    res = CliRunner().invoke(app, ["--data-root", str(root), *args])
    assert res.exit_code == code, res.output
    assert res.output.startswith("error: "), res.output
    return res.output


def _profile(path: Path, root: Path, inputs, llm: str) -> Path:
    """The demo profile (schemas/profiles/demo.toml), cut down: fewer steps, two evaluation variants."""
    listed = ", ".join(
        f'{{ split = "{i.split}", visdial = "{i.visdial}", images = "{i.images}", coco = "{i.coco}" }}'
        for i in inputs
    )
    path.write_text(f"""
data_root = "{root}"
[pipeline]
ingest_workers = 1
inputs = [{listed}]
[embed]
tiny = true
device = "cpu"
[reminders]
ollama_host = "{llm}"
model = "mmem-teacher"
splits = ["train"]
[train_sft]
tiny = true
max_steps = 1
[train_memory]
tiny = true
max_steps = 1
[evaluate]
variants = "demo"
only = ["teacher_prompt", "memory_model"]
limit = 2
ollama_host = "{llm}"
""")
    return path


async def _flow_run(flow_run_id: str):
    async with get_client() as client:
        run = await client.read_flow_run(flow_run_id)
        return run, (await client.read_flow(run.flow_id)).name


@pytest.mark.slow  # about 40-85 s: the whole DAG, tiny models
def test_pipeline_run_on_a_tiny_demo_profile_writes_every_stage_and_says_where_to_look(tmp_path):
    from cli.demo import demo_inputs
    from llmcalls.server import make_state, running_server

    root = tmp_path / "root"
    inputs = demo_inputs(tmp_path / "demo", 4, 2)  # what `mmem demo` writes, smaller
    with running_server(make_state(teacher=True)) as llm:
        profile = _profile(tmp_path / "tiny.toml", root, inputs, llm)
        res = CliRunner().invoke(
            app, ["--data-root", str(root), "pipeline", "run", "--profile", str(profile)]
        )
    assert res.exit_code == 0, res.output
    out = res.output

    # Every stage's table, as `mmem tables` sees it, and in the run's own summary with the same figures.
    stage_tables = {"images", "dialogs", "turns", "quarantine", "image_embeddings", "text_embeddings",
                    "llm_responses", "reminders", "evaluations"}
    listed = {n: (int(r), int(v)) for n, r, v in
              re.findall(r"^(\w+)\s+rows=(\d+)\s+version=(\d+)", _mmem(root, "tables"), re.MULTILINE)}
    assert stage_tables <= set(listed)
    assert all(listed[t][0] > 0 for t in stage_tables - {"quarantine"}), listed
    assert listed["turns"][0] == 60 and listed["reminders"][0] == 4  # 4 + 2 dialogs; reminders for train only
    summary = out[out.index("pipeline: completed"):]
    for name, (rows, version) in listed.items():
        assert re.search(rf"^  {name}\s+{rows} rows  version {version}$", summary, re.MULTILINE), name
    # Training wrote its artifacts (no tables of its own).
    assert {"memory-model", "gemma3-4b-reminders-lora"} <= {p.name for p in (root / "artifacts").iterdir()}
    # Tables of different stages join: every turn has its text embedding.
    joined = "SELECT count(*) AS n FROM turns t JOIN text_embeddings e USING (text_hash)"
    assert _frame(_mmem(root, "sql", joined)) == [["60"]]

    # Where to look: the commands, on this data root, and the run's page in the UI of the server in use.
    for line in (
        f"model artifacts:  mmem --data-root {root} artifacts list   ({root / 'artifacts'})",
        f"evaluation:       mmem --data-root {root} evaluate report  (plots under {root / 'reports'})",
        f"SQL:              mmem --data-root {root} sql ",
    ):
        assert line in summary, line
    page = re.search(
        r"^Prefect UI:\s+(http://127\.0\.0\.1:\d+/runs/flow-run/([0-9a-f-]{36}))$", summary, re.MULTILINE
    )
    assert page, summary
    run, flow_name = asyncio.run(_flow_run(page.group(2)))
    assert flow_name == "pipeline" and run.state.is_completed()
