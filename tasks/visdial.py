"""Parse and check a VisDial v1.0 file into columnar form (no Prefect, no Lance).

Fast path, for any file whose records have the right types (however many the checks reject):
numpy finds every ``"answer_options": [...]`` list in the raw bytes; in place, its key becomes a
private member ``"[":0`` followed by an ignored key, and the list a JSON string, so that msgspec
decodes the rest of the file into small structs while skipping the lists as strings. The lists
themselves (~75% of the bytes) are parsed in bulk by :mod:`tasks.visdial_options`, on a helper
process too for a large file. Every round must carry the private member and there must be as many
lists as rounds, which proves that the lists found are exactly the rounds' ``answer_options``, in
order. Then every check is vectorised.

Slow path, the fallback wherever the fast one meets something it does not expect (a record of the
wrong type, a malformed file, a nested or unusual layout): msgspec decodes the original bytes, one
dialog at a time where one is malformed, and the option lists one by one where a chunk fails.

Both paths feed the same checks, so their results are the same (tests compare them). A syntax
error, a wrong encoding or a wrong top-level shape fails the whole file with the file name and the
position; a bad dialog becomes a :class:`Rejection` and the others survive.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from operator import attrgetter
from pathlib import Path

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import simdjson

from schemas.embed import text_hash, turn_text
from schemas.ingest import NUM_OPTIONS, NUM_TURNS
from schemas.quarantine import Reason, Rejection
from tasks.visdial_options import CHUNK_ROUNDS, FileBytes, OptionsHelper, OptionsJob, parse_joined

HELPER_MIN_BYTES = 32 * 2**20  # below this a helper process costs more than it saves


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


def parse_visdial(path: str | Path, *, helper_min_bytes: int = HELPER_MIN_BYTES) -> ParsedVisdial:
    """Parse ``visdial_1.0_<split>.json``; reject bad dialogs with a reason, keep the rest.

    A file of ``helper_min_bytes`` or more shares the option lists with a helper process.
    """
    path = Path(path)
    helper = source = None
    with _gc_paused():
        try:
            try:
                helper = OptionsHelper.spawn() if path.stat().st_size >= helper_min_bytes else None
                source = FileBytes(path, helper.data_fd if helper else None)
                try:
                    return _parse_fast(source, helper)
                except _NotFast:
                    if helper:
                        helper.close()  # it may still be parsing lists: free the core
                    for _ in source.pieces():  # whatever the fast path did not read
                        pass
                raw = bytes(source.buf[: source.got])
            except OSError as exc:
                raise VisdialFormatError(f"{path}: cannot read: {exc.strerror}") from exc
            return _parse_slow(path, raw)
        finally:
            if source:
                source.close()
            if helper:
                helper.close()


@contextmanager
def _gc_paused() -> Iterator[None]:
    """A parse makes about two million objects, none in a cycle; meanwhile the collector would
    walk the whole heap (Prefect, lancedb, ...) several times, for nothing."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# --- the checks, shared by both paths ---------------------------------------------------------


@dataclass
class _Decoded:
    """The dialogs that decoded with the right types, in file order, and access to their rounds.

    Round rows are indices into all these dialogs' rounds, in file order.
    """

    split: str
    questions: list[str]
    answers: list[str]
    image_ids: list[int]
    captions: list[str]
    turns: list[int]
    rounds: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]  # rows -> question, answer, gt
    options: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, int, int]]
    """rows -> (.., 100) int32 options, each round's malformed flag; a bound below and above every
    well-formed option of these rows (of all rounds, say)"""
    record: Callable[[int], str]  # dialog i as JSON text, for its quarantine row
    rejections: list[Rejection]  # the dialogs that did not decode


