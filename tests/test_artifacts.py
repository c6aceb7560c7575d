"""The artifact store: numbered immutable versions, manifests, the latest alias, the CLI listing."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from schemas.paths import UnsafeName, safe_child
from storage.artifacts import ArtifactError, ArtifactStore, code_version, fingerprint


def writer(payload: bytes):
    def write(folder: Path) -> None:
        (folder / "adapter_model.safetensors").write_bytes(payload)
        (folder / "sub").mkdir()
        (folder / "sub" / "config.json").write_text(json.dumps({"payload": len(payload)}))
    return write


def publish(store: ArtifactStore, name: str, payload: bytes, fp: str = "fp", metrics: dict | None = None):
    return store.publish(name, writer(payload), kind="test", inputs={"reminders": {"version": 7}},
                         config={"lora_r": 16}, code={"commit": "abc", "dirty": False},
                         metrics=metrics or {"loss": 1.5}, fingerprint_=fp)


def test_versions_manifest_latest_and_verify(tmp_path):
    store = ArtifactStore(tmp_path / "artifacts")
    v1 = publish(store, "sft", b"one", fp="a")
    v2 = publish(store, "sft", b"two-two", fp="b", metrics={"loss": 0.5})
    assert (v1.version, v2.version) == (1, 2)
    assert store.versions("sft") == [1, 2]
    assert (tmp_path / "artifacts" / "sft" / "latest").resolve() == v2.path.resolve()
    assert store.get("sft").version == 2 and store.get("sft", "v1").version == 1
    assert store.get_ref("sft:v1").path == v1.path and store.get_ref("sft").version == 2

    m = store.get("sft", 1).manifest
    assert m["inputs"] == {"reminders": {"version": 7}} and m["config"] == {"lora_r": 16}
    assert m["version"] == 1 and m["fingerprint"] == "a" and m["kind"] == "test"
    files = m["files"]
    assert set(files) == {"adapter_model.safetensors", "sub/config.json"}
    assert files["adapter_model.safetensors"]["sha256"] == hashlib.sha256(b"one").hexdigest()
    assert store.find("sft", "b").version == 2 and store.find("sft", "nope") is None

    store.verify(store.get("sft", 2))
    (v2.path / "adapter_model.safetensors").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="adapter_model.safetensors"):
        store.get("sft", 2, verify=True)
    with pytest.raises(ArtifactError, match="no version v9"):
        store.get("sft", 9)
    with pytest.raises(ArtifactError, match="no artifact named"):
        store.get("other")
    assert [a.ref for a in store.list()] == ["sft:v1", "sft:v2"]


def test_failed_write_leaves_nothing(tmp_path):
    store = ArtifactStore(tmp_path)

    def broken(folder: Path) -> None:
        (folder / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        store.publish("m", broken, kind="t", inputs={}, config={}, code={}, metrics={})
    assert store.versions("m") == []
    assert [p.name for p in (tmp_path / "m").iterdir()] == []


def test_concurrent_publishers_get_distinct_versions(tmp_path):
    store = ArtifactStore(tmp_path)
    barrier = threading.Barrier(4)
    out, errors = [], []

    def run(i: int) -> None:
        def write(folder: Path) -> None:
            (folder / "w.bin").write_bytes(bytes([i]) * 10)
            barrier.wait()  # everyone claims a number at the same time
        try:
            out.append(store.publish("m", write, kind="t", inputs={}, config={}, code={}, metrics={}))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(a.version for a in out) == [1, 2, 3, 4]
    payloads = {(store.get("m", v).path / "w.bin").read_bytes()[0] for v in range(1, 5)}
    assert payloads == {0, 1, 2, 3}


RACE_ROUNDS = 20


def _race_publisher(root: str, slow: bool, barrier, rounds: int) -> None:
    """One of two processes publishing artifact ``race-<r>`` at the same moment, round after round.

    The ``slow`` one pauses 50 ms in ``os.symlink`` (a slow file system, in this process only)
    between claiming its number and moving ``latest``; the other one starts 10 ms late, so it
    claims the higher number while the slow one has not moved the alias yet."""
    if slow:
        real = os.symlink

        def symlink(*args, **kwargs):
            time.sleep(0.05)
            return real(*args, **kwargs)

        os.symlink = symlink
    store = ArtifactStore(Path(root))
    for r in range(rounds):
        def write(folder: Path) -> None:
            if not slow:
                time.sleep(0.01)
            (folder / "w.bin").write_bytes(b"slow" if slow else b"fast")

        barrier.wait(timeout=60)
        store.publish(f"race-{r}", write, kind="t", inputs={}, config={}, code={}, metrics={})


def test_latest_names_the_highest_version_when_two_processes_publish_at_once(tmp_path):
    """The race of issue 19: v2 published while v1 is between claim and alias must not leave
    ``latest -> v1``. Two real processes, 20 rounds, tiny files."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_race_publisher, args=(str(tmp_path), slow, barrier, RACE_ROUNDS))
             for slow in (True, False)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    store = ArtifactStore(tmp_path)
    wrong = []
    for r in range(RACE_ROUNDS):
        name = f"race-{r}"
        assert store.versions(name) == [1, 2]
        if os.readlink(tmp_path / name / "latest") != "v2" or store.get(name).version != 2:
            wrong.append((name, os.readlink(tmp_path / name / "latest")))
    assert not wrong, f"latest names an older version in {len(wrong)} of {RACE_ROUNDS} rounds: {wrong}"


