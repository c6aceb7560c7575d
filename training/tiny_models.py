"""Tiny random-weight models of the real architectures, built offline.

No Gemma3 weights can be downloaded here, yet the SFT loop, the local Ollama-protocol server and
the evaluation must run the real code path (processor, chat template, image tokens, generate).
``tiny_gemma3`` saves a Gemma3ForConditionalGeneration (SigLIP vision tower + Gemma3 text model)
of a few hundred thousand parameters, with a locally built tokenizer, image processor and chat
template, in the Hugging Face layout, so that ``AutoModelForImageTextToText.from_pretrained`` and
``AutoProcessor.from_pretrained`` load it exactly as they would load ``google/gemma-3-4b-it``.

The tokenizer is character level with byte fallback: every string round-trips, and the token ids
of the special tokens sit where the processor and the model config expect them.
"""

from __future__ import annotations

import string
from pathlib import Path

# Gemma3's special tokens, by the names the processor reads off the tokenizer.
PAD, EOS, BOS, UNK, MASK = "<pad>", "<eos>", "<bos>", "<unk>", "<mask>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
BOI, EOI, IMAGE_SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
SPECIALS = (PAD, EOS, BOS, UNK, MASK, START_OF_TURN, END_OF_TURN, BOI, EOI, IMAGE_SOFT)

IMAGE_SIZE, PATCH_SIZE, MM_TOKENS_PER_IMAGE = 32, 8, 4

# Gemma's turn format: the system text joins the first user turn, the assistant role is "model",
# and an image is one <start_of_image> the processor expands to its soft tokens. Written for this
# project (content may be a string or a list of {"type": "text"|"image"} parts).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(system='') -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set ns.system = messages[0]['content'] -%}"
    "{%- else -%}{%- for part in messages[0]['content'] if part['type'] == 'text' -%}"
    "{%- set ns.system = ns.system + part['text'] -%}{%- endfor -%}{%- endif -%}"
    "{%- set turns = messages[1:] -%}{%- else -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for m in turns -%}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' }}"
    "{%- if loop.first and ns.system -%}{{ ns.system + '\n\n' }}{%- endif -%}"
    "{%- if m['content'] is string -%}{{ m['content'] | trim }}"
    "{%- else -%}{%- for part in m['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def _vocab() -> dict[str, int]:
    """Specials first (ids 0..9, as Gemma puts pad/eos/bos at 0/1/2), then bytes, then characters."""
    tokens = list(SPECIALS) + [f"<0x{b:02X}>" for b in range(256)]
    tokens += ["▁"] + [c for c in string.printable if not c.isspace()] + ["\n", "\t"]
    return {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}


def tiny_tokenizer():
    """A GemmaTokenizer over ``_vocab()`` that knows the image and turn tokens by name."""
    from transformers import GemmaTokenizer

    tok = GemmaTokenizer(
        vocab=_vocab(),
        merges=[],
        extra_special_tokens={"image_token": IMAGE_SOFT, "boi_token": BOI, "eoi_token": EOI},
    )
    tok.add_special_tokens({"additional_special_tokens": [START_OF_TURN, END_OF_TURN, BOI, EOI, IMAGE_SOFT]},
                           replace_extra_special_tokens=False)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_gemma3_config(vocab: dict[str, int], hidden: int = 32, layers: int = 2):
    from transformers import Gemma3Config

    text = {
        "vocab_size": len(vocab), "hidden_size": hidden, "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": hidden // 2,
        "query_pre_attn_scalar": hidden // 2, "max_position_embeddings": 2048, "sliding_window": 64,
        "pad_token_id": vocab[PAD], "eos_token_id": [vocab[EOS], vocab[END_OF_TURN]],
        "bos_token_id": vocab[BOS],
    }
    vision = {
        "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "vision_use_head": False,
    }
    return Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=MM_TOKENS_PER_IMAGE,
        boi_token_index=vocab[BOI], eoi_token_index=vocab[EOI], image_token_index=vocab[IMAGE_SOFT],
    )


def tiny_gemma3(path: Path, seed: int = 0) -> Path:
    """Save a tiny random Gemma3 vision+language model with its processor to ``path``; return it.

    Deterministic for a given seed. Loadable offline with ``AutoModelForImageTextToText`` and
    ``AutoProcessor``; the chat template takes Gemma3-style messages with image parts.
    """
    import torch
    from transformers import (
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
        GenerationConfig,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer()
    vocab = tok.get_vocab()
    config = tiny_gemma3_config(vocab)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=vocab[BOS], pad_token_id=vocab[PAD], eos_token_id=[vocab[EOS], vocab[END_OF_TURN]],
    )
    model.save_pretrained(path)
    image_processor = Gemma3ImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )
    processor = Gemma3Processor(
        image_processor=image_processor, tokenizer=tok, chat_template=CHAT_TEMPLATE,
        image_seq_length=MM_TOKENS_PER_IMAGE,
    )
    processor.save_pretrained(path)
    return path
