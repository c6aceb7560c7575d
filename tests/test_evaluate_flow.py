"""The evaluate flow end to end on the ingested demo: a served variant (the teacher behind the
Ollama-protocol server, reached over real HTTP by the official client) and an in-process tiny
LLaMA with option ranking; rows, response cache, charts, artifacts, resumption, held-out check.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from evaluation.metrics import GENERATION_METRICS
from evaluation.ranking import RANKING_METRICS
from llmcalls.server import make_state, running_server
from schemas.evaluate import EvaluateConfig, Variant, format_dataset_version, load_variants
from schemas.reminders import prompt_messages
from storage.lance import connect, merge, open_table, read

VARIANTS = """
[[variant]]
name = "teacher_prompt"
backend = "ollama"
model = "mmem-teacher"
serve = "teacher"
prompt = "prompt"

[[variant]]
name = "teacher_base"
backend = "ollama"
model = "mmem-teacher"
host = "{shared_host}"
prompt = "base"

[[variant]]
name = "tiny_base"
backend = "hf"
model = "tiny:llama"
prompt = "base"
max_new_tokens = 8
ranking = true

[[variant]]
name = "memory"
backend = "memory"
artifact = "memory-model"
turns = "all"
ranking = true
max_new_tokens = 8

[[variant]]
name = "missing_sft"
backend = "ollama"
model = "mmem-sft"
artifact = "no-such-artifact"
serve = "checkpoint"
prompt = "sft"
required = false
"""
LIMIT = 2  # dialogs


def _random_embeddings(root) -> None:
    """Unit vectors for every val image, turn and caption: the memory model's inputs (the embed
    stage's own tests cover ImageBind; here only their presence and shape matter)."""
    import numpy as np

    from schemas.embed import EMBED_DIM
    from schemas.tables import spec

    db = connect(root / "lance")
    rng = np.random.default_rng(0)

    def rows(name: str, cols: dict) -> pa.Table:
        n = len(next(iter(cols.values())))
        v = rng.standard_normal((n, EMBED_DIM)).astype(np.float32)
        unit = v / np.linalg.norm(v, axis=1)[:, None]
        cols["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(unit.ravel()), EMBED_DIM)
        for f in spec(name).schema:  # provenance columns (model fingerprint ...) get a test label
            if f.name not in cols and not f.nullable and pa.types.is_string(f.type):
                cols[f.name] = ["test-random"] * n
        return pa.table(cols)

    dialogs, turns = read(db, "dialogs", where="split = 'val'"), read(db, "turns", where="split = 'val'")
    merge(db, "image_embeddings", rows("image_embeddings", {"image_id": dialogs.column("image_id")}))
    hashes = sorted(set(turns.column("text_hash").to_pylist())
                    | set(dialogs.column("caption_hash").to_pylist()))
    merge(db, "text_embeddings", rows("text_embeddings", {"text_hash": hashes, "text": hashes}))


def _memory_artifact(root, trained_on: list[int]) -> None:
    """A tiny memory model published as ``memory-model:v1``, saying it trained on ``trained_on``."""
    from schemas.train import MemoryTrainConfig
    from storage.artifacts import ArtifactStore
    from training.memory_model import build_memory_model, save_memory_model

    config = MemoryTrainConfig(data_root=root, tiny=True, device="cpu")
    model = build_memory_model(config)

    def write(folder) -> None:
        save_memory_model(model, folder, copy_llm=True)
        (folder / "data_split.json").write_text(json.dumps({"train": trained_on, "eval": []}))

    ArtifactStore(config.artifacts_dir).publish("memory-model", write, kind="memory-model", inputs={},
                                                config=config.model_dump(mode="json"), code={}, metrics={})


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, ingested_root):
    """One evaluation run on a private copy of the ingested demo, then the same run again."""
    import shutil

    from flows.evaluate import evaluate_flow

    root = tmp_path_factory.mktemp("eval") / "root"
    shutil.copytree(ingested_root, root, symlinks=True)
    _random_embeddings(root)
    val_ids = sorted(read(connect(root / "lance"), "dialogs",
                          where="split = 'val'").column("image_id").to_pylist())
    _memory_artifact(root, trained_on=[val_ids[0]])  # a leak the flow must catch
    variants = root / "variants.toml"
    with running_server(make_state(teacher=True)) as url:  # a shared server, as Ollama would be
        variants.write_text(VARIANTS.replace("{shared_host}", url))
        config = EvaluateConfig(data_root=root, variants=variants, limit=LIMIT, run_label="first")
        first = evaluate_flow(config)
        db = connect(config.lance_uri)
        versions = {n: open_table(db, n).version for n in ("llm_responses", "evaluations")}
        again = evaluate_flow(config)
    return config, first, again, versions, url


