"""Crash and resume (issue 9): the embed stage is SIGKILLed at random points, then re-run (the
reminders stage: test_crash_resume_reminders.py).

Guarantee: after a run is killed and the stage is run again, its tables equal those of a run that
never stopped (same keys, no duplicate, no missing row, equal values), and the resumed run does
not redo finished work: embed computes only the shards that were neither merged nor persisted,
reminders asks the LLM only for prompts whose answer was neither merged nor journaled (the calls
in flight at the kill, at most ``concurrency`` of them, are the only ones made twice).

The killed runs are real processes (forked by ``_stage_runner.py``, talking to this session's
Prefect server); the kill point is drawn from the seed: after k finished shards / k received LLM
requests plus a short random delay. The LLM server runs in this process, so its request log
survives the kills.
"""

from __future__ import annotations

import os
import random
from contextlib import suppress
from pathlib import Path

import numpy as np
import pytest
from crash_support import SEEDS, copy_root, unique

from storage.lance import connect, read, table_exists

# --- embed -----------------------------------------------------------------------------------

EMBED_TABLES = {"image_embeddings": ["image_id"], "text_embeddings": ["text_hash"]}


def embed_config(root: Path) -> dict:
    """Shards of 8 rows (24 shards on the demo), merged two at a time: a kill finds shards merged,
    shards persisted but not merged, and shards not started."""
    return {"data_root": str(root), "tiny": True, "device": "cpu", "shard_rows": 8, "decode_workers": 1,
            "merge_rows": 16, "concurrent_shards": 2, "index_min_rows": 10**6}


@pytest.fixture(scope="module")
def embed_reference(ingested_root, tmp_path_factory):
    from flows.embed import embed_flow
    from schemas.embed import EmbedConfig

    root = copy_root(ingested_root, tmp_path_factory.mktemp("embed-ref") / "root")
    counts = embed_flow(EmbedConfig(**embed_config(root)))
    assert counts.shards_computed == counts.shards > 10
    db = connect(root / "lance")
    return counts, {name: unique(read(db, name), key) for name, key in EMBED_TABLES.items()}


def shard_state(cfg) -> list[tuple[str, bool, bool]]:
    """Per planned shard: (content key, all its rows in the table, a readable persisted result)."""
    from prefect.results import ResultRecord

    from embed.plan import ModelArgs, image_items, plan_shards, text_items

    db = connect(cfg.lance_uri)
    fingerprint = ModelArgs.from_config(cfg).fingerprint
    out = []
    for kind, items, name, key in (("image", image_items(db, cfg), "image_embeddings", "image_id"),
                                   ("text", text_items(db, cfg), "text_embeddings", "text_hash")):
        have = set(read(db, name, columns=[key]).column(key).to_pylist()) if table_exists(db, name) else set()
        for s in plan_shards(kind, items, cfg.shard_rows, fingerprint):
            path = cfg.results_dir / s.key
            readable = False
            if path.is_file():
                with suppress(Exception):  # a file cut short by the kill is a cache miss, as for Prefect
                    ResultRecord.deserialize(path.read_bytes())
                    readable = True
            out.append((s.key, set(s.rows.column(key).to_pylist()) <= have, readable))
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_embed_killed_at_a_random_point_resumes_to_the_uninterrupted_tables(seed, runner, embed_reference,
                                                                            ingested_root, tmp_path):
    from flows.embed import embed_flow
    from schemas.embed import EmbedConfig

    ref_counts, ref_tables = embed_reference
    rng = random.Random(seed)
    root = copy_root(ingested_root, tmp_path / "root")
    cfg = EmbedConfig(**embed_config(root))
    log = tmp_path / "killed.log"
    after = rng.randint(1, 2 * ref_counts.shards // 3)  # finished shards before the kill
    pid = runner.start("embed", embed_config(root), log)
    runner.kill_after(
        pid,
        log,
        lambda: cfg.results_dir.is_dir() and len(os.listdir(cfg.results_dir)) >= after,
        rng.uniform(0, 0.15),
    )

    state = shard_state(cfg)
    up_to_date = sum(merged for _, merged, _ in state)
    cached = sum(ok and not merged for _, merged, ok in state)
    assert up_to_date + cached < len(state), "the kill came after the last shard: nothing left to resume"
    persisted = {k: (cfg.results_dir / k).stat().st_mtime_ns for k, _, ok in state if ok}
    db = connect(cfg.lance_uri)
    before = {
        n: read(db, n, columns=[k[0]]).num_rows if table_exists(db, n) else 0 for n, k in EMBED_TABLES.items()
    }

    out = embed_flow(cfg)

    # only the shards neither merged nor persisted were computed again
    assert (out.shards_up_to_date, out.shards_cached, out.shards_computed) == (
        up_to_date, cached, len(state) - up_to_date - cached)
    assert {k: (cfg.results_dir / k).stat().st_mtime_ns for k in persisted} == persisted  # not rewritten
    db = connect(cfg.lance_uri)
    assert read(db, "quarantine", where="stage = 'embed'").num_rows == 0
    for name, key in EMBED_TABLES.items():
        got, ref = unique(read(db, name), key), ref_tables[name]
        assert getattr(out, f"{name}_inserted") == ref.num_rows - before[name]
        assert getattr(out, f"{name}_updated") == 0
        assert got.num_rows == ref.num_rows
        for col in got.column_names:
            if col == "vector":
                np.testing.assert_allclose(
                    np.stack(got.column(col).to_numpy(zero_copy_only=False)),
                    np.stack(ref.column(col).to_numpy(zero_copy_only=False)),
                    atol=1e-5,
                )
            else:
                assert got.column(col).to_pylist() == ref.column(col).to_pylist(), (name, col)
