"""Parse and check a VisDial v1.0 file into columnar form (no Prefect, no Lance).

msgspec decodes the file into small typed structs, keeping each round's ``answer_options`` as
raw JSON; :mod:`ingest.options` parses those lists in bulk. Where one dialog does not have the
right types, the file is decoded again dialog by dialog, so that only that dialog is rejected.
Then every check runs vectorised over all rounds.

A syntax error, a wrong encoding or a wrong top-level shape fails the whole file with the file
name and the position; a bad dialog becomes a :class:`Rejection` and the others survive.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from operator import attrgetter
from pathlib import Path

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ingest.options import parse_options
from schemas.embed import text_hash, turn_text
from schemas.ingest import NUM_OPTIONS, NUM_TURNS
from schemas.quarantine import Reason, Rejection

_INT64_MIN, _INT64_MAX = int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max)


class VisdialFormatError(ValueError):
    """The file as a whole is not VisDial v1.0 JSON; the message names the file and position."""


@dataclass
class ParsedVisdial:
    """Kept dialogs as columns, plus the rejected ones."""

    split: str
    questions: pa.Array
    answers: pa.Array
    image_ids: np.ndarray  # (D,) int64, one per kept dialog
    captions: list[str]
    q_idx: np.ndarray  # (D, 10) int64
    a_idx: np.ndarray  # (D, 10)
    gt_index: np.ndarray  # (D, 10)
    options: np.ndarray  # (D, 10, 100) int32; an index past int32 is clipped (still out of range)
    rejections: list[Rejection] = field(default_factory=list)

    @property
    def num_dialogs(self) -> int:
        return len(self.image_ids)


def parse_visdial(path: str | Path) -> ParsedVisdial:
    """Parse ``visdial_1.0_<split>.json``; reject bad dialogs with a reason, keep the rest."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise VisdialFormatError(f"{path}: cannot read: {exc.strerror}") from exc
    with _gc_paused():
        split, questions, answers, decoded, rejections = _decode(path, raw)
        return _check(split, questions, answers, [d for d in decoded if d is not None], rejections)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """A parse makes millions of objects, none in a cycle; meanwhile the collector would walk the
    whole heap (Prefect, lancedb, ...) several times, for nothing."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# --- decoding -----------------------------------------------------------------------------------


class _Round(msgspec.Struct, gc=False):
    question: int
    answer: int
    gt_index: int
    answer_options: msgspec.Raw  # parsed in bulk, never as Python ints


class _Dialog(msgspec.Struct, gc=False):
    image_id: int
    caption: str
    dialog: list[_Round]


class _Data(msgspec.Struct):
    questions: list[str]
    answers: list[str]
    dialogs: list[_Dialog]


class _RawData(msgspec.Struct):
    questions: list[str]
    answers: list[str]
    dialogs: list[msgspec.Raw]


class _File(msgspec.Struct):
    split: str
    data: _Data
    version: str | None = None


class _RawFile(msgspec.Struct):
    split: str
    data: _RawData
    version: str | None = None


def _record(d: _Dialog) -> str:
    """The dialog as JSON text, for its quarantine row."""
    return msgspec.json.encode(d).decode("utf-8")


def _decode(
    path: Path, raw: bytes
) -> tuple[str, list[str], list[str], list[_Dialog | None], list[Rejection]]:
    """The whole file typed at once; if one dialog is malformed, dialog by dialog."""
    try:
        f = msgspec.json.decode(raw, type=_File)
        return f.split, f.data.questions, f.data.answers, list(f.data.dialogs), []
    except msgspec.ValidationError:
        pass
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise _position_error(path, raw, exc) from exc
    try:
        rf = msgspec.json.decode(raw, type=_RawFile)
    except msgspec.ValidationError as exc:
        raise VisdialFormatError(f"{path}: not VisDial v1.0: {exc}") from exc
    dec = msgspec.json.Decoder(_Dialog)
    dialogs: list[_Dialog | None] = []
    rejections = []
    for pos, r in enumerate(rf.data.dialogs):
        try:
            dialogs.append(dec.decode(r))
        except msgspec.ValidationError as exc:
            dialogs.append(None)
            key = _image_id_of(r) or f"dialogs[{pos}]"
            rejections.append(Rejection(key, Reason.BAD_RECORD, bytes(r), str(exc)))
    return rf.split, rf.data.questions, rf.data.answers, dialogs, rejections


def _position_error(path: Path, raw: bytes, cause: Exception) -> VisdialFormatError:
    """Only on failure: find where the file stops being UTF-8 JSON (``cause``: the decoder's error)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return VisdialFormatError(f"{path}: not UTF-8 at byte {exc.start}: {exc.reason}")
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        return VisdialFormatError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno} (char {exc.pos}): {exc.msg}"
        )
    return VisdialFormatError(f"{path}: invalid JSON: {cause}")  # what only Python's parser allows (NaN, say)


