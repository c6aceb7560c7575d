"""VisDial's ranking metrics, and ranking the 100 answer options by a language model.

The metrics follow the definitions of the VisDial starter code (re-implemented here in numpy):
each round's 100 options get ranks 1..100 by descending score; R@1/5/10, mean rank and MRR come
from the rank of the ground-truth option; NDCG (only for rounds with a dense annotation) looks
at the top k predicted options, k = the number of options whose relevance is > 0, discounts by
log2(rank + 1), and divides by the same sum over the ideal ordering. Ties in the scores are
broken by option index (a stable sort), so equal scores give reproducible ranks.

A model enters through a *scorer*: a callable from (contexts, per-context option lists) to an
(N, options) array of scores, higher = better. :func:`lm_option_scorer` makes one from any
Hugging Face causal LM and tokenizer (sum of the options' token log-likelihoods given the
context); the memory model provides its own.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

RANKING_METRICS = ("r@1", "r@5", "r@10", "mean_rank", "mrr")

Scorer = Callable[[Sequence[str], Sequence[Sequence[str]]], np.ndarray]


def scores_to_ranks(scores: np.ndarray) -> np.ndarray:
    """(N, K) scores -> (N, K) ranks in 1..K; rank 1 is the highest score."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, axis=-1, kind="stable")
    ranks = np.empty_like(order)
    positions = np.arange(1, scores.shape[-1] + 1)[None, :].repeat(len(scores), 0)
    np.put_along_axis(ranks, order, positions, axis=-1)
    return ranks


def sparse_metrics(ranks: np.ndarray, gt_index: np.ndarray) -> dict[str, float]:
    """R@1/5/10, mean rank and MRR from the rank of each round's ground-truth option."""
    ranks = np.asarray(ranks)
    gt_rank = ranks[np.arange(len(ranks)), np.asarray(gt_index)].astype(np.float64)
    if len(gt_rank) == 0:
        return dict.fromkeys(RANKING_METRICS, float("nan"))
    return {
        "r@1": float(np.mean(gt_rank <= 1)),
        "r@5": float(np.mean(gt_rank <= 5)),
        "r@10": float(np.mean(gt_rank <= 10)),
        "mean_rank": float(np.mean(gt_rank)),
        "mrr": float(np.mean(1.0 / gt_rank)),
    }


def ndcg(ranks: np.ndarray, relevance: np.ndarray) -> float:
    """Mean NDCG over rounds; k per round = the number of options with relevance > 0."""
    ranks = np.asarray(ranks)
    relevance = np.asarray(relevance, dtype=np.float64)
    values = []
    for r, rel in zip(ranks, relevance, strict=True):
        k = int(np.count_nonzero(rel > 0))
        if k == 0:
            continue  # nothing relevant: NDCG is undefined for this round, as in the starter code's data
        discount = 1.0 / np.log2(np.arange(1, k + 1) + 1)
        predicted = rel[np.argsort(r, kind="stable")][:k]
        ideal = np.sort(rel)[::-1][:k]
        values.append(float(np.sum(predicted * discount) / np.sum(ideal * discount)))
    return float(np.mean(values)) if values else float("nan")


def load_dense_annotations(path: Path) -> dict[tuple[int, int], np.ndarray]:
    """VisDial dense annotations: ``[{image_id, round_id (1-based), gt_relevance[100]}]``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dense annotation file {path} does not exist")
    rows = json.loads(path.read_text())
    if not isinstance(rows, list):
        raise TypeError(f"{path}: expected a JSON list of {{image_id, round_id, gt_relevance}}")
    out = {}
    for row in rows:
        rel = row.get("gt_relevance", row.get("relevance"))
        out[(int(row["image_id"]), int(row["round_id"]))] = np.asarray(rel, dtype=np.float64)
    return out


def ranking_metrics(
    scores: np.ndarray,
    gt_index: np.ndarray,
    keys: Sequence[tuple[int, int]] | None = None,
    dense: dict[tuple[int, int], np.ndarray] | None = None,
) -> dict[str, float]:
    """All VisDial metrics for (N, 100) option scores; NDCG over the rounds ``dense`` annotates."""
    ranks = scores_to_ranks(scores)
    out = sparse_metrics(ranks, gt_index)
    if dense and keys is not None:
        hit = [i for i, k in enumerate(keys) if tuple(k) in dense]
        if hit:
            out["ndcg"] = ndcg(ranks[hit], np.stack([dense[tuple(keys[i])] for i in hit]))
            out["ndcg_rounds"] = float(len(hit))
    return out


# --- scoring options with a causal LM ------------------------------------------------------------


def lm_option_scorer(model, tokenizer, *, option_batch: int = 100, device: str | None = None) -> Scorer:
    """A scorer: each option's summed token log-likelihood given its context, under ``model``.

    The context is run once and its key/value cache is shared by all of that context's options
    (:func:`option_logliks`). An option is scored as ``" " + option`` after the context, without
    an end-of-turn token, so only the answer's own words compete. The sum (not the mean) is what
    a generative VisDial decoder ranks by; it favours short options, as it does there.
    """
    import torch

    device = device or str(next(model.parameters()).device)

    @torch.inference_mode()
    def score(contexts: Sequence[str], options: Sequence[Sequence[str]]) -> np.ndarray:
        if len(contexts) != len(options):
            raise ValueError(f"{len(contexts)} contexts but {len(options)} option lists")
        width = max((len(o) for o in options), default=0)
        out = np.full((len(contexts), width), -np.inf, dtype=np.float64)
        for i, (context, opts) in enumerate(zip(contexts, options, strict=True)):
            ids = tokenizer(context, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
            out[i, : len(opts)] = option_logliks(model, tokenizer, {"input_ids": ids}, opts, option_batch)
        return out

    return score


def option_logliks(model, tokenizer, prefix: dict, options: Sequence[str],
                   option_batch: int = 100) -> np.ndarray:
    """Summed log-likelihood of each option after one prefix (``{"input_ids": (1, L)}`` or
    ``{"inputs_embeds": (1, L, H)}``): the prefix runs once, its cache is repeated for each chunk
    of ``option_batch`` right-padded options, and the first option token is scored from the
    prefix's last position."""
    import copy

    import torch

    with torch.inference_mode():
        out = model(**prefix, use_cache=True)
        first_logp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        length = next(iter(prefix.values())).shape[1]
        device = first_logp.device
        scores = []
        for lo in range(0, len(options), option_batch):
            enc = [tokenizer(" " + o.strip(), add_special_tokens=False).input_ids or [tokenizer.eos_token_id]
                   for o in options[lo : lo + option_batch]]
            n, width = len(enc), max(len(e) for e in enc)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            ids = torch.full((n, width), pad, dtype=torch.long)
            mask = torch.zeros((n, width), dtype=torch.long)
            for j, e in enumerate(enc):
                ids[j, : len(e)] = torch.tensor(e)
                mask[j, : len(e)] = 1
            ids, mask = ids.to(device), mask.to(device)
            total = first_logp[ids[:, 0]].double()
            if width > 1:
                cache = copy.deepcopy(out.past_key_values)
                cache.batch_repeat_interleave(n)
                full = torch.cat([torch.ones((n, length), dtype=torch.long, device=device), mask], dim=1)
                logits = model(input_ids=ids[:, :-1], attention_mask=full[:, :-1], past_key_values=cache,
                               use_cache=True).logits.float()
                logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
                total = total + (logp * mask[:, 1:]).sum(dim=1).double()
            scores.append(total.cpu().numpy())
    return np.concatenate(scores) if scores else np.zeros(0)
