"""Clean one VisDial split: parse it, locate and check every image, and say what is kept and why
the rest is dropped. Nothing is written here (:mod:`ingest.write` does that)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from ingest.images import ImageInfo, check_images, coco_file_names, index_image_folder
from ingest.roots import root_to_store
from ingest.visdial import ParsedVisdial, dialog_columns, parse_visdial
from schemas.expectations import dialogs_suite, images_suite, turns_suite
from schemas.ingest import IMAGES, NUM_TURNS, IngestConfig
from schemas.quarantine import Reason, Rejection
from schemas.validate import ValidationReport, validate
from storage.progress import Progress

log = logging.getLogger("mmem." + __name__)


@dataclass
class IngestOutput:
    """What ``clean`` kept and dropped. ``dialogs``/``turns`` rows are built chunk by chunk at
    write time (``row_chunks``): the 100 option strings of 827k turns would not fit the memory
    budget all at once."""

    parsed: ParsedVisdial
    keep: np.ndarray  # positions in ``parsed`` of dialogs whose image is usable
    images: pa.Table
    rejections: list[Rejection]
    dialogs_in: int
    seconds: dict[str, float] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        c = Counter(str(r.reason) for r in self.rejections)
        return {"dialogs_in": self.dialogs_in, "dialogs_kept": len(self.keep),
                "turns_kept": len(self.keep) * NUM_TURNS, "images_kept": len(self.images), **c}

    def row_chunks(self, dialogs_per_chunk: int = 8192) -> Iterator[dict[str, pa.Table]]:
        for lo in range(0, len(self.keep), dialogs_per_chunk):
            yield dialog_columns(self.parsed, self.keep[lo : lo + dialogs_per_chunk])

    def validation_tables(self) -> dict[str, pa.Table]:
        """Every kept row without the option strings: what the suites check."""
        return {"images": self.images, **dialog_columns(self.parsed, self.keep, options=False)}


def image_locations(images_root: Path, coco: Path | None) -> tuple[dict[int, str], list[Rejection]]:
    """Image id -> path relative to the image root (COCO ``file_name`` first, then the folder), and
    the COCO entries that could not be used."""
    where = index_image_folder(images_root) if images_root.is_dir() else {}
    if coco is None:
        return where, []
    names, rejections = coco_file_names(coco)
    where.update(names)
    return where, rejections


def clean(config: IngestConfig, progress: bool = True) -> IngestOutput:
    """Parse, locate and check everything; return the rows to write and the rejections."""
    t0 = time.perf_counter()
    parsed = parse_visdial(config.visdial)
    t1 = time.perf_counter()
    dialogs_in = parsed.num_dialogs + len(parsed.rejections)
    log.info(
        "parsed %s: %d dialogs, %d rejected by the parser", config.visdial, dialogs_in, len(parsed.rejections)
    )
    rejections = list(parsed.rejections)
    if not config.images.is_dir():
        raise FileNotFoundError(f"image folder {config.images} does not exist")
    where, coco_rejections = image_locations(config.images, config.coco)
    rejections += coco_rejections

    items, missing = [], []
    for i, image_id in enumerate(parsed.image_ids.tolist()):
        rel = where.get(image_id)
        if rel is None:
            missing.append(i)
        else:
            items.append((image_id, rel))
    with Progress(len(items), "check images", enabled=progress) as bar:
        checked = check_images(
            config.images,
            items,
            workers=config.workers,
            max_pixels=config.max_image_pixels,
            max_bytes=config.max_image_bytes,
            progress=bar,
        )
    infos = [c for c in checked if isinstance(c, ImageInfo)]
    ok_ids = np.array([c.image_id for c in infos], dtype=np.int64)
    t2 = time.perf_counter()
    problems = {c.image_id: c for c in checked if not isinstance(c, ImageInfo)}
    for i in missing:
        image_id = int(parsed.image_ids[i])
        rejections.append(Rejection(str(image_id), Reason.IMAGE_MISSING, _dialog_json(parsed, i),
                                    f"no image with id {image_id} under {config.images}"))
    for i, image_id in enumerate(parsed.image_ids.tolist()):
        p = problems.get(image_id)
        if p is not None:
            rejections.append(
                Rejection(
                    str(image_id), p.reason, {"path": p.path, "dialog": _dialog_json(parsed, i)}, p.detail
                )
            )
    root = root_to_store(config.images, config.data_root)  # relative when under the data root
    images = pa.Table.from_pylist(
        [{"split": parsed.split, "root": root, **info.__dict__} for info in infos],
        schema=IMAGES.schema,
    )
    keep = np.flatnonzero(np.isin(parsed.image_ids, ok_ids))
    return IngestOutput(parsed, keep, images, rejections, dialogs_in, {"parse": t1 - t0, "images": t2 - t1})


def _dialog_json(parsed: ParsedVisdial, i: int) -> dict:
    return {
        "image_id": int(parsed.image_ids[i]),
        "caption": parsed.captions[i],
        "dialog": [
            {"question": int(q), "answer": int(a), "gt_index": int(g)}
            for q, a, g in zip(parsed.q_idx[i], parsed.a_idx[i], parsed.gt_index[i], strict=True)
        ],
    }


def validate_tables(out: IngestOutput) -> list[ValidationReport]:
    """The ingest suites over every kept row (the gate before anything is written)."""
    t = out.validation_tables()
    return [
        validate(t["images"], images_suite(), table_name="images"),
        validate(t["dialogs"], dialogs_suite(), table_name="dialogs"),
        validate(t["turns"], turns_suite(len(t["dialogs"])), table_name="turns"),
    ]


def counts_markdown(counts: dict[str, int]) -> str:
    lines = ["| count | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in counts.items()]
    return "\n".join(lines)
