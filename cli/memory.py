"""``mmem memory add | recall | list | forget | end-session | seed``: the memory store from the shell."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import DataRootOpt, echo, fail, load

memory_app = typer.Typer(
    no_args_is_help=True, help="An agent's long-term multimodal memory (the memories table)."
)

OwnerOpt = Annotated[str, typer.Option("--owner", help="Whose memory (user or agent id).")]
TextOpt = Annotated[str | None, typer.Option("--text", help="Text to remember / query.")]
ImageOpt = Annotated[Path | None, typer.Option("--image", help="Image file to remember / query.")]
SessionOpt = Annotated[
    str | None, typer.Option("--session", help="Session id (transient memories live in one).")
]
TinyOpt = Annotated[
    bool | None, typer.Option("--tiny/--no-tiny", help="Tiny random-weight ImageBind.", show_default=False)
]
CheckpointOpt = Annotated[Path | None, typer.Option("--checkpoint", help="Local imagebind_huge.pth.")]


def register(app: typer.Typer) -> None:
    app.add_typer(memory_app, name="memory")


def _store(data_root, **overrides):
    from memory.store import MemoryStore
    from schemas.memory import MemoryConfig

    return MemoryStore(load(MemoryConfig, data_root, **overrides))


def _one_of(text, image) -> None:
    if (text is None) == (image is None):
        fail("give exactly one of --text or --image")
    if image is not None and not image.is_file():
        fail(f"no image file {image}")


@memory_app.command("add")
def add(
    owner: OwnerOpt,
    text: TextOpt = None,
    image: ImageOpt = None,
    saliency: Annotated[float | None, typer.Option(help="How important, 0..1 (default from config).")] = None,
    kind: Annotated[str, typer.Option(help="transient (kept for its session) or durable.")] = "durable",
    key: Annotated[
        str | None, typer.Option(help="Subject key: a new fact on it supersedes the old one.")
    ] = None,
    session: SessionOpt = None,
    memory_id: Annotated[
        str | None,
        typer.Option("--id", help="Your id for it: a retry with the same id stores nothing twice."),
    ] = None,
    tiny: TinyOpt = None,
    checkpoint: CheckpointOpt = None,
    data_root: DataRootOpt = None,
) -> None:
    """Remember a text or an image."""
    _one_of(text, image)
    store = _store(data_root, tiny=tiny, checkpoint=checkpoint)
    try:
        row = store.remember(
            owner,
            text=text,
            image=image,
            saliency=saliency,
            kind=kind,
            key=key,
            session=session,
            memory_id=memory_id,
        )
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    echo(row)


@memory_app.command("recall")
def recall(
    owner: OwnerOpt,
    text: TextOpt = None,
    image: ImageOpt = None,
    k: Annotated[int, typer.Option("-k", "--k", help="How many memories.")] = 5,
    explain: Annotated[bool, typer.Option("--explain", help="Show each memory's score breakdown.")] = False,
    session: SessionOpt = None,
    hybrid: Annotated[bool | None, typer.Option("--hybrid/--no-hybrid", help="Add full-text search.",
                                                show_default=False)] = None,
    tiny: TinyOpt = None,
    checkpoint: CheckpointOpt = None,
    data_root: DataRootOpt = None,
) -> None:
    """The memories that best answer a text or image query (similarity, recency, frequency, saliency)."""
    _one_of(text, image)
    store = _store(data_root, tiny=tiny, checkpoint=checkpoint)
    try:
        with store:  # writes the access stats before the command exits
            hits = store.recall(owner, text=text, image=image, k=k, session=session, hybrid=hybrid)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    if not hits:
        typer.echo(f"no memories for {owner}")
    for rank, h in enumerate(hits, 1):
        m = h.memory
        what = m["text"] or m["image_ref"] or ""
        typer.echo(f"{rank:>2}. {h.score:.3f}  {m['memory_id']}  [{m['modality']}/{m['kind']}]  {what}")
        if explain:
            b = h.breakdown
            terms = "  ".join(
                f"{t}={b[t]:.3f}x{b['w_' + t]:g}" for t in ("similarity", "recency", "frequency", "saliency")
            )
            extra = "".join(f"  {t}={b[t]:.3f}" for t in ("cosine", "keyword") if t in b)
            typer.echo(f"      {terms}{extra}  (accessed {m['access_count']}x, last {m['last_accessed_at']})")


@memory_app.command("list")
def list_(
    owner: OwnerOpt,
    superseded: Annotated[bool, typer.Option("--superseded", help="Include superseded facts.")] = False,
    data_root: DataRootOpt = None,
) -> None:
    """Every memory of an owner, oldest first."""
    rows = _store(data_root).list(owner, include_superseded=superseded)
    if not rows:
        typer.echo(f"no memories for {owner}")
    for m in rows:
        what = m["text"] or m["image_ref"] or ""
        flags = f"{m['modality']}/{m['kind']}" + (f" key={m['subject_key']}" if m["subject_key"] else "")
        flags += " superseded" if m["superseded_by"] else ""
        typer.echo(f"{m['memory_id']}  {m['created_at']:%Y-%m-%d %H:%M}  sal={m['saliency']:.2f} "
                   f"n={m['access_count']}  [{flags}]  {what}")


@memory_app.command("forget")
def forget(
    owner: OwnerOpt,
    id_: Annotated[str | None, typer.Option("--id", help="The memory to forget.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Forget every memory of the owner.")] = False,
    key: Annotated[str | None, typer.Option("--key", help="Forget a subject key's whole history.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only print what would be removed.")] = False,
    data_root: DataRootOpt = None,
) -> None:
    """Remove memories from the table's files: delete, rewrite the fragments that held them, purge
    the indexes, drop the tags that pin them, remove the old versions. Prints what it removed."""
    if sum((id_ is not None, all_, key is not None)) != 1:
        fail("give exactly one of --id, --key or --all")
    try:
        report = _store(data_root).forget(owner, id_, everything=all_, key=key, dry_run=dry_run)
    except ValueError as exc:
        fail(str(exc))
    if id_ is not None and report.deleted == 0:
        fail(f"owner {owner} has no memory {id_}")
    echo(report.__dict__)


@memory_app.command("end-session")
def end_session(owner: OwnerOpt, session: Annotated[str, typer.Option(help="The session that ended.")],
                data_root: DataRootOpt = None) -> None:
    """A session ended: its transient memories are deleted for good."""
    try:
        echo(_store(data_root).end_session(owner, session).__dict__)
    except ValueError as exc:
        fail(str(exc))


@memory_app.command("maintain")
def maintain(data_root: DataRootOpt = None) -> None:
    """Upkeep now: purge expired memories, build the indexes once the table is big enough, fold new
    rows into them (the vector index keeps its partitions), merge small fragments, drop old
    versions. Open stores do the folding themselves; schedule this (or the memory-upkeep
    deployment) for the rest."""
    echo(_store(data_root).maintain())


@memory_app.command("seed")
def seed(
    split: Annotated[str | None, typer.Option(help="Only this split of the ingested tables.")] = None,
    owner: Annotated[
        str | None, typer.Option(help="One owner for all dialogs (default: one per dialog).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N dialogs.")] = None,
    images: Annotated[
        Path | None, typer.Option(help="Image folder, for images the embed stage did not embed.")
    ] = None,
    tiny: TinyOpt = None,
    checkpoint: CheckpointOpt = None,
    data_root: DataRootOpt = None,
) -> None:
    """Seed memories from the ingested VisDial tables: each dialog's image and turns, timed as they went."""
    from memory.seed import seed_visdial
    from storage.lance import TablesMissing, open_table, require
    from storage.progress import Progress

    store = _store(data_root, tiny=tiny, checkpoint=checkpoint)
    try:
        require(store.db, ["dialogs", "turns"], hint="run `mmem ingest` first")
    except TablesMissing as exc:
        fail(str(exc))
    try:
        total = open_table(store.db, "dialogs").count_rows()
        with Progress(min(limit or total, total), "seed memories") as bar:
            counts = seed_visdial(
                store, split=split, owner=owner, limit=limit, images_root=images, progress=bar
            )
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    counts["maintain"] = store.maintain()
    echo(counts)
