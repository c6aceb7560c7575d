"""BTREE indexes on the join keys (turns.image_id, turns.text_hash, dialogs.caption_hash): none on
a small table, built once past the threshold, rows written later folded in, and a filter on the
key then answered through the index (Lance's plan names it)."""

from __future__ import annotations

import pyarrow as pa

from storage.index import JOIN_KEYS, ensure_scalar_indexes
from storage.lance import connect, open_table


def test_join_keys_are_indexed_past_the_threshold_and_kept_current(data_root):
    db = connect(data_root / "lance")
    assert ensure_scalar_indexes(db, "turns") == {"image_id": "none", "text_hash": "none"}  # 260 rows
    assert not open_table(db, "turns").list_indices()

    for name, columns in JOIN_KEYS.items():
        assert ensure_scalar_indexes(db, name, min_rows=10) == dict.fromkeys(columns, "created")
        tbl = open_table(db, name)
        assert {i.columns[0]: str(i.index_type) for i in tbl.list_indices()} == dict.fromkeys(
            columns, "BTree"
        )

    turns = open_table(db, "turns")
    some = turns.to_lance().to_table(limit=10)
    image_id = some.column("image_id")[0].as_py()
    plan = turns.to_lance().scanner(filter=f"image_id = {image_id}").explain_plan(verbose=True)
    assert "ScalarIndexQuery" in plan or "MaterializeIndex" in plan, plan

    moved = pa.array(
        [-1] * len(some), some.schema.field("image_id").type
    )  # new keys, written after the build
    turns.add(some.set_column(some.schema.get_field_index("image_id"), "image_id", moved))
    assert ensure_scalar_indexes(db, "turns", min_rows=10) == {"image_id": "updated", "text_hash": "updated"}
    tbl = open_table(db, "turns")
    for idx in tbl.list_indices():
        assert tbl.index_stats(idx.name).num_unindexed_rows == 0
    assert ensure_scalar_indexes(db, "turns", min_rows=10) == {"image_id": "current", "text_hash": "current"}
    assert tbl.count_rows("image_id = -1") == len(some)
