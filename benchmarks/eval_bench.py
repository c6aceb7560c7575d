"""Speed of the report's BLEU-4 evaluation: 20,640 generated answers + corpus BLEU-4.

The report evaluated its memory model (LLaMA-3.2-1B) on VisDial val, 20,640 samples, in
39 min 42 s (1,290 batches of 16 at 1.85 s each). This script runs the same amount of work
through the evaluate flow's own code on random weights (none can be downloaded; speed does not
depend on their values), bf16 on CUDA:

* ``--model memory`` (default): the memory model of ``training.memory_model`` (report-size
  Q-Former over an 11-position ImageBind memory, soft prompt into a LLaMA-3.2-1B-architecture LM),
  answered through ``evaluation.generate.generate_memory`` itself, the function the flow's ``memory``
  variants run: response-cache lookup, shards of whole batches through
  ``evaluation.memory_eval.memory_generate`` (batched ``generate`` over ``inputs_embeds`` with the
  key/value cache), each shard journaled and merged into a fresh ``llm_responses`` table. Its
  batch and shard sizes are the flow's for ``schemas/variants/memory.toml`` on the device
  (``--batch-size`` / ``--shard-size`` override them, as ``mmem evaluate run --batch-size`` does);
  its answers go through the flow's ``hypothesis`` before scoring;
* ``--model lm``: the plain LM on text prompts through ``evaluation.generation.generate``
  (length-sorted, left-padded batches), the function the flow's in-process ``hf`` variants call,
  at the batch size the flow gives an ``hf`` variant.

Then ``evaluation.metrics.corpus_bleu4`` over all answers. The baseline, in the same run: the same
code at the report's batch size of 16, timed over ``--baseline-samples`` samples and extrapolated
(each timed run writes its own response cache under a fresh data root, so none hits another's).
Every answer is exactly ``--new-tokens`` tokens long (``min_new_tokens``), so the work is fixed
whatever the random model says.

Full size, one H100 (target: <= 120 s for the whole evaluation):
    .venv/bin/python benchmarks/eval_bench.py --device cuda
Tiny check on a CPU:
    .venv/bin/python benchmarks/eval_bench.py --device cpu --preset tiny --samples 640 --baseline-samples 64
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPORT_SECONDS = 39 * 60 + 42  # the report's 20,640-sample evaluation
REPORT_SECONDS_PER_BATCH = 1.85
TURNS = 10

# LLaMA-3.2-1B's published configuration and the report's Q-Former; "tiny" keeps the shapes' family.
PRESETS = {
    "1b": {"llm": {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
                   "num_hidden_layers": 16,
                       "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64},
           "memory": {"num_query_tokens": 32, "qformer_hidden": 768, "qformer_layers": 12,
                      "qformer_heads": 12,
                          "qformer_intermediate": 3072}},
    "tiny": {"llm": {"vocab_size": 4096, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16},
             "memory": {"num_query_tokens": 4, "qformer_hidden": 32, "qformer_layers": 2, "qformer_heads": 2,
                            "qformer_intermediate": 64}},
}


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer whose every id decodes to a word ``w<id>``: random ids become text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|eot_id|>", "<|pad|>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), vocab_size)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<|pad|>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=specials[0], eos_token=specials[1],
                                   pad_token=specials[2], padding_side="left")


def build_llm(preset: str, device: str, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **PRESETS[preset]["llm"], max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
        hidden_act="silu", bos_token_id=0, eos_token_id=1, pad_token_id=2,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                         "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype).eval()


def build_memory_model(preset: str, llm, tokenizer, device: str, dtype):
    from training.memory_net import MemoryArch, MemoryModel

    arch = MemoryArch(**PRESETS[preset]["memory"], qformer_dropout=0.0)
    return MemoryModel(arch, llm, tokenizer).to(device=device, dtype=dtype).eval()


def random_words(rng: random.Random, vocab_size: int, k: int) -> str:
    return " ".join(f"w{rng.randint(3, vocab_size - 1)}" for _ in range(k))


def memory_data(n: int, model, tokenizer, question_words: int, answer_words: int, seed: int, dtype):
    """``n`` samples (n / 10 dialogs x 10 turns) with random unit ImageBind vectors as the memory."""
    import numpy as np
    import torch

    from schemas.embed import EMBED_DIM
    from training.memory_data import NUM_POSITIONS, MemoryData, tokenize

    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    dialogs = -(-n // TURNS)
    image = torch.nn.functional.normalize(torch.randn(dialogs, EMBED_DIM, generator=gen), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(dialogs, NUM_POSITIONS, EMBED_DIM, generator=gen),
                                          dim=-1)
    arch, vocab = model.arch, tokenizer.vocab_size
    prompts = [arch.prompt_template.format(question=random_words(rng, vocab, rng.randint(3, question_words)))
               for _ in range(n)]
    refs = [random_words(rng, vocab, rng.randint(1, answer_words)) for _ in range(n)]
    p_ids, p_len = tokenize(tokenizer, prompts, arch.max_prompt_tokens, special=True)
    a_ids, a_len = tokenize(tokenizer, [" " + r for r in refs], arch.max_answer_tokens, special=False,
                            eos=tokenizer.eos_token_id)
    index = torch.arange(n)
    data = MemoryData(image_ids=np.arange(dialogs), image=image.to(dtype), texts=texts.to(dtype),
                      dialog=index // TURNS, turn=index % TURNS + 1, prompt_ids=p_ids, prompt_len=p_len,
                      answer_ids=a_ids, answer_len=a_len, answers=refs)
    return data.to(next(model.parameters()).device), refs, prompts


def flow_config(root: Path, device: str, batch_size: int | None, shard_size: int | None):
    """The evaluate flow's config over a fresh data root (its own response cache)."""
    from schemas.evaluate import EvaluateConfig

    extra = {"shard_size": shard_size} if shard_size else {}
    return EvaluateConfig(data_root=root, device=device, batch_size=batch_size, **extra)


