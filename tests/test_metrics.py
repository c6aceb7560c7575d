"""Known-answer tests of the generation metrics: identical texts, disjoint texts, hand-checked cases."""

from __future__ import annotations

import math

import pytest

from evaluation.metrics import (
    Backbone,
    bertscore_f1,
    bleu_scores,
    corpus_bleu4,
    default_backbone_path,
    generation_metrics,
    resolve_backbone,
    rouge_f1,
    sentence_bleu_mean,
)

SENTS = ["the man is holding a red umbrella", "two dogs are playing in the snow near a tree"]
DISJOINT = ["purple elephants sing loudly tonight again", "seven violins quietly float above oceans forever"]


def test_identical_texts_score_one():
    r = rouge_f1(SENTS, SENTS)
    assert r == {"rouge1_f1": 1.0, "rouge2_f1": 1.0, "rougeL_f1": 1.0}
    b = bleu_scores(SENTS, SENTS)
    assert b["bleu4"] == pytest.approx(100.0)
    assert b["bleu"] == pytest.approx(1.0)
    assert b["bleu_sentence_mean"] == pytest.approx(1.0)


def test_disjoint_texts_score_zero():
    r = rouge_f1(SENTS, DISJOINT)
    assert r == {"rouge1_f1": 0.0, "rouge2_f1": 0.0, "rougeL_f1": 0.0}
    b = bleu_scores(SENTS, DISJOINT)
    assert b["bleu4"] == 0.0 and b["bleu"] == 0.0
    assert b["bleu_sentence_mean"] == pytest.approx(0.0, abs=1e-9)


def test_rouge_hand_checked():
    # hypothesis "the cat is on the mat" vs reference "the cat sat on the mat":
    # unigrams: 5 of 6 match -> P = R = F = 5/6; bigrams: (the cat)(on the)(the mat) = 3 of 5 -> 3/5;
    # LCS = "the cat on the mat" = 5 tokens -> 5/6.
    r = rouge_f1(["the cat is on the mat"], ["the cat sat on the mat"])
    assert r["rouge1_f1"] == pytest.approx(5 / 6)
    assert r["rouge2_f1"] == pytest.approx(3 / 5)
    assert r["rougeL_f1"] == pytest.approx(5 / 6)
    # the Porter stemmer is on: "cats running" matches "cat runs"... only where the stems agree
    assert rouge_f1(["cats running"], ["cat running"])["rouge1_f1"] == pytest.approx(1.0)
    # per-sample mean, not pooled: one perfect and one disjoint sample average to 0.5
    assert rouge_f1([SENTS[0], SENTS[1]], [SENTS[0], DISJOINT[1]])["rouge1_f1"] == pytest.approx(0.5)


