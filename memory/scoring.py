"""How a recalled memory is ranked: four terms in [0, 1] and their weighted mean.

The terms follow Generative Agents' retrieval (relevance, recency, importance) plus MemoryBank's
idea that recalling a memory strengthens it, with two deliberate differences:

- recency is an exponential decay in *elapsed time* since the memory was last used, with a
  half-life in hours, so the newest memory scores 1 and one ``half_life`` old scores 0.5.
  (Generative Agents' public code decays by *rank* in a list that runs oldest-first, so its
  oldest memory gets the largest recency; that is the bug DESIGN.md tells us not to copy.)
- terms are normalised by fixed maps, not min-max over the candidates, so a term means the same
  in every query and a breakdown can be read on its own ("0.5: last used one half-life ago").

Everything here is pure numpy: the store computes the inputs, these functions only score.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import numpy as np

TERMS = ("similarity", "recency", "frequency", "saliency")


@dataclass(frozen=True)
class Weights:
    similarity: float
    recency: float
    frequency: float
    saliency: float

    def __post_init__(self) -> None:
        values = asdict(self).values()
        if any(w < 0 for w in values) or sum(values) <= 0:
            raise ValueError(f"weights must be >= 0 and not all zero, got {asdict(self)}")

    @classmethod
    def from_config(cls, config) -> Weights:
        return cls(config.w_similarity, config.w_recency, config.w_frequency, config.w_saliency)

    @classmethod
    def similarity_only(cls) -> Weights:
        return cls(1.0, 0.0, 0.0, 0.0)


def similarity(cosine: np.ndarray) -> np.ndarray:
    """Cosine similarity with negatives clipped to 0 (an opposite memory is just irrelevant)."""
    return np.clip(np.asarray(cosine, np.float64), 0.0, 1.0)


def recency(last_used: np.ndarray, now: datetime | np.datetime64, half_life_hours: float) -> np.ndarray:
    """``0.5 ** (hours since last use / half_life)``; a time in the future counts as now."""
    if half_life_hours <= 0:
        raise ValueError("half_life_hours must be > 0")
    now64 = np.datetime64(_naive_utc(now), "us")
    last = np.asarray(last_used).astype("datetime64[us]")
    hours = (now64 - last).astype(np.float64) / 3.6e9
    return np.power(0.5, np.maximum(hours, 0.0) / half_life_hours)


def frequency(access_count: np.ndarray, saturation: int) -> np.ndarray:
    """``log1p(count) / log1p(saturation)``, capped at 1: the 1st recall counts most, the 100th little."""
    if saturation < 1:
        raise ValueError("saturation must be >= 1")
    n = np.maximum(np.asarray(access_count, np.float64), 0.0)
    return np.minimum(np.log1p(n) / np.log1p(saturation), 1.0)


def saliency(value: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(value, np.float64), 0.0, 1.0)


def combine(terms: dict[str, np.ndarray], weights: Weights) -> np.ndarray:
    """Weighted mean of the four terms: the score is in [0, 1] whatever the weights' scale."""
    w = asdict(weights)
    total = sum(w[t] * np.asarray(terms[t], np.float64) for t in TERMS)
    return total / sum(w.values())


def breakdowns(terms: dict[str, np.ndarray], scores: np.ndarray, weights: Weights) -> list[dict[str, float]]:
    """One dict per memory: each term, its weight, and the score, for "why was this recalled"."""
    w = asdict(weights)
    names = list(terms)
    out = []
    for i in range(len(scores)):
        row = {name: round(float(terms[name][i]), 6) for name in names}
        row.update({f"w_{t}": w[t] for t in TERMS})
        row["score"] = round(float(scores[i]), 6)
        out.append(row)
    return out


def _naive_utc(t: datetime | np.datetime64) -> np.datetime64 | datetime:
    if isinstance(t, datetime) and t.tzinfo is not None:
        return t.astimezone(UTC).replace(tzinfo=None)
    return t
