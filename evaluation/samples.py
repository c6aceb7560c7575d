"""The held-out evaluation samples, built from the ``dialogs`` and ``turns`` tables.

A sample is one question of one dialog with everything said before it: the caption, the earlier
question/answer turns, the question, its ground-truth answer (the reference) and its 100 answer
options (for ranking). ``last`` makes one sample per dialog, its 10th turn, as the reminders do
(they drop the last answer and ask for it); ``all`` makes one per turn, the report's
20,640-sample evaluation of VisDial val (2,064 dialogs x 10 turns).

"Held out" is checked, not assumed: a dialog whose image also appears in data the models were
trained on is rejected with a reason, so a leak shows up in ``quarantine`` instead of in the scores.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa

from schemas.quarantine import Reason, Rejection


@dataclass(frozen=True)
class Sample:
    image_id: int
    turn: int  # 1..10
    caption: str
    history: tuple[tuple[str, str], ...]  # (question, answer) of turns 1..turn-1
    question: str
    answer: str  # the ground truth: the reference for generation metrics
    gt_index: int
    options: tuple[str, ...]
    split: str

    @property
    def key(self) -> tuple[int, int]:
        """(image_id, round_id) as VisDial's dense annotations name a round."""
        return (self.image_id, self.turn)


def build_samples(
    dialogs: pa.Table,
    turns: pa.Table,
    *,
    which: Literal["last", "all"] = "last",
    limit: int | None = None,
) -> list[Sample]:
    """Samples of the given dialogs, ordered by (image_id, turn); ``limit`` counts dialogs."""
    ids = dialogs.column("image_id").to_pylist()
    captions = dict(zip(ids, dialogs.column("caption").to_pylist(), strict=True))
    split_of = dict(zip(ids, dialogs.column("split").to_pylist(), strict=True))
    by_dialog: dict[int, list[dict]] = {}
    for row in turns.select(["image_id", "turn", "question", "answer", "gt_index",
                             "answer_options"]).to_pylist():
        if row["image_id"] in captions:
            by_dialog.setdefault(row["image_id"], []).append(row)
    samples = []
    for image_id in sorted(by_dialog)[:limit]:
        rows = sorted(by_dialog[image_id], key=lambda r: r["turn"])
        chosen = rows[-1:] if which == "last" else rows
        for row in chosen:
            t = row["turn"]
            history = tuple((r["question"], r["answer"]) for r in rows if r["turn"] < t)
            samples.append(
                Sample(
                    image_id=image_id, turn=t, caption=captions[image_id], history=history,
                    question=row["question"], answer=row["answer"], gt_index=row["gt_index"],
                    options=tuple(row["answer_options"] or ()), split=split_of[image_id],
                )
            )
    return samples


def held_out(
    samples: list[Sample], trained_on: Iterable[int], what: str
) -> tuple[list[Sample], list[Rejection]]:
    """Drop samples whose dialog's image the models saw in training; one rejection per dialog."""
    seen = set(trained_on)
    kept, rejected = [], {}
    for s in samples:
        if s.image_id in seen:
            rejected.setdefault(
                s.image_id,
                Rejection(str(s.image_id), Reason.SEEN_IN_TRAINING,
                          {"image_id": s.image_id, "split": s.split, "caption": s.caption},
                          f"image {s.image_id} is also in {what}: not a held-out dialog"),
            )
        else:
            kept.append(s)
    return kept, list(rejected.values())
