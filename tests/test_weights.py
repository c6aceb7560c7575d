"""ImageBind weights by themselves: named, from the environment, cached, or downloaded once (from a
local HTTP server here: no network) with a size and sha256 check and an atomic rename."""

from __future__ import annotations

import hashlib
import http.server
import threading

import numpy as np
import pytest
import torch

from embed.model import load_embedder
from embed.weights import (
    CHECKPOINT_ENV,
    SHA256_ENV,
    SIZE_ENV,
    URL_ENV,
    CheckpointError,
    build_random,
    checkpoint_cache_dir,
    resolve_checkpoint,
)

NAME = "imagebind_tiny.pth"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny ImageBind checkpoint behind a local HTTP server; yields (url, bytes, requests seen)."""
    folder = tmp_path_factory.mktemp("served")
    torch.save(build_random("imagebind_tiny", seed=0).state_dict(), folder / NAME)
    seen: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def do_GET(self):
            seen.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/{NAME}", (folder / NAME).read_bytes(), seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def env(monkeypatch, tmp_path, served):
    """A private Hugging Face cache, downloads allowed, the URL pointing at the local server."""
    url, _, seen = served
    seen.clear()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in (CHECKPOINT_ENV, SHA256_ENV, SIZE_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(URL_ENV, url)
    return monkeypatch


def leftovers() -> list[str]:
    folder = checkpoint_cache_dir()
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) if folder.is_dir() else []


def test_downloads_once_into_the_hf_cache_then_reuses_it(env, served, tmp_path):
    _, data, seen = served
    env.setenv(SHA256_ENV, hashlib.sha256(data).hexdigest())
    env.setenv(SIZE_ENV, str(len(data)))
    path = resolve_checkpoint()
    assert path == tmp_path / "hf" / "mmem" / "imagebind" / NAME
    assert path.read_bytes() == data and leftovers() == [NAME]  # no temporary file left beside it
    assert seen == [f"/{NAME}"]
    assert resolve_checkpoint() == path and seen == [f"/{NAME}"]  # the cache: no second request
    # the downloaded file is a real, loadable checkpoint (weights_only, strict)
    downloaded, drawn = load_embedder(path, tiny=True), load_embedder(tiny=True)
    assert downloaded.fingerprint == drawn.fingerprint
    np.testing.assert_array_equal(downloaded.embed_texts(["a cat"]), drawn.embed_texts(["a cat"]))


def test_size_from_content_length_when_nothing_is_pinned(env, served):
    _, data, _ = served
    assert resolve_checkpoint().read_bytes() == data


@pytest.mark.parametrize(("var", "value", "message"), [
    (SHA256_ENV, "0" * 64, "sha256"),
    (SIZE_ENV, "12345", "12345"),
])
def test_a_mismatching_download_fails_clearly_and_leaves_nothing(env, served, var, value, message):
    env.setenv(var, value)
    with pytest.raises(CheckpointError, match=message):
        resolve_checkpoint()
    assert leftovers() == []
    env.delenv(var)
    assert resolve_checkpoint().is_file()  # the next try downloads afresh


def test_resolution_order_and_offline(env, served, tmp_path):
    _, data, seen = served
    named, from_env = tmp_path / "named.pth", tmp_path / "env.pth"
    named.write_bytes(data)
    from_env.write_bytes(data)
    env.setenv(CHECKPOINT_ENV, str(from_env))
    assert resolve_checkpoint(named) == named  # --checkpoint first
    assert resolve_checkpoint() == from_env  # then MMEM_IMAGEBIND_CHECKPOINT
    env.setenv(CHECKPOINT_ENV, str(tmp_path / "gone.pth"))
    with pytest.raises(FileNotFoundError, match=CHECKPOINT_ENV):
        resolve_checkpoint()  # a named file that is missing is an error, not a download
    env.delenv(CHECKPOINT_ENV)
    env.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE"):
        resolve_checkpoint()
    assert seen == [] and leftovers() == []
    env.delenv("HF_HUB_OFFLINE")
    cached = resolve_checkpoint()  # then the cache, filled by one download
    env.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_checkpoint() == cached and seen == [f"/{NAME}"]  # offline, the cache still serves


def test_cache_dir_follows_the_hugging_face_convention(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert checkpoint_cache_dir() == tmp_path / "xdg" / "huggingface" / "mmem" / "imagebind"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert checkpoint_cache_dir() == tmp_path / "hf" / "mmem" / "imagebind"