def test_rows_for_every_metric_with_provenance(evaluated):
    config, first, _, _, _ = evaluated
    rows = read(connect(config.lance_uri), "evaluations").to_pylist()
    by = {(r["variant"], r["metric"]): r for r in rows}
    assert {r["run_id"] for r in rows} == {"first"}
    assert {r["variant"] for r in rows} == {"teacher_prompt", "teacher_base", "tiny_base", "memory"}
    for variant in ("teacher_prompt", "teacher_base", "tiny_base"):
        for metric in (*GENERATION_METRICS, "reminder_format_rate"):
            row = by[(variant, metric)]
            assert row["n"] == LIMIT and row["split"] == "val"
            assert format_dataset_version(row["dataset_version"]) == first.dataset_version
            first_table = row["dataset_version"][0]
            assert first_table["table"] == "dialogs" and first_table["version"] >= 1
            assert (row["backbone"] is not None) == (metric == "bertscore_f1")
    assert by[("tiny_base", "bertscore_f1")]["backbone"].startswith("all-MiniLM-L6-v2@L6 (")
    for metric in RANKING_METRICS:  # ranking: every round of the two dialogs
        assert by[("tiny_base", metric)]["n"] == LIMIT * 10
    assert not any(v == "teacher_prompt" and m in RANKING_METRICS for v, m in by)
    for metric in (*GENERATION_METRICS, *RANKING_METRICS):  # the memory model answers every turn
        assert by[("memory", metric)]["n"] == LIMIT * 10
        assert by[("memory", metric)]["model_artifact"] == "memory-model:v1"
        # the memory model answers from the stored embeddings: their versions are part of what it read
        version = format_dataset_version(by[("memory", metric)]["dataset_version"])
        assert version.startswith(first.dataset_version + ",image_embeddings@v")
        assert ",text_embeddings@v" in version
    assert list(first.skipped) == ["missing_sft"] and "no-such-artifact" in first.skipped["missing_sft"]
    # the typed result names what the run read (the memory variant also read the embeddings) and wrote
    assert set(first.read_versions) == {"dialogs", "turns", "image_embeddings", "text_embeddings"}
    held = first.read_versions
    assert first.dataset_version == f"dialogs@v{held['dialogs']},turns@v{held['turns']}"
    assert first.versions == {"evaluations": first.evaluations_version,
                              "quarantine": first.quarantine_version}
    assert first.versions["evaluations"] == open_table(connect(config.lance_uri), "evaluations").version


def test_model_artifact_names_what_answered(evaluated):
    """Served models: the digest the server lists for them; a checkpoint given as a path: the
    content fingerprint its cache key uses; an artifact: name:vN."""
    import hashlib

    config, _, _, _, _ = evaluated
    db = connect(config.lance_uri)
    rows = read(db, "evaluations", where="run_id = 'first'").to_pylist()
    artifact = {r["variant"]: r["model_artifact"] for r in rows}
    assert len({(r["variant"], r["model_artifact"]) for r in rows}) == len(artifact)  # one per variant
    # the loopback server's /api/tags digest of the teacher (what the official client lists)
    digest = hashlib.sha256(b"mmem-teacher:latest:teacher").hexdigest()
    assert artifact["teacher_prompt"] == artifact["teacher_base"] == f"mmem-teacher:latest@sha256:{digest}"
    hf = next(r["model"] for r in read(db, "llm_responses").to_pylist() if r["backend"].startswith("hf:"))
    assert artifact["tiny_base"] == hf.removeprefix("hf:") and len(hf.rsplit("@", 1)[1]) == 12
    assert artifact["memory"] == "memory-model:v1"


