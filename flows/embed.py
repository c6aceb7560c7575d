"""The embed flow: ImageBind embeddings of every image and every distinct turn text and caption.

``embed`` (the parent) picks where the shards run from the config: the local thread pool, a
loopback Dask cluster of its own, or an existing Dask cluster (``dask_address``: one worker per
GPU, each loading the model once), then runs ``embed-shards`` on that task runner, indexes the
tables and publishes the counts. Dask ships pickles both ways, so every Dask connection is TLS
with credentials: the local cluster's are temporary (made for this run, held by this process),
a remote scheduler's come from the environment (``DASK_DISTRIBUTED__COMM__TLS__*``).
"""

from __future__ import annotations

import contextvars
import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from embed.compute import prestart
from embed.plan import Plan
from embed.shard import RowsUnreadable, ShardResult
from embed.write import Collected, Writer, summary, wrote_text
from schemas.config import record_root_choice
from schemas.embed import EmbedConfig, EmbedResult
from storage.lance import connect, versions_text
from storage.progress import Progress
from tasks.embed import embed_shard_task, finish_task, index_task, merge_task, plan_task, results_storage
from tasks.runtime import enforce_trust, logger, publish_table, run_id


class DaskSecurityError(ValueError):
    """A Dask address or credentials that would let someone else's code in."""


def task_runner(config: EmbedConfig):
    """Threads by default; Dask when asked: an existing cluster (``tls://`` only, credentials from the
    environment), or a loopback-only LocalCluster with temporary TLS credentials, so no other user of
    the machine can run code in its workers or feed this process pickles (distributed binds its
    dashboard to every interface unless told otherwise: it is off here)."""
    if config.dask_address:
        from prefect_dask import DaskTaskRunner

        if config.dask_address == "local":
            return DaskTaskRunner(cluster_kwargs={
                "n_workers": config.dask_workers, "threads_per_worker": 1, "processes": True,
                "host": "127.0.0.1", "dashboard_address": None, "security": True, "protocol": "tls://"})
        return DaskTaskRunner(address=config.dask_address,
                              client_kwargs={"security": remote_security(config)})
    return ThreadPoolTaskRunner(max_workers=config.concurrent_shards)


