"""Embed steps: ``images`` + ``turns``/``dialogs`` -> ``image_embeddings`` + ``text_embeddings``.

The work is cut into shards of a few thousand rows, fixed by the sorted keys, so a shard means
the same rows on every run. A shard's key is a hash of its rows' content (image id and image
bytes hash; text hash), the model fingerprint and the preprocessing version: the ``@task``
wrapper caches on it (results persisted under the data root), so a killed run resumes at the
first unfinished shard. Shards whose rows are already in the table, made by the same model from
the same content, are not even dispatched. Workers only compute and return Arrow; the flow is
the one writer (``storage.lance.merge`` on the key: nothing is appended twice).

On CUDA a shard streams: processes decode and resize images ahead, the main thread queues bf16
forwards, one copy back per shard. A text shard is tokenized in the same processes, then run in
order of token length, each batch only as wide as its longest text (exact: the text tower is causal).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import multiprocessing as mp
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from schemas.embed import IMAGE_EMBEDDINGS, TEXT_EMBEDDINGS, EmbedConfig, normalise_text, turn_text
from schemas.quarantine import Reason, Rejection
from storage.index import ensure_vector_index
from storage.lance import MergeResult, connect, merge, read, resolve_versions, table_exists
from storage.quarantine import reason_counts
from tasks.images import resolve_inside
from tasks.runtime import CheckedResults, Progress, checked_storage, logger
from training.imagebind import (
    CONTEXT_LENGTH,
    PREPROCESS_VERSION,
    Embedder,
    StreamStats,
    cached_embedder,
    load_pixels_many,
    model_fingerprint,
    tokenize,
    warm_preprocessing,
)

Kind = Literal["image", "text"]
OUTPUT = {"image": IMAGE_EMBEDDINGS.name, "text": TEXT_EMBEDDINGS.name}
# Bump when ShardResult's layout changes: results persisted by older code must not be served from cache.
# 4: JSON results with Arrow rows (version 3 wrote pickles: their keys are never looked up again).
RESULT_VERSION = 4
DECODE_CHUNK = 32  # images per job sent to a decoding process
TOKENIZE_CHUNK = 512


# --- the model a worker loads ----------------------------------------------------------------


@dataclass(frozen=True)
class ModelArgs:
    """What a worker needs to load the model (once per process): small and picklable."""

    checkpoint: str | None
    tiny: bool
    seed: int
    device: str
    dtype: str
    batch_size: int
    random_weights: bool = False
    compile: bool = False

    @classmethod
    def from_config(cls, config: EmbedConfig) -> ModelArgs:
        return cls(str(config.checkpoint) if config.checkpoint else None, config.tiny, config.seed,
                   config.device, config.dtype, config.batch_size, config.random_weights, config.compile)

    @property
    def fingerprint(self) -> str:
        return model_fingerprint(self.checkpoint, tiny=self.tiny, seed=self.seed, random_weights=self.random_weights)

    def load(self) -> Embedder:
        import torch

        dtype = None if self.dtype == "auto" else getattr(torch, self.dtype)
        return cached_embedder(self.checkpoint, tiny=self.tiny, seed=self.seed, device=self.device, dtype=dtype,
                               batch_size=self.batch_size, random_weights=self.random_weights, compile=self.compile)


# --- what to embed ---------------------------------------------------------------------------


def _split_filter(config: EmbedConfig) -> str | None:
    if not config.splits:
        return None
    return "split IN (" + ", ".join("'" + s.replace("'", "''") + "'" for s in config.splits) + ")"


INPUTS = ("images", "dialogs", "turns")


def input_versions(db, config: EmbedConfig) -> dict[str, int]:
    """The version of each input table this run reads (``config.table_versions`` pins, else the latest)."""
    missing = [n for n in INPUTS if not table_exists(db, n)]
    if missing:
        raise FileNotFoundError(f"tables {missing} are missing under {config.lance_uri}: run `mmem ingest` first")
    return resolve_versions(db, INPUTS, config.table_versions)


def output_versions(db) -> dict[str, int]:
    """The current version of each embeddings table (what a run wrote, or found up to date)."""
    return {name: db.open_table(name).version for name in OUTPUT.values() if table_exists(db, name)}


def image_items(db, config: EmbedConfig, versions: dict[str, int] | None = None) -> pa.Table:
    """``image_id, split, path, root, image_sha256`` of every ingested image, by id.

    ``root`` is the folder ``path`` is relative to: the config's ``image_roots[split]`` if set,
    else the one ingest stored with the row. ``versions`` pins the ``images`` version read.
    """
    if not table_exists(db, "images"):
        raise FileNotFoundError(f"no images table under {config.lance_uri}: run `mmem ingest` first")
    version = (versions or {}).get("images")
    tbl = db.open_table("images")
    if version is not None:
        tbl.checkout(version)
    stored = "root" in tbl.schema.names
    rows = read(db, "images", columns=["image_id", "split", "path", "sha256"] + (["root"] if stored else []),
                where=_split_filter(config), version=version).sort_by("image_id")
    stored_roots = rows.column("root").to_pylist() if stored else [None] * len(rows)
    given = {k: str(v) for k, v in config.image_roots.items()}
    roots = [given.get(s) or r for s, r in zip(rows.column("split").to_pylist(), stored_roots, strict=True)]
    return pa.table({"image_id": rows.column("image_id"), "split": rows.column("split"), "path": rows.column("path"),
                     "root": pa.array(roots, pa.string()), "image_sha256": rows.column("sha256")})


def check_roots(items: pa.Table) -> None:
    """A clear error, before any work, when images have no known folder (a config problem, not data)."""
    missing = sorted(set(items.filter(pc.is_null(items.column("root"))).column("split").to_pylist()))
    if missing:
        raise ValueError(f"no image folder known for split(s) {missing}: set image_roots "
                         "(MMEM_EMBED_IMAGE_ROOTS='{\"train\": \"/path/to/train2014\"}' or [embed] image_roots)")


def text_items(db, config: EmbedConfig, versions: dict[str, int] | None = None) -> pa.Table:
    """``text_hash, text`` of every distinct turn text ("Q: ... A: ...") and caption, by hash.

    Ingest already keyed turns and captions by the hash of the normalised text, so identical
    texts are collapsed before any string is built; the text kept is the normalised form.
    ``versions`` pins the ``turns``/``dialogs`` versions read.
    """
    where, v = _split_filter(config), versions or {}
    turns = read(db, "turns", columns=["text_hash", "question", "answer"], where=where, version=v.get("turns"))
    dialogs = read(db, "dialogs", columns=["caption_hash", "caption"], where=where, version=v.get("dialogs"))
    turns, dialogs = _first_per_key(turns, "text_hash"), _first_per_key(dialogs, "caption_hash")
    texts = [normalise_text(turn_text(q, a)) for q, a in zip(turns.column("question").to_pylist(),
                                                             turns.column("answer").to_pylist(), strict=True)]
    texts += [normalise_text(c) for c in dialogs.column("caption").to_pylist()]
    hashes = turns.column("text_hash").to_pylist() + dialogs.column("caption_hash").to_pylist()
    both = pa.table({"text_hash": pa.array(hashes, pa.string()), "text": pa.array(texts, pa.string())})
    return _first_per_key(both, "text_hash").sort_by("text_hash")


def _first_per_key(rows: pa.Table, key: str) -> pa.Table:
    """The first row of each distinct ``key``, in their original order."""
    if len(rows) == 0:
        return rows
    idx = pa.array(np.arange(len(rows)))
    first = rows.select([key]).append_column("__i", idx).group_by(key).aggregate([("__i", "min")])
    return rows.take(np.sort(first.column("__i_min").to_numpy()))


# --- shards ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """A fixed slice of the sorted rows of one kind, and the content key it is cached on."""

    kind: Kind
    index: int
    key: str
    rows: pa.Table = field(repr=False)


def content_key(kind: Kind, rows: pa.Table, fingerprint: str) -> str:
    """What the embeddings of ``rows`` depend on: their content, the model, the preprocessing."""
    h = hashlib.sha256(f"{kind}\0{fingerprint}\0{PREPROCESS_VERSION}\0{RESULT_VERSION}\0".encode())
    if kind == "image":
        h.update(np.ascontiguousarray(rows.column("image_id").to_numpy()).tobytes())
        h.update("\0".join(rows.column("image_sha256").to_pylist()).encode())
    else:
        h.update("\0".join(rows.column("text_hash").to_pylist()).encode())
    return f"embed-{kind}-{h.hexdigest()[:40]}"


def plan_shards(kind: Kind, items: pa.Table, shard_rows: int, fingerprint: str) -> list[Shard]:
    out = []
    for i, start in enumerate(range(0, len(items), shard_rows)):
        rows = items.slice(start, shard_rows)
        out.append(Shard(kind, i, content_key(kind, rows, fingerprint), rows))
    return out


def current_mask(db, kind: Kind, items: pa.Table, fingerprint: str) -> np.ndarray:
    """Per item: is its embedding in the table already, by this model and preprocessing, of this content?"""
    name = OUTPUT[kind]
    if len(items) == 0 or not table_exists(db, name):
        return np.zeros(len(items), dtype=bool)
    key = ["image_id", "image_sha256"] if kind == "image" else ["text_hash"]
    have = read(db, name, columns=key, where=f"model = '{fingerprint}' AND preprocess = '{PREPROCESS_VERSION}'")
    probe = items.select(key).append_column("__i", pa.array(np.arange(len(items))))
    hit = probe.join(have.append_column("__hit", pa.array(np.ones(len(have), dtype=bool))), keys=key)
    mask = np.zeros(len(items), dtype=bool)
    found = hit.filter(pc.is_valid(hit.column("__hit"))).column("__i").to_numpy()
    mask[found] = True
    return mask


def pending_shards(shards: list[Shard], mask: np.ndarray) -> list[Shard]:
    """Shards with at least one row not yet embedded by this model (``mask`` is per sorted item)."""
    out, start = [], 0
    for s in shards:
        if not mask[start : start + len(s.rows)].all():
            out.append(s)
        start += len(s.rows)
    return out


# --- computing one shard ---------------------------------------------------------------------


@dataclass
class ShardResult:
    kind: Kind
    index: int
    key: str
    rows: pa.Table  # conforming to the output table's schema
    rejections: list[Rejection]
    seconds: float
    stream: StreamStats = field(default_factory=StreamStats)  # input wait vs forward time
    worker: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")  # who computed it

    @property
    def table(self) -> str:
        return OUTPUT[self.kind]

    def payload(self) -> ShardPayload:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, self.rows.schema) as writer:
            writer.write_table(self.rows)
        return ShardPayload(
            kind=self.kind, index=self.index, key=self.key, rows=base64.b64encode(sink.getvalue()).decode(),
            rejections=[RejectionModel(key=r.key, reason=str(r.reason), record=r.record, detail=r.detail)
                        for r in self.rejections],
            seconds=self.seconds, stream=StreamModel(**dataclasses.asdict(self.stream)), worker=self.worker)

    @classmethod
    def from_payload(cls, p: ShardPayload) -> ShardResult:
        """The shard back from its JSON: the rows must be exactly the output table's schema."""
        rows = pa.ipc.open_stream(pa.py_buffer(base64.b64decode(p.rows, validate=True))).read_all()
        expected = (IMAGE_EMBEDDINGS if p.kind == "image" else TEXT_EMBEDDINGS).schema
        if [(f.name, f.type) for f in rows.schema] != [(f.name, f.type) for f in expected]:
            raise ValueError(f"shard {p.key}: persisted rows do not have the {OUTPUT[p.kind]} schema")
        return cls(p.kind, p.index, p.key, rows,
                   [Rejection(r.key, Reason(r.reason), r.record, r.detail) for r in p.rejections], p.seconds,
                   StreamStats(**p.stream.model_dump()), p.worker)


class RejectionModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str
    reason: str
    record: dict[str, str | int | float | bool | None]
    detail: str = ""


class StreamModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    samples: int = 0
    input_wait_s: float = 0.0
    forward_s: float = 0.0
    widths: dict[int, int] = {}


class ShardPayload(BaseModel):
    """A computed shard as its task's persisted result: JSON, the rows as an Arrow IPC stream (base64)."""

    model_config = ConfigDict(extra="forbid")

    kind: Kind
    index: int
    key: str
    rows: str
    rejections: list[RejectionModel]
    seconds: float
    stream: StreamModel
    worker: str


class ShardResults(CheckedResults):
    """Where shard results persist: read back only as JSON of ``ShardPayload``."""

    _block_type_name = "mmem embed shard results"
    result_model = ShardPayload


_POOL_LOCK = threading.Lock()


def worker_pool(workers: int, kind: str = "process") -> Executor:
    """The process's decoding pool of this size and kind (made once, also when shards ask at once)."""
    with _POOL_LOCK:
        return _new_pool(workers, kind)


@lru_cache(maxsize=4)
def _new_pool(workers: int, kind: str) -> Executor:
    """Decoding/tokenizing workers, one pool per process, size and kind, reused by every shard
    (its size never depends on a shard's length: each new size would start new processes).

    Processes (forkserver: no fork of a threaded, CUDA-holding parent) where allowed; threads
    inside a daemonic process such as a Dask worker, where PIL still decodes in parallel
    because it releases the GIL. Process workers are warmed at once, all together: each loads
    ImageBind's tokenizer (imports pytorchvideo, reads the BPE vocabulary) before any shard waits on it.
    """
    if kind == "thread" or mp.current_process().daemon:
        return ThreadPoolExecutor(workers, thread_name_prefix="embed-decode")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["training.imagebind"])  # workers fork with torch/PIL already imported
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=warm_preprocessing)
    for _ in range(workers):  # starts every process now, not one by one as shards queue jobs
        pool.submit(int)
    return pool


