"""The reminders flow end to end: real Prefect, real Lance, the official client against the local
server over loopback (teacher backend, with and without injected faults)."""

from __future__ import annotations

import json

import pytest

from flows.reminders import reminders_flow
from llmcalls.cache import Journal, ResponseCache
from llmcalls.requests import OK, LLMResult
from llmcalls.server import Faults, make_state, running_server
from llmcalls.shard import ShardFailed
from reminders.parse import parse_response
from reminders.prompts import build_prompts, conversation_text, load_inputs
from schemas.quarantine import Reason
from schemas.reminders import RemindersConfig, load_prompt_data
from storage.lance import connect, open_table, read

REMINDER = "We saw a red ball on a table and counted two cups; now the cup color."
GOOD = f"<reminder>{REMINDER}</reminder>\nThe cups are blue."


def _config(root, url, **kw) -> RemindersConfig:
    base = {"data_root": root, "ollama_host": url, "model": "mmem-teacher", "shard_size": 4,
            "shard_retries": 0, "backoff_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 5, "concurrency": 4}
    return RemindersConfig(**{**base, **kw})


@pytest.mark.parametrize("text, expected", [
    (GOOD, None),
    ("The cups are blue.", Reason.NO_REMINDER),
    ("<reminder>unclosed and long enough to count\nThe cups are blue.", Reason.NO_REMINDER),
    (GOOD.replace("\nThe", "<reminder>again</reminder>\nThe"), Reason.MULTIPLE_REMINDERS),
    ("<reminder>   </reminder>\nBlue.", Reason.EMPTY_REMINDER),
    ("<reminder>We saw a red ball on a table and counted two cups.</reminder>", Reason.EMPTY_ANSWER),
    ("<reminder>" + "x" * 2001 + "</reminder>\nBlue.", Reason.TOO_LONG),
    ("<reminder>short</reminder>\nBlue.", Reason.TOO_SHORT),
    ("<reminder>We saw a red ball\nQ: how many cups\nA: two</reminder>\nThe cups are blue.",
     Reason.ECHOED_DIALOG),
])
def test_parse_response(text, expected):
    out = parse_response(text)
    if expected is None:
        assert out == (REMINDER, "The cups are blue.")
    else:
        assert out[0] == expected


def test_prompts_follow_the_report(ingested_root):
    config = RemindersConfig(data_root=ingested_root, limit=3, splits=["train"])
    prompts, rejections = build_prompts(config, *load_inputs(config.lance_uri))
    assert len(prompts) == 3 and not rejections
    assert conversation_text([("q1", "a1"), ("q2", "a2")]) == ("Q: q1\nA: a1\nQ: q2", "a2")
    instructions, examples = load_prompt_data()
    p = prompts[0]
    system, user = p.request.messages
    assert system["role"] == "system" and instructions in system["content"] and len(examples) >= 2
    assert all(ex["conversation"] in system["content"] for ex in examples)
    assert user["content"] == f"conversation:\n{p.conversation}"
    lines = p.conversation.splitlines()
    assert len(lines) == 19 and lines[-1].startswith("Q: ") and p.target_answer  # 10 questions, 9 answers
    assert len(user["images"]) == 1 and user["images"][0].path.endswith(".jpg")
    assert p.request.options == {"temperature": 0.0, "seed": 0, "num_predict": 256, "num_ctx": 4096}


def test_flow_with_faults_reconciles_and_a_rerun_makes_no_calls(data_root):
    state = make_state(teacher=True, faults=Faults(error_rate=0.3, drop_rate=0.1, untagged_rate=0.2, seed=5))
    with running_server(state) as url:
        config = _config(data_root, url, max_attempts=8, limit=14)
        first = reminders_flow(config)
        calls_after_first = sum(state.requests.values())
        db = connect(config.lance_uri)
        version = db.open_table("reminders").version
        second = reminders_flow(config)
        assert sum(state.requests.values()) == calls_after_first  # zero calls for cached keys
        assert db.open_table("reminders").version == version  # nothing written twice
    assert first.prompts == 14 and first.calls == 14 and first.retries > 0
    assert first.valid + first.quarantined + first.failures == 14 and first.failures == 0
    assert first.quarantined == first.quarantined_no_reminder > 0  # the untagged answers
    assert second.cache_hits == 14 and second.calls == 0 and second.valid == first.valid
    responses = read(db, "llm_responses")
    assert responses.num_rows == 14 and set(responses.column("backend").to_pylist()) == {"teacher"}
    assert set(responses.column("status").to_pylist()) == {OK}
    reminders = read(db, "reminders")
    assert reminders.num_rows == first.valid and set(reminders.column("backend").to_pylist()) == {"teacher"}
    assert all(r["response"].startswith("<reminder>") for r in reminders.to_pylist())
    q = read(db, "quarantine", where="stage = 'reminders'")
    assert q.num_rows == first.quarantined and set(q.column("reason").to_pylist()) == {"no_reminder"}


def test_failed_shard_fails_and_a_rerun_makes_only_the_missing_calls(data_root):
    broken = make_state(teacher=True, faults=Faults(error_rate=0.5, seed=11))
    with running_server(broken) as url:
        config = _config(data_root, url, max_attempts=1, limit=12)
        with pytest.raises(ShardFailed, match="re-run"):
            reminders_flow(config)
    db = connect(config.lance_uri)
    status = read(db, "llm_responses").column("status").to_pylist()
    failed = status.count("error")
    assert failed > 0 and status.count(OK) == 12 - failed  # finished calls were cached anyway
    healthy = make_state(teacher=True)
    with running_server(healthy) as url:
        result = reminders_flow(config.model_copy(update={"ollama_host": url}))
    assert sum(healthy.requests.values()) == failed == result.calls
    assert result.cache_hits == 12 - failed and result.valid == 12 and result.failures == 0


def test_a_killed_runs_journal_is_recovered_and_not_asked_again(data_root):
    config = _config(data_root, "http://127.0.0.1:1", limit=5)
    prompts, _ = build_prompts(config, *load_inputs(config.lance_uri))
    cache = ResponseCache(config.lance_uri, config.cache_dir / "llm_journal")
    journal = Journal(cache.journal_path("killed-run", 0))  # what a killed shard leaves behind
    for p in prompts[:3]:
        answer = LLMResult(p.request.request_hash, OK, GOOD, attempts=1, backend="teacher")
        journal.append(answer.row(p.request, "x"))
    journal.close()
    state = make_state(teacher=True)
    with running_server(state) as url:
        result = reminders_flow(config.model_copy(update={"ollama_host": url}))
    assert result.cache_hits == 3 and sum(state.requests.values()) == 2 == result.calls
    assert not list((config.cache_dir / "llm_journal").glob("*.jsonl"))


def test_missing_model_fails_before_any_shard_and_limit_is_named_after_host(data_root):
    from prefect.client.orchestration import get_client

    from llmcalls.requests import LLMUnavailable
    from tasks.runtime.slots import limit_name

    with running_server(make_state(teacher=True)) as url:
        with pytest.raises(LLMUnavailable, match="ollama pull gemma3:27b"):
            reminders_flow(_config(data_root, url, model="gemma3:27b", limit=2))
        reminders_flow(_config(data_root, url, limit=2, concurrency=6))
        with get_client(sync_client=True) as client:
            limit = client.read_global_concurrency_limit_by_name(limit_name(url))
    assert limit.limit == 6 and limit.name.startswith("ollama-127.0.0.1-")
    assert read(connect(_config(data_root, url).lance_uri), "llm_responses").num_rows == 2


def test_repair_reask_and_exports(data_root, tmp_path):
    import datasets

    state = make_state(teacher=True, faults=Faults(untagged_rate=0.5, seed=2))
    with running_server(state) as url:
        plain = reminders_flow(_config(data_root, url, limit=8))
        v1 = connect(_config(data_root, url).lance_uri).open_table("reminders").version
        repaired = reminders_flow(_config(data_root, url, limit=8, repair=True))
    assert plain.quarantined > 0 and repaired.valid > plain.valid
    assert repaired.calls == plain.quarantined  # one re-ask each, the first answers came from the cache
    from typer.testing import CliRunner

    from cli.main import app

    out = tmp_path / "report.json"
    res = CliRunner().invoke(app, ["reminders", "export", "--format", "report-json", "--out", str(out),
                                   "--version", str(v1), "--data-root", str(data_root)])
    assert res.exit_code == 0, res.output
    samples = json.loads(out.read_text())
    assert len(samples) == plain.valid
    assert set(samples[0]) == {"image_id", "image_url", "conversation", "response"}
    res = CliRunner().invoke(app, ["reminders", "export", "--format", "hf", "--out", str(tmp_path / "hf"),
                                   "--data-root", str(data_root)])
    assert res.exit_code == 0, res.output
    ds = datasets.load_from_disk(str(tmp_path / "hf"))
    assert sum(len(d) for d in ds.values()) == repaired.valid and "reminder" in ds["train"].column_names


def test_a_moved_image_folder_stops_the_run_before_it_writes(data_root, tmp_path):
    """Nothing quarantined as image_missing, no reminder dropped: a clear error naming the folder."""
    from reminders.prompts import ImageRootMissing

    db = connect(data_root / "lance")
    before = {n: (open_table(db, n).version if n in db.list_tables().tables else None)
              for n in ("reminders", "quarantine", "llm_responses")}
    gone = tmp_path / "moved-away"
    config = _config(data_root, "http://127.0.0.1:9", image_roots={"train": gone}, splits=["train"])
    with pytest.raises(ImageRootMissing, match="moved-away.*MMEM_REMINDERS_IMAGE_ROOTS"):
        reminders_flow(config)
    db = connect(data_root / "lance")
    after = {n: (open_table(db, n).version if n in db.list_tables().tables else None) for n in before}
    assert after == before


def test_an_image_root_recorded_relative_to_the_data_root_moves_with_it(data_root, tmp_path, demo_dir):
    """images.root relative to the data root: the whole root moved elsewhere still finds its images."""
    import shutil

    shutil.copytree(demo_dir / "images" / "train2014", data_root / "imgs" / "train2014")
    open_table(connect(data_root / "lance"), "images").update(where="split = 'train'",
                                                              values={"root": "imgs/train2014"})
    moved = tmp_path / "elsewhere" / "root"
    shutil.move(data_root, moved)
    config = RemindersConfig(data_root=moved, splits=["train"])
    prompts, rejections = build_prompts(config, *load_inputs(config.lance_uri))
    assert len(prompts) == 20 and not rejections
    assert all(p.request.messages[1]["images"][0].path.startswith(str(moved)) for p in prompts)


def test_shard_results_persisted_before_the_move_are_ignored_and_the_root_still_reads(data_root, monkeypatch):
    """A data root written before ShardStats moved to llmcalls: its shard records (version 2 keys,
    naming ``tasks.reminders.ShardStats``) are never looked up, so nothing decodes them into a moved
    class; the re-run serves every answer from the response cache and makes no call."""
    import tasks.reminders as glue
    from tasks.reminders import shard_cache_key

    state = make_state(teacher=True)
    with running_server(state) as url:
        config = _config(data_root, url, limit=8)
        first = reminders_flow(config)
        prompts, _ = build_prompts(config, *load_inputs(config.lance_uri))
        folder = config.cache_dir / "reminders_shards"
        for i in (0, 4):
            params = {"requests": [p.request for p in prompts[i:i + 4]]}
            new = folder / shard_cache_key(None, params)
            with monkeypatch.context() as m:  # the key the code before the move gave this shard
                m.setattr(glue, "SHARD_RESULT_VERSION", 2)
                old = folder / shard_cache_key(None, params)
            assert old != new
            old.write_text(new.read_text().replace("llmcalls.shard.ShardStats", "tasks.reminders.ShardStats"))
            new.unlink()
        calls = sum(state.requests.values())
        again = reminders_flow(config)
    assert sum(state.requests.values()) == calls and again.calls == 0 and again.cache_hits == 8
    assert again.shards_cached == 0 and again.valid == first.valid == 8
    assert "tasks.reminders.ShardStats" in old.read_text()  # left alone, never read
