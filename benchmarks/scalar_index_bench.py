"""Join-key lookups on ``turns`` with and without the BTREE indexes ingest builds past
``storage.index.SCALAR_MIN_ROWS``: p50 of ``image_id IN`` (20 ids) and ``text_hash IN`` (50 hashes)
over a synthetic table of ``--images`` x 10 turns (one fragment, distinct hashes).

    python benchmarks/scalar_index_bench.py --images 82783     # the VisDial-train size (827,830 turns)
    python benchmarks/scalar_index_bench.py --images 10000     # at the threshold (100,000 turns)
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schemas.tables import spec
from storage.index import ensure_scalar_indexes
from storage.lance import connect, open_table


def synthetic_turns(images: int) -> tuple[pa.Table, list[str]]:
    schema = spec("turns").schema
    ids = np.repeat(np.arange(images, dtype=np.int64), 10)
    turn = np.tile(np.arange(1, 11), images)
    hashes = [hashlib.sha1(f"{i}-{t}".encode()).hexdigest()[:16] for i, t in zip(ids, turn, strict=True)]
    given = {"image_id": ids, "turn": turn, "text_hash": hashes}
    cols = []
    for f in schema:
        if f.name in given:
            cols.append(pa.array(given[f.name], f.type))
        elif pa.types.is_string(f.type):
            cols.append(pa.array(["q"] * len(ids), f.type))
        elif pa.types.is_integer(f.type):
            cols.append(pa.array(np.zeros(len(ids), np.int64), f.type))
        else:
            cols.append(pa.nulls(len(ids), f.type))
    return pa.Table.from_arrays(cols, schema=schema), hashes


def probe(db, images: int, hashes: list[str], label: str, rng: np.random.Generator, repeat: int = 7) -> None:
    ds = open_table(db, "turns").to_lance()
    q_ids = rng.choice(images, 20, replace=False)
    q_hashes = [hashes[i] for i in rng.choice(len(hashes), 50, replace=False)]
    for name, where in (("image_id IN 20", f"image_id IN ({','.join(map(str, q_ids))})"),
                        ("text_hash IN 50", "text_hash IN (" + ",".join(f"'{h}'" for h in q_hashes) + ")")):
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            n = ds.to_table(columns=["image_id", "turn", "question"], filter=where).num_rows
            times.append(time.perf_counter() - t0)
        print(f"{label:6} {name:16} rows={n:4} p50 {1000 * sorted(times)[repeat // 2]:.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=82_783)
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="scalar-bench-"))
    try:
        db = connect(folder / "lance")
        rows, hashes = synthetic_turns(args.images)
        open_table(db, "turns").add(rows)
        rng = np.random.default_rng(0)
        probe(db, args.images, hashes, "before", rng)
        t0 = time.perf_counter()
        state = ensure_scalar_indexes(db, "turns", min_rows=1)
        print(f"indexes {state} built in {time.perf_counter() - t0:.1f} s")
        probe(db, args.images, hashes, "after", np.random.default_rng(0))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