def prestart(config: EmbedConfig) -> None:
    """Start the decoding processes and load the model in the background while the flow plans.

    Otherwise the first shards pay both, one after the other (on one H100: 19 s to start 15
    forkserver workers, each re-importing the main module and the tokenizer, then 9 s to build
    ImageBind-Huge). A failure here is ignored: the shard that needs the model raises it again.
    Shards on Dask workers start their own.
    """
    if config.dask_address:
        return
    model = ModelArgs.from_config(config)

    def start() -> None:
        workers = resolve_workers(config.decode_workers)
        if workers > 1:
            worker_pool(workers, config.decode_pool)  # returns at once; the processes warm up meanwhile
        with contextlib.suppress(Exception):
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


FAILURE_REASONS = {"missing": Reason.IMAGE_MISSING, "unreadable": Reason.IMAGE_UNREADABLE,
                   "outside": Reason.IMAGE_OUTSIDE_ROOT}


def embed_image_shard(shard: Shard, model: ModelArgs, workers: int = 0, pool: str = "process",
                      decode: str = "cpu") -> ShardResult:
    """Decode, preprocess and embed one shard of images; undecodable ones become rejections.

    ``decode="gpu"`` on a CUDA model: the workers only read the files, JPEGs decode and resize on
    the GPU (:mod:`training.jpeg`), anything else on the CPU; otherwise the workers decode and resize.
    """
    t0 = time.perf_counter()
    rows = shard.rows
    paths = [_full_path(r, p) for r, p in zip(rows.column("root").to_pylist(), rows.column("path").to_pylist(),
                                              strict=True)]
    jobs = [paths[i : i + DECODE_CHUNK] for i in range(0, len(paths), DECODE_CHUNK)]
    ok = np.ones(len(rows), dtype=bool)
    rejections: list[Rejection] = []
    embedder = model.load()
    on_gpu = decode == "gpu" and embedder.device.type == "cuda"

    def reject(j: int, failed: list[tuple[int, str, str]]) -> None:
        for pos, kind, detail in sorted(failed):
            i = j * DECODE_CHUNK + pos
            ok[i] = False
            rejections.append(Rejection(str(rows.column("image_id")[i].as_py()), FAILURE_REASONS[kind],
                                        {k: rows.column(k)[i].as_py() for k in rows.column_names}, detail))

    def chunks() -> Iterator:
        if on_gpu:
            from training.jpeg import decode_pixels, read_jpegs

            for j, (entries, failed) in enumerate(map_ordered(read_jpegs, jobs, resolve_workers(workers), pool)):
                pixels, bad = decode_pixels(entries, embedder.device)
                reject(j, failed + bad)
                yield pixels
            return
        for j, (pixels, failed) in enumerate(map_ordered(load_pixels_many, jobs, resolve_workers(workers), pool)):
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