def _check(dec: _Decoded) -> ParsedVisdial:
    """The checks in the order the reference parser made them; what needs no option comes first,
    while a helper process may still be parsing options."""
    rejections = list(dec.rejections)
    kept = _dialog_checks(dec, rejections)
    n, n_q, n_a = len(kept), len(dec.questions), len(dec.answers)
    turns = np.asarray(dec.turns, np.int64)
    if n == len(turns) and n * NUM_TURNS == turns.sum():  # every dialog kept so far
        rows = np.arange(n * NUM_TURNS).reshape(n, NUM_TURNS)
    else:
        rows = (np.cumsum(turns) - turns)[kept][:, None] + np.arange(NUM_TURNS)
    q_idx, a_idx, gt = dec.rounds(rows)
    questions = pa.array(dec.questions, pa.string())
    answers = pa.array(dec.answers, pa.string())
    q_blank = _is_blank(questions)
    a_blank = _is_blank(answers)
    index_out = (q_idx < 0).any(1) | (q_idx >= n_q).any(1) | (a_idx < 0).any(1) | (a_idx >= n_a).any(1)
    safe_q = np.clip(q_idx, 0, max(n_q - 1, 0))
    safe_a = np.clip(a_idx, 0, max(n_a - 1, 0))
    no_text = np.ones(q_idx.shape, bool)  # an empty list: every index is out of range anyway
    any_blank = ((q_blank[safe_q] if n_q else no_text) | (a_blank[safe_a] if n_a else no_text)).any(1)

    options, bad_options, lowest, highest = dec.options(rows)
    bad_options = bad_options.any(1)
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
        (bad_index, Reason.INDEX_OUT_OF_RANGE, f"an index is outside 0..{n_q - 1} (questions) or 0..{n_a - 1} (answers)"),
        (bad_gt, Reason.GT_INDEX_OUT_OF_RANGE, f"gt_index outside 0..{NUM_OPTIONS - 1}"),
        (blank, Reason.EMPTY_TEXT, "a question or answer is empty"),
        (gt_mismatch, Reason.GT_INDEX_OUT_OF_RANGE, "answer_options[gt_index] is not the answer"),
    ]
    for mask, reason, detail in checks:
        for i in np.flatnonzero(mask):
            rejections.append(Rejection(str(dec.image_ids[kept[i]]), reason, dec.record(kept[i]), detail))
    keep_idx = np.flatnonzero(ok)
    if len(keep_idx) == n:  # the common case: no copies
        keep_idx = slice(None)
    return ParsedVisdial(
        split=dec.split,
        questions=questions,
        answers=answers,
        image_ids=np.fromiter(map(dec.image_ids.__getitem__, kept.tolist()), np.int64, n)[keep_idx],
        captions=list(map(dec.captions.__getitem__, kept[ok].tolist())),
        q_idx=q_idx[keep_idx],
        a_idx=a_idx[keep_idx],
        gt_index=gt[keep_idx],
        options=options[keep_idx],
        rejections=rejections,
    )


def _dialog_checks(dec: _Decoded, rejections: list[Rejection]) -> np.ndarray:
    """Id range, turn count, then duplicate id, then blank caption, in file order: the dialogs that pass."""
    ids, turns, captions = dec.image_ids, dec.turns, dec.captions
    ids_fit = not ids or (min(ids) >= _INT64_MIN and max(ids) <= _INT64_MAX)  # the table's column is int64
    if (ids_fit and turns.count(NUM_TURNS) == len(turns) and len(set(ids)) == len(ids)
            and all(map(str.strip, captions))):
        return np.arange(len(ids))  # the common case, without a Python step per dialog
    kept, seen = [], set()
    for i, (image_id, n_turns, caption) in enumerate(zip(ids, turns, captions, strict=True)):
        if not _INT64_MIN <= image_id <= _INT64_MAX:
            rejections.append(Rejection(str(image_id), Reason.BAD_RECORD, dec.record(i),
                                        "image_id outside the 64-bit integer range"))
        elif n_turns != NUM_TURNS:
            rejections.append(Rejection(str(image_id), Reason.WRONG_TURN_COUNT, dec.record(i), f"{n_turns} turns"))
        elif image_id in seen:
            rejections.append(Rejection(str(image_id), Reason.DUPLICATE_ID, dec.record(i), "image_id seen earlier in the file"))
        elif not caption.strip():
            rejections.append(Rejection(str(image_id), Reason.EMPTY_TEXT, dec.record(i), "empty caption"))
        else:
            seen.add(image_id)
            kept.append(i)
    return np.array(kept, np.int64)


def _is_blank(strings: pa.Array) -> np.ndarray:
    return pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(strings)), 0).to_numpy(zero_copy_only=False)


class _Round(msgspec.Struct):
    question: int
    answer: int
    gt_index: int
    answer_options: msgspec.Raw  # parsed in bulk, never as Python ints


class _Dialog(msgspec.Struct):
    image_id: int
    caption: str
    dialog: list[_Round]


def _record(d: _Dialog) -> str:
    """The dialog as JSON text, for its quarantine row."""
    return msgspec.json.encode(d).decode("utf-8")


