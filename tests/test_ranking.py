"""VisDial ranking metrics (hand-computed cases and properties) and LM option scoring."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from evaluation.ranking import (
    lm_option_scorer,
    load_dense_annotations,
    ndcg,
    ranking_metrics,
    scores_to_ranks,
    sparse_metrics,
)


def test_scores_to_ranks_descending_and_stable_ties():
    ranks = scores_to_ranks(np.array([[0.1, 0.9, 0.5], [1.0, 1.0, 0.0]]))
    assert ranks.tolist() == [[3, 1, 2], [1, 2, 3]]  # a tie goes to the lower option index


def test_sparse_metrics_hand_computed():
    # ground-truth ranks 1, 3 and 12 over three rounds
    scores = np.zeros((3, 20))
    scores[0, 4] = 10  # gt 4 is first
    scores[1, :2] = [10, 9]
    scores[1, 7] = 8  # gt 7 is third
    scores[2, :11] = np.arange(20, 9, -1)  # 11 options above gt 15, all others below it
    scores[2, 15] = 1
    out = sparse_metrics(scores_to_ranks(scores), np.array([4, 7, 15]))
    assert scores_to_ranks(scores)[2, 15] == 12
    assert out["r@1"] == pytest.approx(1 / 3)
    assert out["r@5"] == pytest.approx(2 / 3)
    assert out["r@10"] == pytest.approx(2 / 3)
    assert out["mean_rank"] == pytest.approx((1 + 3 + 12) / 3)
    assert out["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 12) / 3)


def test_ndcg_hand_computed():
    relevance = np.array([[1.0, 0.5, 0.0, 0.0]])
    # predicted order: option 1 first, then option 0 -> k = 2 relevant options
    ranks = scores_to_ranks(np.array([[0.8, 0.9, 0.1, 0.0]]))
    dcg = 0.5 / math.log2(2) + 1.0 / math.log2(3)
    ideal = 1.0 / math.log2(2) + 0.5 / math.log2(3)
    assert ndcg(ranks, relevance) == pytest.approx(dcg / ideal)
    # perfect order scores 1; a round with no relevant option is skipped, not counted as 0
    perfect = scores_to_ranks(np.array([[0.9, 0.8, 0.1, 0.0], [0.1, 0.2, 0.3, 0.4]]))
    assert ndcg(perfect, np.array([[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])) == pytest.approx(1.0)
    # only the top k count: relevant options ranked below k add nothing
    low = scores_to_ranks(np.array([[0.0, 0.1, 0.9, 0.8]]))
    assert ndcg(low, relevance) == pytest.approx(0.0)


def test_dense_annotations_give_ndcg_for_annotated_rounds(tmp_path):
    path = tmp_path / "dense.json"
    rel = [0.0] * 100
    rel[3], rel[5] = 1.0, 0.5
    path.write_text(json.dumps([{"image_id": 7, "round_id": 2, "gt_relevance": rel}]))
    dense = load_dense_annotations(path)
    scores = np.zeros((2, 100))
    scores[:, 3] = 5.0
    scores[:, 5] = 4.0
    out = ranking_metrics(scores, np.array([3, 5]), keys=[(7, 1), (7, 2)], dense=dense)
    assert out["ndcg"] == pytest.approx(1.0) and out["ndcg_rounds"] == 1
    assert out["r@1"] == pytest.approx(0.5)
    with pytest.raises(FileNotFoundError):
        load_dense_annotations(tmp_path / "missing.json")


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 8), st.just(100)), elements=st.floats(-5, 5)),
       st.data())
def test_metric_properties(scores, data):
    gt = np.array(data.draw(st.lists(st.integers(0, 99), min_size=len(scores), max_size=len(scores))))
    ranks = scores_to_ranks(scores)
    assert sorted(ranks[0].tolist()) == list(range(1, 101))  # a permutation of 1..100
    out = sparse_metrics(ranks, gt)
    assert out["r@1"] <= out["r@5"] <= out["r@10"] <= 1
    assert 1 <= out["mean_rank"] <= 100 and 0 < out["mrr"] <= 1
    assert out["mrr"] >= 1 / out["mean_rank"] - 1e-12  # Jensen: mean(1/x) >= 1/mean(x)
    # raising the ground truth's score above every other option makes it rank 1
    boosted = scores.copy()
    boosted[np.arange(len(gt)), gt] = 10.0
    assert sparse_metrics(scores_to_ranks(boosted), gt)["r@1"] == 1.0


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.tiny_llama import tiny_llama

    path = tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_lm_scorer_equals_full_sequence_loglik(tiny_lm):
    """The shared-prefix cache must give the same log-likelihoods as scoring each option alone."""
    import torch

    model, tok = tiny_lm
    contexts = ["is there a person in the picture", "what color is the shirt"]
    options = [["yes", "no", "i can not tell", "maybe one two"], ["red", "blue shirt", "white and black"]]
    got = lm_option_scorer(model, tok, option_batch=3)(contexts, options)
    assert got.shape == (2, 4) and got[1, 3] == -np.inf  # a shorter option list is padded with -inf
    for i, (ctx, opts) in enumerate(zip(contexts, options, strict=True)):
        ctx_ids = tok(ctx, add_special_tokens=False).input_ids
        for j, opt in enumerate(opts):
            opt_ids = tok(" " + opt, add_special_tokens=False).input_ids
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ctx_ids + opt_ids])).logits[0].float(), -1)
            expected = sum(logp[len(ctx_ids) - 1 + k, t].item() for k, t in enumerate(opt_ids))
            assert got[i, j] == pytest.approx(expected, abs=1e-4)


def test_memory_option_scores_equal_full_sequence_loglik(tmp_path):
    """The memory model's option scores (shared prefix, cached) equal each option's summed token
    log-likelihood after [soft prompt][question prompt], computed by one full forward pass each."""
    import torch

    from evaluation.memory_eval import memory_option_scores
    from schemas.embed import EMBED_DIM
    from schemas.train import MemoryTrainConfig
    from training.memory_data import NUM_POSITIONS, MemoryData, tokenize
    from training.memory_model import build_memory_model

    model = build_memory_model(MemoryTrainConfig(data_root=tmp_path, tiny=True, device="cpu")).eval()
    tok, arch = model.tokenizer, model.arch
    gen = torch.Generator().manual_seed(0)
    questions = ["is there a person in the picture", "what color is the shirt", "how many dogs"]
    answers = ["yes", "red", "two"]
    p_ids, p_len = tokenize(tok, [arch.prompt_template.format(question=q) for q in questions],
                            arch.max_prompt_tokens, special=True)
    a_ids, a_len = tokenize(tok, [" " + a for a in answers], arch.max_answer_tokens, special=False,
                            eos=tok.eos_token_id)
    data = MemoryData(
        image_ids=np.array([11, 12]),
        image=torch.nn.functional.normalize(torch.randn(2, EMBED_DIM, generator=gen), dim=-1),
        texts=torch.nn.functional.normalize(torch.randn(2, NUM_POSITIONS, EMBED_DIM, generator=gen), dim=-1),
        dialog=torch.tensor([0, 0, 1]), turn=torch.tensor([1, 4, 2]), prompt_ids=p_ids, prompt_len=p_len,
        answer_ids=a_ids, answer_len=a_len, answers=answers,
    )
    options = [["yes", "no", "i can not tell", "maybe one two"], ["red", "blue shirt", "white and black"],
               ["two", "none at all", "three or four dogs", "i think 2", "lots"]]
    got = memory_option_scores(model, data, options, option_batch=2)
    assert got.shape == (3, 5) and got[0, 4] == -np.inf and got[1, 3] == -np.inf
    embed = model.llm.get_input_embeddings()
    for i, opts in enumerate(options):
        with torch.no_grad():
            batch = data.batch(torch.tensor([i]))
            soft = model.soft_prompt(model.encode_memory(batch))[0]
            prompt = batch.prompt_ids[0, : int(batch.prompt_len[0])].tolist()
        for j, opt in enumerate(opts):
            opt_ids = tok(" " + opt, add_special_tokens=False).input_ids
            ids = torch.tensor(prompt + opt_ids)
            with torch.no_grad():
                logits = model.llm(inputs_embeds=torch.cat([soft, embed(ids)])[None]).logits[0].float()
            logp = torch.log_softmax(logits, -1)
            start = soft.shape[0] + len(prompt) - 1  # the position that predicts the option's first token
            expected = sum(logp[start + k, t].item() for k, t in enumerate(opt_ids))
            assert got[i, j] == pytest.approx(expected, abs=1e-4), (i, opt)
    # the memory matters: another sample's memory under the same question scores differently
    assert not np.allclose(got[0, :4], memory_option_scores(model, data, [options[0]] * 3)[2, :4])