def embed_text_shard(shard: Shard, model: ModelArgs, workers: int = 0) -> ShardResult:
    """Tokenize (in worker processes when there is enough) and embed one shard of distinct texts,
    shortest first (:meth:`Embedder.embed_tokens`: narrow batches), the rows kept in shard order."""
    t0 = time.perf_counter()
    texts = shard.rows.column("text").to_pylist()
    jobs = [texts[i : i + TOKENIZE_CHUNK] for i in range(0, len(texts), TOKENIZE_CHUNK)]
    embedder = model.load()
    stream = StreamStats()
    tokens = list(map_ordered(tokenize, jobs, resolve_workers(workers)))
    tokens = np.concatenate(tokens) if tokens else np.zeros((0, CONTEXT_LENGTH), np.int32)
    stream.input_wait_s = time.perf_counter() - t0
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
    return embed_text_shard(shard, model, workers)


# --- writing ---------------------------------------------------------------------------------


class Writer:
    """Buffers shard results and merges them into their table every ``merge_rows`` rows.

    ``storage.lance.merge`` compares against the table to write only what changed, so fewer,
    larger merges are much cheaper than one per shard.
    """

    def __init__(self, db, merge_rows: int) -> None:
        self.db, self.merge_rows = db, merge_rows
        self.buffers: dict[str, list[pa.Table]] = {}
        self.merged: dict[str, MergeResult] = {}
        self.inserted: dict[str, int] = {}
        self.updated: dict[str, int] = {}
        self.seconds = 0.0  # spent merging into Lance

    def add(self, result: ShardResult) -> None:
        buf = self.buffers.setdefault(result.table, [])
        buf.append(result.rows)
        if sum(len(t) for t in buf) >= self.merge_rows:
            self.flush(result.table)

    def flush(self, name: str | None = None) -> None:
        for table in [name] if name else list(self.buffers):
            rows = self.buffers.pop(table, [])
            if not rows:
                continue
            t0 = time.perf_counter()
            res = merge(self.db, table, pa.concat_tables(rows))
            self.seconds += time.perf_counter() - t0
            self.merged[table] = res
            self.inserted[table] = self.inserted.get(table, 0) + res.inserted
            self.updated[table] = self.updated.get(table, 0) + res.updated


