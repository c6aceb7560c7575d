"""The memory model: architecture facts, what it sees, saving and loading (test_memory_model_train.py:
the loop's resume after a kill, the flow, the command)."""

from __future__ import annotations

import hashlib
import itertools
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from schemas.embed import EMBED_DIM, IMAGE_EMBEDDINGS, TEXT_EMBEDDINGS
from schemas.train import MemoryTrainConfig
from storage.lance import connect, merge, read
from training.memory_data import build_memory_data, read_memory_inputs, tokenize
from training.memory_model import build_memory_model, load_memory_model
from training.memory_net import multi_positive_infonce
from training.tiny_llama import tiny_llama

REPO = Path(__file__).resolve().parent.parent


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, EMBED_DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _embedding_rows(spec, key: str, keys: list, rng: np.random.Generator) -> pa.Table:
    """Rows for an embedding table: the key, random unit vectors, a marker in other string columns."""
    cols = {
        key: keys,
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(_unit(rng, len(keys)).ravel()), EMBED_DIM),
    }
    for f in spec.schema:
        if f.name not in cols and pa.types.is_string(f.type):
            cols[f.name] = ["random-test-vectors"] * len(keys)
    return pa.table(cols)


def make_embedded_root(tmp_path_factory, ingested_root) -> Path:
    """The ingested demo root plus random ImageBind-shaped vectors; one train dialog lacks its image
    vector (it must be quarantined, not silently dropped)."""
    root = tmp_path_factory.mktemp("memory") / "root"
    shutil.copytree(ingested_root, root, symlinks=True)
    db = connect(root / "lance")
    rng = np.random.default_rng(0)
    images = read(db, "images", columns=["image_id", "split"]).to_pylist()
    train_ids = sorted(r["image_id"] for r in images if r["split"] == "train")
    ids = [r["image_id"] for r in images if r["image_id"] != train_ids[-1]]
    merge(db, "image_embeddings", _embedding_rows(IMAGE_EMBEDDINGS, "image_id", ids, rng))
    hashes = set(read(db, "turns", columns=["text_hash"]).column("text_hash").to_pylist())
    hashes |= set(read(db, "dialogs", columns=["caption_hash"]).column("caption_hash").to_pylist())
    merge(db, "text_embeddings", _embedding_rows(TEXT_EMBEDDINGS, "text_hash", sorted(hashes), rng))
    return root


@pytest.fixture(scope="module")
def embedded_root(tmp_path_factory, ingested_root) -> Path:
    return make_embedded_root(tmp_path_factory, ingested_root)


def tiny_config(root: Path, **kw) -> MemoryTrainConfig:
    return MemoryTrainConfig(data_root=root, tiny=True, device="cpu", **kw)


@pytest.fixture(scope="module")
def model_and_data(embedded_root):
    config = tiny_config(embedded_root)
    model = build_memory_model(config, torch.device("cpu"))
    loaded = read_memory_inputs(config.lance_uri, ["train", "val"], {})
    data, rejections = build_memory_data(loaded, "train", model.tokenizer, model.arch)
    return config, model, data, rejections


def test_tiny_llama_is_deterministic_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def digest(p: Path) -> str:
        return hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()

    a, b, c = (
        tiny_llama(tmp_path / "a", seed=0),
        tiny_llama(tmp_path / "b", seed=0),
        tiny_llama(tmp_path / "c", seed=1),
    )
    assert digest(a) == digest(b) != digest(c)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    tok = AutoTokenizer.from_pretrained(a, local_files_only=True)
    lm = AutoModelForCausalLM.from_pretrained(a, local_files_only=True)
    assert lm.config.architectures == ["LlamaForCausalLM"] and lm.config.tie_word_embeddings
    text = "is there a dog in the picture? no, only 2 cats — café"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    assert len(tok("is there a person in the picture")["input_ids"]) < 12  # BPE merges, not characters
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_architecture_and_what_trains(model_and_data, embedded_root):
    config, model, data, _ = model_and_data
    assert model.imagebind_fc.in_features == 2 * EMBED_DIM and model.imagebind_fc.out_features == EMBED_DIM
    assert tuple(model.turn_pe.weight.shape) == (11, EMBED_DIM)
    assert model.qformer.config.encoder_hidden_size == EMBED_DIM
    assert model.llm_proj.in_features == config.qformer_hidden
    assert model.llm_proj.out_features == model.llm.config.hidden_size
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"imagebind_fc", "turn_pe"}

    both = build_memory_model(tiny_config(embedded_root, train_qformer=True, infonce_weight=0.5))
    trainable = {n.split(".")[0] for n, p in both.named_parameters() if p.requires_grad}
    assert trainable == {"imagebind_fc", "turn_pe", "qformer", "query_tokens", "retrieval_proj"}
    assert not any(p.requires_grad for p in both.llm.parameters())

    out = both(data.batch(torch.arange(6)), infonce_weight=0.5)
    out.loss.backward()
    assert out.infonce is not None and out.answer_tokens > 0
    assert both.imagebind_fc.weight.grad.abs().sum() > 0 and both.query_tokens.grad.abs().sum() > 0
    assert all(p.grad is None for p in both.llm.parameters())


