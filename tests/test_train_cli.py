"""``mmem train``: the choices it refuses, with messages that say what to do, before any data is read.

(The successful ``mmem train sft --tiny`` / ``mmem train memory --tiny`` runs are in test_sft.py
and test_memory_model.py, next to the data they train on.)
"""

from __future__ import annotations

import time

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from training.memory_llm import load_llm


@pytest.fixture(scope="module", autouse=True)
def prefect_logging():
    """Prefect's console log handler keeps the stream it was made with: make it before CliRunner
    swaps sys.stderr for a buffer it closes after each call (other modules run a flow first)."""
    from prefect.logging.configuration import setup_logging

    setup_logging()


def invoke(root, *args):
    return CliRunner().invoke(app, ["--data-root", str(root), "train", *args])


@pytest.mark.parametrize("command, option", [("sft", "--base"), ("memory", "--llm")])
def test_a_local_model_and_tiny_exclude_each_other(tmp_path, command, option):
    res = invoke(tmp_path, command, option, str(tmp_path), "--tiny")
    assert res.exit_code == 1
    assert f"give either {option} or --tiny, not both" in res.output


@pytest.mark.parametrize("command, option, message", [
    ("sft", "--base", "no Gemma3 model at {path}"),
    ("memory", "--llm", "no causal LM at {path}"),
])
def test_a_missing_local_model_is_named(tmp_path, command, option, message):
    """No table exists under this root: the model check comes first, so its message is the one seen."""
    path = tmp_path / "weights"
    path.mkdir()  # a folder without config.json is no model either
    res = invoke(tmp_path, command, option, str(path))
    assert res.exit_code == 1
    assert message.format(path=path) in res.output and "--tiny" in res.output
    assert not (tmp_path / "artifacts").exists()


@pytest.mark.parametrize("command", ["sft", "memory"])
def test_neither_a_local_model_nor_tiny(tmp_path, command):
    res = invoke(tmp_path, command)
    assert res.exit_code == 1 and "or tiny=true" in res.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_memory_model_refuses_4bit_without_cuda(tmp_path):
    res = invoke(tmp_path, "memory", "--tiny", "--4bit", "--device", "cpu")
    assert res.exit_code == 1 and "load_in_4bit needs CUDA" in res.output
    res = invoke(tmp_path, "memory", "--tiny", "--4bit")  # auto resolves to the CPU here
    assert res.exit_code == 1 and "load_in_4bit needs CUDA" in res.output


def test_load_llm_errors(tmp_path):
    from training.tiny_llama import tiny_llama

    with pytest.raises(FileNotFoundError, match=f"no causal LM at {tmp_path / 'nowhere'}"):
        load_llm(tmp_path / "nowhere", torch.device("cpu"))
    lm = tiny_llama(tmp_path / "lm", seed=0)
    with pytest.raises(ValueError, match="load_in_4bit needs CUDA"):
        load_llm(lm, torch.device("cpu"), load_in_4bit=True)
    model, tokenizer = load_llm(lm, torch.device("cpu"))  # the same folder loads without 4-bit
    assert model.config.architectures == ["LlamaForCausalLM"] and tokenizer.eos_token_id is not None


@pytest.mark.parametrize("artifact", ["../x", "/tmp/elsewhere", "..", "a/b"])
def test_an_artifact_name_that_is_a_path_is_refused_by_the_options(tmp_path, artifact):
    """The same rule from a profile or the environment: refused before any data is read."""
    res = CliRunner().invoke(app, ["--data-root", str(tmp_path), "train", "memory", "--tiny"],
                             env={"MMEM_TRAIN_MEMORY_ARTIFACT": artifact})
    assert res.exit_code == 1
    assert "error: artifact: String should match pattern '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'" in res.output
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "checkpoints").exists()


LE = "Input should be less than or equal to"


@pytest.mark.parametrize("var, value, message", [
    ("MMEM_TRAIN_MEMORY_BATCH_SIZE", "1000000000", f"batch_size: {LE} 65536"),
    ("MMEM_TRAIN_MEMORY_QFORMER_LAYERS", "100000", f"qformer_layers: {LE} 48"),
    ("MMEM_TRAIN_MEMORY_MAX_STEPS", "10000000000", f"max_steps: {LE} 10000000"),
])
def test_numbers_have_upper_bounds(tmp_path, var, value, message):
    res = CliRunner().invoke(app, ["--data-root", str(tmp_path), "train", "memory", "--tiny"],
                             env={var: value})
    assert res.exit_code == 1 and message in res.output, res.output


def test_an_artifact_name_that_is_a_path_gets_409_from_the_prefect_api(tmp_path):
    """A flow run asked for through the API, as the UI or an outsider does: the server checks the
    parameters against the flow's schema (the name's pattern is in it) and refuses before any work."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    from flows.train import train_memory_flow, train_sft_flow
    from schemas.train import MemoryTrainConfig, SftConfig

    api = PREFECT_API_URL.value()
    for flow_, config in ((train_sft_flow, SftConfig), (train_memory_flow, MemoryTrainConfig)):
        params = {"config": config(data_root=tmp_path, tiny=True).model_dump(mode="json")}
        dep_id = flow_.to_deployment(name="path-check", parameters=params).apply()
        url = f"{api}/deployments/{dep_id}/create_flow_run"
        try:
            for bad in ("../x", "/tmp/x", "..", "x/../../y"):
                res = httpx.post(url, json={"parameters": {"config": {**params["config"], "artifact": bad}}},
                                 timeout=30)
                assert res.status_code == 409, (bad, res.status_code, res.text)
                assert "artifact" in res.text and "does not match" in res.text, res.text
            for _ in range(10):  # the control: a plain name is taken (503: SQLite busy on a loaded machine)
                good = {**params["config"], "artifact": "ok-name.v2"}
                ok = httpx.post(url, json={"parameters": {"config": good}}, timeout=30)
                if ok.status_code != 503:
                    break
                time.sleep(2)
            assert ok.status_code == 201, ok.text
            httpx.delete(f"{api}/flow_runs/{ok.json()['id']}", timeout=30)
        finally:
            httpx.delete(f"{api}/deployments/{dep_id}", timeout=30)
    assert not (tmp_path / "artifacts").exists()