# --- a run: plan, collect, summarise ------------------------------------------------------


@dataclass
class Plan:
    """Everything to embed, cut into shards, and the shards not yet in the tables."""

    model: ModelArgs
    fingerprint: str
    images: int
    texts: int
    shards: int
    todo: list[Shard]
    read_versions: dict[str, int] = field(default_factory=dict)  # the input table versions read


def plan(db, config: EmbedConfig) -> Plan:
    model = ModelArgs.from_config(config)
    fingerprint = model.fingerprint
    versions = input_versions(db, config)
    items = {"image": image_items(db, config, versions), "text": text_items(db, config, versions)}
    check_roots(items["image"])
    shards, todo = 0, {}
    for kind, rows in items.items():
        planned = plan_shards(kind, rows, config.shard_rows, fingerprint)
        shards += len(planned)
        todo[kind] = pending_shards(planned, current_mask(db, kind, rows, fingerprint))
    return Plan(model, fingerprint, len(items["image"]), len(items["text"]), shards,
                interleave(todo["image"], todo["text"]), versions)


def interleave(a: list[Shard], b: list[Shard]) -> list[Shard]:
    """Both lists, each in order, ``b`` spread evenly through ``a``. Image shards wait on CPU
    decoding and text shards mostly on the model, so running them side by side keeps the device
    busy while images decode (instead of all images, then all texts)."""
    if not a or not b:
        return a + b
    slots = sorted([((i + 0.5) / len(a), 0, s) for i, s in enumerate(a)] +
                   [((j + 0.5) / len(b), 1, s) for j, s in enumerate(b)], key=lambda t: (t[0], t[1]))
    return [s for *_, s in slots]


@dataclass
class Collected:
    writer: Writer
    rejections: list[Rejection] = field(default_factory=list)
    computed: int = 0
    cached: int = 0
    workers: set[str] = field(default_factory=set)
    streams: dict[str, StreamStats] = field(default_factory=dict)  # per kind, computed shards only


def log_shard(res: ShardResult) -> None:
    """One line per computed shard: a shard that mostly waited on its input is decode-bound."""
    st = res.stream
    logger().info("%s shard %d: %d rows in %.1f s on %s (waited %.1f s for input, forwards %.1f s)",
                  res.kind, res.index, st.samples, res.seconds, res.worker, st.input_wait_s, st.forward_s)


def collect(futures: list, writer: Writer, total_rows: int) -> Collected:
    """Merge shard results as they finish (the flow is the one writer), counting cached ones."""
    from prefect.futures import as_completed

    out = Collected(writer)
    with Progress(total_rows, "embed") as bar:
        for fut in as_completed(futures):
            res = ShardResult.from_payload(fut.result())
            if fut.state.name == "Cached":
                out.cached += 1
            else:
                out.computed += 1
                out.workers.add(res.worker)
                log_shard(res)
                total = out.streams.setdefault(res.kind, StreamStats())
                total.samples += res.stream.samples
                total.input_wait_s += res.stream.input_wait_s
                total.forward_s += res.stream.forward_s
                for width, rows in res.stream.widths.items():
                    total.widths[width] = total.widths.get(width, 0) + rows
            writer.add(res)
            out.rejections += res.rejections
            bar(len(res.rows) + len(res.rejections))
    writer.flush()
    return out