def test_missing_vectors_are_rejected_with_a_reason(model_and_data, embedded_root):
    _, _, data, rejections = model_and_data
    db = connect(embedded_root / "lance")
    train_ids = sorted(r["image_id"] for r in read(db, "dialogs", columns=["image_id", "split"]).to_pylist()
                       if r["split"] == "train")
    assert [r.key for r in rejections] == [str(train_ids[-1])]
    assert rejections[0].reason == "embedding_missing" and "image" in rejections[0].record["missing"]
    assert list(data.image_ids) == train_ids[:-1]
    assert len(data) == 10 * (len(train_ids) - 1)


def test_memory_is_the_history_before_the_turn(model_and_data):
    """Sample (dialog, t) sees the image, the caption and turns < t, never turn t (it holds the answer)."""
    _, model, data, _ = model_and_data
    model.eval()
    i = int(((data.dialog == 0) & (data.turn == 5)).nonzero()[0])
    batch = data.batch(torch.tensor([i]))
    assert batch.memory_mask.tolist() == [[True] * 5 + [False] * 6]
    base = model(batch).ce
    later = data.batch(torch.tensor([i]))
    later.texts[0, 5:] = torch.randn(6, EMBED_DIM)  # turn t itself and every later turn
    assert torch.allclose(model(later).ce, base, atol=1e-6)
    earlier = data.batch(torch.tensor([i]))
    earlier.texts[0, 4] = torch.randn(EMBED_DIM)
    assert not torch.allclose(model(earlier).ce, base, atol=1e-6)
    assert torch.equal(batch.target[0], data.texts[0, 5])  # the retrieval target is turn t


def test_loss_does_not_depend_on_padding(model_and_data):
    _, model, data, _ = model_and_data
    model.eval()
    lens = data.prompt_len + data.answer_len
    i, j = int(lens.argmin()), int(lens.argmax())
    assert lens[i] != lens[j]
    pair = model(data.batch(torch.tensor([i, j])))
    one, two = model(data.batch(torch.tensor([i]))), model(data.batch(torch.tensor([j])))
    weighted = (one.ce * one.answer_tokens + two.ce * two.answer_tokens) / (
        one.answer_tokens + two.answer_tokens
    )
    assert pair.answer_tokens == one.answer_tokens + two.answer_tokens
    assert torch.allclose(pair.ce, weighted, atol=1e-5)


def test_generate_batched_equals_one_by_one(model_and_data):
    _, model, data, _ = model_and_data
    model.eval()
    idx = torch.tensor([0, 13, 27])
    assert len(set(data.prompt_len[idx].tolist())) > 1  # rows of different lengths: left padding matters
    with torch.no_grad():
        model.llm_proj.weight.mul_(50)  # make the soft prompt matter, so wrong padding shows
        try:
            together = model.generate(data.batch(idx), max_new_tokens=4)
            alone = [model.generate(data.batch(idx[k:k + 1]), max_new_tokens=4)[0] for k in range(3)]
        finally:
            model.llm_proj.weight.div_(50)
    assert together == alone


def test_multi_positive_infonce():
    rng = torch.Generator().manual_seed(0)
    targets = torch.nn.functional.normalize(torch.randn(4, 8, generator=rng), dim=-1)
    group = torch.tensor([0, 0, 1, 2])
    aligned = multi_positive_infonce(targets * 10, targets, group, 0.1)
    shuffled = multi_positive_infonce(targets[[2, 3, 0, 1]] * 10, targets, group, 0.1)
    assert aligned < shuffled
    # rows 0 and 1 share a dialog: for anchor 0 both targets count, so pointing at 1 costs the same
    z = targets.clone()
    z[0] = targets[1]
    alt = multi_positive_infonce(z, targets, group, 0.1)
    swap = torch.tensor([1, 0, 2, 3])
    assert torch.allclose(multi_positive_infonce(z[swap], targets[swap], group[swap], 0.1), alt)


