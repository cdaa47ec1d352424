"""Where a run's time goes: Ignite's ``HandlersTimeProfiler`` on the trainer and the evaluator (every
handler's time per event, plus data loading and the step), the epoch-end handlers one by one, a table
at the end and ``profile.json``. Off by default, and then nothing is attached."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events
from ignite.handlers import HandlersTimeProfiler

from engine.files import write_json_atomic
from handlers.ordering import wrap_ordered

__all__ = ["Profile"]


def _name(fn: Callable[..., Any]) -> str:
    fn = getattr(fn, "_profiler_original", fn)
    return getattr(fn, "__qualname__", type(fn).__name__)


class Profile:
    """``attach(trainer, evaluator)``; after the run :meth:`rows` (handler, event, calls, total and mean
    seconds, sorted by total), :meth:`table` and :meth:`write`. ``Processing`` is the step (forward,
    backward, optimiser) and ``Dataflow`` the wait for each batch, as Ignite's profiler names them.
    Handlers run in order at an epoch's end (``attach_ordered``) are timed one by one."""

    def __init__(self) -> None:
        self.profilers: dict[str, HandlersTimeProfiler] = {}
        self._staged: dict[tuple[str, str], list[float]] = {}

    def attach(self, trainer: Engine, evaluator: Engine | None = None) -> Profile:
        for label, engine in (("trainer", trainer), ("evaluator", evaluator)):
            if engine is None:
                continue
            profiler = HandlersTimeProfiler()
            profiler.attach(engine)
            self.profilers[label] = profiler
        trainer.add_event_handler(Events.STARTED, self._time_stages)
        return self

    def _time_stages(self, engine: Engine) -> None:
        """Time each handler run in order at an epoch's end (wrapped once)."""
        wrap_ordered(engine, self._timed)

    def _timed(self, fn: Callable[..., Any], event: Any) -> Callable[..., Any]:
        if getattr(fn, "_profiled", False):
            return fn
        times = self._staged.setdefault((_name(fn), getattr(event, "name", str(event))), [])

        def timed(*args: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                times.append(time.perf_counter() - start)

        timed._profiled = True  # type: ignore[attr-defined]
        timed.__qualname__ = _name(fn)
        return timed

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for label, profiler in self.profilers.items():
            named = {"Processing": profiler.processing_times, "Dataflow": profiler.dataflow_times}
            for name, times in named.items():
                rows.append(_row(f"{label}: {name}", "-", times))
            for event, handlers in profiler.event_handlers_times.items():
                for handler, times in handlers.items():
                    if handler.startswith("_Dispatcher"):
                        continue  # shown one by one below
                    rows.append(_row(f"{label}: {handler}", getattr(event, "name", str(event)), times))
        for (handler, event), times in self._staged.items():
            rows.append(_row(f"trainer: {handler}", event, times))
        return sorted((r for r in rows if r["calls"]), key=lambda r: -r["total_s"])

    def table(self, limit: int = 25) -> list[str]:
        rows = self.rows()
        width = max([len(r["handler"]) for r in rows[:limit]] + [7])
        lines = [f"{'handler':<{width}}  {'event':<20} {'calls':>7} {'total s':>9} {'mean ms':>9}"]
        for r in rows[:limit]:
            lines.append(f"{r['handler']:<{width}}  {r['event']:<20} {r['calls']:>7} {r['total_s']:>9.3f} "
                         f"{r['mean_s'] * 1e3:>9.3f}")
        if len(rows) > limit:
            lines.append(f"... and {len(rows) - limit} more in profile.json")
        return lines

    def write(self, path: str | Path) -> None:
        write_json_atomic(Path(path), self.rows())


def _row(handler: str, event: str, times: list[float]) -> dict[str, Any]:
    total = float(sum(times))
    return {"handler": handler, "event": event, "calls": len(times), "total_s": round(total, 6),
            "mean_s": round(total / len(times), 9) if times else 0.0}
