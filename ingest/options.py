"""VisDial ``answer_options`` lists (100 indices per round) parsed in bulk.

The option indices are most of a VisDial file's bytes, so they are never turned into one Python
int each: a chunk of rounds' lists is joined into one flat JSON array with a ``-1`` after each
list, parsed at once by simdjson into an int64 buffer and checked in bulk. The ``-1`` separators
must sit at every 101st place and be the only ``-1`` values, which proves that each list held
exactly 100 integers; anything else (a float, a string, a nested list, a wrong count) fails the
chunk, whose lists are then parsed one by one so that only the malformed ones are marked.
"""

from __future__ import annotations

import msgspec
import numpy as np
import simdjson

CHUNK_ROUNDS = 1024  # the joined JSON of a chunk stays small enough for the CPU's cache
_INT32_MAX = np.iinfo(np.int32).max


def parse_joined(parser: simdjson.Parser, doc: bytes, out: np.ndarray, span: np.ndarray) -> bool:
    """Parse ``[list,-1,list,-1,...,list,-1]`` (lists bare or bracketed) into ``out`` (k, width) int32.

    Values are clipped to -1..int32 max (anything clipped is out of range anyway); ``span`` gets
    the smallest and largest value. False if the document is not exactly k lists of ``width``
    integers.
    """
    k, width = out.shape
    try:
        values = np.frombuffer(parser.parse(doc).as_buffer(of_type="i"), np.int64)
    except (TypeError, ValueError, RuntimeError):  # not JSON, not integers, or past int64
        return False
    if values.size != k * (width + 1):
        return False
    rows = values.reshape(k, width + 1)
    if not (rows[:, width] == -1).all():
        return False
    lists = rows[:, :width]
    low, high = lists.min(), lists.max()
    if low < -1 or high > _INT32_MAX:
        np.clip(lists, -1, _INT32_MAX, out=out, casting="unsafe")
    else:
        out[...] = lists
    span[:] = min(max(low, -1), _INT32_MAX), min(max(high, -1), _INT32_MAX)
    # A -1 in the data could stand in for a missing separator: then the count gives it away.
    return bool(low >= 0 or np.count_nonzero(values == -1) == k)


def parse_options(raws: list[msgspec.Raw], width: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(rounds, width) int32 options, a per-round 'malformed' mask, and a bound below and above
    every well-formed option (-1 and int32 max where a chunk had to be parsed list by list)."""
    out = np.empty((len(raws), width), np.int32)
    bad = np.zeros(len(raws), bool)
    parser, span = simdjson.Parser(), np.empty(2, np.int32)
    lowest, highest = _INT32_MAX, -1
    for lo in range(0, len(raws), CHUNK_ROUNDS):
        part = raws[lo : lo + CHUNK_ROUNDS]
        doc = b"[" + b",-1,".join(part) + b",-1]"
        flat = doc.count(b"[") == doc.count(b"]") == len(part) + 1  # one bracketed list each, no nesting
        if flat and parse_joined(parser, doc, out[lo : lo + len(part)], span):
            lowest, highest = min(lowest, int(span[0])), max(highest, int(span[1]))
        else:
            bad[lo : lo + len(part)] = _one_by_one(part, out[lo : lo + len(part)])
            lowest, highest = -1, _INT32_MAX  # not tracked here: look at every value
    return out, bad, lowest, highest


def _one_by_one(raws: list[msgspec.Raw], out: np.ndarray) -> np.ndarray:
    bad = np.zeros(len(raws), bool)
    dec = msgspec.json.Decoder(list[int])
    for i, r in enumerate(raws):
        try:
            v = dec.decode(r)
            if len(v) != out.shape[1]:
                raise ValueError
            out[i] = [min(max(x, -1), _INT32_MAX) for x in v]
        except (msgspec.MsgspecError, ValueError, OverflowError):
            bad[i] = True
            out[i] = 0
    return bad
