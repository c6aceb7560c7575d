"""A tiny random-weight LLaMA (the architecture of LLaMA-3.2-1B) with a locally built tokenizer.

The memory model's frozen LM and the evaluation's generation must run the real code path
(``AutoModelForCausalLM`` / ``AutoTokenizer`` from a local folder, a chat template, ``generate``)
without weights that cannot be downloaded here. ``tiny_llama`` writes such a folder in the
Hugging Face layout. Everything is a function of the seed: the same seed gives the same bytes.

The tokenizer is a byte-level BPE, as LLaMA-3's is, trained here on a small fixed English corpus
(so every string round-trips and common words are single tokens), with LLaMA-3's special tokens
and a LLaMA-3-style chat template.
"""

from __future__ import annotations

from pathlib import Path

BOS, EOS, EOT, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"
START_HEADER, END_HEADER = "<|start_header_id|>", "<|end_header_id|>"
SPECIALS = (BOS, EOS, START_HEADER, END_HEADER, EOT, PAD)
VOCAB_SIZE = 640

# LLaMA-3's turn layout, written for this project: a header per message, <|eot_id|> after each.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for m in messages -%}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' }}"
    "{%- if m['content'] is string -%}{{ m['content'] | trim }}"
    "{%- else -%}{%- for part in m['content'] if part['type'] == 'text' -%}{{ part['text'] | trim }}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}"
)

# The words VisDial-style dialogs use most, so that typical answers tokenise into few pieces.
_CORPUS = """
is there a person in the picture yes no i can not tell it is hard to say maybe one two three four
what color is the shirt of the man woman boy girl white black red blue green yellow brown gray
how many people are there any animals dogs cats horses birds is it sunny outside indoors outdoors
does the photo look old new is the image in color black and white can you see the sky trees
buildings cars street road water grass snow table food plate cup kitchen room window wall floor
where is he she they standing sitting holding wearing looking at playing with on top of next to
left right middle center bottom big small large circle square triangle shape background picture
what is the weather like do you think i think so not sure probably it looks like the caption says
a the an of and or to in on at by for from with without about answer question reminder final
<reminder> </reminder> the user asked earlier that and now remember image shows conversation
"""


def tiny_tokenizer():
    """A fast tokenizer (byte-level BPE, LLaMA-3 special tokens and chat template), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    core.train_from_iterator(lines * 4, trainer=trainer)
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, core.token_to_id(BOS))],
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOT, pad_token=PAD,
        additional_special_tokens=[EOS, START_HEADER, END_HEADER], padding_side="left",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama_config(vocab_size: int, ids: dict[str, int], hidden: int = 64, layers: int = 2):
    """LLaMA-3.2's shape in miniature: GQA, RoPE with llama3 scaling, tied embeddings."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        hidden_act="silu",
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
        bos_token_id=ids[BOS],
        eos_token_id=[ids[EOS], ids[EOT]],
        pad_token_id=ids[PAD],
    )


def tiny_llama(path: Path, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """Save a tiny random LlamaForCausalLM and its tokenizer to ``path``; return ``path``.

    Deterministic for a given seed; loads offline with ``AutoModelForCausalLM`` and
    ``AutoTokenizer.from_pretrained(path)``.
    """
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer()
    ids = {s: tok.convert_tokens_to_ids(s) for s in SPECIALS}
    config = tiny_llama_config(len(tok), ids, hidden=hidden, layers=layers)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=[ids[EOS], ids[EOT]], pad_token_id=ids[PAD],
    )
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
