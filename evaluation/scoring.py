"""The scores of one variant: generation metrics of its answers, and VisDial's option ranking where
the model gives log-likelihoods (a local causal LM, or the memory model).

The score caches are keyed on their inputs and on :data:`SCORING_MODULES` (what decides a score:
this module, the metrics, the ranking and the memory model's option scores), so a change to any of
them re-scores, and a change elsewhere in ``evaluation/`` (data, prompts, reports) does not.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from evaluation import metrics as M
from evaluation import ranking as R
from evaluation.generation import load_causal_lm
from storage.progress import Progress

if TYPE_CHECKING:
    from evaluation.generate import MemoryRun

# The modules whose source is part of the score caches' keys (tasks.evaluate.scoring_code_version).
SCORING_MODULES = ("evaluation.scoring", "evaluation.metrics", "evaluation.ranking", "evaluation.memory_eval")
# ... and the packages whose versions are.
SCORING_PACKAGES = ("rouge-score", "sacrebleu", "bert-score", "transformers", "torch")


def score_generations(hypotheses: list[str], references: list[str], backbone_path: str | None,
                      backbone_layers: int | None, batch_size: int, device: str) -> dict[str, float]:
    """All generation metrics of ``hypotheses`` against ``references``."""
    backbone = M.Backbone(Path(backbone_path), backbone_layers) if backbone_path else None
    return M.generation_metrics(hypotheses, references, backbone, bertscore_batch_size=batch_size,
                                device=None if device == "auto" else device)


def rank_options(model_path: str, model_id: str, contexts: list[str], options: list[list[str]],
                 gt_index: list[int], keys: list[tuple[int, int]], dense_path: str | None, option_batch: int,
                 device: str) -> dict[str, float]:
    """VisDial ranking metrics of a local causal LM over each context's answer options."""
    lm, tok = load_causal_lm(model_path, device)
    scorer = R.lm_option_scorer(lm, tok, option_batch=option_batch)
    scores = np.full((len(contexts), max((len(o) for o in options), default=0)), -np.inf)
    with Progress(len(contexts), f"rank options ({model_id})") as bar:
        for i in range(0, len(contexts), 32):
            scores[i : i + 32] = scorer(contexts[i : i + 32], options[i : i + 32])
            bar(len(contexts[i : i + 32]))
    dense = R.load_dense_annotations(Path(dense_path)) if dense_path else None
    return R.ranking_metrics(scores, np.asarray(gt_index), keys=keys, dense=dense)


def rank_memory(run: MemoryRun, model_id: str, dense_path: str | None, option_batch: int) -> dict[str, float]:
    """VisDial ranking metrics of the memory model over its samples' 100 options."""
    from evaluation.memory_eval import memory_option_scores

    with Progress(len(run.samples), f"rank options ({model_id})") as bar:
        scores = memory_option_scores(run.model, run.data, [list(s.options) for s in run.samples],
                                      option_batch=option_batch, progress=bar)
    dense = R.load_dense_annotations(Path(dense_path)) if dense_path else None
    return R.ranking_metrics(scores, np.asarray([s.gt_index for s in run.samples]),
                             keys=[s.key for s in run.samples], dense=dense)
