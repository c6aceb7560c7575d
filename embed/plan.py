"""What an embed run must compute: every ingested image and every distinct turn text and caption,
cut into shards of a few thousand rows fixed by the sorted keys (a shard means the same rows on
every run), minus the shards whose rows are already in the tables, made by the same model from the
same content.

A shard's key is a hash of its rows' content (image id and image bytes hash; text hash), the model
fingerprint, the preprocessing version and :data:`RESULT_VERSION`: the task that computes it caches
on that key, so a killed run resumes at the first unfinished shard.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embed.preprocess import PREPROCESS_VERSION
from embed.weights import model_fingerprint
from ingest.roots import ImageRoots
from schemas.embed import IMAGE_EMBEDDINGS, TEXT_EMBEDDINGS, EmbedConfig, normalise_text, turn_text
from storage.lance import read, require, resolve_versions, sql_in, sql_literal, table_exists

log = logging.getLogger("mmem." + __name__)

Kind = Literal["image", "text"]
OUTPUT = {"image": IMAGE_EMBEDDINGS.name, "text": TEXT_EMBEDDINGS.name}
# Bump when a shard's persisted result changes layout or home: results stored by older code must
# not be served from cache. 6: the rows in an Arrow file beside the JSON.
# 5: the result types moved from tasks.embed to embed.compute (issue 17).
# 4: JSON results with Arrow rows (version 3 wrote pickles: their keys are never looked up again).
RESULT_VERSION = 6
INPUTS = ("images", "dialogs", "turns")
HINT = "run `mmem ingest` first"


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
        return model_fingerprint(self.checkpoint, tiny=self.tiny, seed=self.seed,
                                 random_weights=self.random_weights)

    def load(self):
        """The process's :class:`embed.model.Embedder` for these arguments (loaded once)."""
        import torch

        from embed.model import cached_embedder

        dtype = None if self.dtype == "auto" else getattr(torch, self.dtype)
        return cached_embedder(self.checkpoint, tiny=self.tiny, seed=self.seed, device=self.device,
                               dtype=dtype, batch_size=self.batch_size, random_weights=self.random_weights,
                               compile=self.compile)


# --- what to embed ---------------------------------------------------------------------------


def _split_filter(config: EmbedConfig) -> str | None:
    return sql_in("split", config.splits) if config.splits else None


def input_versions(db, config: EmbedConfig) -> dict[str, int]:
    """The version of each input table this run reads (``config.table_versions`` pins, else the latest)."""
    return resolve_versions(db, INPUTS, config.table_versions, hint=HINT)


def output_versions(db) -> dict[str, int]:
    """The current version of each embeddings table (what a run wrote, or found up to date)."""
    return {name: db.open_table(name).version for name in OUTPUT.values() if table_exists(db, name)}


def image_items(db, config: EmbedConfig, versions: dict[str, int] | None = None,
                roots: ImageRoots | None = None) -> pa.Table:
    """``image_id, split, path, root, image_sha256`` of every ingested image, by id.

    ``root`` is the folder ``path`` is in, as ``roots`` (:class:`ingest.roots.ImageRoots`) finds
    it: the config's ``image_roots[split]`` if set, else the one ingest stored (a relative one
    against the data root); a folder that does not exist is kept as the path tried and named in
    ``roots.missing``. ``versions`` pins the ``images`` version read.
    """
    require(db, ["images"], HINT)
    version = (versions or {}).get("images")
    tbl = db.open_table("images")
    if version is not None:
        tbl.checkout(version)
    stored = "root" in tbl.schema.names
    rows = read(db, "images", columns=["image_id", "split", "path", "sha256"] + (["root"] if stored else []),
                where=_split_filter(config), version=version).sort_by("image_id")
    roots = roots if roots is not None else ImageRoots(config.data_root, config.image_roots)
    found = roots.column(rows.column("split").to_pylist(),
                         rows.column("root").to_pylist() if stored else [None] * len(rows),
                         rows.column("path").to_pylist())
    return pa.table({"image_id": rows.column("image_id"), "split": rows.column("split"),
                     "path": rows.column("path"), "root": pa.array(found, pa.string()),
                     "image_sha256": rows.column("sha256")})


