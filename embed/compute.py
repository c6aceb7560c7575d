"""Computing one shard: images decoded and resized ahead in worker processes (or read there and
decoded on the model's GPU by nvJPEG), the model fed as a stream; the rows come back as Arrow
in the output table's schema, undecodable images as rejections. Nothing here writes a table.

On CUDA a shard streams: processes decode and resize images ahead, the main thread queues bf16
forwards, one copy back per shard. A text shard is tokenized in Rust threads, then run in
order of token length, each batch only as wide as its longest text (exact: the text tower is causal).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import pyarrow as pa

from embed.device import resolve_device
from embed.jpeg import decode_on_device, read_jpegs
from embed.model import StreamStats
from embed.plan import ModelArgs, Shard
from embed.preprocess import (
    PREPROCESS_VERSION,
    load_pixels_many,
    tokenize,
    warm_images,
    warm_texts,
)
from embed.shard import ShardResult
from ingest.images import resolve_inside
from schemas.embed import EmbedConfig
from schemas.quarantine import Reason, Rejection

log = logging.getLogger("mmem." + __name__)

DECODE_CHUNK = 32  # images per job sent to a decoding process
# What the decoding processes import before they fork (torch, PIL, ImageBind's code).
PRELOAD = "embed.model"


# --- decoding workers --------------------------------------------------------------------------

_POOL_LOCK = threading.Lock()


def worker_pool(workers: int, kind: str = "process") -> Executor:
    """The process's decoding pool of this size and kind (made once, also when shards ask at once)."""
    with _POOL_LOCK:
        return _new_pool(workers, kind)


@lru_cache(maxsize=4)
def _new_pool(workers: int, kind: str) -> Executor:
    """Decoding workers, one pool per process, size and kind, reused by every shard
    (its size never depends on a shard's length: each new size would start new processes).

    Processes (forkserver: no fork of a threaded, CUDA-holding parent) where allowed; threads
    inside a daemonic process such as a Dask worker, where PIL still decodes in parallel
    because it releases the GIL. Process workers are warmed at once, all together: each loads
    the image transforms before any shard waits on it.
    """
    if kind == "thread" or mp.current_process().daemon:
        return ThreadPoolExecutor(workers, thread_name_prefix="embed-decode")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([PRELOAD])  # workers fork with torch/PIL already imported
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=warm_images)
    for _ in range(workers):  # starts every process now, not one by one as shards queue jobs
        pool.submit(int)
    return pool


def prestart(config: EmbedConfig) -> None:
    """Start the decoding processes and load the model in the background while the run plans, so
    that the first shards do not pay for both, one after the other. A failure here is ignored: the
    shard that needs the model raises it again. Shards on Dask workers start their own."""
    if config.dask_address:
        return
    model = ModelArgs.from_config(config)

    def start() -> None:
        workers = resolve_workers(config.decode_workers)
        if workers > 1:
            worker_pool(workers, config.decode_pool)  # returns at once; the processes warm up meanwhile
        with contextlib.suppress(Exception):
            warm_texts()
            model.load()

    threading.Thread(target=start, name="embed-prestart", daemon=True).start()


def resolve_workers(requested: int) -> int:
    """``requested`` processes (0: all cores but the one that feeds the GPU)."""
    return max(1, requested or (os.cpu_count() or 2) - 1)


def map_ordered(fn: Callable, jobs: list, workers: int, kind: str = "process") -> Iterator:
    """``map(fn, jobs)`` in order, ahead of the consumer in ``workers`` processes or threads (inline if 1)."""
    if workers <= 1 or len(jobs) <= 1:
        return map(fn, jobs)
    return worker_pool(workers, kind).map(fn, jobs)


# --- one shard ---------------------------------------------------------------------------------

FAILURE_REASONS = {"missing": Reason.IMAGE_MISSING, "unreadable": Reason.IMAGE_UNREADABLE,
                   "outside": Reason.IMAGE_OUTSIDE_ROOT}