# --- fast path ----------------------------------------------------------------------------------


class _NotFast(Exception):
    """The fast path met something it does not handle; the slow path decides."""


# '"answer_options": ' (17 bytes or more) becomes a private member, then the key '""' that the list,
# now a string, hangs on (unknown to the structs: skipped, never copied), then spaces.
_PRIVATE_KEY = "["
_MARK = b'"[":0,"":'


class _FastRound(msgspec.Struct, gc=False):
    question: int
    answer: int
    gt_index: int
    marker: int = msgspec.field(name=_PRIVATE_KEY)  # required: where answer_options was


class _FastDialog(msgspec.Struct, gc=False):
    image_id: int
    caption: str
    dialog: list[_FastRound]


class _FastData(msgspec.Struct):
    questions: list[str]
    answers: list[str]
    dialogs: list[_FastDialog]


class _FastFile(msgspec.Struct):
    split: str
    data: _FastData
    version: str | None = None


_FAST_DECODER = msgspec.json.Decoder(_FastFile)
_ROUNDS = attrgetter("dialog")
_SCAN = 1 << 20
_WORDS = np.frombuffer(b'"answer_options"tions": ', "<u8")  # '"answer_options": [' as 8-byte words
_UNSIGNED = {8: "<u8", 4: "<u4", 2: "<u2", 1: "u1"}


