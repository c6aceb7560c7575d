"""VisDial parsing: every bad dialog is rejected with its reason, every good one survives, and the
bulk option-list parser proves each list held exactly 100 integers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.options import parse_joined, parse_options
from ingest.visdial import VisdialFormatError, dialog_columns, parse_visdial
from schemas.quarantine import Reason


def _round(q=0, a=0, gt=0, n_answers=3):
    opts = [(a + 1 + k) % n_answers for k in range(100)]
    opts[gt] = a
    return {"question": q, "answer": a, "gt_index": gt, "answer_options": opts}


def _doc(dialogs, questions=("is it red", "any dogs"), answers=("yes", "no", "maybe")):
    return {"version": "1.0", "split": "train",
            "data": {"questions": list(questions), "answers": list(answers), "dialogs": dialogs}}


def _good(image_id):
    return {"image_id": image_id, "caption": "a cat", "dialog": [_round(k % 2, k % 3, k) for k in range(10)]}


def _write(tmp_path, doc):
    p = tmp_path / "visdial_1.0_train.json"
    p.write_text(json.dumps(doc) if not isinstance(doc, (str, bytes)) else doc)
    return p


def test_good_file_parses(tmp_path):
    parsed = parse_visdial(_write(tmp_path, _doc([_good(1), _good(2)])))
    assert parsed.num_dialogs == 2 and parsed.rejections == []
    assert parsed.options.shape == (2, 10, 100)
    assert parsed.options[0, 3, 3] == parsed.a_idx[0, 3]


@pytest.mark.parametrize(
    "bad, reason",
    [
        ({**_good(9), "dialog": _good(9)["dialog"][:9]}, Reason.WRONG_TURN_COUNT),
        ({**_good(9), "dialog": [_round(q=7)] + _good(9)["dialog"][1:]}, Reason.INDEX_OUT_OF_RANGE),
        ({**_good(9), "dialog": [_round(a=-1)] + _good(9)["dialog"][1:]}, Reason.INDEX_OUT_OF_RANGE),
        (
            {**_good(9), "dialog": [{**_round(), "gt_index": 100}] + _good(9)["dialog"][1:]},
            Reason.GT_INDEX_OUT_OF_RANGE,
        ),
        ({**_good(9), "dialog": [{**_round(), "question": "0"}] + _good(9)["dialog"][1:]}, Reason.BAD_RECORD),
        (
            {**_good(9), "dialog": [{**_round(), "answer_options": [0] * 99}] + _good(9)["dialog"][1:]},
            Reason.BAD_RECORD,
        ),
        (
            {**_good(9), "dialog": [{**_round(), "answer_options": ["x"] * 100}] + _good(9)["dialog"][1:]},
            Reason.BAD_RECORD,
        ),
        ({"image_id": 9, "dialog": _good(9)["dialog"]}, Reason.BAD_RECORD),
        ({**_good(9), "caption": "  "}, Reason.EMPTY_TEXT),
        (_good(1), Reason.DUPLICATE_ID),
    ],
)
def test_bad_dialog_is_rejected_good_ones_survive(tmp_path, bad, reason):
    parsed = parse_visdial(_write(tmp_path, _doc([_good(1), bad, _good(2)])))
    assert sorted(parsed.image_ids.tolist()) == [1, 2]
    assert [r.reason for r in parsed.rejections] == [reason]
    assert parsed.rejections[0].record_json()  # the source record is kept


def test_empty_question_text_is_rejected(tmp_path):
    doc = _doc([_good(1), {**_good(2), "dialog": [_round(q=2)] + _good(2)["dialog"][1:]}],
               questions=("is it red", "any dogs", " "))
    parsed = parse_visdial(_write(tmp_path, doc))
    assert parsed.image_ids.tolist() == [1]
    assert parsed.rejections[0].reason == Reason.EMPTY_TEXT


@pytest.mark.parametrize(
    "content, fragment",
    [
        ('{"version": "1.0", "split": "train", "data": {"questions": [', "line 1"),
        (b'{"version": "1.0", "split": "tr\xffain"}', "not UTF-8 at byte"),
        (
            '{"version": "1.0", "split": "train", "data": {"questions": "x", "answers": [], "dialogs": []}}',
            "not VisDial",
        ),
        ("[1, 2]", "not VisDial"),
        ('{"version": "1.0", "split": NaN}', "invalid JSON: JSON is malformed: invalid character (byte 28)"),
    ],
)
def test_malformed_file_names_file_and_position(tmp_path, content, fragment):
    p = tmp_path / "bad.json"
    p.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(VisdialFormatError) as err:
        parse_visdial(p)
    assert str(p) in str(err.value) and fragment in str(err.value)


def test_empty_question_and_answer_lists_reject_every_dialog_with_a_reason(tmp_path):
    rounds = [{"question": 0, "answer": 0, "gt_index": 0, "answer_options": [0] * 100}] * 10
    doc = {
        "version": "1.0",
        "split": "train",
        "data": {
            "questions": [],
            "answers": [],
            "dialogs": [
                {"image_id": 7, "caption": "c", "dialog": rounds},
                {"image_id": 2**70, "caption": "c", "dialog": []},
            ],
        },
    }
    p = tmp_path / "v.json"
    p.write_text(json.dumps(doc))
    parsed = parse_visdial(p)
    assert parsed.num_dialogs == 0
    assert sorted(r.reason for r in parsed.rejections) == [Reason.BAD_RECORD, Reason.INDEX_OUT_OF_RANGE]


@pytest.mark.parametrize("image_id", [2**63, -(2**63) - 1, 2**70])
def test_image_id_past_int64_is_a_bad_record_and_the_others_survive(tmp_path, image_id):
    rounds = [{"question": 0, "answer": 0, "gt_index": 0, "answer_options": [0] * 100}] * 10
    dialogs = [
        {"image_id": image_id, "caption": "c", "dialog": rounds},
        {"image_id": 5, "caption": "c", "dialog": rounds},
    ]
    p = tmp_path / "v.json"
    p.write_text(
        json.dumps(
            {
                "version": "1.0",
                "split": "train",
                "data": {"questions": ["q"], "answers": ["a"], "dialogs": dialogs},
            }
        )
    )
    parsed = parse_visdial(p)
    assert parsed.image_ids.tolist() == [5]
    assert [(r.key, r.reason) for r in parsed.rejections] == [(str(image_id), Reason.BAD_RECORD)]


# --- many kinds of dialog in one file, against a model of the checks -------------------------------

QS = ["is it red", "any dogs", "how many", " "]  # index 3 is blank
ANS = ["yes", "no", "two", "maybe"]
# kind -> the reason its dialog is rejected (None: kept). "dup" repeats the previous dialog's id.
EXPECTED = {
    "ok": None, "short": Reason.WRONG_TURN_COUNT, "empty": Reason.WRONG_TURN_COUNT,
    "blank_caption": Reason.EMPTY_TEXT, "blank_question": Reason.EMPTY_TEXT,
    "question_oob": Reason.INDEX_OUT_OF_RANGE, "answer_neg": Reason.INDEX_OUT_OF_RANGE,
    "option_oob": Reason.INDEX_OUT_OF_RANGE, "minus_one_option": Reason.INDEX_OUT_OF_RANGE,
    "gt_oob": Reason.GT_INDEX_OUT_OF_RANGE, "gt_mismatch": Reason.GT_INDEX_OUT_OF_RANGE,
    "string_index": Reason.BAD_RECORD, "float_option": Reason.BAD_RECORD, "nested_options": Reason.BAD_RECORD,
    "null_options": Reason.BAD_RECORD, "count_99": Reason.BAD_RECORD,
    "escaped_bracket": None, "bracket_caption": None, "dup": None,
}
DIALOG_LEVEL = {Reason.WRONG_TURN_COUNT, Reason.DUPLICATE_ID}  # checked before the rounds


def _dialog(image_id, rng, kind, shuffle):
    rounds = []
    for _ in range(10):
        a, gt = int(rng.integers(4)), int(rng.integers(100))
        opts = [int(x) for x in rng.integers(4, size=100)]
        opts[gt] = a
        rounds.append({"question": int(rng.integers(3)), "answer": a, "gt_index": gt, "answer_options": opts})
    d = {"image_id": image_id, "caption": f'picture {image_id}: "answer_options": [1, 2]', "dialog": rounds}
    r = rounds[int(rng.integers(10))]
    if kind == "short":
        d["dialog"] = rounds[: int(rng.integers(1, 10))]
    elif kind == "empty":
        d["dialog"] = []
    elif kind == "blank_caption":
        d["caption"] = " \t"
    elif kind == "blank_question":
        r["question"] = 3
    elif kind == "question_oob":
        r["question"] = 4 + int(rng.integers(10**9))
    elif kind == "answer_neg":
        r["answer"] = -int(rng.integers(1, 10**6))
    elif kind == "option_oob":
        r["answer_options"][int(rng.integers(100))] = 2**40
    elif kind == "gt_oob":
        r["gt_index"] = int(rng.choice([-1, 100]))
    elif kind == "gt_mismatch":
        r["answer_options"][r["gt_index"]] = (r["answer"] + 1) % 4
    elif kind == "string_index":
        r["answer"] = str(r["answer"])
    elif kind == "float_option":
        r["answer_options"][0] = 1.5
    elif kind == "nested_options":
        r["answer_options"] = [r["answer_options"]]
    elif kind == "null_options":
        r["answer_options"] = None
    elif kind == "count_99":
        r["answer_options"] = r["answer_options"][:99]
    elif kind == "minus_one_option":
        r["answer_options"][int(rng.integers(100))] = -1  # looks like a separator of the bulk parser
    elif kind == "escaped_bracket":
        d["caption"] = "tab["  # the bracket written as a \u escape below
    elif kind == "bracket_caption":
        d["caption"] = "["
    if shuffle:
        d["dialog"] = [dict(sorted(x.items(), key=lambda kv: rng.random())) for x in d["dialog"]]
    return d


def _expected(dialogs, kinds):
    """(kept dialogs in file order, sorted (key, reason) of the rejections): the checks' order."""
    kept, rejected, seen = [], [], set()
    for d, kind in zip(dialogs, kinds, strict=True):
        reason = EXPECTED[kind]
        if kind != "string_index" and reason not in DIALOG_LEVEL and d["image_id"] in seen:
            reason = Reason.DUPLICATE_ID
        if reason is None:
            kept.append(d)
        else:
            rejected.append((str(d["image_id"]), reason))
        if reason not in DIALOG_LEVEL and kind not in ("string_index", "blank_caption"):
            seen.add(d["image_id"])  # passed the dialog checks: a later copy is a duplicate
    return kept, sorted(rejected)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    kinds=st.lists(st.sampled_from(sorted(EXPECTED)), min_size=1, max_size=8),
    seed=st.integers(0, 2**32 - 1),
    indent=st.sampled_from([None, None, 1]),
    compact=st.booleans(),
    shuffle=st.booleans(),
    extra_list=st.booleans(),
)
def test_each_kind_of_dialog_gets_its_reason_and_the_rest_survive(
    tmp_path, kinds, seed, indent, compact, shuffle, extra_list
):
    rng = np.random.default_rng(seed)
    dialogs = []
    for i, kind in enumerate(kinds):
        dialogs.append(
            _dialog(dialogs[-1]["image_id"] if kind == "dup" and dialogs else 100 + i, rng, kind, shuffle)
        )
    if extra_list:  # an answer_options list outside any round: not a round's, ignored
        dialogs[0]["answer_options"] = [1, 2, 3]
    doc = {"version": "1.0", "split": "val", "data": {"questions": QS, "answers": ANS, "dialogs": dialogs}}
    text = json.dumps(doc, indent=indent, ensure_ascii=False, separators=(",", ":") if compact else None)
    p = tmp_path / "visdial_1.0_val.json"
    p.write_bytes(text.replace("tab[", "tab\\u005b").encode())

    parsed = parse_visdial(p)
    kept, rejected = _expected(dialogs, kinds)
    assert parsed.image_ids.tolist() == [d["image_id"] for d in kept]
    assert sorted((r.key, r.reason) for r in parsed.rejections) == rejected
    assert all(r.record_json() for r in parsed.rejections)
    for row, source in enumerate(kept):
        assert parsed.captions[row] == source["caption"]
        rounds = source["dialog"]
        assert parsed.options[row].tolist() == [r["answer_options"] for r in rounds]
        assert parsed.gt_index[row].tolist() == [r["gt_index"] for r in rounds]
    turns = dialog_columns(parsed)["turns"]
    assert len(turns) == 10 * len(kept)