def test_bleu_hand_checked():
    # same pair: modified n-gram precisions 5/6, 3/5, 1/4 ("on the mat") and 0/3 for 4-grams, which
    # sacrebleu's "exp" smoothing replaces by 1 / (2 * 3); equal lengths -> brevity penalty 1.
    expected = 100 * (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25
    bleu = corpus_bleu4(["the cat is on the mat"], ["the cat sat on the mat"])
    assert bleu == pytest.approx(expected, abs=0.01)
    # brevity penalty: a correct but short hypothesis, 4 of 8 reference words -> BP = exp(1 - 8/4)
    ref, hyp = "a man rides a horse on the beach", "a man rides a"
    assert corpus_bleu4([hyp], [ref]) == pytest.approx(100 * math.exp(1 - 8 / 4), abs=0.01)


def test_sentence_bleu_mean_hand_checked():
    # per-sample sacrebleu sentence BLEU ("exp" smoothing, effective order), averaged, 0..1:
    # (1) the pair above: precisions 5/6, 3/5, 1/4 and 0/3 -> 1/(2*3), brevity penalty 1;
    # (2) "a dog" vs "a dog runs": 2/2 unigrams, 1/1 bigram, no trigram in a 2-word hypothesis, so the
    #     effective order is 2: geometric mean 1, brevity penalty exp(1 - 3/2).
    first = (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25
    second = math.exp(1 - 3 / 2)
    hyps, refs = ["the cat is on the mat", "a dog"], ["the cat sat on the mat", "a dog runs"]
    assert sentence_bleu_mean(hyps[:1], refs[:1]) == pytest.approx(first, abs=1e-4)
    assert sentence_bleu_mean(hyps[1:], refs[1:]) == pytest.approx(second, abs=1e-4)
    assert sentence_bleu_mean(hyps, refs) == pytest.approx((first + second) / 2, abs=1e-4)
    assert bleu_scores(hyps, refs)["bleu_sentence_mean"] == pytest.approx((first + second) / 2, abs=1e-4)
    assert sentence_bleu_mean([], []) == 0.0


def test_corpus_bleu_differs_from_mean_of_sentence_bleu():
    hyps = ["the cat is on the mat", "yes"]
    refs = ["the cat sat on the mat", "no it is not"]
    corpus = corpus_bleu4(hyps, refs) / 100
    mean = sentence_bleu_mean(hyps, refs)
    assert corpus != pytest.approx(mean, abs=1e-3)  # two different statistics, both reported by name
    assert 0 <= mean <= 1 and 0 <= corpus <= 1


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        generation_metrics(SENTS, SENTS[:1], None)


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return resolve_backbone()


def test_default_backbone_is_the_packaged_minilm(backbone):
    assert backbone.path == default_backbone_path().resolve()
    assert backbone.num_layers == 6  # its last layer: bert-score has no tuned layer for it
    assert backbone.label.startswith("all-MiniLM-L6-v2@L6 (")
    assert str(backbone.path) in backbone.label


def test_backbone_path_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local model folder"):
        resolve_backbone(tmp_path / "roberta-large")


def test_roberta_large_folder_gets_the_reports_layer(tmp_path):
    folder = tmp_path / "roberta-large"
    folder.mkdir()
    (folder / "config.json").write_text('{"num_hidden_layers": 24}')
    assert resolve_backbone(folder).num_layers == 17  # bert-score's (and the report's) default layer
    assert resolve_backbone(folder, num_layers=12).num_layers == 12


def test_bertscore_identical_is_one_and_beats_disjoint(backbone):
    same = bertscore_f1(SENTS, SENTS, backbone, device="cpu")
    other = bertscore_f1(SENTS, DISJOINT, backbone, device="cpu")
    assert same == pytest.approx(1.0, abs=1e-5)
    assert other < same - 0.1


def test_bertscore_hand_checked(backbone):
    """Recompute BERTScore F1 from the backbone's hidden states: each token's best cosine match on
    the other side (whose [CLS]/[SEP] may be matched, as bert-score does), averaged over the
    side's own words (specials weigh 0), no idf weighting, no baseline rescaling."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    hyp, ref = "a dog runs on the grass", "the dog is running across a field"
    tok = AutoTokenizer.from_pretrained(backbone.path)
    model = AutoModel.from_pretrained(backbone.path).eval()

    def states(text: str) -> torch.Tensor:
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc, output_hidden_states=True).hidden_states[backbone.num_layers][0]
        return h / h.norm(dim=-1, keepdim=True)

    sim = states(hyp) @ states(ref).T  # rows: hypothesis tokens, columns: reference tokens
    p = sim.max(dim=1).values[1:-1].mean().item()  # average over words, not [CLS]/[SEP]
    r = sim.max(dim=0).values[1:-1].mean().item()
    expected = 2 * p * r / (p + r)
    assert bertscore_f1([hyp], [ref], backbone, device="cpu") == pytest.approx(expected, abs=1e-4)


def test_generation_metrics_all_names(backbone):
    out = generation_metrics(SENTS, SENTS, backbone, device="cpu")
    assert set(out) == {"rouge1_f1", "rouge2_f1", "rougeL_f1", "bleu", "bleu4", "bleu_sentence_mean",
                        "bertscore_f1"}


def test_empty_hypothesis_scores_zero_everywhere(backbone):
    """A model that says nothing gets 0 (bert-score's definition), and the mean counts it."""
    out = generation_metrics(["", SENTS[1]], [SENTS[0], SENTS[1]], backbone, device="cpu")
    assert out["rouge1_f1"] == pytest.approx(0.5)
    assert out["bertscore_f1"] == pytest.approx(0.5, abs=1e-5)  # (0 + 1) / 2


def test_score_caches_key_on_the_scoring_code_only(monkeypatch):
    """The score caches' code version reads the modules that decide a score and nothing else, so
    moving or editing the rest of ``evaluation/`` (data, prompts, reports) keeps users' cached
    scores, while an edit of a scoring module re-scores."""
    from pathlib import Path

    from tasks.evaluate import scoring_code_version

    real, read, edit = Path.read_text, [], {"name": None}

    def read_text(self, *args, **kwargs):
        if self.parent.name == "evaluation":  # (package versions come from their METADATA files)
            read.append(f"evaluation/{self.name}")
        text = real(self, *args, **kwargs)
        return text + "\n# edited\n" if self.name == edit["name"] else text

    monkeypatch.setattr(Path, "read_text", read_text)
    before = scoring_code_version()
    assert sorted(read) == ["evaluation/memory_eval.py", "evaluation/metrics.py", "evaluation/ranking.py",
                            "evaluation/scoring.py"]
    assert scoring_code_version() == before
    edit["name"] = "metrics.py"
    assert scoring_code_version() != before
