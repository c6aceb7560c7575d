"""The ``reminders`` table at a version -> the report's JSON sample list, or a Hugging Face
``DatasetDict`` folder (``datasets.load_from_disk``)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from storage.lance import connect, read, require


def read_reminders(lance_uri: str, version: int | str | None = None) -> pa.Table:
    db = connect(lance_uri)
    require(db, ["reminders"], hint="run `mmem reminders` first")
    return read(db, "reminders", version=version)


def export_report_json(table: pa.Table, out: Path) -> int:
    """The report's sample format: a JSON list of ``image_id, image_url, conversation, response``."""
    rows = table.select(["image_id", "image_url", "conversation", "response"]).to_pylist()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    return len(rows)


def export_hf(table: pa.Table, out: Path) -> dict[str, int]:
    """A ``datasets.DatasetDict`` (one split per dialog split), loadable with ``load_from_disk``."""
    import datasets

    splits = sorted(set(table.column("split").to_pylist())) or ["train"]
    column = table.column("split")
    dd = datasets.DatasetDict({s: datasets.Dataset(table.filter(pc.equal(column, s))) for s in splits})
    dd.save_to_disk(str(out))
    return {s: len(d) for s, d in dd.items()}
