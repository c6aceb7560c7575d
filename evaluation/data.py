"""The held-out data of an evaluation: the ``config.split`` dialogs (and their turns and images)
that no training split shares, read at one version of each table.

A dialog whose image a training split also holds, or that a model's artifact says it trained on,
is dropped with a reason (``seen_in_training``), so a leak shows up in ``quarantine`` instead of
in the scores.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from evaluation.samples import Sample, build_samples, held_out
from ingest.roots import ImageRoots
from schemas.evaluate import EvaluateConfig, Variant
from schemas.quarantine import Reason, Rejection
from storage.lance import connect, read, resolve_versions, sql_literal, table_exists

if TYPE_CHECKING:
    from evaluation.models import ResolvedModel

INPUTS = ("dialogs", "turns")


@dataclass
class EvalData:
    dialogs: pa.Table  # the held-out split's dialogs that no training split shares
    turns: pa.Table
    images: pa.Table
    dataset_version: str  # the Lance versions read, e.g. "dialogs@v3,turns@v3"
    rejections: list[Rejection] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)  # the same versions, by table


def load_eval_data(config: EvaluateConfig) -> EvalData:
    """The ``config.split`` dialogs, minus any whose image a training split also holds."""
    db = connect(config.lance_uri)
    versions = resolve_versions(db, INPUTS, hint="run `mmem ingest` first")
    dialogs = read(db, "dialogs", columns=["image_id", "split", "caption"], version=versions["dialogs"])
    split = pc.equal(dialogs.column("split"), config.split)
    held, others = dialogs.filter(split), dialogs.filter(pc.invert(split))
    if len(held) == 0:
        raise ValueError(f"no dialogs in split {config.split!r} under {config.lance_uri}")
    trained = set(others.filter(pc.is_in(others.column("split"), pa.array(config.train_splits)))
                  .column("image_id").to_pylist())
    if table_exists(db, "reminders"):
        rem = read(db, "reminders", columns=["image_id", "split"])
        trained |= set(rem.filter(pc.is_in(rem.column("split"), pa.array(config.train_splits)))
                       .column("image_id").to_pylist())
    leaked = pc.is_in(held.column("image_id"), pa.array(sorted(trained), pa.int64()))
    rejections = [
        Rejection(str(r["image_id"]), Reason.SEEN_IN_TRAINING, r,
                  f"image {r['image_id']} is also in the training split(s) {config.train_splits}")
        for r in held.filter(leaked).to_pylist()
    ]
    held = held.filter(pc.invert(leaked))
    ids = pa.array(held.column("image_id").to_pylist(), pa.int64())
    turns = read(db, "turns", version=versions["turns"], where=f"split = {sql_literal(config.split)}")
    turns = turns.filter(pc.is_in(turns.column("image_id"), ids))
    if table_exists(db, "images"):
        images = read(db, "images")
    else:
        images = pa.table({"image_id": pa.array([], pa.int64())})
    images = found_roots(images.filter(pc.is_in(images.column("image_id"), ids)), config)
    version = ",".join(f"{n}@v{v}" for n, v in versions.items())
    return EvalData(held, turns, images, version, rejections, versions)


def found_roots(images: pa.Table, config: EvaluateConfig) -> pa.Table:
    """``images`` with each ``root`` as the folder it is now (relative ones against the data root,
    a gone one found under it: :class:`ingest.roots.ImageRoots`); ``image_roots`` still wins later."""
    if "root" not in images.column_names or len(images) == 0:
        return images
    found = ImageRoots(config.data_root).column(images.column("split").to_pylist(),
                                                images.column("root").to_pylist(),
                                                images.column("path").to_pylist())
    return images.set_column(images.column_names.index("root"), "root", pa.array(found, pa.string()))


def samples_for(data: EvalData, variant: Variant, limit: int | None) -> list[Sample]:
    return build_samples(data.dialogs, data.turns, which=variant.turns, limit=limit)


def without_training_data(data: EvalData, model: ResolvedModel) -> EvalData:
    """``data`` minus the dialogs the model's artifact says it trained on (``data_split.json``'s
    ``train`` ids, written by the training flows), each quarantined as ``seen_in_training``; the
    result's ``rejections`` are only these new ones."""
    split_file = model.path / "data_split.json" if model.path is not None else None
    if split_file is None or not split_file.is_file():
        return dataclasses.replace(data, rejections=[])
    trained = json.loads(split_file.read_text()).get("train", [])
    samples = build_samples(data.dialogs, data.turns, which="last")
    kept, rejections = held_out(samples, trained, f"the training data of {model.artifact or model.path}")
    if not rejections:
        return dataclasses.replace(data, rejections=[])
    ids = pa.array([s.image_id for s in kept], pa.int64())
    dialogs = data.dialogs.filter(pc.is_in(data.dialogs.column("image_id"), ids))
    turns = data.turns.filter(pc.is_in(data.turns.column("image_id"), ids))
    return dataclasses.replace(data, dialogs=dialogs, turns=turns, rejections=rejections)
