"""The embed flow on a real Dask scheduler with two worker processes on loopback, through
``prefect_dask.DaskTaskRunner`` pointed at its address (as a multi-GPU run would be)."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc

from schemas.embed import EmbedConfig
from storage.lance import connect, read
from training.imagebind import load_embedder


def test_embed_flow_on_a_dask_cluster_with_two_workers(data_root, demo_dir):
    from distributed import LocalCluster

    from flows.embed import embed_flow

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        cfg = EmbedConfig(data_root=data_root, tiny=True, device="cpu", shard_rows=48, decode_workers=1,
                          dask_address=cluster.scheduler_address)
        out = embed_flow(cfg)
        assert len(cluster.workers) == 2

    assert out["workers"] == 2  # shards were computed in both worker processes ...
    assert out["shards_computed"] == out["shards"] >= 3
    db = connect(cfg.lance_uri)
    img, txt = read(db, "image_embeddings"), read(db, "text_embeddings")
    assert img.num_rows == read(db, "images").num_rows and txt.num_rows == out["texts"]
    # ... with the same weights as this process draws from the seed, and one writer: no duplicates
    local = load_embedder(tiny=True)
    assert set(img.column("model").to_pylist()) == set(txt.column("model").to_pylist()) == {local.fingerprint}
    assert len(set(txt.column("text_hash").to_pylist())) == txt.num_rows
    row = txt.filter(pc.equal(txt.column("text_hash"), txt.column("text_hash")[0])).to_pylist()[0]
    np.testing.assert_allclose(row["vector"], local.embed_texts([row["text"]])[0], atol=1e-5)