def check_roots(items: pa.Table, roots: ImageRoots | None = None, todo: list[Shard] | None = None) -> None:
    """A clear error, before any work: images with no known folder (a config problem, not data),
    or images still to embed whose folder is gone (``todo``: the shards to run; None = every row).
    Rows already embedded need no file: a root whose images are gone still plans as up to date."""
    missing = sorted(set(items.filter(pc.is_null(items.column("root"))).column("split").to_pylist()))
    if missing:
        raise ValueError(f"no image folder known for split(s) {missing}: set image_roots "
                         "(MMEM_EMBED_IMAGE_ROOTS='{\"train\": \"/path/to/train2014\"}' "
                         "or [embed] image_roots)")
    if roots is not None:
        needed = [items] if todo is None else [s.rows for s in todo if s.kind == "image"]
        folders = {r for rows in needed for r in rows.column("root").to_pylist() if r}
        roots.check(sorted(folders), stage="embed")


def text_items(db, config: EmbedConfig, versions: dict[str, int] | None = None) -> pa.Table:
    """``text_hash, text`` of every distinct turn text ("Q: ... A: ...") and caption, by hash.

    Ingest already keyed turns and captions by the hash of the normalised text, so identical
    texts are collapsed before any string is built; the text kept is the normalised form.
    ``versions`` pins the ``turns``/``dialogs`` versions read.
    """
    where, v = _split_filter(config), versions or {}
    turns = read(db, "turns", columns=["text_hash", "question", "answer"], where=where,
                 version=v.get("turns"))
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


def made_by(fingerprint: str) -> str:
    """The Lance filter of the rows this model made with today's preprocessing."""
    return f"model = {sql_literal(fingerprint)} AND preprocess = {sql_literal(PREPROCESS_VERSION)}"


def current_mask(db, kind: Kind, items: pa.Table, fingerprint: str) -> np.ndarray:
    """Per item: is its embedding in the table already, by this model and preprocessing, of this content?"""
    name = OUTPUT[kind]
    if len(items) == 0 or not table_exists(db, name):
        return np.zeros(len(items), dtype=bool)
    key = ["image_id", "image_sha256"] if kind == "image" else ["text_hash"]
    have = read(db, name, columns=key, where=made_by(fingerprint))
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


# --- the plan of a run -----------------------------------------------------------------------


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
    roots = ImageRoots(config.data_root, config.image_roots)
    items = {"image": image_items(db, config, versions, roots), "text": text_items(db, config, versions)}
    shards, todo = 0, {}
    for kind, rows in items.items():
        planned = plan_shards(kind, rows, config.shard_rows, fingerprint)
        shards += len(planned)
        todo[kind] = pending_shards(planned, current_mask(db, kind, rows, fingerprint))
    check_roots(items["image"], roots, todo["image"])
    return Plan(model, fingerprint, len(items["image"]), len(items["text"]), shards,
                interleave(todo["image"], todo["text"]), versions)


def interleave(a: list[Shard], b: list[Shard], within: float = 0.5) -> list[Shard]:
    """Both lists, each in order, ``b`` spread evenly through the first ``within`` of ``a``. Image
    shards wait on CPU decoding and text shards mostly on the model, so running them side by side
    keeps the device busy while images decode (instead of all images, then all texts); ending the
    texts early lets their table's vector index build while the last images decode."""
    if not a or not b:
        return a + b
    slots = sorted([((i + 0.5) / len(a), 0, s) for i, s in enumerate(a)] +
                   [((j + 0.5) / len(b) * within, 1, s) for j, s in enumerate(b)], key=lambda t: (t[0], t[1]))
    return [s for *_, s in slots]
