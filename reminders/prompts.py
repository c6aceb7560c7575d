"""Dialogs -> prompts: one request per dialog in the report's format, the image attached by
reference (its content hash is part of the request's cache key)."""

from __future__ import annotations

import logging
import os
import urllib.parse
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from ingest.roots import ImageRootMissing, ImageRoots, relative_to_root  # noqa: F401 (raised here)
from llmcalls.requests import ImageRef, LLMRequest
from schemas.quarantine import Reason, Rejection
from schemas.reminders import RemindersConfig, load_prompt_data
from storage.lance import connect, read, require, resolve_versions

log = logging.getLogger("mmem." + __name__)

INPUTS = ("dialogs", "turns", "images")
HINT = "run `mmem ingest` first"
REPAIR_TEXT = (
    "Your answer did not follow the format. Answer again: one <reminder>...</reminder> tag that summarises "
    "the conversation, then exactly one sentence that answers the last question, and nothing else."
)


@dataclass(frozen=True)
class Prompt:
    """One dialog's request, with what the ``reminders`` row needs besides the answer."""

    image_id: int
    split: str
    conversation: str
    target_answer: str
    image_url: str
    request: LLMRequest


def conversation_text(qa: list[tuple[str, str]]) -> tuple[str, str]:
    """The report's format: ``Q:``/``A:`` lines with the LAST answer dropped; returns (text, dropped)."""
    lines = []
    for i, (q, a) in enumerate(qa):
        lines.append(f"Q: {q}")
        if i < len(qa) - 1:
            lines.append(f"A: {a}")
    return "\n".join(lines), qa[-1][1] if qa else ""


def system_prompt(instructions: str, examples: list[dict[str, str]]) -> str:
    shots = "\n\n".join(f"Example {i}:\nconversation:\n{ex['conversation']}\nanswer:\n{ex['response']}"
                        for i, ex in enumerate(examples, 1))
    return f"{instructions}\n\n{shots}" if shots else instructions


def repair_request(req: LLMRequest, bad_answer: str) -> LLMRequest:
    """The one bounded re-ask: the same conversation, the invalid answer, and the format again."""
    return LLMRequest(req.model, req.messages + ({"role": "assistant", "content": bad_answer},
                                                 {"role": "user", "content": REPAIR_TEXT}), req.options)


def _columns(table: pa.Table, names: list[str]) -> list[list]:
    """Columns as Python lists: far cheaper than a list of row dicts at VisDial scale."""
    return [table.column(n).to_pylist() for n in names]


def _dialog_turns(turns: pa.Table, ids: pa.ChunkedArray) -> dict[int, list[tuple[str, str]]]:
    turns = turns.filter(pc.is_in(turns.column("image_id"), ids)).sort_by([("image_id", "ascending"),
                                                                           ("turn", "ascending")])
    qa: dict[int, list[tuple[str, str]]] = {}
    for image_id, q, a in zip(*_columns(turns, ["image_id", "question", "answer"]), strict=True):
        qa.setdefault(image_id, []).append((q, a))
    return qa


def _image_places(images: pa.Table, ids: pa.ChunkedArray) -> dict[int, tuple[str, str, str | None]]:
    """image_id -> (relative path, sha256, the root ingest stored)."""
    images = images.filter(pc.is_in(images.column("image_id"), ids))
    roots = _columns(images, ["root"])[0] if "root" in images.column_names else [None] * len(images)
    return {i: (p, h, r) for i, p, h, r in zip(*_columns(images, ["image_id", "path", "sha256"]), roots,
                                               strict=True)}


def image_url(path: str, data_root) -> str:
    """The ``reminders.image_url`` of a file: relative to the data root when under it (a root moved
    whole keeps it), else an absolute ``file://`` URL."""
    rel = relative_to_root(path, data_root)
    return urllib.parse.quote(rel) if rel is not None else "file://" + urllib.parse.quote(path)


def build_prompts(config: RemindersConfig, dialogs: pa.Table, turns: pa.Table,
                  images: pa.Table) -> tuple[list[Prompt], list[Rejection]]:
    """One prompt per dialog (in ``image_id`` order, ``limit`` first), the image by reference."""
    instructions, examples = load_prompt_data(config.examples)
    system = {"role": "system", "content": system_prompt(instructions, examples)}
    if config.splits:
        dialogs = dialogs.filter(pc.is_in(dialogs.column("split"), pa.array(config.splits)))
    dialogs = dialogs.sort_by("image_id")
    if config.limit:
        dialogs = dialogs.slice(0, config.limit)
    ids = dialogs.column("image_id")
    qa, where = _dialog_turns(turns, ids), _image_places(images, ids)
    roots = ImageRoots(config.data_root, config.image_roots)
    prompts, rejections = [], []
    for image_id, split in zip(*_columns(dialogs, ["image_id", "split"]), strict=True):
        rel, sha, stored_root = where.get(image_id, (None, None, None))
        root = roots.find(split, stored_root, rel)
        if root in roots.missing:
            continue
        path = os.path.abspath(os.path.join(root, rel)) if rel and root else None
        record = {"image_id": image_id, "split": split}
        if path is None or not os.path.isfile(path):
            rejections.append(Rejection(str(image_id), Reason.IMAGE_MISSING, record,
                                        f"no image file for {image_id} (root {root}); set image_roots"))
            continue
        conv, target = conversation_text(qa.get(image_id, []))
        if not conv:
            rejections.append(Rejection(str(image_id), Reason.EMPTY_TEXT, record, "dialog has no turns"))
            continue
        user = {"role": "user", "content": f"conversation:\n{conv}", "images": (ImageRef(path, sha),)}
        prompts.append(Prompt(image_id, split, conv, target, image_url(path, config.data_root),
                              LLMRequest(config.model, (system, user), config.options)))
    roots.check(stage="reminders")
    return prompts, rejections


def input_versions(db, pins: dict[str, int | str] | None = None) -> dict[str, int]:
    """The version of each input table a run reads: the pinned one, else the latest now."""
    return resolve_versions(db, INPUTS, pins, hint=HINT)


def load_inputs(lance_uri: str,
                versions: dict[str, int] | None = None) -> tuple[pa.Table, pa.Table, pa.Table]:
    """``dialogs``, ``turns``, ``images`` at ``versions`` (default: the latest)."""
    db = connect(lance_uri)
    require(db, INPUTS, hint=HINT)
    v = versions or {}
    return (read(db, "dialogs", columns=["image_id", "split"], version=v.get("dialogs")),
            read(db, "turns", columns=["image_id", "turn", "question", "answer"], version=v.get("turns")),
            read(db, "images", version=v.get("images")))


def plan(config: RemindersConfig) -> tuple[list[Prompt], list[Rejection], dict[str, int]]:
    """The prompts, the dialogs rejected before asking, and the input table versions read."""
    versions = input_versions(connect(config.lance_uri), config.table_versions)
    prompts, rejections = build_prompts(config, *load_inputs(config.lance_uri, versions))
    log.info("%d prompts planned, %d dialogs rejected before asking", len(prompts), len(rejections))
    return prompts, rejections, versions