def summary(p: Plan, c: Collected, written: dict[str, int] | None = None) -> dict:
    """The run's counts, with ``read_versions`` (inputs) and ``versions`` (the embeddings tables
    after the run: what train_memory reads)."""
    w = c.writer
    return {
        "read_versions": dict(p.read_versions), "versions": dict(written or {}),
        "model": p.fingerprint, "images": p.images, "texts": p.texts, "shards": p.shards,
        "shards_up_to_date": p.shards - len(p.todo), "shards_cached": c.cached, "shards_computed": c.computed,
        "workers": len(c.workers),
        **{f"{name}_inserted": w.inserted.get(name, 0) for name in OUTPUT.values()},
        **{f"{name}_updated": w.updated.get(name, 0) for name in OUTPUT.values()},
        "merge_seconds": round(w.seconds, 3),
        **{f"{kind}_{k}": round(v, 2) for kind, st in c.streams.items()
           for k, v in (("input_wait_s", st.input_wait_s), ("forward_s", st.forward_s))},
        **({"text_widths": dict(sorted(c.streams["text"].widths.items()))} if "text" in c.streams else {}),
        "quarantined": len(c.rejections),
        **{f"quarantined_{k}": v for k, v in reason_counts(c.rejections).items()},
    }


# --- Prefect task wrappers -------------------------------------------------------------------


def shard_cache_key(context, parameters) -> str:
    """The shard's content key: the same rows, model and preprocessing give the same result."""
    return parameters["shard"].key


def results_storage(config: EmbedConfig) -> ShardResults:
    """Shard results persist (JSON) under the data root, so caches do not leak between data roots (on
    a multi-host Dask cluster the data root must be shared storage)."""
    return checked_storage(ShardResults, config.results_dir, "mmem-embed")


def embed_shard_result(shard: Shard, model: ModelArgs, workers: int = 0, pool: str = "process",
                       decode: str = "cpu") -> ShardPayload:
    """:func:`embed_shard` as JSON, the form its task persists."""
    return embed_shard(shard, model, workers, pool, decode).payload()


def index_tables(lance_uri: str, min_rows: int) -> dict[str, str]:
    """Build (or extend) the vector index of both tables once they are large enough."""
    db = connect(lance_uri)
    return {name: ensure_vector_index(db, name, min_rows=min_rows).action for name in OUTPUT.values()}


embed_shard_task = task(
    embed_shard_result,
    name="embed-shard",
    task_run_name="embed-{shard.kind}-{shard.index}",
    cache_key_fn=shard_cache_key,
    persist_result=True,
    result_serializer="json",
    retries=1,
    retry_delay_seconds=5,
)
index_task = task(index_tables, name="index-embeddings", cache_policy=NO_CACHE)


# --- query -----------------------------------------------------------------------------------


def query(config: EmbedConfig, *, text: str | None = None, image: Path | None = None, k: int = 10,
          turns_per_hit: int = 3) -> dict:
    """The ``k`` images and ``k`` texts nearest to a text or an image, with their dialog context.

    The query is embedded by the model the config names, and compared only with vectors that
    model made (a clear error if the tables hold none).
    """
    from PIL import Image

    from storage.index import image_context, search, text_context

    if (text is None) == (image is None):
        raise ValueError("give exactly one of a text or an image")
    db = connect(config.lance_uri)
    embedder = ModelArgs.from_config(config).load()
    if text is not None:
        vector = embedder.embed_texts([normalise_text(text)])[0]
    else:
        with Image.open(image) as im:
            vector = embedder.embed_images([im])[0]
    where = f"model = '{embedder.fingerprint}'"
    for name in OUTPUT.values():
        if not table_exists(db, name) or read(db, name, columns=["model"], where=where).num_rows == 0:
            raise LookupError(f"{name} holds no vectors made by {embedder.fingerprint}: run `mmem embed` "
                              "with the same --checkpoint/--tiny first")
    images = search(db, OUTPUT["image"], vector, k, where=where, columns=["image_id"])
    texts = search(db, OUTPUT["text"], vector, k, where=where, columns=["text_hash", "text"])
    return {
        "model": embedder.fingerprint,
        "query": {"text": text} if text is not None else {"image": str(image)},
        "images": image_context(db, images),
        "texts": text_context(db, texts, turns_per_hit),
    }
