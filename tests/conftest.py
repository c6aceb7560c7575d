"""Shared fixtures: one Prefect test server per session, the demo dataset, an ingested root."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

DEMO_DIALOGS = 20
DEMO_VAL_DIALOGS = 6


@pytest.fixture(scope="session", autouse=True)
def prefect_server():
    """One temporary Prefect server (SQLite) for the whole session, instead of one per flow run."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The demo dataset (20 train + 6 val dialogs), written once per session. Read-only."""
    from ingest.demo_data import write_demo

    out = tmp_path_factory.mktemp("demo")
    write_demo(out, DEMO_DIALOGS, seed=0, val_dialogs=DEMO_VAL_DIALOGS)
    return out


@pytest.fixture(scope="session")
def ingested_root(tmp_path_factory, demo_dir) -> Path:
    """A data root with both demo splits ingested. Read-only: copy it (``data_root`` fixture) to write."""
    from flows.ingest import ingest_flow
    from schemas.ingest import IngestConfig

    root = tmp_path_factory.mktemp("ingested")
    for split, folder in (("train", "train2014"), ("val", "val2014")):
        ingest_flow(
            IngestConfig(
                data_root=root,
                visdial=demo_dir / f"visdial_1.0_{split}.json",
                images=demo_dir / "images" / folder,
                coco=demo_dir / f"captions_{folder}.json",
                workers=1,
            )
        )
    return root


@pytest.fixture
def data_root(tmp_path, ingested_root) -> Path:
    """A private, writable copy of the ingested data root."""
    dst = tmp_path / "root"
    shutil.copytree(ingested_root, dst, symlinks=True)
    return dst


@pytest.fixture
def flow_run_artifacts():
    """``f(flow_run_id) -> {key: artifact}`` read back through the Prefect server's REST API."""
    import asyncio

    from prefect.client.orchestration import get_client

    async def _read(flow_run_id):
        async with get_client() as client:
            resp = await client._client.post(
                "/artifacts/filter",
                json={
                    "artifacts": {"flow_run_id": {"any_": [str(flow_run_id)]}},
                    "limit": 200,
                    "sort": "CREATED_DESC",
                    "offset": 0,
                },
            )
            resp.raise_for_status()
            return {a["key"]: a for a in resp.json()}

    return lambda flow_run_id: asyncio.run(_read(flow_run_id))


# --- the memory store's tests -------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedder():
    """The tiny random-weight ImageBind (identical inputs embed identically)."""
    from embed.model import cached_embedder

    return cached_embedder(None, tiny=True, device="cpu")


@pytest.fixture
def store(tmp_path, embedder):
    """A memory store on a fresh table."""
    from memory.store import MemoryStore
    from schemas.memory import MemoryConfig

    return MemoryStore(MemoryConfig(data_root=tmp_path), embedder)
