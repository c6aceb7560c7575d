"""Progress of long work, for every stage: a terminal bar, a log line every ``log_every`` of the
work on the ``mmem`` logger, and, where an orchestrator registered a sink (the Prefect task glue
does: a progress artifact on the run's page), updates to it. Pure: the stage code that reports
progress never imports the orchestrator.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol, Self

log = logging.getLogger("mmem.progress")


class Sink(Protocol):
    """Where progress goes besides the bar and the log (``start`` may return ``None``: no view)."""

    def start(self, desc: str) -> Any: ...

    def update(self, handle: Any, percent: float) -> None: ...


_SINKS: list[Sink] = []


def add_sink(sink: Sink) -> None:
    """Register ``sink`` once per process (the orchestrator's glue does, when it is imported)."""
    if not any(type(s) is type(sink) for s in _SINKS):
        _SINKS.append(sink)


class Progress:
    """A terminal progress bar plus a log line (and sink update) every ``log_every`` of the work."""

    def __init__(self, total: int, desc: str, *, log_every: float = 0.1, enabled: bool = True) -> None:
        from tqdm import tqdm

        self.total, self.desc, self.done = total, desc, 0
        self._next_log = log_every
        self._log_every = log_every
        self._bar = tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)
        self._views = []
        for sink in _SINKS if enabled else []:
            try:
                handle = sink.start(desc)
            except Exception as exc:  # noqa: BLE001 -- a view of progress is not worth failing the work
                log.debug("no progress view for %s: %s", desc, exc)
                continue
            if handle is not None:
                self._views.append((sink, handle))

    def __call__(self, n: int = 1) -> None:
        self.done += n
        self._bar.update(n)
        if self.total and self.done / self.total >= self._next_log:
            log.info("%s: %d/%d (%.0f%%)", self.desc, self.done, self.total, 100 * self.done / self.total)
            self._show()
            while self._next_log <= self.done / self.total:
                self._next_log += self._log_every

    def _show(self) -> None:
        if not self.total:
            return
        for sink, handle in self._views:
            try:
                sink.update(handle, min(100.0, 100.0 * self.done / self.total))
            except Exception as exc:  # noqa: BLE001 -- as above
                log.debug("progress view of %s not updated: %s", self.desc, exc)

    def close(self) -> None:
        self._bar.close()
        self._show()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(items: Iterable[Any], total: int, desc: str) -> Iterable[Any]:
    with Progress(total, desc) as p:
        for item in items:
            yield item
            p()


ProgressFn = Callable[[int], None]
