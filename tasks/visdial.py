"""Parse and check a VisDial v1.0 file into columnar form (no Prefect, no Lance).

The structure is decoded by msgspec into typed structs, with each round's 100 answer options
kept as raw JSON text; those are then parsed all at once by simdjson into one int64 buffer (no
Python int per option: VisDial train has 82.8M of them), and range-checked in bulk with numpy. A syntax error, a wrong encoding or a wrong top-level shape fails the whole
file with the file name and the position; a bad dialog becomes a :class:`Rejection` and the
others survive.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import simdjson

from schemas.embed import text_hash, turn_text
from schemas.ingest import NUM_OPTIONS, NUM_TURNS
from schemas.quarantine import Reason, Rejection


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


def _position_error(path: Path, raw: bytes) -> VisdialFormatError:
    """Slow path, only on failure: find where the file stops being UTF-8 JSON."""
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
    return VisdialFormatError(f"{path}: not VisDial v1.0 JSON")


class _Round(msgspec.Struct):
    question: int
    answer: int
    gt_index: int
    answer_options: msgspec.Raw  # parsed in bulk below, never as Python ints


class _Dialog(msgspec.Struct):
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


def _decode(path: Path, raw: bytes) -> tuple[str, list[str], list[str], list[_Dialog | None], list[Rejection]]:
    """Fast path: the whole file typed at once. If one dialog is malformed, decode dialog by dialog."""
    try:
        f = msgspec.json.decode(raw, type=_File)
        return f.split, f.data.questions, f.data.answers, list(f.data.dialogs), []
    except msgspec.ValidationError:
        pass
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise _position_error(path, raw) from exc
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


def _image_id_of(raw: msgspec.Raw) -> str | None:
    try:
        value = msgspec.json.decode(raw).get("image_id")
    except Exception:  # noqa: BLE001 - only for naming the rejected record
        return None
    return str(value) if value is not None else None


_INT32_MAX = np.iinfo(np.int32).max


def _parse_options(raws: list[msgspec.Raw], chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """(rounds, 100) int32 options and a per-round 'malformed' mask.

    Fast path, per chunk of rounds: the option lists joined into one flat JSON array, parsed by
    simdjson into one int64 buffer (one parser reused, so its buffers stay small and warm), each
    list's length checked from the bracket and comma positions. Any surprise (a non-integer, a
    nested list, a wrong count) sends that chunk to the slow path, list by list.
    """
    n = len(raws)
    out = np.empty((n, NUM_OPTIONS), np.int32)
    bad = np.zeros(n, bool)
    parser = simdjson.Parser()
    for lo in range(0, n, chunk):
        part = raws[lo : lo + chunk]
        if not _parse_chunk_fast(parser, part, out[lo : lo + len(part)]):
            bad[lo : lo + len(part)] = _parse_chunk_slow(part, out[lo : lo + len(part)])
    return out, bad


def _parse_chunk_fast(parser: simdjson.Parser, raws: list[msgspec.Raw], out: np.ndarray) -> bool:
    joined = b",".join(raws)
    chars = np.frombuffer(joined, np.uint8)
    opens, closes = np.flatnonzero(chars == 91), np.flatnonzero(chars == 93)
    if len(opens) != len(raws) or len(closes) != len(raws):
        return False
    commas = np.flatnonzero(chars == 44)
    if not (np.searchsorted(commas, closes) - np.searchsorted(commas, opens) + 1 == NUM_OPTIONS).all():
        return False
    try:
        doc = parser.parse(b"[" + joined.translate(None, b"[]") + b"]")
        values = np.frombuffer(doc.as_buffer(of_type="i"), np.int64)
    except (TypeError, ValueError, RuntimeError):
        return False
    if len(values) != out.size:
        return False
    out.reshape(-1)[:] = np.clip(values, -1, _INT32_MAX)
    del values, doc  # the parser may be reused only once nothing refers to its document
    return True


def _parse_chunk_slow(raws: list[msgspec.Raw], out: np.ndarray) -> np.ndarray:
    bad = np.zeros(len(raws), bool)
    dec = msgspec.json.Decoder(list[int])
    for i, r in enumerate(raws):
        try:
            v = dec.decode(r)
            if len(v) != NUM_OPTIONS:
                raise ValueError
            out[i] = [min(max(x, -1), _INT32_MAX) for x in v]
        except (msgspec.MsgspecError, ValueError, OverflowError):
            bad[i] = True
            out[i] = 0
    return bad


def parse_visdial(path: str | Path) -> ParsedVisdial:
    """Parse ``visdial_1.0_<split>.json``; reject bad dialogs with a reason, keep the rest."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise VisdialFormatError(f"{path}: cannot read: {exc.strerror}") from exc
    split, questions_l, answers_l, decoded, rejections = _decode(path, raw)
    n_q, n_a = len(questions_l), len(answers_l)

    kept: list[_Dialog] = []
    seen: set[int] = set()
    for d in decoded:
        if d is None:
            continue
        if len(d.dialog) != NUM_TURNS:
            rejections.append(Rejection(str(d.image_id), Reason.WRONG_TURN_COUNT, _record(d), f"{len(d.dialog)} turns"))
        elif d.image_id in seen:
            rejections.append(Rejection(str(d.image_id), Reason.DUPLICATE_ID, _record(d), "image_id seen earlier in the file"))
        elif not d.caption.strip():
            rejections.append(Rejection(str(d.image_id), Reason.EMPTY_TEXT, _record(d), "empty caption"))
        else:
            seen.add(d.image_id)
            kept.append(d)

    n = len(kept)
    rounds = [r for d in kept for r in d.dialog]
    q_idx = np.fromiter((r.question for r in rounds), np.int64, len(rounds)).reshape(n, NUM_TURNS)
    a_idx = np.fromiter((r.answer for r in rounds), np.int64, len(rounds)).reshape(n, NUM_TURNS)
    gt = np.fromiter((r.gt_index for r in rounds), np.int64, len(rounds)).reshape(n, NUM_TURNS)
    options, bad_options = _parse_options([r.answer_options for r in rounds])
    options = options.reshape(n, NUM_TURNS, NUM_OPTIONS)
    bad_options = bad_options.reshape(n, NUM_TURNS).any(1)
    del rounds

    questions = pa.array(questions_l, pa.string())
    answers = pa.array(answers_l, pa.string())
    q_blank = _is_blank(questions)
    a_blank = _is_blank(answers)

    bad_index = ~bad_options & (
        (q_idx < 0).any(1) | (q_idx >= n_q).any(1) | (a_idx < 0).any(1) | (a_idx >= n_a).any(1)
        | (options.min((1, 2)) < 0) | (options.max((1, 2)) >= n_a)
    )
    ok = ~bad_options & ~bad_index
    bad_gt = ok & ((gt < 0) | (gt >= NUM_OPTIONS)).any(1)
    ok &= ~bad_gt
    safe_q = np.clip(q_idx, 0, max(n_q - 1, 0))
    safe_a = np.clip(a_idx, 0, max(n_a - 1, 0))
    blank = ok & ((q_blank[safe_q] if n_q else True) | (a_blank[safe_a] if n_a else True)).any(1)
    ok &= ~blank
    safe_gt = np.clip(gt, 0, NUM_OPTIONS - 1)
    gt_mismatch = ok & (np.take_along_axis(options, safe_gt[..., None], 2)[..., 0] != a_idx).any(1)
    ok &= ~gt_mismatch

    checks = [
        (bad_options, Reason.BAD_RECORD, f"answer_options must be {NUM_OPTIONS} integers"),
        (bad_index, Reason.INDEX_OUT_OF_RANGE, f"an index is outside 0..{n_q - 1} (questions) or 0..{n_a - 1} (answers)"),
        (bad_gt, Reason.GT_INDEX_OUT_OF_RANGE, f"gt_index outside 0..{NUM_OPTIONS - 1}"),
        (blank, Reason.EMPTY_TEXT, "a question or answer is empty"),
        (gt_mismatch, Reason.GT_INDEX_OUT_OF_RANGE, "answer_options[gt_index] is not the answer"),
    ]
    for mask, reason, detail in checks:
        for i in np.flatnonzero(mask):
            rejections.append(Rejection(str(kept[i].image_id), reason, _record(kept[i]), detail))
    keep_idx = np.flatnonzero(ok)
    if len(keep_idx) == n:  # the common case: no copies
        keep_idx = slice(None)
    return ParsedVisdial(
        split=split,
        questions=questions,
        answers=answers,
        image_ids=np.fromiter((d.image_id for d in kept), np.int64, n)[keep_idx],
        captions=[d.caption for d, k in zip(kept, ok, strict=True) if k],
        q_idx=q_idx[keep_idx],
        a_idx=a_idx[keep_idx],
        gt_index=gt[keep_idx],
        options=options[keep_idx],
        rejections=rejections,
    )


def _record(d: _Dialog) -> str:
    """The dialog as JSON text, for its quarantine row."""
    return msgspec.json.encode(d).decode("utf-8")


def _is_blank(strings: pa.Array) -> np.ndarray:
    return pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(strings)), 0).to_numpy(zero_copy_only=False)


def dialog_columns(parsed: ParsedVisdial, sel: np.ndarray | None = None, *, options: bool = True) -> dict[str, pa.Table]:
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
            "text_hash": pa.array([text_hash(turn_text(x, y)) for x, y in zip(qs, as_, strict=True)], pa.string()),
    }
    if options:
        opts = parsed.answers.take(pa.array(parsed.options[sel].ravel()))
        offsets = pa.array(np.arange(0, d * NUM_TURNS * NUM_OPTIONS + 1, NUM_OPTIONS, dtype=np.int32))
        columns["answer_options"] = pa.ListArray.from_arrays(offsets, opts)
    return {"dialogs": dialogs, "turns": pa.table(columns)}