def memory_run(model, data, prompts: list[str], new_tokens: int, device: str, batch_size: int | None,
               shard_size: int | None, work: Path):
    """``f(indices, batch, tag) -> answers`` through ``evaluation.generate.generate_memory`` (each call a
    fresh data root), and the batch and shard sizes the flow uses on ``device``."""
    from evaluation.generate import MemoryRun, generate_memory, generation_batch_size, shard_step
    from evaluation.models import ResolvedModel
    from evaluation.prompts import generation_options, memory_request
    from evaluation.rows import hypothesis
    from schemas.evaluate import load_variants

    variant = load_variants("memory")[0].model_copy(update={"max_new_tokens": new_tokens})
    config = flow_config(work / "probe", device, batch_size, shard_size)
    flow_batch = generation_batch_size(config, variant, device)
    options = generation_options(config, variant)
    resolved = ResolvedModel("memory:bench-random@0", artifact="bench-random:v1", label="random weights")
    embeddings = "image_embeddings@v1,text_embeddings@v1"
    requests = [memory_request(resolved.request_model, prompt, int(data.image_ids[d]), int(t), embeddings,
                               options)
                for prompt, d, t in zip(prompts, data.dialog.tolist(), data.turn.tolist(), strict=True)]

    def run(indices, batch, tag):
        cfg = flow_config(work / tag, device, batch, shard_size)
        picked = [requests[i] for i in indices]
        assert list(indices) == list(range(len(picked))), "runs take a prefix of the samples"
        answers = generate_memory(cfg, resolved, MemoryRun(model, data, [], picked, [], batch), tag)
        return [hypothesis(answers[r.request_hash])[0] for r in picked]

    return run, flow_batch, shard_step(config, flow_batch)


def lm_data(n: int, vocab: int, prompt_words: tuple[int, int], answer_words: int, seed: int):
    """Prompts of varying length (a dialog history) and short references (VisDial answers)."""
    rng = random.Random(seed)
    prompts = ["<|begin_of_text|>" + random_words(rng, vocab, rng.randint(*prompt_words)) for _ in range(n)]
    return prompts, [random_words(rng, vocab, rng.randint(1, answer_words)) for _ in range(n)]


