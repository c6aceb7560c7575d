"""A pinned table version is the one a stage reads: embed and reminders plan from the ``images``/
``dialogs``/``turns`` versions handed to them (by the pipeline, from ingest), not from whatever
was written since; unpinned, they read the latest."""

from __future__ import annotations

from schemas.embed import EmbedConfig
from schemas.reminders import RemindersConfig
from storage.lance import connect, open_table, tag


def _drop_first_dialog(root) -> tuple[dict[str, int], int]:
    """Versions before, then a newer version of each input table without the first dialog."""
    db = connect(root / "lance")
    before = {n: open_table(db, n).version for n in ("images", "dialogs", "turns")}
    first = open_table(db, "dialogs").to_lance().to_table(columns=["image_id"]).column("image_id").to_pylist()
    gone = min(first)
    for name in before:
        open_table(db, name).delete(f"image_id = {gone}")
    return before, gone


def test_reminders_plan_reads_the_pinned_versions(data_root):
    from reminders.prompts import plan

    cfg = RemindersConfig(data_root=data_root, model="m", ollama_host="http://127.0.0.1:9")
    before, gone = _drop_first_dialog(data_root)
    tag(connect(data_root / "lance"), "turns", "before-drop", before["turns"])

    prompts, _, read = plan(cfg)  # unpinned: the latest
    assert gone not in {p.image_id for p in prompts} and all(read[n] > v for n, v in before.items())

    pins = {**before, "turns": "before-drop"}  # a tag pins as well as a number
    prompts, _, read = plan(cfg.model_copy(update={"table_versions": pins}))
    assert read == before
    assert gone in {p.image_id for p in prompts}
    dropped = next(p for p in prompts if p.image_id == gone)
    assert dropped.conversation.startswith("Q: ")  # its turns were read too


def test_embed_plan_reads_the_pinned_versions(data_root):
    from embed.plan import input_versions, plan

    cfg = EmbedConfig(data_root=data_root, tiny=True, device="cpu", shard_rows=16)
    latest = plan(connect(cfg.lance_uri), cfg)
    before, _ = _drop_first_dialog(data_root)

    after = plan(connect(cfg.lance_uri), cfg)
    assert after.images == latest.images - 1 and after.texts < latest.texts
    pinned_cfg = cfg.model_copy(update={"table_versions": before})
    assert input_versions(connect(cfg.lance_uri), pinned_cfg) == before
    pinned = plan(connect(cfg.lance_uri), pinned_cfg)
    assert pinned.read_versions == before
    assert (pinned.images, pinned.texts) == (latest.images, latest.texts)