def test_scores_are_honest(evaluated):
    _, first, _, _, _ = evaluated
    teacher, tiny = first.metrics["teacher_prompt"], first.metrics["tiny_base"]
    assert teacher["reminder_format_rate"] == 1.0  # the teacher always writes the format
    assert tiny["reminder_format_rate"] == 0.0  # a random model never does
    for random_model in (tiny, first.metrics["memory"]):
        assert random_model["bleu4"] < 1.0 and random_model["rouge1_f1"] < 0.2  # near zero: random weights
        assert 1 <= random_model["mean_rank"] <= 100
        assert random_model["r@1"] <= random_model["r@5"] <= random_model["r@10"]


def test_generations_are_in_the_response_cache(evaluated):
    config, _, _, _, _ = evaluated
    responses = read(connect(config.lance_uri), "llm_responses").to_pylist()
    backends = [r["backend"] for r in responses]
    assert backends.count("teacher") == 2 * LIMIT  # two prompt styles: two different requests each
    assert sum(b.startswith("hf:llama") for b in backends) == LIMIT
    assert backends.count("memory:memory-model:v1") == LIMIT * 10
    hf = next(r for r in responses if r["backend"].startswith("hf:"))
    assert hf["model"].startswith("hf:llama-seed0@") and hf["host"] == "in-process" and hf["status"] == "ok"
    assert {k: v for k, v in hf["options"].items() if v is not None} == {"temperature": 0.0, "seed": 0,
                                                                         "num_predict": 8}  # typed, not JSON


def test_a_shared_server_is_guarded_by_a_prefect_concurrency_limit(evaluated):
    from prefect.client.orchestration import get_client

    from tasks.runtime.slots import limit_name

    config, _, _, _, url = evaluated
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(limit_name(url))
    assert limit.limit == config.concurrency and limit.active_slots == 0  # created, used, released


def test_dialogs_an_artifact_trained_on_are_quarantined(evaluated):
    config, _, _, _, _ = evaluated
    db = connect(config.lance_uri)
    val_ids = sorted(read(db, "dialogs", where="split = 'val'").column("image_id").to_pylist())
    q = read(db, "quarantine", where="stage = 'evaluate'").to_pylist()
    assert [(r["key"], r["reason"]) for r in q] == [(str(val_ids[0]), "seen_in_training")]
    assert "memory-model:v1" in q[0]["detail"]
    memory_turns = {prompt_messages(r["prompt"])[0]["memory"] for r in read(db, "llm_responses").to_pylist()
                    if r["backend"].startswith("memory:")}
    assert not any(m.startswith(f"visdial:{val_ids[0]}:") for m in memory_turns)  # never asked about it


def test_rerun_makes_no_calls_and_writes_nothing(evaluated):
    config, first, again, versions, _ = evaluated
    db = connect(config.lance_uri)
    # every answer came from the cache
    assert open_table(db, "llm_responses").version == versions["llm_responses"]
    assert open_table(db, "evaluations").version == versions["evaluations"]  # same run label, same values
    assert again.inserted == 0 and again.updated == 0
    assert again.metrics == first.metrics


