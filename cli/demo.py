"""``mmem demo``: the whole pipeline on the demo dataset, start to finish, on a laptop CPU (a command,
not a flow: it runs the parent flow and seeds the memory store).

It writes the demo dataset (once), starts the local Ollama-protocol server in teacher mode in
a background thread (a deterministic stand-in, named as such in every row it produces), runs the
parent flow with the demo profile, seeds the ``memories`` table from the ingested dialogs, records
in the data root how it was made (``mmem-root.json``: tiny ImageBind, the teacher LLM) so that every
later command on the root uses the same models without flags, and says where to look at the
results (``where_to_look``, which ``mmem pipeline run`` prints too).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from prefect.client.schemas.objects import State
from prefect.settings import PREFECT_API_URL
from prefect.utilities.urls import url_for

from flows.pipeline import pipeline_flow
from ingest.demo_data import SPLIT_FOLDERS, write_demo
from llmcalls.server import make_state, running_server
from schemas.config import record_root_choice
from schemas.memory import MemoryConfig
from schemas.pipeline import PipelineConfig, SplitInput
from storage.catalog import describe_tables

DEMO_PROFILE = Path(str(resources.files("schemas") / "profiles" / "demo.toml"))


def demo_inputs(demo: Path, dialogs: int, val_dialogs: int) -> list[SplitInput]:
    marker = demo / f".complete-{dialogs}-{val_dialogs}"
    if not marker.exists():
        write_demo(demo, dialogs, seed=0, val_dialogs=val_dialogs, workers=2, progress=True)
        marker.write_text("ok")
    return [
        SplitInput(split=s, visdial=demo / f"visdial_1.0_{s}.json", images=demo / "images" / SPLIT_FOLDERS[s],
                   coco=demo / f"captions_{SPLIT_FOLDERS[s]}.json")
        for s in ("train", "val")
    ]


def run_demo(root: Path, *, dialogs: int = 40, val_dialogs: int = 10, profile: Path | None = None) -> str:
    root = Path(root)
    inputs = demo_inputs(root / "demo", dialogs, val_dialogs)
    with running_server(make_state(teacher=True)) as url:
        cfg = PipelineConfig.load(profile or DEMO_PROFILE, data_root=root, inputs=inputs,
                                  reminders={"ollama_host": url}, evaluate={"ollama_host": url})
        state = pipeline_flow(cfg, return_state=True)
    if not state.is_completed():
        raise RuntimeError(where_to_look(cfg, state))
    record_made_with(cfg)
    owner = seed_memories(cfg)
    return where_to_look(cfg, state, owner=owner)


# Where the demo profile serves the teacher by hand (`mmem llm serve --teacher --port 11500`): the
# demo's own server lives only as long as the demo.
TEACHER_HOST, TEACHER_MODEL = "http://127.0.0.1:11500", "mmem-teacher"


def record_made_with(cfg: PipelineConfig) -> None:
    """The models this root was made with, as defaults of every later command on it."""
    e = cfg.embed
    record_root_choice(
        cfg.data_root, "imagebind", {"tiny": e.tiny, "checkpoint": e.checkpoint, "seed": e.seed}
    )
    record_root_choice(cfg.data_root, "llm", {
        "ollama_host": TEACHER_HOST, "model": TEACHER_MODEL,
        "serve": f"mmem llm serve --teacher --port {TEACHER_HOST.rsplit(':', 1)[1]}"})


def seed_memories(cfg: PipelineConfig) -> str:
    """Fill ``memories`` from the ingested train dialogs, as one owner's history (`mmem memory seed
    --owner demo`); returns that owner."""
    from memory.seed import seed_visdial
    from memory.store import MemoryStore

    owner = "demo"
    with MemoryStore(MemoryConfig.load(None, data_root=cfg.data_root, device="cpu")) as store:
        seed_visdial(store, split="train", owner=owner)
        store.maintain()
    return owner


def where_to_look(cfg: PipelineConfig, state: State, owner: str | None = None) -> str:
    """How the run ended, every table with its rows and version, and the commands (and, on a
    server, the UI page) that show the results: what `mmem demo` and `mmem pipeline run` print last."""
    root = cfg.data_root
    lines = [
        f"pipeline: {'completed' if state.is_completed() else 'FAILED: ' + str(state.message)}",
        "",
        "tables:",
    ]
    for t in describe_tables(cfg.lance_uri):
        lines.append(f"  {t['table']:<18} {t['rows']:>7} rows  version {t['version']}")
    run_page = (
        url_for("flow-run", obj_id=state.state_details.flow_run_id) if PREFECT_API_URL.value() else None
    )
    lines += [
        "",
        f"model artifacts:  mmem --data-root {root} artifacts list   ({cfg.artifacts_dir})",
        f"evaluation:       mmem --data-root {root} evaluate report  (plots under {root / 'reports'})",
        f'query:            mmem --data-root {root} query --text "a red circle" -k 5',
        *([(f"memory:           mmem --data-root {root} memory recall --owner {owner} "
            '--text "a red circle" -k 5')] if owner else []),
        (f"SQL:              mmem --data-root {root} sql "
         '"SELECT reason, count(*) FROM quarantine GROUP BY 1"'),
        f"Prefect UI:       {run_page}" if run_page else
        "Prefect UI:       run `mmem server start`, export PREFECT_API_URL as it says, and run this again",
    ]
    return "\n".join(lines)