def remote_security(config: EmbedConfig):
    """TLS credentials for a remote scheduler, from distributed's configuration (the environment's
    ``DASK_DISTRIBUTED__COMM__TLS__CA_FILE`` / ``__CLIENT__CERT`` / ``__CLIENT__KEY``, or a dask YAML)."""
    import dask.config
    from distributed.security import Security

    if not config.dask_address.startswith("tls://"):
        raise DaskSecurityError(f"dask_address {config.dask_address!r}: a remote Dask scheduler must be "
                                "reached over tls:// (plain tcp lets anyone on the network run code in its "
                                "workers and answer this process with pickles)")
    def setting(name: str) -> str | None:  # variables exported after dask was imported count too
        env = "DASK_DISTRIBUTED__COMM__TLS__" + name.upper().replace(".", "__").replace("-", "_")
        return os.environ.get(env) or dask.config.get(f"distributed.comm.tls.{name}", None)

    security = Security(require_encryption=True, tls_ca_file=setting("ca-file"),
                        tls_client_cert=setting("client.cert"), tls_client_key=setting("client.key"))
    if not (security.tls_ca_file and security.tls_client_cert):
        raise DaskSecurityError(
            f"dask_address {config.dask_address!r}: no TLS credentials for the Dask client; export "
            "DASK_DISTRIBUTED__COMM__TLS__CA_FILE, DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT and "
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY (the scheduler's CA and a client certificate)")
    return security


def collect(submit: Callable, shards: list, writer: Writer, total_rows: int, rows_dir: Path,
            stream_done: Callable[[str], None] = lambda table: None) -> Collected:
    """Run the shards (``submit(shard, refresh)`` -> future) and merge their results as they finish
    (the flow is the one writer), counting cached ones. A cached result whose rows file is gone or
    changed is computed again, once. When every shard of one table is merged while the other's still
    run, ``stream_done(table)``."""
    from prefect.futures import as_completed

    out = Collected(writer)
    left = Counter(s.kind for s in shards)
    with Progress(total_rows, "embed") as bar:
        for refresh in (False, True):
            futures = {submit(s, refresh): s for s in shards}
            shards = []
            for fut in as_completed(list(futures)):
                try:
                    res = ShardResult.from_payload(fut.result(), rows_dir)
                except RowsUnreadable as exc:
                    if refresh:
                        raise
                    logger().warning("%s: computing it again", exc)
                    shards.append(futures[fut])
                    continue
                bar(out.add(res, cached=fut.state.name == "Cached"))
                left[res.kind] -= 1
                if not refresh and left[res.kind] == 0 and sum(left.values()):
                    writer.flush(res.table)
                    stream_done(res.table)
    writer.flush()
    return out


def index_device(config: EmbedConfig) -> str | None:
    """The GPU that trains a new vector index's partitions: this process's, when the run embeds on a
    GPU (a flow process without one, with the shards on Dask workers, trains on its CPU)."""
    import torch

    return "cuda" if config.device != "cpu" and torch.cuda.is_available() else None


class EarlyIndex:
    """Builds a table's vector index as soon as its last shard is merged, in a thread of its own (as
    a task of the run), while the other table's shards still run: the text shards finish first
    (:func:`embed.plan.interleave`), and their index build would otherwise wait for the last image."""

    def __init__(self, config: EmbedConfig) -> None:
        self.config = config
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="embed-index")
        self.futures: list[Future] = []

    def __call__(self, table: str) -> None:
        logger().info("every %s shard is merged: indexing it while the others run", table)
        run = contextvars.copy_context().run  # the task runs inside this flow run
        self.futures.append(self.pool.submit(run, index_task, self.config.lance_uri,
                                             self.config.index_min_rows, [table], index_device(self.config)))

    def wait(self) -> dict[str, str]:
        """The index action per table indexed early (raises what a build raised)."""
        try:
            return {table: action for f in self.futures for table, action in f.result()[0].items()}
        finally:
            self.pool.shutdown()


@flow(name="embed-shards", log_prints=True)
def embed_shards_flow(config: EmbedConfig) -> EmbedResult:
    """Plan the shards, run those not in the tables yet (cached ones are not recomputed), merge."""
    enforce_trust(config)
    prestart(config)
    db = connect(config.lance_uri)
    t0 = time.perf_counter()
    p: Plan = plan_task(config)
    t1 = time.perf_counter()
    logger().info("embed read %s", versions_text(p.read_versions))
    logger().info("model %s: %d images, %d distinct texts in %d shards; %d to run",
                  p.fingerprint, p.images, p.texts, p.shards, len(p.todo))
    shard_task = embed_shard_task.with_options(result_storage=results_storage(config))

    def submit(shard, refresh: bool):
        return shard_task.with_options(refresh_cache=refresh or None).submit(
            shard, p.model, str(config.rows_dir), config.decode_workers, config.decode_pool,
            config.image_decode)

    writer, early = Writer(db, config.merge_rows, merge_task), EarlyIndex(config)
    done = collect(submit, p.todo, writer, sum(len(s.rows) for s in p.todo), config.rows_dir,
                   early if config.early_index else lambda table: None)
    t2 = time.perf_counter()
    indexed = early.wait()  # before tagging: the run's tag names the version with the index
    t3 = time.perf_counter()
    w = done.writer
    merged = {name: (w.inserted.get(name, 0), w.updated.get(name, 0)) for name in w.merged}
    written = finish_task(config.lance_uri, merged, done.rejections, f"embed-{run_id()}")
    logger().info("%s", wrote_text(p.read_versions, written, merged))
    return summary(p, done, written).model_copy(update={
        "plan_seconds": round(t1 - t0, 2), "compute_seconds": round(t2 - t1, 2),
        "finish_seconds": round(time.perf_counter() - t3, 2), "index": indexed,
        "index_seconds": round(t3 - t2, 2)})  # waiting for an index begun while shards ran


@flow(name="embed", log_prints=True)
def embed_flow(config: EmbedConfig) -> EmbedResult:
    """Embed every ingested image and distinct text with ImageBind into Lance; returns the counts.
    The data root records the model (``mmem-root.json``), so later commands on it use the same."""
    enforce_trust(config)
    result = embed_shards_flow.with_options(task_runner=task_runner(config))(config)
    t0 = time.perf_counter()
    actions, after = index_task(config.lance_uri, config.index_min_rows, accelerator=index_device(config))
    # a table indexed while the shards ran is "current" by now: report what that build did
    result.index = {t: result.index.get(t, a) if a == "current" else a for t, a in actions.items()}
    result.index_seconds = round(result.index_seconds + time.perf_counter() - t0, 2)
    result.versions.update(after)  # an index build is a new version
    # later commands on this root (query, memory) embed with the same model without flags
    record_root_choice(config.data_root, "imagebind",
                       {"tiny": config.tiny, "checkpoint": config.checkpoint, "seed": config.seed})
    publish_table("embed-counts", result.artifact_rows(),
                  "Embed: rows, shards (up to date / cached / computed), merges, quarantine, table versions")
    logger().info("embed done: %s", result.flat())
    return result
