"""ImageBind's BPE tokenizer rebuilt on Hugging Face ``tokenizers`` (Rust, batch-parallel, releases the
GIL), for the texts where it provably gives the same ids.

ImageBind's ``SimpleTokenizer`` (OpenAI CLIP's) cleans each text with ftfy and a double HTML unescape,
collapses whitespace, lower-cases, splits with one regex and runs byte-level BPE with a ``</w>``
end-of-word mark, in Python. For printable ASCII without ``&`` every cleaning step but the whitespace
collapse and the strip is the identity, and those two, the lower-casing, the split and the BPE are
what the Rust pipeline below does, on the same vocabulary file. :func:`fast_safe` picks those texts
(VisDial's are nearly all of them); the rest keep the Python tokenizer. ``tests/test_bpe.py`` compares
the ids of both on a large corpus of turn texts and on the edge cases.
"""

from __future__ import annotations

import gzip
import re
from functools import lru_cache

import numpy as np

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
# CLIP's split: contractions, letter runs, single digits, runs of anything else (whitespace dropped)
SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 256 bytes x2 (with and without </w>), merges, 2 specials
_SAFE = re.compile(r"[\x20-\x25\x27-\x7e]*")  # printable ASCII but '&' (HTML entities)


def fast_safe(text: str) -> bool:
    """Whether the Rust pipeline gives ImageBind's ids for ``text`` (see the module docstring)."""
    return _SAFE.fullmatch(text) is not None


def _byte_chars() -> list[str]:
    """GPT-2/CLIP's byte -> printable character table, in CLIP's vocabulary order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(rest))]


@lru_cache(maxsize=4)
def fast_tokenizer(bpe_path: str):
    """A ``tokenizers.Tokenizer`` with the vocabulary and merges of ImageBind's ``bpe_path`` (no
    special tokens added: :func:`encode` places them as ImageBind does)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    with gzip.open(bpe_path, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")[1 : MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    chars = _byte_chars()
    vocab = [*chars, *(c + "</w>" for c in chars), *("".join(m) for m in merges), SOT, EOT]
    tok = Tokenizer(models.BPE(vocab={w: i for i, w in enumerate(vocab)}, merges=merges,
                               end_of_word_suffix="</w>", continuing_subword_prefix="", fuse_unk=False))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip(),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    return tok


def encode(bpe_path: str, texts: list[str], context_length: int) -> np.ndarray:
    """(n, context_length) int32 ids of ``texts`` (all :func:`fast_safe`): start token, the BPE ids cut
    to leave room for the end token, the end token, zeros, as ``SimpleTokenizer.__call__`` lays them out."""
    tok = fast_tokenizer(bpe_path)
    sot, eot = tok.token_to_id(SOT), tok.token_to_id(EOT)
    out = np.zeros((len(texts), context_length), np.int32)
    for row, enc in zip(out, tok.encode_batch(texts, add_special_tokens=False), strict=True):
        ids = [sot, *enc.ids][: context_length - 1] + [eot]
        row[: len(ids)] = ids
    return out