def _image_id_of(raw: msgspec.Raw) -> str | None:
    try:
        value = msgspec.json.decode(raw).get("image_id")
    except Exception:  # noqa: BLE001 - only for naming the rejected record
        return None
    return str(value) if value is not None else None


# --- the checks ---------------------------------------------------------------------------------


def _check(split: str, questions: list[str], answers: list[str], dialogs: list[_Dialog],
           rejections: list[Rejection]) -> ParsedVisdial:
    """The checks in the reference parser's order: per dialog (id, turn count, duplicate,
    caption), then per round (option lists, indices, gt_index, blank text, gt answer)."""
    rejections = list(rejections)
    image_ids, captions = [d.image_id for d in dialogs], [d.caption for d in dialogs]
    kept = _dialog_checks(dialogs, image_ids, captions, rejections)
    n, n_q, n_a = len(kept), len(questions), len(answers)
    rounds = list(chain.from_iterable(map(attrgetter("dialog"), map(dialogs.__getitem__, kept.tolist()))))
    q_idx, a_idx, gt = (
        _ints(rounds, name).reshape(n, NUM_TURNS) for name in ("question", "answer", "gt_index")
    )
    questions, answers = pa.array(questions, pa.string()), pa.array(answers, pa.string())
    q_blank, a_blank = _is_blank(questions), _is_blank(answers)
    index_out = (q_idx < 0).any(1) | (q_idx >= n_q).any(1) | (a_idx < 0).any(1) | (a_idx >= n_a).any(1)
    safe_q = np.clip(q_idx, 0, max(n_q - 1, 0))
    safe_a = np.clip(a_idx, 0, max(n_a - 1, 0))
    no_text = np.ones(q_idx.shape, bool)  # an empty list: every index is out of range anyway
    any_blank = ((q_blank[safe_q] if n_q else no_text) | (a_blank[safe_a] if n_a else no_text)).any(1)

    options, bad_options, lowest, highest = parse_options(list(map(attrgetter("answer_options"), rounds)),
                                                          NUM_OPTIONS)
    del rounds
    options = options.reshape(n, NUM_TURNS, NUM_OPTIONS)
    bad_options = bad_options.reshape(n, NUM_TURNS).any(1)
    if lowest < 0 or highest >= n_a:  # else no option is out of range, no need to look
        index_out |= (options.min((1, 2)) < 0) | (options.max((1, 2)) >= n_a)
    bad_index = ~bad_options & index_out
    ok = ~bad_options & ~bad_index
    bad_gt = ok & ((gt < 0) | (gt >= NUM_OPTIONS)).any(1)
    ok &= ~bad_gt
    blank = ok & any_blank
    ok &= ~blank
    safe_gt = np.clip(gt, 0, NUM_OPTIONS - 1)
    gt_mismatch = ok & (np.take_along_axis(options, safe_gt[..., None], 2)[..., 0] != a_idx).any(1)
    ok &= ~gt_mismatch

    checks = [
        (bad_options, Reason.BAD_RECORD, f"answer_options must be {NUM_OPTIONS} integers"),
        (bad_index, Reason.INDEX_OUT_OF_RANGE,
         f"an index is outside 0..{n_q - 1} (questions) or 0..{n_a - 1} (answers)"),
        (bad_gt, Reason.GT_INDEX_OUT_OF_RANGE, f"gt_index outside 0..{NUM_OPTIONS - 1}"),
        (blank, Reason.EMPTY_TEXT, "a question or answer is empty"),
        (gt_mismatch, Reason.GT_INDEX_OUT_OF_RANGE, "answer_options[gt_index] is not the answer"),
    ]
    for mask, reason, detail in checks:
        for i in np.flatnonzero(mask):
            d = dialogs[kept[i]]
            rejections.append(Rejection(str(d.image_id), reason, _record(d), detail))
    keep_idx = np.flatnonzero(ok)
    if len(keep_idx) == n:  # the common case: no copies
        keep_idx = slice(None)
    return ParsedVisdial(
        split=split,
        questions=questions,
        answers=answers,
        image_ids=np.fromiter(map(image_ids.__getitem__, kept.tolist()), np.int64, n)[keep_idx],
        captions=list(map(captions.__getitem__, kept[ok].tolist())),
        q_idx=q_idx[keep_idx],
        a_idx=a_idx[keep_idx],
        gt_index=gt[keep_idx],
        options=options[keep_idx],
        rejections=rejections,
    )