def embed_image_shard(shard: Shard, model: ModelArgs, workers: int = 0, pool: str = "process",
                      decode: str = "cpu") -> ShardResult:
    """Decode, preprocess and embed one shard of images; undecodable ones become rejections.

    ``decode="gpu"`` on a CUDA model: the workers read JPEGs, and this process decodes and resizes
    them on the model's GPU (:mod:`embed.jpeg`), anything else on the CPU; otherwise the workers
    decode and resize on the CPU.
    """
    t0 = time.perf_counter()
    rows = shard.rows
    roots, rels = rows.column("root").to_pylist(), rows.column("path").to_pylist()
    paths = [_full_path(r, p) for r, p in zip(roots, rels, strict=True)]
    jobs = [paths[i : i + DECODE_CHUNK] for i in range(0, len(paths), DECODE_CHUNK)]
    ok = np.ones(len(rows), dtype=bool)
    rejections: list[Rejection] = []
    device = resolve_device(model.device)
    on_gpu = decode == "gpu" and device.type == "cuda"
    # the workers start on the whole shard now, while the model loads (seconds, on a run's first shard)
    work = map_ordered(read_jpegs if on_gpu else load_pixels_many, jobs, resolve_workers(workers), pool)
    if on_gpu:
        work = decode_on_device(work, device)
    embedder = model.load()

    def reject(j: int, failed: list[tuple[int, str, str]]) -> None:
        for pos, kind, detail in sorted(failed):
            i = j * DECODE_CHUNK + pos
            ok[i] = False
            rejections.append(Rejection(str(rows.column("image_id")[i].as_py()), FAILURE_REASONS[kind],
                                        {k: rows.column(k)[i].as_py() for k in rows.column_names}, detail))

    def chunks() -> Iterator:
        for j, (pixels, failed) in enumerate(work):
            reject(j, failed)
            yield pixels

    stream = StreamStats()
    vectors = embedder.embed_stream("vision", chunks(), stream)
    kept = rows.filter(pa.array(ok))
    out = pa.table({
        "image_id": kept.column("image_id"),
        "vector": _vectors(vectors),
        "model": pa.array([embedder.fingerprint] * len(kept), pa.string()),
        "preprocess": pa.array([PREPROCESS_VERSION] * len(kept), pa.string()),
        "image_sha256": kept.column("image_sha256"),
    })
    return ShardResult("image", shard.index, shard.key, out, rejections, time.perf_counter() - t0, stream)


def _full_path(root: str, rel: str) -> str | None:
    full = resolve_inside(root, rel)
    return None if full is None else str(full)


def embed_text_shard(shard: Shard, model: ModelArgs) -> ShardResult:
    """Tokenize and embed one shard of distinct texts, shortest first (:meth:`Embedder.embed_tokens`:
    narrow batches), the rows kept in shard order. Tokenizing runs here, in Rust threads
    (:mod:`embed.bpe`), not in the decoding processes, where it would queue behind images."""
    t0 = time.perf_counter()
    texts = shard.rows.column("text").to_pylist()
    stream = StreamStats()
    tokens = tokenize(texts)
    stream.input_wait_s = time.perf_counter() - t0
    embedder = model.load()
    vectors = embedder.embed_tokens(tokens, stream)
    out = pa.table({
        "text_hash": shard.rows.column("text_hash"),
        "text": shard.rows.column("text"),
        "vector": _vectors(vectors),
        "model": pa.array([embedder.fingerprint] * len(texts), pa.string()),
        "preprocess": pa.array([PREPROCESS_VERSION] * len(texts), pa.string()),
    })
    return ShardResult("text", shard.index, shard.key, out, [], time.perf_counter() - t0, stream)


def _vectors(vectors: np.ndarray) -> pa.FixedSizeListArray:
    if not np.isfinite(vectors).all():
        raise FloatingPointError("the model produced non-finite embeddings")
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), vectors.shape[1])


def embed_shard(shard: Shard, model: ModelArgs, workers: int = 0, pool: str = "process",
                decode: str = "cpu") -> ShardResult:
    if shard.kind == "image":
        return embed_image_shard(shard, model, workers, pool, decode)
    return embed_text_shard(shard, model)
