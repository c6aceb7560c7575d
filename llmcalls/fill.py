"""The one fill loop: which requests still need an answer, in which shard, and what came back.

Every stage that asks an LLM (or a local model standing in for one) for many answers does the
same thing: merge the journals a killed run left, look the requests up in the response cache, cut
the rest into fixed shards, have each shard answered into its own journal, merge each journal into
the cache as its shard ends, and finally read every answer from the cache. :func:`plan_fill`
does the first half and returns a :class:`Fill`; :func:`run_fill` runs the shards one after
another through a ``produce`` callback (the reminders flow runs them as Prefect tasks instead and
uses the :class:`Fill` for shards, journals, errors and merges).

Shards are cut over all (deduplicated) requests in request order, answered or not, so a shard is
the same on every run (its requests can key an orchestrator's cache); only the shards holding an
unanswered request are marked ``needed``, and only their unanswered requests are asked. An
answered request is never asked again: a crash-resumed run asks only what is missing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from llmcalls.cache import ResponseCache, read_journal
from llmcalls.requests import OK, LLMRequest
from storage.progress import ProgressFn

log = logging.getLogger("mmem." + __name__)

Produce = Callable[[list[LLMRequest], Path], None]  # (a shard's unanswered requests, its journal)


class FillIncomplete(RuntimeError):
    """Some requests have no answer after their retries; their finished neighbours are cached, so a
    re-run asks only for those."""


@dataclass
class Fill:
    """A planned fill of ``requests`` (deduplicated, in request order) against ``cache``."""

    cache: ResponseCache
    label: str  # names this round's journals: ``<label>-shard-<i>``
    requests: list[LLMRequest]
    shards: list[list[LLMRequest]]
    answers: dict[str, dict]  # request hash -> cached ``llm_responses`` row (status ok)
    needed: list[int]  # indexes of the shards that hold an unanswered request
    recovered: int = 0  # journal rows of dead runs merged before the lookup
    cached: int = 0  # requests answered before this fill asked anything
    _errors: dict[int, dict[str, dict]] = field(default_factory=dict, repr=False)

    @property
    def hashes(self) -> list[str]:
        return [r.request_hash for r in self.requests]

    def journal(self, i: int) -> Path:
        """Shard ``i``'s journal file."""
        return self.cache.journal_path(self.label, i)

    def todo(self, i: int) -> list[LLMRequest]:
        """Shard ``i``'s requests without an answer yet."""
        return [r for r in self.shards[i] if r.request_hash not in self.answers]

    def answered(self, i: int) -> frozenset[str]:
        """Hashes of shard ``i``'s requests that already have an answer."""
        return frozenset(r.request_hash for r in self.shards[i] if r.request_hash in self.answers)

    def missing(self) -> list[str]:
        """Hashes without an answer (as of the last lookup: see :meth:`refresh`)."""
        return [h for h in self.hashes if h not in self.answers]

    def errors(self, i: int) -> dict[str, dict]:
        """Shard ``i``'s failed calls (rows with status other than ok) by request hash: read from its
        journal, or remembered from when :meth:`merge` merged it. Signed rows only, so a planted error
        row says nothing."""
        if i in self._errors:
            return self._errors[i]
        return {r["request_hash"]: r for r in read_journal(self.journal(i)) if r.get("status") != OK}

    def merge(self, i: int) -> int:
        """Merge shard ``i``'s journal into the cache (and delete it); returns the rows merged.
        Its error rows (:meth:`errors`) are kept from the same read."""
        rows = read_journal(self.journal(i))
        errors = {r["request_hash"]: r for r in rows if r.get("status") != OK}
        merged = self.cache.merge(self.journal(i), rows)
        self._errors[i] = errors
        return merged

    def refresh(self) -> dict[str, dict]:
        """Look the requests up again (after shards were merged); updates ``answers`` and ``needed``."""
        self.answers = self.cache.lookup(self.hashes)
        self.needed = [i for i in range(len(self.shards)) if self.todo(i)]
        return self.answers

    def complete(self) -> bool:
        """Every request has an answer (as of the last lookup)."""
        return not self.missing()

    def responses(self) -> dict[str, str]:
        """Each request's answer text by hash; raises :class:`FillIncomplete` if any is missing."""
        missing = self.missing()
        if missing:
            raise FillIncomplete(f"{self.label}: {len(missing)} of {len(self.requests)} requests have no "
                                 "answer after their retries; re-run the flow to make only those calls")
        return {h: self.answers[h]["response"] or "" for h in self.hashes}


def unique(requests: Iterable[LLMRequest]) -> list[LLMRequest]:
    """``requests`` without repeats (same hash), first occurrence first."""
    return list({r.request_hash: r for r in requests}.values())


def plan_fill(cache: ResponseCache, requests: Iterable[LLMRequest], label: str, shard_size: int, *,
              recover: bool = True) -> Fill:
    """Merge dead runs' journals (unless ``recover`` is off: the caller did), look ``requests`` up,
    and cut them into shards of ``shard_size`` in request order."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, not {shard_size}")
    recovered = cache.recover() if recover else 0
    reqs = unique(requests)
    shards = [reqs[i:i + shard_size] for i in range(0, len(reqs), shard_size)]
    fill = Fill(cache, label, reqs, shards, {}, [], recovered=recovered)
    fill.refresh()
    fill.cached = len(fill.answers)
    log.info("%s: %d requests, %d cached, %d to ask in %d of %d shards (%d journal rows recovered)", label,
             len(reqs), fill.cached, len(reqs) - fill.cached, len(fill.needed), len(shards), recovered)
    return fill


def run_fill(fill: Fill, produce: Produce, progress: ProgressFn | None = None) -> Fill:
    """Answer every needed shard, one after another: ``produce(requests, journal)`` writes the
    answers of a shard's unanswered requests to the journal at ``journal`` (a
    :class:`~llmcalls.cache.Journal`); the journal is merged when it returns or raises.
    ``progress(n)`` is called with each shard's request count when it is done. Returns ``fill``,
    looked up again when anything was asked (check :meth:`Fill.complete` or read
    :meth:`Fill.responses`)."""
    needed = list(fill.needed)
    for i in needed:
        todo = fill.todo(i)
        try:
            produce(todo, fill.journal(i))
        finally:
            fill.merge(i)
        if progress is not None:
            progress(len(todo))
    if needed:
        fill.refresh()
    return fill