def _dialog_checks(dialogs: list[_Dialog], ids: list[int], captions: list[str],
                   rejections: list[Rejection]) -> np.ndarray:
    """Id range, turn count, then duplicate id, then blank caption, in file order: the dialogs that pass."""
    turns = [len(d.dialog) for d in dialogs]
    ids_fit = not ids or (min(ids) >= _INT64_MIN and max(ids) <= _INT64_MAX)  # the table's column is int64
    if (ids_fit and turns.count(NUM_TURNS) == len(turns) and len(set(ids)) == len(ids)
            and all(map(str.strip, captions))):
        return np.arange(len(ids))  # the common case, without a Python step per dialog
    kept, seen = [], set()
    for i, (image_id, n_turns, caption) in enumerate(zip(ids, turns, captions, strict=True)):
        problem = None
        if not _INT64_MIN <= image_id <= _INT64_MAX:
            problem = Reason.BAD_RECORD, "image_id outside the 64-bit integer range"
        elif n_turns != NUM_TURNS:
            problem = Reason.WRONG_TURN_COUNT, f"{n_turns} turns"
        elif image_id in seen:
            problem = Reason.DUPLICATE_ID, "image_id seen earlier in the file"
        elif not caption.strip():
            problem = Reason.EMPTY_TEXT, "empty caption"
        if problem:
            rejections.append(Rejection(str(image_id), problem[0], _record(dialogs[i]), problem[1]))
        else:
            seen.add(image_id)
            kept.append(i)
    return np.array(kept, np.int64)


def _ints(rounds: list[_Round], name: str) -> np.ndarray:
    """One int64 per round; an index past int64 is clipped (it is out of range either way)."""
    try:
        return np.fromiter(map(attrgetter(name), rounds), np.int64, len(rounds))
    except OverflowError:
        values = [min(max(getattr(r, name), _INT64_MIN), _INT64_MAX) for r in rounds]
        return np.array(values, np.int64).reshape(len(rounds))


def _is_blank(strings: pa.Array) -> np.ndarray:
    return pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(strings)), 0).to_numpy(zero_copy_only=False)


# --- rows for the tables ------------------------------------------------------------------------


def dialog_columns(parsed: ParsedVisdial, sel: np.ndarray | None = None, *,
                   options: bool = True) -> dict[str, pa.Table]:
    """``dialogs`` and ``turns`` rows for the kept dialogs at positions ``sel`` (default all).

    ``options=False`` leaves out the 100 option strings per turn (most of the bytes), for
    validation; the writer builds the full rows a chunk of dialogs at a time.
    """
    sel = np.arange(parsed.num_dialogs) if sel is None else sel
    ids = parsed.image_ids[sel]
    captions = [parsed.captions[i] for i in sel]
    d = len(sel)
    dialogs = pa.table(
        {
            "image_id": pa.array(ids, pa.int64()),
            "split": pa.array([parsed.split] * d, pa.string()),
            "caption": pa.array(captions, pa.string()),
            "caption_hash": pa.array([text_hash(c) for c in captions], pa.string()),
        }
    )
    q = parsed.questions.take(pa.array(parsed.q_idx[sel].ravel()))
    a = parsed.answers.take(pa.array(parsed.a_idx[sel].ravel()))
    qs, as_ = q.to_pylist(), a.to_pylist()
    columns = {
        "image_id": pa.array(np.repeat(ids, NUM_TURNS), pa.int64()),
        "turn": pa.array(np.tile(np.arange(1, NUM_TURNS + 1, dtype=np.int8), d), pa.int8()),
        "split": pa.array([parsed.split] * (d * NUM_TURNS), pa.string()),
        "question": q,
        "answer": a,
        "gt_index": pa.array(parsed.gt_index[sel].ravel().astype(np.int16), pa.int16()),
        "text_hash": pa.array(
            [text_hash(turn_text(x, y)) for x, y in zip(qs, as_, strict=True)], pa.string()
        ),
    }
    if options:
        opts = parsed.answers.take(pa.array(parsed.options[sel].ravel()))
        offsets = pa.array(np.arange(0, d * NUM_TURNS * NUM_OPTIONS + 1, NUM_OPTIONS, dtype=np.int32))
        columns["answer_options"] = pa.ListArray.from_arrays(offsets, opts)
    return {"dialogs": dialogs, "turns": pa.table(columns)}
