"""A data root moved whole keeps working (issue 24): its tables name their images relative to it.

One root is built as the demo builds it (the demo dataset inside the root, both splits ingested,
tiny ImageBind, reminders from the local teacher server, memories seeded, one evaluation run),
then the whole folder is moved to another parent. On the moved root, with no ``image_roots`` and no
model flags: the query and memory recall answer, a reminders re-run asks nothing and keeps every
reminder, an embed re-run embeds nothing (and a new model finds every image), an evaluation re-run
asks nothing and its report prints. A root whose image folder is really gone stops with one clear
line and writes nothing, instead of quarantining every image and deleting what it made before.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from storage.lance import connect, open_table, read

SPLITS = {"train": "train2014", "val": "val2014"}
VARIANTS = """
[[variant]]
name = "teacher_prompt"
backend = "ollama"
model = "mmem-teacher"
prompt = "prompt"
"""
LIMIT = 2  # evaluated dialogs


def _versions(root: Path) -> dict[str, int]:
    db = connect(root / "lance")
    return {n: open_table(db, n).version for n in db.list_tables().tables}


def _counts(root: Path) -> dict[str, int]:
    db = connect(root / "lance")
    return {n: open_table(db, n).count_rows() for n in db.list_tables().tables}


def _reminders(root: Path, url: str):
    from schemas.reminders import RemindersConfig

    return RemindersConfig(data_root=root, ollama_host=url, model="mmem-teacher", splits=["train"])


def _evaluate(root: Path, url: str, variants: Path):
    from schemas.evaluate import EvaluateConfig

    return EvaluateConfig(data_root=root, variants=variants, limit=LIMIT, run_label="before", ollama_host=url)


@pytest.fixture(scope="module")
def moved(tmp_path_factory, demo_dir):
    """``(root, url, state, variants, before)``: the root after the move, the teacher server that
    answered before it (still running: same host, same cache keys), and what the root held."""
    from flows.embed import embed_flow
    from flows.evaluate import evaluate_flow
    from flows.ingest import ingest_flow
    from flows.reminders import reminders_flow
    from llmcalls.server import make_state, running_server
    from memory.seed import seed_visdial
    from memory.store import MemoryStore
    from schemas.embed import EmbedConfig
    from schemas.ingest import IngestConfig
    from schemas.memory import MemoryConfig

    root = tmp_path_factory.mktemp("before") / "root"
    shutil.copytree(demo_dir, root / "demo")  # the demo's images live under its root
    for split, folder in SPLITS.items():
        ingest_flow(IngestConfig(data_root=root, visdial=root / "demo" / f"visdial_1.0_{split}.json",
                                 images=root / "demo" / "images" / folder,
                                 coco=root / "demo" / f"captions_{folder}.json", workers=1))
    stored = set(read(connect(root / "lance"), "images").column("root").to_pylist())
    assert stored == {f"demo/images/{f}" for f in SPLITS.values()}  # relative to the data root
    embed_flow(EmbedConfig(data_root=root, tiny=True, device="cpu"))  # records tiny in mmem-root.json
    with MemoryStore(MemoryConfig.load(None, data_root=root, device="cpu")) as store:
        seed_visdial(store, split="train", owner="demo")
    variants = tmp_path_factory.mktemp("variants") / "variants.toml"
    variants.write_text(VARIANTS)
    state = make_state(teacher=True)
    with running_server(state) as url:
        made = reminders_flow(_reminders(root, url))
        assert made.valid == made.prompts > 0 and made.calls > 0
        evaluated = evaluate_flow(_evaluate(root, url, variants))
        before = {"versions": _versions(root), "counts": _counts(root), "calls": sum(state.requests.values()),
                  "reminders": read(connect(root / "lance"), "reminders").sort_by("image_id").to_pylist(),
                  "evaluated": evaluated}
        dst = tmp_path_factory.mktemp("elsewhere") / "moved-root"
        shutil.move(str(root), str(dst))
        assert not root.exists()
        yield dst, url, state, variants, before


def test_query_and_recall_answer_on_the_moved_root(moved):
    from memory.store import MemoryStore
    from schemas.memory import MemoryConfig

    root, *_ = moved
    res = CliRunner().invoke(app, ["--data-root", str(root), "query", "--text", "a red circle", "-k", "3"])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.output[res.output.index("{"):])["images"]) == 3  # the recorded tiny model
    res = CliRunner().invoke(app, ["--data-root", str(root), "memory", "recall", "--owner", "demo",
                                   "--text", "a red circle", "-k", "5"])
    assert res.exit_code == 0, res.output
    with MemoryStore(MemoryConfig.load(None, data_root=root, device="cpu")) as store:
        assert len(store.recall("demo", text="a red circle", k=5)) == 5


def test_a_reminders_re_run_asks_nothing_and_keeps_every_reminder(moved):
    from flows.reminders import reminders_flow

    root, url, state, _, before = moved
    calls = sum(state.requests.values())
    result = reminders_flow(_reminders(root, url))
    assert sum(state.requests.values()) == calls and result.calls == 0
    assert result.quarantined == 0 and result.valid == result.cache_hits == result.prompts
    rows = read(connect(root / "lance"), "reminders").sort_by("image_id").to_pylist()
    assert rows == before["reminders"]  # the same rows, image_url included (relative to the root)
    assert all(r["image_url"].startswith("demo/images/train2014/") for r in rows)
    assert _versions(root)["reminders"] == before["versions"]["reminders"]  # nothing rewritten


def test_an_embed_re_run_embeds_nothing_and_a_new_model_finds_every_image(moved, tmp_path):
    from flows.embed import embed_flow
    from schemas.embed import EmbedConfig

    root, *_, before = moved
    again = embed_flow(EmbedConfig(data_root=root, tiny=True, device="cpu"))
    assert again.shards_computed == 0 and again.shards_up_to_date == again.shards > 0
    assert _counts(root)["image_embeddings"] == before["counts"]["image_embeddings"]

    copy = tmp_path / "copy"  # another model reads every image again, from where they are now
    shutil.copytree(root, copy)
    other = embed_flow(EmbedConfig(data_root=copy, tiny=True, seed=1, device="cpu"))
    assert other.shards_computed > 0
    quarantined = read(connect(copy / "lance"), "quarantine", where="stage = 'embed'")
    assert len(quarantined) == 0, quarantined.to_pylist()


def test_an_evaluation_re_run_asks_nothing_and_its_report_prints(moved):
    from flows.evaluate import evaluate_flow

    root, url, state, variants, before = moved
    first, calls = before["evaluated"], sum(state.requests.values())
    again = evaluate_flow(_evaluate(root, url, variants))
    assert sum(state.requests.values()) == calls  # every answer from the cache: the images were found
    assert again.quarantined == first.quarantined and again.metrics == first.metrics
    assert again.inserted == 0 and again.updated == 0
    res = CliRunner().invoke(app, ["--data-root", str(root), "evaluate", "report"])
    assert res.exit_code == 0, res.output
    assert "| teacher_prompt |" in res.output


def test_a_gone_image_folder_stops_reminders_and_embed_before_they_write(moved, tmp_path):
    """The images themselves moved away (not with the root): one clear line naming the folder and
    the setting to point at it; no dialog quarantined, no reminder deleted, no table written."""
    from flows.embed import embed_flow
    from flows.reminders import reminders_flow
    from ingest.roots import ImageRootMissing
    from schemas.embed import EmbedConfig

    root, url, *_ = moved
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    shutil.move(str(copy / "demo" / "images" / "train2014"), str(tmp_path / "train2014-elsewhere"))
    versions = _versions(copy)
    with pytest.raises(ImageRootMissing, match=r"train2014.*MMEM_REMINDERS_IMAGE_ROOTS") as err:
        reminders_flow(_reminders(copy, url))
    assert "\n" not in str(err.value)
    with pytest.raises(ImageRootMissing, match=r"train2014.*MMEM_EMBED_IMAGE_ROOTS"):
        embed_flow(EmbedConfig(data_root=copy, tiny=True, seed=1, device="cpu"))  # a model that needs them
    assert _versions(copy) == versions
    # pointed at where they are now, both run again
    elsewhere = {"train": tmp_path / "train2014-elsewhere"}
    again = reminders_flow(_reminders(copy, url).model_copy(update={"image_roots": elsewhere}))
    assert again.calls == 0 and again.quarantined == 0