def test_report_files_and_artifacts(evaluated, flow_run_artifacts):
    _, first, _, _, _ = evaluated
    assert len(first.charts) == 4  # overlap, bleu4, ranking, mean rank
    for path in first.charts:
        with open(path, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    md = Path(first.report).read_text(encoding="utf-8")
    assert "| teacher_prompt |" in md and "| tiny_base |" in md and "r@10" in md

    artifacts = flow_run_artifacts(first.flow_run_id)
    assert "data:image/png;base64," in artifacts["evaluation"]["data"]  # the charts travel inline
    assert "| tiny_base |" in artifacts["evaluation"]["data"]
    assert artifacts["evaluation-rows"]["type"] == "table"


def test_leaked_dialog_is_quarantined_not_scored(data_root):
    """A val dialog that training data also holds is dropped with a reason, and n shrinks."""
    from evaluation.data import load_eval_data

    db = connect(data_root / "lance")
    val_ids = sorted(read(db, "dialogs", where="split = 'val'").column("image_id").to_pylist())
    merge(db, "reminders", pa.Table.from_pylist([{
        "image_id": val_ids[0], "split": "train", "conversation": "Q: x",
        "response": "<reminder>r</reminder> a", "reminder": "r", "final_answer": "a", "request_hash": "h"}]))
    data = load_eval_data(EvaluateConfig(data_root=data_root))
    assert [r.key for r in data.rejections] == [str(val_ids[0])]
    assert data.rejections[0].reason == "seen_in_training"
    assert sorted(data.dialogs.column("image_id").to_pylist()) == val_ids[1:]
    assert set(data.turns.column("image_id").to_pylist()) == set(val_ids[1:])


def test_config_refuses_a_training_split_and_bad_variants(tmp_path):
    with pytest.raises(ValueError, match="training split"):
        EvaluateConfig(data_root=tmp_path, split="train")
    with pytest.raises(ValueError, match="ranking needs option log-likelihoods"):
        Variant(name="x", backend="ollama", model="gemma3:4b", ranking=True)
    names = [v.name for v in load_variants("report")]
    assert names == ["4b_base", "4b_prompt", "27b_base", "27b_prompt", "4b_finetuned"]
    assert {v.name for v in load_variants("demo")} >= {"teacher_prompt", "tiny_llama_base"}


def test_cli_report_compares_runs(evaluated):
    from cli.main import app

    config, _, _, _, _ = evaluated
    db = connect(config.lance_uri)
    rows = read(db, "evaluations", where="run_id = 'first'").to_pylist()
    merge(db, "evaluations", pa.Table.from_pylist(
        [{**r, "run_id": "second", "value": r["value"] + 0.5} for r in rows]))
    out = CliRunner().invoke(app, ["--data-root", str(config.data_root), "evaluate", "report", "--runs",
                                   "first", "--runs", "sec", "--out", str(config.data_root / "cmp")])
    assert out.exit_code == 0, out.output
    assert "| teacher_prompt | rouge1_f1 |" in out.output and "Δ vs first" in out.output
    line = next(x for x in out.output.splitlines() if x.startswith("| teacher_prompt | rouge1_f1 |"))
    assert line.rstrip(" |").endswith("0.5000")  # the change from the first run
    assert (config.data_root / "cmp" / "report-overlap.png").is_file()
    bad = CliRunner().invoke(app, ["--data-root", str(config.data_root), "evaluate", "report", "--runs",
                                   "nope"])
    assert bad.exit_code == 1 and "matches 0 runs" in bad.output


def _dense_file(path: Path, image_ids: list[int], rounds: tuple[int, ...]) -> Path:
    """Dense annotations in VisDial's format for ``rounds`` of each dialog: option 0 fully relevant,
    options 1-3 half, the rest not (the official file annotates one round per dialog; any works)."""
    rel = [1.0, 0.5, 0.5, 0.5] + [0.0] * 96
    path.write_text(json.dumps([{"image_id": i, "round_id": r, "gt_relevance": rel} for i in image_ids
                                for r in rounds]))
    return path


def test_dense_annotations_add_ndcg_over_the_annotated_rounds(evaluated):
    from flows.evaluate import evaluate_flow

    config, first, _, _, _ = evaluated
    db = connect(config.lance_uri)
    val_ids = sorted(read(db, "dialogs", where="split = 'val'").column("image_id").to_pylist())
    rounds = (2, 5, 10)
    dense = _dense_file(config.data_root / "dense.json", val_ids, rounds)
    out = evaluate_flow(config.model_copy(update={"dense_annotations": dense, "run_label": "dense",
                                                  "only": ["tiny_base", "memory"], "bertscore": False}))
    rows = {(r["variant"], r["metric"]): r for r in read(db, "evaluations",
                                                         where="run_id = 'dense'").to_pylist()}
    for variant in ("tiny_base", "memory"):
        ndcg = rows[(variant, "ndcg")]
        assert ndcg["n"] == LIMIT * len(rounds)  # the annotated rounds among the LIMIT dialogs ranked
        assert 0.0 <= ndcg["value"] <= 1.0 and ndcg["value"] == out.metrics[variant]["ndcg"]
        for metric in RANKING_METRICS:  # the same scores as the run without annotations
            assert rows[(variant, metric)]["value"] == pytest.approx(first.metrics[variant][metric])
            assert rows[(variant, metric)]["n"] == LIMIT * 10
    assert "ndcg_rounds" not in out.metrics["tiny_base"]
    assert ("tiny_base", "ndcg") not in {(r["variant"], r["metric"]) for r in
                                         read(db, "evaluations", where="run_id = 'first'").to_pylist()}


def test_cli_run_variants_only_and_bad_files(evaluated):
    from cli.main import app

    config, first, _, _, _ = evaluated
    root = ["--data-root", str(config.data_root)]
    # a packaged file by name, one of its variants, a batch size
    out = CliRunner().invoke(app, [*root, "evaluate", "run", "--variants", "demo", "--only", "teacher_prompt",
                                   "--limit", str(LIMIT), "--run-label", "cli-demo", "--batch-size", "3"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.output[out.output.index("{"):])
    assert result["run_id"] == "cli-demo" and list(result["metrics"]) == ["teacher_prompt"]
    assert result["metrics"]["teacher_prompt"] == first.metrics["teacher_prompt"]  # the same prompts, cached
    # a file of ours, two of its variants (repeatable --only)
    out = CliRunner().invoke(app, [*root, "evaluate", "run", "--variants", str(config.variants), "--only",
                                   "teacher_base", "--only", "tiny_base", "--limit", str(LIMIT),
                                   "--run-label", "cli-file"])
    assert out.exit_code == 0, out.output
    assert sorted(json.loads(out.output[out.output.index("{"):])["metrics"]) == ["teacher_base", "tiny_base"]
    db = connect(config.lance_uri)
    assert {r["variant"] for r in read(db, "evaluations", where="run_id = 'cli-file'").to_pylist()} == {
        "teacher_base", "tiny_base"}

    cases = {
        str(config.data_root / "nope.toml"): "does not exist",
        "not-a-packaged-name": "does not exist",
    }
    for text, needle in (("[[variant]]\nname = 'x'\nbackend = 'nope'\nmodel = 'm'\n", "backend"),
                         ("[[variant]\nname = ", "is not valid TOML"),
                         ("title = 'no variants'\n", "no [[variant]] tables")):
        path = config.data_root / f"bad-{len(cases)}.toml"
        path.write_text(text)
        cases[str(path)] = needle
    for variants, needle in cases.items():
        out = CliRunner().invoke(app, [*root, "evaluate", "run", "--variants", variants])
        assert out.exit_code == 1, (variants, out.output)
        assert "error:" in out.output and needle in out.output, out.output
        assert Path(variants).name in out.output, out.output
        assert "Traceback" not in out.output
    out = CliRunner().invoke(app, [*root, "evaluate", "run", "--variants", "demo", "--only",
                                   "no_such_variant"])
    assert out.exit_code == 1 and "unknown variant(s) ['no_such_variant']" in out.output, out.output
    out = CliRunner().invoke(app, [*root, "evaluate", "run", "--batch-size", "0"])
    assert out.exit_code == 2  # refused by the option parser


def test_artifact_versions_pin_what_a_variant_loads(tmp_path):
    """The pipeline and the new-artifact triggers hand over the version just trained: a variant
    loads that one even when a newer one exists, and its own pin otherwise."""
    from evaluation.models import resolve_model
    from storage.artifacts import ArtifactStore

    store = ArtifactStore(EvaluateConfig(data_root=tmp_path).artifacts_dir)
    for _ in range(3):
        store.publish("memory-model", lambda folder: (folder / "w.bin").write_bytes(b"w"),
                      kind="memory-model", inputs={}, config={}, code={}, metrics={})
    variant = Variant(name="m", backend="memory", artifact="memory-model", artifact_version=2)
    refs = [resolve_model(EvaluateConfig(data_root=tmp_path, artifact_versions=pins), v).artifact
            for pins, v in [({}, variant), ({"memory-model": 1}, variant),
                            ({}, variant.model_copy(update={"artifact_version": None})),
                            ({"other": 1}, variant.model_copy(update={"artifact_version": None}))]]
    assert refs == [store.get("memory-model", v).ref for v in (2, 1, 3, 3)]
