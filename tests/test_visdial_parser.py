"""VisDial parsing: every bad dialog is rejected with its reason, every good one survives."""

from __future__ import annotations

import json

import pytest

from schemas.quarantine import Reason
from tasks.visdial import VisdialFormatError, parse_visdial


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
    ],
)
def test_malformed_file_names_file_and_position(tmp_path, content, fragment):
    p = tmp_path / "bad.json"
    p.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(VisdialFormatError) as err:
        parse_visdial(p)
    assert str(p) in str(err.value) and fragment in str(err.value)
