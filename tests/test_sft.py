"""LoRA SFT of a tiny random Gemma3 on reminders rows: format, split, LoRA targets, resume, the flow."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from killing import sigkill_when

from schemas.reminders import REMINDERS
from schemas.train import SftConfig
from storage.lance import connect, merge, read
from training.sft import (
    base_path,
    build_examples,
    chat_messages,
    choose_backend,
    held_out,
    load_peft_model,
    train_sft,
)

MISSING_ID = 999_999
REPO = Path(__file__).resolve().parent.parent


def reminder_rows(db) -> pa.Table:
    """One valid reminders row per ingested dialog (the teacher's shape), plus one whose image is gone."""
    turns = read(db, "turns", columns=["image_id", "turn", "split", "question", "answer"]).to_pylist()
    images = {r["image_id"]: Path(r["root"]) / r["path"] for r in read(db, "images").to_pylist()}
    dialogs: dict[int, list[dict]] = {}
    for t in turns:
        dialogs.setdefault(t["image_id"], []).append(t)
    rows = []
    for image_id, ts in sorted(dialogs.items()):
        ts.sort(key=lambda t: t["turn"])
        conv = "\n".join(f"Q: {t['question']}" + (f"\nA: {t['answer']}" if i < 3 else "")
                          for i, t in enumerate(ts[:4]))
        reminder = f"Earlier the user asked {ts[0]['question']} and the answer was {ts[0]['answer']}."
        final = ts[3]["answer"].capitalize() + "."
        rows.append({"image_id": image_id, "split": ts[0]["split"], "image_url": images[image_id].as_uri(),
                     "conversation": conv, "response": f"<reminder>{reminder}</reminder> {final}",
                     "reminder": reminder, "final_answer": final, "target_answer": ts[3]["answer"],
                     "request_hash": f"req-{image_id}", "model": "teacher"})
    gone = dict(rows[0], image_id=MISSING_ID, image_url="file:///nowhere/missing.jpg",
                request_hash="req-gone")
    return pa.Table.from_pylist(rows + [gone], schema=REMINDERS.schema)


@pytest.fixture(scope="module")
def sft_root(tmp_path_factory, ingested_root) -> Path:
    root = tmp_path_factory.mktemp("sft") / "root"
    shutil.copytree(ingested_root, root, symlinks=True)
    merge(connect(root / "lance"), "reminders", reminder_rows(connect(root / "lance")))
    return root


def tiny(root: Path, **kw) -> SftConfig:
    return SftConfig(data_root=root, tiny=True, device="cpu", **kw)


def test_chat_format_and_split_by_dialog(sft_root):
    config = tiny(sft_root, val_fraction=0.3)
    rows = read(connect(config.lance_uri), "reminders")
    data = build_examples(rows, config)
    train_split = {r["image_id"] for r in rows.to_pylist() if r["split"] == "train"}
    ids = [e.image_id for e in data.train + data.held_out]
    # val dialogs are never trained on
    assert set(ids) == train_split - {MISSING_ID} and len(ids) == len(set(ids))
    assert data.train and data.held_out
    assert [(r.key, str(r.reason)) for r in data.rejections] == [(str(MISSING_ID), "image_missing")]

    ex = data.train[0]
    assert [m["role"] for m in ex.messages] == ["system", "user", "assistant"]
    assert [p["type"] for p in ex.messages[1]["content"]] == ["text", "image"]  # the report: text, then image
    assert ex.messages[0]["content"][0]["text"] == config.system_prompt
    assert ex.messages[2]["content"][0]["text"].startswith("<reminder>") and ex.image.is_file()

    # the held-out set is a function of the dialog id alone: shuffling or subsetting rows moves nothing
    held = {e.image_id for e in data.held_out}
    shuffled = build_examples(rows.take(list(reversed(range(len(rows))))).slice(0, len(rows) // 2), config)
    kept = {e.image_id for e in shuffled.train + shuffled.held_out}
    assert {e.image_id for e in shuffled.held_out} == held & kept
    assert held == {i for i in ids if held_out(i, 0.3)}
    frac = sum(held_out(i, 0.3) for i in range(20_000)) / 20_000
    assert 0.28 < frac < 0.32


def test_lora_on_attention_and_mlp_of_vision_and_language(sft_root):
    def wrapped(config: SftConfig) -> set[tuple[str, str]]:
        model, _ = load_peft_model(config, base_path(config), cuda=False)
        names = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_modules() if n.endswith("lora_A")}
        assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
        return {("vision" if "vision_tower" in n else "language", n.rsplit(".", 1)[1]) for n in names}

    full = wrapped(tiny(sft_root))
    assert full == {("vision", m) for m in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")} | \
        {("language", m) for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                   "down_proj")}
    language_attention = wrapped(tiny(sft_root, finetune_vision_layers=False, finetune_mlp_modules=False))
    assert language_attention == {("language", m) for m in ("q_proj", "k_proj", "v_proj", "o_proj")}
    model, _ = load_peft_model(tiny(sft_root), base_path(tiny(sft_root)), cuda=False)
    lora = model.peft_config["default"]
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (16, 16, 0.0)


def test_backend_choice():
    assert choose_backend("auto", cuda=False)[0] == "peft"
    assert choose_backend("peft", cuda=True) == ("peft", "asked for")
    with pytest.raises(RuntimeError, match="CUDA"):
        choose_backend("unsloth", cuda=False)
    backend, why = choose_backend("auto", cuda=True)
    import importlib.util

    if importlib.util.find_spec("unsloth") is None:
        assert backend == "peft" and "unsloth is not installed" in why
    else:
        assert backend == "unsloth"


class Crash(RuntimeError):
    pass


def test_resume_after_a_crash_or_a_kill_matches_an_uninterrupted_run(sft_root, tmp_path):
    from transformers import TrainerCallback

    config = tiny(sft_root, max_steps=4, save_steps=2, val_fraction=0.0)
    data = build_examples(read(connect(config.lance_uri), "reminders"), config)

    straight = train_sft(config, data, tmp_path / "straight")
    assert straight.resumed_from == 0 and straight.backend == "peft"

    class CrashAtStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                raise Crash("killed")

    with pytest.raises(Crash):
        train_sft(config, data, tmp_path / "crashed", callbacks=[CrashAtStep3()])
    resumed = train_sft(config, data, tmp_path / "crashed")
    assert resumed.resumed_from == 2

    def lora(model) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    a, b = lora(straight.model), lora(resumed.model)
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any((p != 0).any() for n, p in b.items() if "lora_B" in n)  # it trained

    # The same after a SIGKILL of a training process, with a checkpoint it was still writing.
    version = connect(config.lance_uri).open_table("reminders").version
    ckpt = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SFT, str(sft_root), str(ckpt), str(version),
                             str(torch.get_num_threads())], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # the Trainer writes trainer_state.json last
    sigkill_when(proc, (ckpt / "checkpoint-2" / "trainer_state.json").is_file, "complete checkpoint-2")
    assert not (ckpt / "checkpoint-4").exists()  # killed before the end
    (ckpt / "checkpoint-3").mkdir()  # what a kill in the middle of writing checkpoint 3 leaves
    (ckpt / "checkpoint-3" / "adapter_model.safetensors").write_bytes(b"half")
    killed = train_sft(config, data, ckpt)
    assert killed.resumed_from == 2 and not (ckpt / "checkpoint-3").exists()
    c = lora(killed.model)
    for name in a:
        torch.testing.assert_close(a[name], c[name], rtol=1e-5, atol=1e-6, msg=name)
    assert killed.metrics["train_loss"] == pytest.approx(resumed.metrics["train_loss"], rel=1e-5)


KILLED_SFT = """
import sys, time, torch
from pathlib import Path
from transformers import TrainerCallback
from schemas.train import SftConfig
from storage.lance import connect, read
from training.sft import build_examples, train_sft
root, ckpt, version = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(int(sys.argv[4]))  # the parent's: a float sum's order depends on it
config = SftConfig(data_root=root, tiny=True, device="cpu", max_steps=4, save_steps=2, val_fraction=0.0)
data = build_examples(read(connect(config.lance_uri), "reminders", version=version), config)

class Slow(TrainerCallback):  # room to kill it after checkpoint 2, before the end
    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= 2:
            time.sleep(2)

train_sft(config, data, ckpt, callbacks=[Slow()])
"""


def test_chat_messages_shape():
    msgs = chat_messages("Q: a?\nA: b\nQ: c?", "<reminder>x</reminder> y.", "sys")
    assert msgs[1]["content"] == [{"type": "text", "text": "Q: a?\nA: b\nQ: c?"}, {"type": "image"}]


def test_train_sft_flow_versions_and_validated_input(sft_root):
    from flows.train import train_sft_flow
    from schemas.validate import ValidationFailed
    from storage.artifacts import ArtifactStore
    from training.plan import plan_sft
    from training.sft import SPLIT_FILE, load_sft_model

    config = tiny(sft_root, max_steps=2, val_fraction=0.2, artifact="sft-flow-test")
    db = connect(config.lance_uri)
    good = db.open_table("reminders").version
    first = train_sft_flow(config)
    assert first.created and first.artifact == "sft-flow-test:v1"
    assert first.read_versions == {"reminders": good} and first.versions == {}
    art = ArtifactStore(config.artifacts_dir).get("sft-flow-test", verify=True)
    m = art.manifest
    assert m["inputs"]["reminders"]["version"] == good and m["backend"] == "peft"
    assert m["config"]["lora_r"] == 16 and m["kind"] == "lora-adapter"
    assert (art.path / "adapter_model.safetensors").is_file() and (art.path / "adapter_config.json").is_file()
    split = __import__("json").loads((art.path / SPLIT_FILE).read_text())
    assert not set(split["train"]) & set(split["held_out"]) and split["held_out"]
    q = read(db, "quarantine", where="stage = 'train_sft'").column("reason").to_pylist()
    assert "image_missing" in q

    assert not train_sft_flow(config).created  # same inputs, config and code: nothing to do
    # the pipeline pins the version reminders wrote; a trigger picks the newest validated: one run
    pinned = config.model_copy(update={"reminders_version": good})
    assert plan_sft(pinned).fingerprint == first.fingerprint

    model, processor = load_sft_model(art.path)
    ex = build_examples(read(db, "reminders"), config).train[0]
    from PIL import Image

    inputs = processor.apply_chat_template(
        [{**msg, "content": [dict(p, image=Image.open(ex.image)) if p["type"] == "image" else p
                             for p in msg["content"]]} for msg in ex.messages[:2]],
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3

    # a newer version that fails the reminders suite is skipped; pinning it is refused
    bad = read(db, "reminders").slice(0, 1).to_pylist()[0]
    merge(db, "reminders", pa.Table.from_pylist([dict(bad, response="no tag here")], schema=REMINDERS.schema))
    newest = db.open_table("reminders").version
    assert newest > good
    assert plan_sft(config).inputs["reminders"]["version"] == good
    with pytest.raises(ValidationFailed):
        plan_sft(tiny(sft_root, reminders_version=newest))


def test_cli_train_sft_tiny(sft_root):
    """`mmem train sft --tiny` trains, prints the version, and a second call finds it up to date."""
    import json

    from typer.testing import CliRunner

    from cli.main import app

    args = ["--data-root", str(sft_root), "train", "sft", "--tiny", "--max-steps", "1", "--device", "cpu"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    result = json.loads(first.output[first.output.index("{\n"):])
    assert result["created"] and result["artifact"] == "gemma3-4b-reminders-lora:v1"
    assert set(result["read_versions"]) == {"reminders"} and result["inputs"]["reminders"]["tag"]
    assert result["metrics"]["train_examples"] > 0
    assert Path(result["path"], "adapter_model.safetensors").is_file()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert json.loads(again.output[again.output.index("{\n"):])["created"] is False


def test_adapter_folder_loads_anywhere_with_auto_peft(sft_root, tmp_path, monkeypatch):
    """A tiny run's artifact names its bundled base relative to itself: moved, with the data root
    (and the base it was trained from) deleted, ``AutoPeftModelForCausalLM`` loads the same model."""
    import json

    from peft import AutoPeftModelForCausalLM

    from training.sft import BASE_DIR, load_sft_model, save_adapter

    root = tmp_path / "root"
    shutil.copytree(sft_root, root, symlinks=True)
    config = tiny(root, max_steps=1, val_fraction=0.0)
    data = build_examples(read(connect(config.lance_uri), "reminders"), config)
    run = train_sft(config, data, tmp_path / "out")
    save_adapter(run, tmp_path / "art", data, copy_base=True)
    moved = tmp_path / "moved" / "v1"
    moved.parent.mkdir()
    shutil.move(tmp_path / "art", moved)
    shutil.rmtree(root)  # the data root, its tiny base and its images
    adapter = json.loads((moved / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == BASE_DIR and (moved / BASE_DIR / "config.json").is_file()
    assert str(root) not in (moved / "README.md").read_text()  # peft's model card: no data-root path either

    monkeypatch.chdir(moved)  # peft reads a relative base from the working directory
    loaded = AutoPeftModelForCausalLM.from_pretrained(moved).eval()
    monkeypatch.chdir(tmp_path)
    ours, _ = load_sft_model(moved)  # the project's loader reads it relative to the folder, from anywhere
    want = run.model.state_dict()
    for got in (loaded.state_dict(), ours.state_dict()):
        assert got.keys() == want.keys()
        for k, v in want.items():
            assert torch.equal(got[k].cpu(), v.cpu()), k
    ids = torch.tensor([[2, 20, 30, 40, 50]])
    run.model.eval()
    with torch.no_grad():
        ref = run.model(input_ids=ids).logits
        assert torch.equal(loaded(input_ids=ids).logits, ref) and torch.equal(ours(input_ids=ids).logits, ref)


def test_base_reference_names_a_hub_id_not_a_data_root(tmp_path):
    from training.sft import BASE_DIR, base_reference

    snapshot = tmp_path / "hub" / "models--google--gemma-3-4b-it" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert base_reference(snapshot, bundled=False) == "google/gemma-3-4b-it"
    assert base_reference(tmp_path / "weights" / "gemma-3-4b-it", bundled=False) == "google/gemma-3-4b-it"
    assert base_reference(snapshot, bundled=True) == BASE_DIR
    assert base_reference(tmp_path / "my-model", bundled=False) == str((tmp_path / "my-model").resolve())