def timed(fn, sync) -> tuple[float, object]:
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="memory", choices=["memory", "lm"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                    help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--preset", default="1b", choices=sorted(PRESETS))
    ap.add_argument("--samples", type=int, default=20640)
    ap.add_argument("--batch-size", type=int, default=None,
                    help="default: the evaluate flow's for the variant "
                    "on this device (memory.toml: 512)")
    ap.add_argument("--shard-size", type=int, default=None,
                    help="--model memory: default the flow's shard_size "
                    "(rounded up to whole batches)")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="--model memory: where the timed runs' response "
                    "caches go (default: a temporary folder, removed at the end)")
    ap.add_argument("--baseline-batch-size", type=int, default=16, help="the report's batch size")
    ap.add_argument("--baseline-samples", type=int, default=320,
                    help="timed at the baseline batch size, extrapolated")
    ap.add_argument("--new-tokens", type=int, default=24,
                    help="tokens generated per answer (memory model: its "
                    "max_answer_tokens)")
    ap.add_argument("--question-words", type=int, default=16, help="--model memory: longest question")
    ap.add_argument("--prompt-words", type=int, nargs=2, default=(64, 160), metavar=("MIN", "MAX"),
                    help="--model lm: dialog-history prompt lengths")
    ap.add_argument("--answer-words", type=int, default=6)
    ap.add_argument("--warmup-batches", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    from evaluation.generation import generate
    from evaluation.metrics import corpus_bleu4

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible; use --device cpu with --preset tiny")
    dtype_name = args.dtype or ("bf16" if cuda else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    tok = build_tokenizer(PRESETS[args.preset]["llm"]["vocab_size"])
    llm = build_llm(args.preset, args.device, dtype)
    llm.generation_config.min_new_tokens = args.new_tokens  # fixed work per answer
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="eval-bench-"))
    if args.model == "memory":
        model = build_memory_model(args.preset, llm, tok, args.device, dtype)
        data, refs, prompts = memory_data(args.samples, model, tok, args.question_words, args.answer_words,
                                          args.seed, dtype)
        run, batch_size, shard = memory_run(model, data, prompts, args.new_tokens, args.device,
                                            args.batch_size, args.shard_size, work)
        what = (f"memory model (Q-Former {model.arch.qformer_layers}x{model.arch.qformer_hidden}, "
                f"{model.arch.num_query_tokens} query tokens) + ")
        path = "evaluation.generate.generate_memory (cache lookup, journal, merge into llm_responses)"
        params = sum(p.numel() for p in model.parameters())
    else:
        from evaluation.generate import generation_batch_size
        from schemas.evaluate import Variant

        prompts, refs = lm_data(args.samples, tok.vocab_size, tuple(args.prompt_words), args.answer_words,
                                args.seed)
        hf = Variant(name="bench", backend="hf", model="bench")
        batch_size = generation_batch_size(flow_config(work / "probe", args.device, args.batch_size, None),
                                           hf, args.device)
        shard = None

        def run(indices, batch, tag):
            return generate(llm, tok, [prompts[i] for i in indices], batch_size=batch,
                            max_new_tokens=args.new_tokens)
        what = ""
        path = "evaluation.generation.generate"
        params = sum(p.numel() for p in llm.parameters())
    setup_s = time.perf_counter() - t0

    try:
        everything = list(range(args.samples))
        warm = everything[: args.warmup_batches * batch_size]
        if warm:  # CUDA kernels, allocator, the first Lance table: not timed
            run(warm, batch_size, "warmup")
        base_n = min(args.baseline_samples, args.samples)
        b_gen, b_hyps = timed(lambda: run(everything[:base_n], args.baseline_batch_size, "baseline"), sync)
        b_score, _ = timed(lambda: corpus_bleu4(b_hyps, refs[:base_n]), sync)
        base_total = (b_gen + b_score) * args.samples / base_n
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        gen_s, hyps = timed(lambda: run(everything, batch_size, "batched"), sync)
        score_s, bleu = timed(lambda: corpus_bleu4(hyps, refs), sync)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    total = gen_s + score_s
    batches = -(-args.samples // batch_size)

    device_name = torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)"
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else "n/a"
    cmd = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/eval_bench.py",
                                            *(sys.argv[1:] if argv is None else argv)])
    print(f"device: {device_name}; model: {what}LLaMA-3.2-1B architecture, preset={args.preset} "
          f"({params / 1e6:.0f}M params, random weights, {dtype_name}); setup {setup_s:.1f} s")
    print(f"work: {args.samples} samples, {args.new_tokens} new tokens each, greedy, KV cache; corpus BLEU-4")
    print(f"timed code: {path}; batch {batch_size}" + (f", journal shards of {shard}" if shard else ""))
    print(f"baseline (batch {args.baseline_batch_size}, timed on {base_n} samples, extrapolated): "
          f"{base_total:.1f} s for {args.samples} "
          f"({(b_gen + b_score) / base_n * args.baseline_batch_size:.3f} s/batch)")
    print(f"batched  (batch {batch_size}, {batches} batches): generation {gen_s:.1f} s + BLEU-4 "
          f"{score_s:.2f} s = {total:.1f} s ({args.samples / total:.0f} samples/s, "
          f"{gen_s / batches:.3f} s/batch); peak GPU memory {peak}")
    print(f"speed-up vs baseline: {base_total / total:.1f}x; vs the report's {REPORT_SECONDS} s "
          f"({REPORT_SECONDS_PER_BATCH} s/batch of 16): {REPORT_SECONDS / total:.1f}x")
    full = args.preset == "1b" and args.samples == 20640
    print("target (full size on one H100) <= 120 s: " + (("met" if total <= 120 else "NOT met") if full
                                                        else "n/a: not the full-size run"))
    print(f"BLEU-4 of the random model: {bleu:.2f} (near zero is the honest result)")
    print(f"reproduce: {cmd}")


if __name__ == "__main__":
    main()