@pytest.mark.parametrize("name", ["/tmp/elsewhere", "../x", "..", ".", "a/b", "x\n", "", "-x", "a" * 65,
                                  "ok/../../x"])
def test_names_that_are_not_plain_are_refused(tmp_path, name):
    store = ArtifactStore(tmp_path / "artifacts")
    with pytest.raises(UnsafeName, match="artifact="):
        publish(store, name, b"x")
    with pytest.raises(UnsafeName, match="artifact="):
        store.versions(name)
    with pytest.raises(UnsafeName, match="artifact="):
        store.get(name)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == []


def test_a_symlink_out_of_the_store_is_refused(tmp_path):
    store_root, outside = tmp_path / "artifacts", tmp_path / "outside"
    store_root.mkdir()
    outside.mkdir()
    (store_root / "planted").symlink_to(outside)  # an artifact folder that leads elsewhere
    with pytest.raises(UnsafeName, match=r"artifact='planted'.*leads out of"):
        publish(ArtifactStore(store_root), "planted", b"x")
    assert list(outside.iterdir()) == []
    (store_root / "inside").symlink_to(store_root / "real")  # a symlink that stays inside is fine
    (store_root / "real").mkdir()
    assert publish(ArtifactStore(store_root), "inside", b"x").version == 1
    assert safe_child(store_root, "fine-name_1.0", "artifact") == store_root / "fine-name_1.0"


def test_code_version_and_fingerprint(tmp_path):
    src = tmp_path / "a.py"
    src.write_text("x = 1\n")
    code = code_version(sources=[src])
    assert code["commit"] is None or len(code["commit"]) == 40
    assert code["dirty"] in (True, False, None)
    before = code["source_hash"]
    src.write_text("x = 2\n")
    assert code_version(sources=[src])["source_hash"] != before
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1}) != fingerprint({"a": 2, "b": 2})


def test_cli_artifacts_list(tmp_path):
    from cli.main import app

    store = ArtifactStore(tmp_path / "artifacts")
    publish(store, "memory-model", b"w1")
    publish(store, "memory-model", b"w2", metrics={"eval_ce": 2.25})
    res = CliRunner().invoke(app, ["--data-root", str(tmp_path), "artifacts", "list", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [r["artifact"] for r in rows] == ["memory-model:v1", "memory-model:v2"]
    assert [r["latest"] for r in rows] == [False, True]
    assert rows[1]["metrics"] == "eval_ce=2.25" and rows[0]["inputs"] == "reminders@7"
    text = CliRunner().invoke(app, ["--data-root", str(tmp_path), "artifacts", "list"])
    assert "memory-model:v2 (latest)" in text.output
    missing = CliRunner().invoke(app, ["--data-root", str(tmp_path), "artifacts", "list", "nope"])
    assert missing.exit_code != 0


def test_run_labels_and_variant_names_are_plain_names(tmp_path):
    """The evaluate flow's report folder and its variants' names: the same rule, symlinks included."""
    from pydantic import ValidationError

    from evaluation.report import run_folder
    from schemas.evaluate import EvaluateConfig, Variant

    reports = tmp_path / "reports"
    reports.mkdir()
    assert run_folder(reports, "on-memory-model-v3") == reports / "on-memory-model-v3"
    for label in ("../x", "/tmp/x", "..", "a/b"):
        with pytest.raises(UnsafeName, match="run_label="):
            run_folder(reports, label)
        with pytest.raises(ValidationError, match="run_label"):
            EvaluateConfig(data_root=tmp_path, run_label=label)
        with pytest.raises(ValidationError, match="name"):
            Variant(name=label, backend="hf", model="tiny:llama")
    (reports / "planted").symlink_to(tmp_path)
    with pytest.raises(UnsafeName, match="leads out of"):
        run_folder(reports, "planted")
