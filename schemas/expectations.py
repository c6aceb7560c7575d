"""Great Expectations suites: the data contracts each stage's output must meet.

Suites are built by functions because some expectations depend on the run (a turns table must
have ten rows per dialog written). ``schemas.validate`` runs them; a failed suite stops the
stages downstream.
"""

from __future__ import annotations

import great_expectations as gx
import great_expectations.expectations as gxe

from schemas.ingest import NUM_OPTIONS, NUM_TURNS
from schemas.reminders import ANSWER_CHARS, REMINDER_CHARS


def images_suite() -> gx.ExpectationSuite:
    return gx.ExpectationSuite(
        name="images",
        expectations=[
            gxe.ExpectColumnValuesToBeUnique(column="image_id"),
            gxe.ExpectColumnValuesToNotBeNull(column="path"),
            gxe.ExpectColumnValuesToBeBetween(column="width", min_value=1),
            gxe.ExpectColumnValuesToBeBetween(column="height", min_value=1),
            gxe.ExpectColumnValueLengthsToEqual(column="sha256", value=64),
        ],
    )


def dialogs_suite() -> gx.ExpectationSuite:
    return gx.ExpectationSuite(
        name="dialogs",
        expectations=[
            gxe.ExpectColumnValuesToBeUnique(column="image_id"),
            gxe.ExpectColumnValueLengthsToBeBetween(column="caption", min_value=1),
        ],
    )


def turns_suite(num_dialogs: int) -> gx.ExpectationSuite:
    return gx.ExpectationSuite(
        name="turns",
        expectations=[
            gxe.ExpectCompoundColumnsToBeUnique(column_list=["image_id", "turn"]),
            gxe.ExpectTableRowCountToEqual(value=num_dialogs * NUM_TURNS),
            gxe.ExpectColumnValuesToBeBetween(column="turn", min_value=1, max_value=NUM_TURNS),
            gxe.ExpectColumnValuesToBeBetween(column="gt_index", min_value=0, max_value=NUM_OPTIONS - 1),
            gxe.ExpectColumnValueLengthsToBeBetween(column="question", min_value=1),
            gxe.ExpectColumnValueLengthsToBeBetween(column="answer", min_value=1),
        ],
    )


def reminders_suite() -> gx.ExpectationSuite:
    """A reminder answer: exactly one non-empty <reminder> block, then a final answer; both within
    length bounds; no copied ``Q:``/``A:`` dialog lines."""
    one_block = (
        r"(?is)^(?:(?!<reminder>).)*<reminder>(?:(?!</?reminder>).)+</reminder>(?:(?!</?reminder>).)+$"
    )
    return gx.ExpectationSuite(
        name="reminders",
        expectations=[
            gxe.ExpectColumnValuesToBeUnique(column="image_id"),
            gxe.ExpectColumnValuesToMatchRegex(column="response", regex=one_block),
            gxe.ExpectColumnValueLengthsToBeBetween(column="reminder", min_value=REMINDER_CHARS[0],
                                                    max_value=REMINDER_CHARS[1]),
            gxe.ExpectColumnValueLengthsToBeBetween(column="final_answer", min_value=ANSWER_CHARS[0],
                                                    max_value=ANSWER_CHARS[1]),
            gxe.ExpectColumnValuesToNotMatchRegex(column="reminder", regex=r"(?i)</?reminder>"),
            gxe.ExpectColumnValuesToNotMatchRegex(column="reminder", regex=r"(?m)^\s*[QA]:"),
            gxe.ExpectColumnValuesToNotMatchRegex(column="final_answer", regex=r"(?m)^\s*[QA]:"),
            gxe.ExpectColumnValuesToNotBeNull(column="request_hash"),
        ],
    )
