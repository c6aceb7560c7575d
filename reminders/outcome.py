"""Each prompt's fate after a round of calls: a valid row, a rejection with its reason, or still
failed (retryable: a re-run asks again)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from llmcalls.requests import REJECTED
from reminders.parse import check
from reminders.prompts import Prompt
from schemas.quarantine import Reason, Rejection


@dataclass
class Outcome:
    rows: list[dict]
    rejections: list[Rejection]
    failed: list[int]  # image ids still retryable

    def counts(self) -> dict[str, int]:
        """Quarantined prompts per reason."""
        per_reason = Counter(str(r.reason) for r in self.rejections)
        return {f"quarantined_{k}": v for k, v in sorted(per_reason.items())}

    def __add__(self, other: Outcome) -> Outcome:
        return Outcome(self.rows + other.rows, self.rejections + other.rejections, self.failed + other.failed)


def sort_out(prompts: list[Prompt], answers: dict[str, dict], errors: dict[str, dict]) -> Outcome:
    """Each prompt -> valid row, rejection, or still failed; from the cache and the round's errors."""
    out = Outcome([], [], [])
    for p in prompts:
        rh = p.request.request_hash
        if rh in answers:
            res = check(p, answers[rh])
            (out.rejections if isinstance(res, Rejection) else out.rows).append(res)
        elif errors.get(rh, {}).get("status") == REJECTED:
            out.rejections.append(Rejection(str(p.image_id), Reason.LLM_ERROR, {"image_id": p.image_id,
                                                                                "request_hash": rh},
                                            errors[rh].get("error") or ""))
        else:
            out.failed.append(p.image_id)
    return out


def to_repair(outcome: Outcome) -> dict[int, str]:
    """image_id -> the answer that broke the format (what a repair round re-asks about); a
    rejection without an answer (a 4xx, a missing image) is not repaired."""
    return {int(r.key): r.record["response"] for r in outcome.rejections
            if isinstance(r.record, dict) and r.record.get("response")}


def repaired(outcome: Outcome, second: Outcome) -> Outcome:
    """``outcome`` with the rejections that were re-asked replaced by the re-ask's verdict (final)."""
    redone = set(to_repair(outcome))
    kept = [r for r in outcome.rejections if not (r.key.isdigit() and int(r.key) in redone)]
    return Outcome(outcome.rows + second.rows, kept + second.rejections, outcome.failed + second.failed)
