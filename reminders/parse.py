"""An LLM answer -> (reminder, final answer), or the reason it breaks the format. The bounds and the
tag come from ``schemas.reminders``, which the Great Expectations suite reads too."""

from __future__ import annotations

from schemas.quarantine import Reason, Rejection
from schemas.reminders import ANSWER_CHARS, ANY_TAG_RE, ECHO_RE, REMINDER_CHARS, REMINDER_RE


def parse_response(text: str) -> tuple[str, str] | tuple[Reason, str]:
    """(reminder, final_answer), or (reason, detail) when the answer breaks the format."""
    tags = ANY_TAG_RE.findall(text)
    blocks = REMINDER_RE.findall(text)
    if not blocks:
        return Reason.NO_REMINDER, "no <reminder>...</reminder> block"
    if len(blocks) > 1 or len(tags) != 2:
        return Reason.MULTIPLE_REMINDERS, f"{len(blocks)} blocks, {len(tags)} tags"
    reminder = blocks[0].strip()
    final = text[REMINDER_RE.search(text).end():].strip()
    if not reminder:
        return Reason.EMPTY_REMINDER, "the reminder is empty"
    if not final:
        return Reason.EMPTY_ANSWER, "no final answer after the reminder"
    bounds = (("reminder", reminder, REMINDER_CHARS), ("final answer", final, ANSWER_CHARS))
    for what, value, (lo, hi) in bounds:
        if len(value) > hi:
            return Reason.TOO_LONG, f"{what} has {len(value)} characters (max {hi})"
        if len(value) < lo:
            return Reason.TOO_SHORT, f"{what} has {len(value)} characters (min {lo})"
    if ECHO_RE.search(reminder) or ECHO_RE.search(final):
        return Reason.ECHOED_DIALOG, "the answer copies Q:/A: lines"
    return reminder, final


def check(prompt, answer: dict) -> dict | Rejection:
    """The ``reminders`` row for ``prompt``'s cached answer (a :class:`reminders.prompts.Prompt`),
    or why it is rejected."""
    text = (answer.get("response") or "").strip()
    parsed = parse_response(text)
    if isinstance(parsed[0], Reason):
        record = {"image_id": prompt.image_id, "request_hash": answer["request_hash"], "response": text}
        return Rejection(str(prompt.image_id), parsed[0], record, parsed[1])
    return {"image_id": prompt.image_id, "split": prompt.split, "image_url": prompt.image_url,
            "conversation": prompt.conversation, "response": text, "reminder": parsed[0],
            "final_answer": parsed[1], "target_answer": prompt.target_answer,
            "request_hash": answer["request_hash"], "model": answer.get("model"),
            "backend": answer.get("backend")}