def _parse_fast(source: FileBytes, helper: OptionsHelper | None) -> ParsedVisdial:
    """Raises :class:`_NotFast` where the slow path must decide."""
    buf = source.buf
    data = np.frombuffer(buf, np.uint8)
    job = OptionsJob(buf, source.size // (2 * NUM_OPTIONS + 1) + 1, NUM_OPTIONS, helper)  # room for the most lists
    finder = _ListFinder(data)
    for lo, hi in source.pieces():  # the helper parses lists while the rest is still being read
        opens, closes = finder.feed(lo, hi)
        if not job.add(opens + 1, closes):
            raise _NotFast
    opens, closes, keys = finder.result()
    if source.got < source.size or not len(opens) or finder.private_key_elsewhere() or _escapes_key_char(buf):
        raise _NotFast  # no lists, or the private key could already be in the file
    saved = []
    for length in np.unique(opens - keys):  # one length (the file's spacing), or a few
        saved += _overwrite(data, keys[opens - keys == length], _MARK.ljust(length))
    data[opens] = data[closes] = ord('"')
    try:
        return _check(_decode_fast(buf, job, opens, closes))
    except _NotFast:  # the slow path reads the bytes as they were
        data[opens], data[closes] = ord("["), ord("]")
        for view, at, old in reversed(saved):
            view[at] = old
        raise


def _overwrite(data: np.ndarray, at: np.ndarray, pattern: bytes) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Write ``pattern`` at every position ``at``, a word at a time; return what it replaced."""
    saved, k = [], 0
    while k < len(pattern):
        w = next(w for w in (8, 4, 2, 1) if w <= len(pattern) - k)
        view = np.ndarray((len(data) - w + 1,), _UNSIGNED[w], data, 0, (1,))  # w bytes at every offset
        saved.append((view, at + k, view[at + k]))
        view[at + k] = np.frombuffer(pattern[k : k + w], _UNSIGNED[w])[0]
        k += w
    return saved


def _decode_fast(buf, job: OptionsJob, opens: np.ndarray, closes: np.ndarray) -> _Decoded:
    """Decode ``buf``, whose lists are strings now, each after a private member."""
    try:
        f = _FAST_DECODER.decode(buf)
    except (msgspec.MsgspecError, UnicodeDecodeError) as exc:
        raise _NotFast from exc
    dialogs = f.data.dialogs
    turns = list(map(len, map(_ROUNDS, dialogs)))
    if sum(turns) != len(opens):  # a list outside a round, or two in one round
        raise _NotFast
    all_rounds = list(chain.from_iterable(map(_ROUNDS, dialogs)))
    try:
        q, a, g = (np.fromiter(map(attrgetter(name), all_rounds), np.int64, len(all_rounds))
                   for name in ("question", "answer", "gt_index"))
    except OverflowError as exc:  # an index past int64: the slow path says what becomes of it
        raise _NotFast from exc
    image_ids, captions = [d.image_id for d in dialogs], [d.caption for d in dialogs]
    split, questions, answers = f.split, f.data.questions, f.data.answers
    del f, dialogs, all_rounds
    first = np.cumsum(turns) - np.asarray(turns, np.int64)

    def rounds(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if rows.size == len(q):  # every round: no copies
            return q.reshape(rows.shape), a.reshape(rows.shape), g.reshape(rows.shape)
        return q[rows], a[rows], g[rows]

    def options(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
        parsed = job.finish()
        if parsed is None:  # a list that is not 100 integers: the slow path names the record
            raise _NotFast
        values, lowest, highest = parsed
        if rows.size == len(values):  # every round kept: a view, no copy
            return values.reshape(*rows.shape, NUM_OPTIONS), np.zeros(rows.shape, bool), lowest, highest
        return values[rows], np.zeros(rows.shape, bool), lowest, highest

    def record(i: int) -> str:  # from the lists' contents: their brackets are quotes now
        lo, hi = first[i], first[i] + turns[i]
        return _record(_Dialog(image_ids[i], captions[i], [
            _Round(int(q[r]), int(a[r]), int(g[r]), msgspec.Raw(b"[" + bytes(buf[o + 1 : c]) + b"]"))
            for r, o, c in zip(range(lo, hi), opens[lo:hi].tolist(), closes[lo:hi].tolist(), strict=True)
        ]))

    return _Decoded(split, questions, answers, image_ids, captions, turns, rounds, options, record, [])


class _ListFinder:
    """Finds every ``"answer_options": [...]`` list (where it opens and closes, and where its key
    starts) as the file arrives piece by piece. Whether they are really the rounds' lists is
    proven later, by the decoder; a list holding a bracket fails the fast path."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = data
        self.words = np.ndarray((max(len(data) - 7, 0),), "<u8", data, 0, (1,))  # the 8 bytes at every offset
        self.pending = (np.empty(0, np.int64), np.empty(0, np.int64))  # opened, not closed yet
        self.found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.others: list[np.ndarray] = []  # every other "[": one could be the private key
        self.last_close = -1

    def feed(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Scan ``data[lo:hi]``; the lists completed by it: where each opens and closes."""
        found = [np.flatnonzero((self.data[at : min(hi, at + _SCAN)] | 6) == 0x5F) + at  # [ ] _ Y
                 for at in range(lo, hi, _SCAN)]
        found = np.concatenate(found)
        opens, closes = found[self.data[found] == ord("[")], found[self.data[found] == ord("]")]
        is_list, key_at = self._keys(opens)
        self.others.append(opens[~is_list])
        opens = np.concatenate((self.pending[0], opens[is_list]))
        key_at = np.concatenate((self.pending[1], key_at[is_list]))
        at = np.searchsorted(closes, opens)
        done = int(np.count_nonzero(at < len(closes)))  # a prefix: both are sorted
        self.pending = (opens[done:], key_at[done:])
        opens, closes, key_at = opens[:done], closes[at[:done]], key_at[:done]
        if len(opens) and (opens[0] < self.last_close or (opens[1:] < closes[:-1]).any()):
            raise _NotFast  # a bracket inside a list
        if len(opens):
            self.last_close = closes[-1]
        self.found.append((opens, closes, key_at))
        return opens, closes

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if len(self.pending[0]):
            raise _NotFast  # a list that never closes: the slow path reports where
        return tuple(np.concatenate(x) for x in zip(*self.found, strict=True)) if self.found else (np.empty(0, np.int64),) * 3

    def private_key_elsewhere(self) -> bool:
        """Whether the file has a string '"["' already, which could be the private key."""
        others = np.concatenate(self.others) if self.others else np.empty(0, np.int64)
        others = others[(others >= 1) & (others + 1 < len(self.data))]
        return bool(((self.data[others - 1] == ord('"')) & (self.data[others + 1] == ord('"'))).any())

    def _keys(self, opens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Which ``[`` follow an ``"answer_options":`` key, and where that key starts."""
        data, words = self.data, self.words
        is_list = np.zeros(len(opens), bool)
        far = opens >= 18
        # The usual layout, '"answer_options": [', at once; any other spacing in a second step.
        at = opens[far]
        is_list[far] = (words[at - 18] == _WORDS[0]) & (words[at - 10] == _WORDS[1]) & (words[at - 8] == _WORDS[2])
        key_at = opens - 18
        other = np.flatnonzero(~is_list)
        colon = _skip_space_back(data, opens[other] - 1)
        other, colon = other[colon >= 0], colon[colon >= 0]
        other, colon = other[data[colon] == ord(":")], colon[data[colon] == ord(":")]
        quote = _skip_space_back(data, colon - 1)  # the key's closing quote
        other, quote = other[quote >= 15], quote[quote >= 15]
        match = (words[quote - 15] == _WORDS[0]) & (words[quote - 7] == _WORDS[1])
        is_list[other[match]] = True
        key_at[other[match]] = quote[match] - 15
        return is_list, key_at


def _skip_space_back(data: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Each position moved left past JSON whitespace (-1 if it runs off the start)."""
    pos = pos.copy()
    todo = np.arange(len(pos))
    while len(todo):
        c = data[np.maximum(pos[todo], 0)]
        todo = todo[(pos[todo] >= 0) & ((c == 32) | (c == 10) | (c == 13) | (c == 9))]
        pos[todo] -= 1
    return pos


def _escapes_key_char(buf) -> bool:
    r"""Whether a ``\u`` escape in the file spells a character of the private key (a key could then
    be the private one without its bytes). Escapes are rare in VisDial: walk them one by one."""
    at = buf.find(b"\\")
    while at >= 0:
        if buf[at + 1 : at + 2] == b"u":
            try:
                code = int(bytes(buf[at + 2 : at + 6]), 16)
            except ValueError:
                return True  # not valid JSON: the slow path reports it
            if chr(code) in _PRIVATE_KEY:
                return True
        at = buf.find(b"\\", at + 2)
    return False


# --- slow path (the fallback) -------------------------------------------------------------------


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


def _parse_slow(path: Path, raw: bytes) -> ParsedVisdial:
    split, questions, answers, decoded, rejections = _decode(path, raw)
    dialogs = [d for d in decoded if d is not None]
    all_rounds = [r for d in dialogs for r in d.dialog]

    def rounds(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sel = [all_rounds[i] for i in rows.ravel().tolist()]
        return tuple(np.fromiter((getattr(r, name) for r in sel), np.int64, len(sel)).reshape(rows.shape)
                     for name in ("question", "answer", "gt_index"))

    def options(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
        parsed, bad = _parse_options([all_rounds[i].answer_options for i in rows.ravel().tolist()])
        return parsed.reshape(*rows.shape, NUM_OPTIONS), bad.reshape(rows.shape), -1, _INT32_MAX  # look at all

    return _check(_Decoded(split, questions, answers, [d.image_id for d in dialogs], [d.caption for d in dialogs],
                           [len(d.dialog) for d in dialogs], rounds, options, lambda i: _record(dialogs[i]), rejections))


def _decode(path: Path, raw: bytes) -> tuple[str, list[str], list[str], list[_Dialog | None], list[Rejection]]:
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


def _image_id_of(raw: msgspec.Raw) -> str | None:
    try:
        value = msgspec.json.decode(raw).get("image_id")
    except Exception:  # noqa: BLE001 - only for naming the rejected record
        return None
    return str(value) if value is not None else None


_INT32_MAX = np.iinfo(np.int32).max
_INT64_MIN, _INT64_MAX = int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max)


def _parse_options(raws: list[msgspec.Raw]) -> tuple[np.ndarray, np.ndarray]:
    """(rounds, 100) int32 options and a per-round 'malformed' mask.

    A chunk of lists at once where each is one flat bracketed list (one ``[`` per list: no
    nesting), else that chunk list by list.
    """
    out = np.empty((len(raws), NUM_OPTIONS), np.int32)
    bad = np.zeros(len(raws), bool)
    parser, span = simdjson.Parser(), np.empty(2, np.int32)
    for lo in range(0, len(raws), CHUNK_ROUNDS):
        part = raws[lo : lo + CHUNK_ROUNDS]
        doc = b"[" + b",-1,".join(part) + b",-1]"
        flat = doc.count(b"[") == doc.count(b"]") == len(part) + 1
        if not (flat and parse_joined(parser, doc, out[lo : lo + len(part)], span)):
            bad[lo : lo + len(part)] = _parse_lists_one_by_one(part, out[lo : lo + len(part)])
    return out, bad


def _parse_lists_one_by_one(raws: list[msgspec.Raw], out: np.ndarray) -> np.ndarray:
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


# --- rows for the tables ------------------------------------------------------------------------


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