def test_lr_schedule_warms_up_then_decays_to_zero(model_and_data, embedded_root):
    from training.memory_loop import make_optimizer

    _, model, _, _ = model_and_data
    config = tiny_config(embedded_root, warmup_steps=4, learning_rate=1e-3)
    opt, sched = make_optimizer(model, config, steps=12)
    lrs = []
    for _ in range(12):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0, 2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert all(a > b for a, b in itertools.pairwise(lrs[4:])) and lrs[-1] < 1e-4
    assert sched.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)
    opt.zero_grad(set_to_none=True)


def test_tokenize_keeps_eos_under_truncation(model_and_data):
    _, model, _, _ = model_and_data
    tok = model.tokenizer
    ids, lens = tokenize(tok, [" yes", " " + "very " * 40], 6, special=False, eos=tok.eos_token_id)
    assert lens.tolist()[1] == 6 and ids[1, 5] == tok.eos_token_id
    assert ids[0, lens[0] - 1] == tok.eos_token_id


def test_auto_model_loads_a_moved_folder_exactly(model_and_data, tmp_path):
    """``save_pretrained`` -> move the folder -> ``AutoModel.from_pretrained``: every tensor and every
    output equal; the trained parts alone in model.safetensors, the frozen LM once under llm/."""
    import copy

    from safetensors import safe_open
    from transformers import AutoConfig, AutoModel

    _, model, data, _ = model_and_data
    model = copy.deepcopy(model)
    with torch.no_grad():  # weights no seed re-derives: a load that rebuilt instead of reading fails
        for name, p in model.named_parameters():
            if not name.startswith("llm."):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / "saved")
    moved = tmp_path / "elsewhere" / "memory-model"
    moved.parent.mkdir()
    shutil.move(tmp_path / "saved", moved)
    assert not (tmp_path / "saved").exists()

    files = sorted(str(p.relative_to(moved)) for p in moved.rglob("*") if p.is_file())
    assert {"config.json", "model.safetensors", "llm/config.json", "llm/model.safetensors",
            "llm/tokenizer.json"} <= set(files)
    text = (moved / "config.json").read_text()
    assert str(tmp_path) not in text and "/models/" not in text  # nothing absolute: the folder moves
    with safe_open(moved / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert keys == set(model.memory_state_dict()) and not any(k.startswith("llm.") for k in keys)

    assert AutoConfig.from_pretrained(moved).model_type == "mmem_memory"
    loaded = AutoModel.from_pretrained(moved)
    assert type(loaded) is type(model) and loaded.config.architectures == ["MemoryModel"]
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert want[k].dtype == got[k].dtype and torch.equal(want[k], got[k]), k
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad}

    model.eval()
    batch = data.batch(torch.tensor([0, 13, 27]))
    assert torch.equal(model(batch).ce, loaded(batch).ce)
    assert torch.equal(model.encode_memory(batch), loaded.encode_memory(batch))
    assert model.generate(batch, max_new_tokens=4) == loaded.generate(batch, max_new_tokens=4)


def test_older_artifact_layout_still_loads(model_and_data, tmp_path):
    """An artifact written before the model was a PreTrainedModel (memory_model.safetensors +
    memory_config.json, its LM under llm/) loads; with its LM gone, the error says what to do."""
    import json

    from safetensors.torch import save_file

    from training.memory_llm import LLM_DIR
    from training.memory_net import LEGACY_ARCH, LEGACY_WEIGHTS

    _, model, data, _ = model_and_data
    old = tmp_path / "v1"
    old.mkdir()
    save_file(model.memory_state_dict(), str(old / LEGACY_WEIGHTS))
    shutil.copytree(model._llm_source, old / LLM_DIR)
    arch = {k: getattr(model.config, k) for k in (
        "num_query_tokens", "qformer_hidden", "qformer_layers", "qformer_heads", "qformer_intermediate",
        "qformer_cross_attention_frequency", "qformer_dropout", "prompt_template", "max_prompt_tokens",
        "max_answer_tokens", "train_qformer", "train_llm_proj", "train_retrieval")}
    (old / LEGACY_ARCH).write_text(json.dumps({**arch, "llm": {"path": LLM_DIR, "load_in_4bit": False}}))
    loaded = load_memory_model(old, device="cpu")
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    model.eval()
    batch = data.batch(torch.tensor([0, 13]))
    assert torch.equal(model(batch).ce, loaded(batch).ce)

    shutil.rmtree(old / LLM_DIR)
    with pytest.raises(FileNotFoundError, match="retrain"):
        load_memory_model(old, device="cpu")