@pytest.mark.parametrize("tamper", ["moved_list", "duplicate_key"])
def test_a_round_without_its_own_list_is_a_bad_record(tmp_path, tamper):
    # As many "answer_options" lists as rounds, but one round has none: counting alone would pass.
    rng = np.random.default_rng(5)
    dialogs = [_dialog(1, rng, "ok", False), _dialog(2, rng, "ok", False)]
    lost = dialogs[1]["dialog"][3].pop("answer_options")
    if tamper == "moved_list":
        dialogs[1]["answer_options"] = lost
    else:
        dialogs[1]["dialog"][5]["DUP"] = lost
    text = json.dumps({"split": "val", "data": {"questions": QS, "answers": ANS, "dialogs": dialogs}})
    p = tmp_path / "visdial_1.0_val.json"
    p.write_text(text.replace('"DUP"', '"answer_options"'))
    parsed = parse_visdial(p)
    assert parsed.image_ids.tolist() == [1] and [r.reason for r in parsed.rejections] == [Reason.BAD_RECORD]


def test_many_chunks_of_lists_parse_in_bulk_and_a_bad_list_marks_only_its_round():
    rows = np.random.default_rng(1).integers(0, 300_000, size=(2500, 100))
    raws = [json.dumps(r.tolist()).encode() for r in rows]
    raws[1700] = json.dumps(list(range(99))).encode()
    raws[2100] = b"[" + b",".join([b"1"] * 99) + b",-1]"  # 100 values, one of them -1: still a list of 100
    values, bad, lowest, highest = parse_options(raws, 100)
    assert np.flatnonzero(bad).tolist() == [1700]
    ok = np.ones(len(rows), bool)
    ok[[1700, 2100]] = False
    assert np.array_equal(values[ok], rows[ok]) and values[2100, -1] == -1
    assert lowest == -1 and highest == np.iinfo(np.int32).max  # a chunk went list by list: look at all


@pytest.mark.parametrize("doc, ok", [
    (b"[[1,2,3],-1,[4,5,6],-1]", True),
    (b"[1,2,3,-1,4,5,6,-1]", True),  # bare lists
    (b"[[1,2],-1,[3,4,5,6],-1]", False),  # the counts differ: a separator out of place
    (b"[[1,2,-1],-1,[4,5,6],-1]", False),  # a -1 where a separator should be
    (b"[[1,2,3],-1,[4,5.5,6],-1]", False),
    (b"[[1,2,3],-1,[4,5,6]]", False),
])
def test_parse_joined_proves_every_list_has_its_width(doc, ok):
    import simdjson

    out, span = np.zeros((2, 3), np.int32), np.zeros(2, np.int32)
    assert parse_joined(simdjson.Parser(), doc, out, span) is ok
    if ok:
        assert out.tolist() == [[1, 2, 3], [4, 5, 6]] and span.tolist() == [1, 6]
