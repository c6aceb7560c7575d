"""The Rust rebuild of ImageBind's tokenizer gives ImageBind's ids: on a large corpus of turn texts
like the real set's, on random printable ASCII, and (through the Python fallback) on everything else."""

from __future__ import annotations

import random
import string

import numpy as np
import pytest

from embed.bpe import encode, fast_safe
from embed.preprocess import CONTEXT_LENGTH, bpe_path, python_tokenize, tokenize
from ingest.demo_data import make_scene, photo_caption, photo_dialog
from schemas.embed import turn_text


def corpus() -> list[str]:
    """~23,000 distinct texts: demo turn texts and captions in the real set's shape, random ASCII
    (punctuation runs, digits, contractions, long texts that must be truncated)."""
    texts = []
    for i in range(1500):
        scene = make_scene(7, "train", i)
        texts += [turn_text(q, a) for q, a in photo_dialog(scene, 7)] + [photo_caption(scene, 7)]
    rng = random.Random(3)
    alphabet = string.ascii_letters + string.digits + " " * 12 + "'''.,?!-:;()/$%*+=<>@#^_`{|}~[]\\\""
    texts += ["".join(rng.choices(alphabet, k=rng.randint(0, 160))) for _ in range(6000)]
    texts += ["Q: what's he doing? A: he's surfing", "I'LL BE BACK, can't, won't, they've",
              "   spaced   out  ", "", " ", "12345 67.89", "a" * 400, " ".join(["word"] * 200),
              "''s 's '''", "x's'd'll're've'm't"]
    return texts


def test_fast_tokenizer_matches_imagebind_on_a_large_corpus():
    texts = [t for t in corpus() if fast_safe(t)]
    assert len(texts) > 20_000
    fast, theirs = encode(bpe_path(), texts, CONTEXT_LENGTH), python_tokenize(texts)
    differ = np.flatnonzero((fast != theirs).any(axis=1))
    assert not len(differ), [texts[i] for i in differ[:5]]
    assert (theirs[:, 0] == theirs[0, 0]).all() and (fast.argmax(axis=1) > 0).all()  # start and end tokens
    assert (theirs[:, -1] > 0).sum() >= 2  # the corpus reaches truncation


@pytest.mark.parametrize("text", ["café au lait", "tom &amp; jerry", "tab\there", "line\nbreak", "\x00nul",
                                  "ｆｕｌｌ ｗｉｄｔｈ", "“curly” quotes", "emoji 🙂 here"])
def test_texts_the_fast_path_might_change_take_imagebinds_own(text):
    assert not fast_safe(text)
    mixed = ["Q: is it red? A: yes", text, "Q: how many? A: three"]
    assert np.array_equal(tokenize(mixed), python_tokenize(mixed))
