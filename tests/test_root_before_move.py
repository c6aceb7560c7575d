"""A data root written before the one-house refactor (issue 17) keeps working after it.

``tests/data/root-before-17`` is the root ``mmem demo --dialogs 8 --val-dialogs 4`` wrote at commit
a9eb585 (the code before the move): its Lance tables, the demo images and the Prefect task results
that run persisted (embed and reminders shards, which named the classes of the old modules). The
code that reads it now must answer from what is there: no shard embedded again, no LLM call made
again, no reminder lost, no memory missing; an old persisted shard result is ignored, never decoded
into a moved class. Its images are found without ``image_roots``: the absolute folders it recorded
are gone, and the same folders under the data root (by the tail of their old paths) are taken.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from storage.lance import connect, open_table, read

BEFORE = Path(__file__).parent / "data" / "root-before-17"


@pytest.fixture
def root(tmp_path) -> Path:
    """A copy of the old root, whose absolute image roots (``/tmp/root-before-17/demo/images/...``)
    name a folder that is gone: renamed in the table, as the folder that wrote it may still exist on
    the machine that made it."""
    out = tmp_path / "root"
    shutil.copytree(BEFORE, out)
    gone = tmp_path / "gone" / "root-before-17"
    images = open_table(connect(out / "lance"), "images")
    for folder in ("train2014", "val2014"):
        images.update(where=f"root = '/tmp/root-before-17/demo/images/{folder}'",
                      values={"root": str(gone / "demo" / "images" / folder)})
    assert not gone.exists() and images.count_rows("root LIKE '/tmp/root-before-17%'") == 0
    return out


def _counts(root: Path) -> dict[str, int]:
    db = connect(root / "lance")
    return {n: db.open_table(n).count_rows() for n in db.list_tables().tables}


def test_the_old_root_is_queried_re_embedded_and_recalled(root):
    from flows.embed import embed_flow
    from memory.store import MemoryStore
    from schemas.embed import EmbedConfig
    from schemas.memory import MemoryConfig

    before = _counts(root)
    res = CliRunner().invoke(app, ["--data-root", str(root), "query", "--text", "a red circle", "-k", "3"])
    assert res.exit_code == 0, res.output
    found = json.loads(res.output[res.output.index("{"):])
    assert len(found["images"]) == 3  # the root's recorded tiny model answers

    result = embed_flow(EmbedConfig(data_root=root, tiny=True, device="cpu"))
    assert result.shards_computed == 0 and result.shards_up_to_date == result.shards > 0
    assert _counts(root) == before

    with MemoryStore(MemoryConfig(data_root=root, tiny=True, device="cpu")) as store:
        hits = store.recall("demo", text="a red circle", k=5)
    assert len(hits) == 5


def test_the_old_reminders_are_kept_without_asking_the_llm_again(root):
    from flows.reminders import reminders_flow
    from llmcalls.server import make_state, running_server
    from schemas.reminders import RemindersConfig

    before = _counts(root)
    state = make_state(teacher=True)
    with running_server(state) as url:
        result = reminders_flow(RemindersConfig(data_root=root, ollama_host=url, model="mmem-teacher",
                                                splits=["train"]))  # as the demo made them
    assert sum(state.requests.values()) == 0 and result.calls == 0
    assert result.valid == before["reminders"] and result.cache_hits == result.prompts
    assert _counts(root)["reminders"] == before["reminders"]
    urls = read(connect(root / "lance"), "reminders").column("image_url").to_pylist()
    assert all(u.startswith("demo/images/train2014/") for u in urls)  # relative to the root from now on
