"""The vector index build of an embeddings table: Lance training its IVF partitions itself (on the
CPU) against the partitions trained by ``storage.index.train_centroids`` on ``--device`` and handed
to the same IVF_HNSW_SQ build, which is what the embed stage does on a GPU. Both builds in the same
run, on the same table, with recall@10 against exact search so that a faster build that finds less
shows it.

The vectors are unit vectors on a low-dimensional manifold (a random linear image of ``--latent``-d
Gaussian points, plus a little noise), so that neighbourhoods mean something as they do for real
embeddings: a uniform random cloud in 1024 dimensions has none, and makes recall meaningless.

    python benchmarks/index_bench.py --rows 605770 --device cuda   # the embed stage's text table
    python benchmarks/index_bench.py --rows 100000 --device cpu    # this machine
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa

from storage.index import INDEX_TYPE, METRIC, partitions_for, train_centroids

DIM = 1024


def manifold(rows: int, latent: int, noise: float, seed: int) -> np.ndarray:
    """``rows`` points of the one manifold (its basis is fixed); ``seed`` picks the points."""
    basis = np.random.default_rng(0).standard_normal((latent, DIM), dtype=np.float32)
    rng = np.random.default_rng(seed + 1)
    out = np.empty((rows, DIM), np.float32)
    for lo in range(0, rows, 65536):  # in blocks: the whole noise matrix at once would double the memory
        hi = min(rows, lo + 65536)
        out[lo:hi] = rng.standard_normal((hi - lo, latent), dtype=np.float32) @ basis
        out[lo:hi] += noise * rng.standard_normal((hi - lo, DIM), dtype=np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def recall_at_10(ds: lance.LanceDataset, x: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> float:
    hits = 0
    for q, want in zip(queries, truth, strict=True):
        got = ds.to_table(columns=[], with_row_id=True, nearest={
            "column": "vector", "q": q, "k": 10, "nprobes": 20, "refine_factor": 5, "metric": METRIC})
        hits += len(set(got.column("_rowid").to_pylist()) & set(want.tolist()))
    return hits / truth.size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--latent", type=int, default=12, help="the manifold's dimension")
    ap.add_argument("--noise", type=float, default=0.5, help="per-dimension noise off the manifold")
    ap.add_argument("--device", default="cpu", help="where train_centroids runs (cpu, cuda)")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mmem-index-bench"))
    args = ap.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)

    x = manifold(args.rows, args.latent, args.noise, seed=0)
    queries = manifold(args.queries, args.latent, args.noise, seed=1)  # the same manifold, other points
    truth = np.argsort(-(queries @ x.T), axis=1)[:, :10]  # one fragment: row ids are row numbers

    shutil.rmtree(args.workdir, ignore_errors=True)
    table = pa.table({"vector": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), DIM)})
    ds = lance.write_dataset(table, args.workdir / "t.lance", max_rows_per_file=len(x))
    parts = partitions_for(len(x))
    report: dict[str, object] = {"command": command, "rows": len(x), "partitions": parts,
                                 "index_type": INDEX_TYPE, "cpu_count": os.cpu_count(),
                                 "load_1_5_15": [round(v, 2) for v in os.getloadavg()]}

    t = time.perf_counter()
    ds.create_index("vector", index_type=INDEX_TYPE, metric=METRIC, num_partitions=parts, replace=True)
    report["lance_trains_s"] = round(time.perf_counter() - t, 2)
    report["lance_trains_recall_at_10"] = recall_at_10(ds, x, queries, truth)

    t = time.perf_counter()
    centroids = train_centroids(ds, "vector", parts, args.device)
    t1 = time.perf_counter()
    ds.create_index("vector", index_type=INDEX_TYPE, metric=METRIC, num_partitions=parts,
                    ivf_centroids=centroids, replace=True)
    report[f"kmeans_on_{args.device}_s"] = round(t1 - t, 2)
    report["build_with_centroids_s"] = round(time.perf_counter() - t1, 2)
    report["given_centroids_total_s"] = round(time.perf_counter() - t, 2)
    report["given_centroids_recall_at_10"] = recall_at_10(ds, x, queries, truth)

    print("\n=== index benchmark ===")
    for k, v in report.items():
        print(f"{k:32s} {v}")
    print(f"reproduce with: {command}")


if __name__ == "__main__":
    main()
