"""The embed flow on a real Dask scheduler with two worker processes on loopback, through
``prefect_dask.DaskTaskRunner`` pointed at its ``tls://`` address (as a multi-GPU run would be),
with the client's credentials from the environment (``DASK_DISTRIBUTED__COMM__TLS__*``)."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc

from embed.model import load_embedder
from schemas.embed import EmbedConfig
from storage.lance import connect, read


def tls_env(security, folder) -> dict[str, str]:
    """distributed's environment variables for a client holding ``security``'s credentials (as files)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, pem in (("ca", security.tls_ca_file), ("cert", security.tls_client_cert),
                      ("key", security.tls_client_key)):
        path = folder / f"{name}.pem"
        path.write_text(pem)
        path.chmod(0o600)
        files[name] = str(path)
    return {"DASK_DISTRIBUTED__COMM__TLS__CA_FILE": files["ca"],
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": files["cert"],
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": files["key"]}


def test_embed_flow_on_a_dask_cluster_with_two_workers(data_root, demo_dir, monkeypatch, tmp_path):
    from distributed import LocalCluster
    from distributed.security import Security

    from flows.embed import embed_flow

    security = Security.temporary()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, security=security, protocol="tls://") as cluster:
        assert cluster.scheduler_address.startswith("tls://")
        for k, v in tls_env(security, tmp_path / "tls").items():
            monkeypatch.setenv(k, v)
        cfg = EmbedConfig(data_root=data_root, tiny=True, device="cpu", shard_rows=48, decode_workers=1,
                          dask_address=cluster.scheduler_address)
        out = embed_flow(cfg)
        assert len(cluster.workers) == 2

    assert out.workers == 2  # shards were computed in both worker processes ...
    assert out.shards_computed == out.shards >= 3
    db = connect(cfg.lance_uri)
    img, txt = read(db, "image_embeddings"), read(db, "text_embeddings")
    assert img.num_rows == read(db, "images").num_rows and txt.num_rows == out.texts
    # ... with the same weights as this process draws from the seed, and one writer: no duplicates
    local = load_embedder(tiny=True)
    assert set(img.column("model").to_pylist()) == set(txt.column("model").to_pylist()) == {local.fingerprint}
    assert len(set(txt.column("text_hash").to_pylist())) == txt.num_rows
    row = txt.filter(pc.equal(txt.column("text_hash"), txt.column("text_hash")[0])).to_pylist()[0]
    np.testing.assert_allclose(row["vector"], local.embed_texts([row["text"]])[0], atol=1e-5)
