"""Run a Great Expectations suite over a table and turn the result into a readable report."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import pyarrow as pa


class ValidationFailed(RuntimeError):
    """A data-quality gate failed; the message is the readable report."""


@dataclass
class ValidationReport:
    suite: str
    table: str
    rows: int
    success: bool
    results: list[dict] = field(default_factory=list)

    def failures(self) -> list[dict]:
        return [r for r in self.results if not r["success"]]

    def markdown(self) -> str:
        verdict = "passed" if self.success else "FAILED"
        head = f"### `{self.table}` — suite `{self.suite}`: {verdict} ({self.rows} rows)\n\n"
        lines = ["| expectation | column | success | unexpected |", "| --- | --- | --- | --- |"]
        for r in self.results:
            ok = "yes" if r["success"] else "**no**"
            lines.append(f"| {r['expectation']} | {r['column'] or ''} | {ok} | {r['unexpected']} |")
        return head + "\n".join(lines) + "\n"

    def raise_if_failed(self) -> None:
        if not self.success:
            raise ValidationFailed(self.markdown())


def validate(table: pa.Table | pd.DataFrame, suite, *, table_name: str | None = None) -> ValidationReport:
    """Validate ``table`` (only the columns the suite names are converted to pandas)."""
    import great_expectations as gx

    if isinstance(table, pa.Table):
        needed = sorted({c for e in suite.expectations for c in _columns(e)} & set(table.column_names))
        df = table.select(needed).to_pandas() if needed else pd.DataFrame(index=range(len(table)))
    else:
        df = table
    context = gx.get_context(mode="ephemeral")
    source = context.data_sources.add_pandas(f"mmem_{suite.name}")
    asset = source.add_dataframe_asset(name=table_name or suite.name)
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": df})
    result = batch.validate(suite)
    results = []
    for r in result.results:
        cfg = r.expectation_config
        kw = cfg.kwargs
        results.append(
            {
                "expectation": cfg.type,
                "column": kw.get("column") or ",".join(kw.get("column_list", []) or []),
                "success": bool(r.success),
                "unexpected": (r.result or {}).get(
                    "unexpected_count", (r.result or {}).get("observed_value", "")
                ),
            }
        )
    return ValidationReport(suite.name, table_name or suite.name, len(df), bool(result.success), results)


def _columns(expectation) -> list[str]:
    cols = []
    if getattr(expectation, "column", None):
        cols.append(expectation.column)
    cols.extend(getattr(expectation, "column_list", None) or [])
    return cols
