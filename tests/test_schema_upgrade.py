"""Typed columns, and tables written by the previous release upgraded in place on first open:
``evaluations.dataset_version`` was text (``dialogs@v3,turns@v3``) and is now
list<struct<table, version>>. The upgrade is a new version of the same table; the versions before
it, and the tags pinning them, still open in the schema they were written in."""

from __future__ import annotations

from datetime import UTC, datetime

import lance
import pyarrow as pa
import pyarrow.compute as pc

from schemas.evaluate import DATASET_VERSION, EVALUATIONS, format_dataset_version, parse_dataset_version
from schemas.tables import SCHEMA_VERSION_KEY
from storage.lance import connect, open_table, read

# the evaluations schema as the previous release wrote it (dataset_version as text, no schema version)
OLD = pa.schema([f if f.name != "dataset_version" else pa.field("dataset_version", pa.string())
                 for f in EVALUATIONS.schema]).remove_metadata()


def _old_rows() -> pa.Table:
    now = datetime.now(UTC)
    rows = [{"run_id": "r1", "variant": v, "metric": "bleu4", "value": 0.5, "n": 3, "model_artifact": None,
             "dataset_version": dv, "backbone": None, "created_at": now, "split": "val", "model": "m",
             "prompt": "base"}
            for v, dv in (("a", "dialogs@v3,turns@v3"), ("memory", "dialogs@v3,turns@v3,image_embeddings@v2"),
                          ("none", None))]
    return pa.Table.from_pylist(rows, schema=OLD)


def test_parse_and_format_round_trip():
    text = "dialogs@v3,turns@v12,image_embeddings@v2"
    assert parse_dataset_version(text) == [{"table": "dialogs", "version": 3},
                                           {"table": "turns", "version": 12},
                                           {"table": "image_embeddings", "version": 2}]
    assert format_dataset_version(parse_dataset_version(text)) == text


def test_a_table_of_the_previous_release_is_upgraded_in_place_on_first_open(tmp_path):
    uri = tmp_path / "lance"
    lance.write_dataset(_old_rows(), str(uri / "evaluations.lance"))
    db = connect(uri)
    old_version = db.open_table("evaluations").version
    tag_label = "evaluate-r1"
    db.open_table("evaluations").tags.create(tag_label, old_version)

    tbl = open_table(db, "evaluations")  # the first open upgrades
    assert tbl.version == old_version + 1
    assert tbl.schema.field("dataset_version").type == DATASET_VERSION
    assert tbl.schema.metadata[SCHEMA_VERSION_KEY] == b"2"
    rows = {r["variant"]: r["dataset_version"] for r in read(db, "evaluations").to_pylist()}
    assert rows == {"a": [{"table": "dialogs", "version": 3}, {"table": "turns", "version": 3}],
                    "memory": [{"table": "dialogs", "version": 3}, {"table": "turns", "version": 3},
                               {"table": "image_embeddings", "version": 2}],
                    "none": None}
    typed = tbl.to_lance().to_table(columns=["variant", "dataset_version"])  # joinable without parsing text
    tables = pc.struct_field(pc.list_flatten(typed.column("dataset_version")), "table")
    owners = pc.take(typed.column("variant"), pc.list_parent_indices(typed.column("dataset_version")))
    assert pc.filter(owners, pc.equal(tables, "image_embeddings")).to_pylist() == ["memory"]

    assert open_table(db, "evaluations").version == old_version + 1  # upgraded once, not per open
    before = read(db, "evaluations", version=tag_label)  # the pinned old version, as it was written
    assert before.schema.field("dataset_version").type == pa.string() and before.num_rows == 3


def test_a_new_table_is_created_in_the_current_schema(tmp_path):
    tbl = open_table(connect(tmp_path / "lance"), "evaluations")
    assert tbl.schema.metadata[SCHEMA_VERSION_KEY] == b"2" and tbl.version == 1


def test_llm_responses_of_the_previous_release_are_upgraded_and_its_journals_still_merge(tmp_path):
    import json

    from llmcalls.cache import Journal, ResponseCache
    from schemas.reminders import LLM_RESPONSES, OPTIONS, PROMPT, prompt_messages

    old_schema = pa.schema([pa.field(f.name, pa.string()) if f.name in ("options", "prompt") else f
                            for f in LLM_RESPONSES.schema]).remove_metadata()
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "what colour?", "images": ["sha256:ab"], "memory": "visdial:1:2"}]
    options = {"temperature": 0.0, "seed": 0, "num_predict": 8, "mirostat": 2}
    old = {"request_hash": "h1", "model": "m", "status": "ok", "response": "blue",
           "options": json.dumps(options), "prompt": json.dumps(messages), "created_at": datetime.now(UTC)}
    uri = tmp_path / "lance"
    lance.write_dataset(pa.Table.from_pylist([old], schema=old_schema), str(uri / "llm_responses.lance"))

    db = connect(uri)
    tbl = open_table(db, "llm_responses")
    assert tbl.schema.field("options").type == OPTIONS and tbl.schema.field("prompt").type == PROMPT
    row = read(db, "llm_responses").to_pylist()[0]
    opts = row["options"]
    assert (opts["temperature"], opts["num_predict"], json.loads(opts["other"])) == (0.0, 8, {"mirostat": 2})
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]
    assert row["prompt"][1]["images"] == ["sha256:ab"]
    assert prompt_messages(row["prompt"]) == messages  # nothing lost

    # a journal a killed run of the previous release left (JSON text columns) merges into the new schema
    journal = tmp_path / "journal" / "old-shard-00000.jsonl"
    with Journal(journal) as j:
        j.append({**old, "request_hash": "h2", "created_at": old["created_at"].isoformat()})
    assert ResponseCache(str(uri), journal.parent).merge(journal) == 1
    rows = {r["request_hash"]: r for r in read(db, "llm_responses").to_pylist()}
    assert prompt_messages(rows["h2"]["prompt"]) == messages and rows["h2"]["options"]["seed"] == 0


def test_records_are_idempotent():
    from schemas.reminders import options_record, prompt_records

    opts = options_record({"temperature": 0.0, "seed": 1, "mirostat": 2})
    assert options_record(opts) == opts and options_record(None) is None
    msgs = prompt_records([{"role": "user", "content": "hi", "memory": "m:1"}])
    assert prompt_records(msgs) == msgs
