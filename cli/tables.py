"""``mmem tables`` and ``mmem sql``: look at what the pipeline wrote."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import DataRootOpt, fail, load

tables_app = typer.Typer(help="Every table: rows, columns, current version and tags (`mmem tables`); upkeep.")


def register(app: typer.Typer) -> None:
    app.add_typer(tables_app, name="tables")
    app.command("sql")(sql)


@tables_app.callback(invoke_without_command=True)
def tables(ctx: typer.Context, data_root: DataRootOpt = None) -> None:
    """Every table: rows, columns, current version and tags."""
    from schemas.config import StageConfig
    from storage.catalog import describe_tables

    if ctx.invoked_subcommand is not None:
        ctx.obj = data_root
        return
    cfg = load(StageConfig, data_root)
    rows = describe_tables(cfg.lance_uri)
    if not rows:
        typer.echo(f"no tables under {cfg.lance_uri}")
    for r in rows:
        tags = ",".join(r["tags"]) or "-"
        typer.echo(f"{r['table']:<18} rows={r['rows']:<9} version={r['version']:<4} tags={tags}")
        typer.echo(f"{'':<18} columns: {', '.join(r['columns'])}")


def sql(
    query: Annotated[str, typer.Argument(help="DuckDB SQL; tables are named as in Lance.")],
    version: Annotated[
        list[str] | None, typer.Option(help="TABLE=VERSION (number or tag) to read a past version.")
    ] = None,
    limit: Annotated[int, typer.Option(help="Rows to print.")] = 50,
    data_root: DataRootOpt = None,
) -> None:
    """Run read-only DuckDB SQL over the Lance tables (joins included), e.g.
    mmem sql "SELECT count(*) FROM turns".

    Only queries run: writing, files, URLs, ATTACH, extensions and settings are refused (exit status 2).
    """
    from schemas.config import StageConfig
    from storage.catalog import ReadOnlyError, run_sql
    from storage.lance import version_ref

    cfg = load(StageConfig, data_root)
    pins: dict[str, int | str] = {}
    for v in version or []:
        name, _, ver = v.partition("=")
        if not ver:
            fail(f"--version wants TABLE=VERSION, got {v!r}")
        pins[name] = version_ref(ver)
    try:
        result = run_sql(cfg.lance_uri, query, pins)
    except ReadOnlyError as exc:
        fail(str(exc), code=2)
    except Exception as exc:  # noqa: BLE001 - DuckDB's (or the catalog's) message is the useful part
        fail(str(exc))
    typer.echo(result.slice(0, limit).to_pandas().to_string(max_colwidth=60))
    if result.num_rows > limit:
        typer.echo(f"({result.num_rows} rows; the first {limit} shown, --limit N for more)")


@tables_app.command("maintain")
def maintain(
    ctx: typer.Context,
    keep_hours: Annotated[
        float,
        typer.Option(
            min=0, help="Keep untagged versions younger than this; 0: remove every untagged old version now."
        ),
    ] = 168.0,
    table: Annotated[list[str] | None, typer.Option(help="Only this table (repeatable).")] = None,
    data_root: DataRootOpt = None,
) -> None:
    """Compact every table and remove old versions, keeping every tagged one: each run's writes and
    each version an artifact's manifest names (`pinned-v<N>`). `memories` has its own
    `mmem memory maintain`."""
    import json
    from datetime import timedelta

    from schemas.config import StageConfig
    from storage.maintain import maintain_tables

    cfg = load(StageConfig, data_root or ctx.obj)  # `mmem tables --data-root R maintain` too
    typer.echo(json.dumps(maintain_tables(cfg.lance_uri, timedelta(hours=keep_hours), only=table), indent=2))

