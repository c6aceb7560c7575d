"""VisDial parsing: every bad dialog is rejected with its reason, every good one survives, and the
fast path gives exactly what the reference (slow) path gives."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.quarantine import Reason
from tasks import visdial, visdial_options
from tasks.visdial import VisdialFormatError, dialog_columns, parse_visdial
from tasks.visdial_options import FileBytes, OptionsHelper, OptionsJob


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
        ({**_good(9), "dialog": [{**_round(), "gt_index": 100}] + _good(9)["dialog"][1:]}, Reason.GT_INDEX_OUT_OF_RANGE),
        ({**_good(9), "dialog": [{**_round(), "question": "0"}] + _good(9)["dialog"][1:]}, Reason.BAD_RECORD),
        ({**_good(9), "dialog": [{**_round(), "answer_options": [0] * 99}] + _good(9)["dialog"][1:]}, Reason.BAD_RECORD),
        ({**_good(9), "dialog": [{**_round(), "answer_options": ["x"] * 100}] + _good(9)["dialog"][1:]}, Reason.BAD_RECORD),
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
        ('{"version": "1.0", "split": "train", "data": {"questions": "x", "answers": [], "dialogs": []}}', "not VisDial"),
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
    doc = {"version": "1.0", "split": "train",
           "data": {"questions": [], "answers": [], "dialogs": [{"image_id": 7, "caption": "c", "dialog": rounds},
                                                                {"image_id": 2**70, "caption": "c", "dialog": []}]}}
    p = tmp_path / "v.json"
    p.write_text(json.dumps(doc))
    parsed = parse_visdial(p)
    assert parsed.num_dialogs == 0
    assert sorted(r.reason for r in parsed.rejections) == [Reason.BAD_RECORD, Reason.INDEX_OUT_OF_RANGE]


@pytest.mark.parametrize("image_id", [2**63, -(2**63) - 1, 2**70])
def test_image_id_past_int64_is_a_bad_record_and_the_others_survive(tmp_path, image_id):
    rounds = [{"question": 0, "answer": 0, "gt_index": 0, "answer_options": [0] * 100}] * 10
    dialogs = [{"image_id": image_id, "caption": "c", "dialog": rounds}, {"image_id": 5, "caption": "c", "dialog": rounds}]
    p = tmp_path / "v.json"
    p.write_text(json.dumps({"version": "1.0", "split": "train", "data": {"questions": ["q"], "answers": ["a"],
                                                                           "dialogs": dialogs}}))
    parsed = parse_visdial(p)
    assert parsed.image_ids.tolist() == [5]
    assert [(r.key, r.reason) for r in parsed.rejections] == [(str(image_id), Reason.BAD_RECORD)]


# --- the fast path against the reference (slow) path ----------------------------------------------

QS = ["is it red", "any dogs", "how many", " "]  # index 3 is blank
ANS = ["yes", "no", "two", "maybe"]
SEMANTIC = ["ok", "short", "empty", "blank_caption", "blank_question", "question_oob", "answer_neg",
            "option_oob", "gt_oob", "gt_mismatch", "dup"]
TYPED = ["string_index", "float_option", "nested_options", "null_options", "count_99", "minus_one_option",
         "escaped_key", "private_key_text"]  # the fast path hands these files to the slow path


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
        r["answer_options"][int(rng.integers(100))] = -1
    elif kind == "escaped_key":
        d["caption"] = "tab["  # the bracket written as a \u escape below: it could spell the private key
    elif kind == "private_key_text":
        d["caption"] = "["  # the string the fast path uses as its private key
    if shuffle:
        d["dialog"] = [dict(sorted(x.items(), key=lambda kv: rng.random())) for x in d["dialog"]]
    return d


def _same(a, b):
    assert a.split == b.split and a.questions.equals(b.questions) and a.answers.equals(b.answers)
    for name in ("image_ids", "q_idx", "a_idx", "gt_index", "options"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), name
    assert a.captions == b.captions
    assert [(r.key, r.reason, r.record_json(), r.detail) for r in a.rejections] == \
        [(r.key, r.reason, r.record_json(), r.detail) for r in b.rejections]
    ta, tb = dialog_columns(a), dialog_columns(b)
    assert all(ta[k].equals(tb[k]) for k in ta)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(st.sampled_from(SEMANTIC + TYPED), min_size=1, max_size=8), seed=st.integers(0, 2**32 - 1),
       indent=st.sampled_from([None, None, 1]), compact=st.booleans(), shuffle=st.booleans(), extra_list=st.booleans())
def test_fast_path_gives_what_the_reference_path_gives(tmp_path, kinds, seed, indent, compact, shuffle, extra_list):
    rng = np.random.default_rng(seed)
    dialogs = []
    for i, kind in enumerate(kinds):
        dialogs.append(_dialog(dialogs[-1]["image_id"] if kind == "dup" and dialogs else 100 + i, rng, kind, shuffle))
    if extra_list:  # an answer_options list outside any round
        dialogs[0]["answer_options"] = [1, 2, 3]
    doc = {"version": "1.0", "split": "val", "data": {"questions": QS, "answers": ANS, "dialogs": dialogs}}
    text = json.dumps(doc, indent=indent, ensure_ascii=False, separators=(",", ":") if compact else None)
    raw = text.replace("tab[", "tab\\u005b").encode()
    p = tmp_path / "visdial_1.0_val.json"
    p.write_bytes(raw)

    parsed = parse_visdial(p)
    _same(parsed, visdial._parse_slow(p, raw))
    source = FileBytes(p)
    try:
        visdial._parse_fast(source, None)
        took_fast = True
    except visdial._NotFast:
        took_fast = False
    finally:
        source.close()
    has_lists = any(d.get("dialog") for d in dialogs)  # a file without any falls back too
    assert took_fast == (indent is None and not extra_list and has_lists and not set(kinds) & set(TYPED))


@pytest.mark.parametrize("tamper", ["moved_list", "duplicate_key"])
def test_lists_that_are_not_exactly_the_rounds_lists_go_to_the_slow_path(tmp_path, tamper):
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
    source = FileBytes(p)
    with pytest.raises(visdial._NotFast):
        visdial._parse_fast(source, None)
    source.close()
    parsed = parse_visdial(p)
    _same(parsed, visdial._parse_slow(p, p.read_bytes()))
    assert parsed.image_ids.tolist() == [1] and [r.reason for r in parsed.rejections] == [Reason.BAD_RECORD]


def test_helper_process_gives_the_same_tables(tmp_path):  # the helper starts; here the caller may outrun it
    rng = np.random.default_rng(7)
    kinds = ["ok"] * 1500 + ["gt_mismatch", "short", "dup", "option_oob"]
    dialogs = [_dialog(10_000 + i if k != "dup" else 10_000, rng, k, False) for i, k in enumerate(kinds)]
    raw = json.dumps({"split": "train", "data": {"questions": QS, "answers": ANS, "dialogs": dialogs}}).encode()
    p = tmp_path / "visdial_1.0_train.json"
    p.write_bytes(raw)
    parsed = parse_visdial(p, helper_min_bytes=0)
    _same(parsed, visdial._parse_slow(p, raw))
    assert len(parsed.rejections) == 4


def _lists_file(tmp_path, rows):
    texts = [b"[" + b", ".join(str(x).encode() for x in r) + b"]" for r in rows]
    p = tmp_path / "lists.json"
    p.write_bytes(b" ".join(texts))
    ends = np.cumsum([len(t) + 1 for t in texts]) - 2  # the "]" of each list
    starts = ends - np.array([len(t) for t in texts]) + 2
    return p, starts, ends


def _job(path, starts, ends, helper, chunk=16):
    source = FileBytes(path, helper.data_fd if helper else None)
    job = OptionsJob(source.buf, len(starts), 100, helper, chunk=chunk)
    for lo, hi in source.pieces(4096):  # hand the spans over as their bytes arrive
        whole = (ends < hi) & (ends >= lo)
        job.add(starts[whole], ends[whole])
    source.close()
    return job


@pytest.mark.parametrize("kill", [False, True])
def test_helper_takes_chunks_from_the_front_and_a_dead_one_costs_nothing(tmp_path, kill):
    rows = np.random.default_rng(1).integers(0, 300_000, size=(640, 100))
    p, starts, ends = _lists_file(tmp_path, rows)
    helper = OptionsHelper.spawn()
    assert helper is not None, "needs two cores and memfd"
    try:
        job = _job(p, starts, ends, helper)
        if kill:
            helper.proc.kill()
        deadline = time.monotonic() + 30
        while not kill and job.work.states[0] == 0 and time.monotonic() < deadline:  # the helper has begun
            time.sleep(0.01)
        values, lowest, highest = job.finish()
        assert np.array_equal(values, rows) and (lowest, highest) == (rows.min(), rows.max())
        if not kill:
            assert job.work.states[0] == visdial_options._HELPER_DONE
    finally:
        helper.close()


def test_a_malformed_list_fails_the_job_wherever_it_is(tmp_path):
    rows = [list(range(100))] * 300
    rows[5] = list(range(99))
    p, starts, ends = _lists_file(tmp_path, rows)
    helper = OptionsHelper.spawn()
    try:
        assert _job(p, starts, ends, helper).finish() is None
    finally:
        helper.close()
    assert _job(p, starts, ends, None).finish() is None
