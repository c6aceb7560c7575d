"""The one fill loop (llmcalls.fill) against a real response cache on disk: shards in request
order, repeats asked once, a dead run's journal recovered, errors per shard, complete()."""

from __future__ import annotations

import fcntl
import multiprocessing as mp
from pathlib import Path

import pytest

from llmcalls.cache import Journal, ResponseCache
from llmcalls.fill import FillIncomplete, plan_fill, run_fill
from llmcalls.requests import ERROR, OK, REJECTED, LLMRequest, LLMResult


def req(n: int) -> LLMRequest:
    return LLMRequest("m", ({"role": "user", "content": f"question {n}"},), {"seed": 0})


@pytest.fixture
def cache(tmp_path) -> ResponseCache:
    return ResponseCache(str(tmp_path / "lance"), tmp_path / "journal")


def answer(requests: list[LLMRequest], path: Path, asked: list[str], status=OK) -> None:
    """A produce callback: answers each request with its own content, noting what it was asked."""
    with Journal(path) as journal:
        for r in requests:
            asked.append(r.request_hash)
            text = r.messages[0]["content"].upper() if status == OK else None
            error = None if status == OK else "x"
            result = LLMResult(r.request_hash, status, response=text, error=error, attempts=1)
            journal.append(result.row(r, "test"))


def test_shards_follow_request_order_and_repeats_are_asked_once(cache):
    requests = [req(i) for i in range(7)] + [req(2), req(5)]
    fill = plan_fill(cache, requests, "run1", 3)
    assert [[r.messages[0]["content"] for r in s] for s in fill.shards] == [
        ["question 0", "question 1", "question 2"], ["question 3", "question 4", "question 5"],
        ["question 6"]]
    assert fill.needed == [0, 1, 2] and not fill.complete() and fill.cached == 0
    asked: list[str] = []
    done: list[int] = []
    run_fill(fill, lambda reqs, path: answer(reqs, path, asked), progress=done.append)
    assert asked == [req(i).request_hash for i in range(7)]  # each once, in request order
    assert done == [3, 3, 1]
    assert fill.complete() and fill.needed == []
    assert fill.responses()[req(5).request_hash] == "QUESTION 5"
    assert not any(fill.journal(i).exists() for i in range(3))  # merged into the cache and deleted


def test_answered_requests_are_never_asked_again(cache):
    asked: list[str] = []
    run_fill(plan_fill(cache, [req(i) for i in (1, 4)], "first", 2), lambda r, p: answer(r, p, asked))
    asked.clear()
    fill = plan_fill(cache, [req(i) for i in range(6)], "second", 2)
    assert fill.cached == 2 and fill.needed == [0, 1, 2]  # shards stay cut over all requests
    assert fill.answered(0) == {req(1).request_hash} and fill.todo(0) == [req(0)]
    run_fill(fill, lambda r, p: answer(r, p, asked))
    assert sorted(asked) == sorted(req(i).request_hash for i in (0, 2, 3, 5))
    asked.clear()
    again = plan_fill(cache, [req(i) for i in range(6)], "third", 2)
    assert again.needed == [] and again.complete()
    run_fill(again, lambda r, p: answer(r, p, asked))
    assert asked == []


def _die_holding_a_journal(path: str, hashes: list[int]) -> None:
    """A run killed in the middle of a shard: its journal holds the calls it finished."""
    import os

    with Journal(Path(path)) as journal:
        for n in hashes:
            r = req(n)
            journal.append(LLMResult(r.request_hash, OK, response=f"before {n}", attempts=1).row(r, "test"))
        os._exit(0)  # no close, no merge: the kernel drops the flock


def test_a_resumed_run_recovers_the_dead_journal_and_asks_only_what_is_missing(cache):
    dead = cache.journal_path("killed", 0)
    proc = mp.get_context("spawn").Process(target=_die_holding_a_journal, args=(str(dead), [0, 1, 2]))
    proc.start()
    proc.join(60)
    assert dead.exists()
    fill = plan_fill(cache, [req(i) for i in range(5)], "resume", 2)
    assert fill.recovered == 3 and not dead.exists() and fill.cached == 3
    assert fill.needed == [1, 2] and [r.messages[0]["content"] for r in fill.todo(1)] == ["question 3"]
    asked: list[str] = []
    run_fill(fill, lambda r, p: answer(r, p, asked))
    assert asked == [req(3).request_hash, req(4).request_hash]
    assert fill.responses()[req(1).request_hash] == "before 1"  # the dead run's answer is kept


def test_a_live_writers_journal_is_left_alone(cache):
    live = cache.journal_path("live", 0)
    with Journal(live) as j:
        j.append(LLMResult(req(0).request_hash, OK, response="mine", attempts=1).row(req(0), "test"))
        fill = plan_fill(cache, [req(0)], "other", 4)
        assert fill.recovered == 0 and fill.needed == [0] and live.exists()
    with live.open() as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released with the writer


def test_errors_are_kept_per_shard_and_an_incomplete_fill_says_so(cache):
    fill = plan_fill(cache, [req(i) for i in range(4)], "errs", 2)

    def produce(reqs, path):
        answer(reqs, path, [], status=OK if reqs[0] == req(0) else ERROR)
        if reqs[0] == req(2):
            raise RuntimeError("the backend died")

    with pytest.raises(RuntimeError, match="backend died"):
        run_fill(fill, produce)
    assert not fill.journal(1).exists()  # merged even though produce raised
    assert fill.errors(0) == {}
    assert set(fill.errors(1)) == {req(2).request_hash, req(3).request_hash}
    assert fill.errors(1)[req(2).request_hash]["status"] == ERROR
    fill.refresh()
    assert not fill.complete() and fill.needed == [1]
    assert fill.missing() == [req(2).request_hash, req(3).request_hash]
    with pytest.raises(FillIncomplete, match="2 of 4 requests have no answer"):
        fill.responses()
    asked: list[str] = []
    run_fill(fill, lambda r, p: answer(r, p, asked))  # a second round asks only the failed ones
    assert asked == [req(2).request_hash, req(3).request_hash] and fill.complete()


def test_errors_read_before_a_merge_come_from_the_journal(cache):
    fill = plan_fill(cache, [req(0), req(1)], "peek", 1)
    answer([req(1)], fill.journal(1), [], status=REJECTED)
    assert fill.errors(1)[req(1).request_hash]["status"] == REJECTED  # before the merge
    assert fill.merge(1) == 1
    assert fill.errors(1)[req(1).request_hash]["status"] == REJECTED  # and after it
    assert fill.refresh() == {} and fill.needed == [0, 1]  # a rejection is not an answer


def test_a_bad_shard_size_is_refused(cache):
    with pytest.raises(ValueError, match="shard_size"):
        plan_fill(cache, [req(0)], "x", 0)
