"""Shared pieces of the benchmarks: figures, medians of repeats, one-core pinning, the cache folder.

Every benchmark returns ``{"figures": [figure(...), ...], ...details}`` (see ``benchmarks/run.py``);
:func:`figure` rounds values and decides ``met`` from a goal written as ``"<= 10"``/``">= 30"``.
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
#: Large inputs written once and reused by later runs (gitignored).
CACHE = HERE / "results" / "tmp"
CACHE_ENV = "WSISCAN_BENCH_CACHE"

_GOAL = re.compile(r"^\s*(<=|>=|<|>)\s*([-+0-9.eE]+)\s*$")


def cache_dir(smoke: bool = False) -> Path:
    """The benchmark cache folder: ``$WSISCAN_BENCH_CACHE`` if set, else ``benchmarks/results/tmp``;
    ``smoke/`` below it for smoke runs."""
    root = Path(os.environ.get(CACHE_ENV) or CACHE)
    path = root / "smoke" if smoke else root
    path.mkdir(parents=True, exist_ok=True)
    return path


def round_sig(value: float, digits: int = 4) -> float | int:
    """``value`` rounded to ``digits`` significant digits (ints stay ints)."""
    if isinstance(value, int) or value == 0 or value != value:
        return value
    return float(f"{value:.{digits}g}")


def goal_met(value: float, goal: str) -> bool:
    """Whether ``value`` meets a goal written as ``"<= 10"``, ``">= 2.5"``, ``"< 1"``, ``"> 0"``."""
    m = _GOAL.match(goal)
    if not m:
        raise ValueError(f"goal {goal!r} is not of the form '<= number' or '>= number'")
    op, bound = m.group(1), float(m.group(2))
    return {
        "<=": value <= bound,
        ">=": value >= bound,
        "<": value < bound,
        ">": value > bound,
    }[op]


def figure(name: str, value: float, unit: str, goal: str | None = None) -> dict[str, Any]:
    """One row of the results table; ``met`` is computed when a goal is given."""
    out: dict[str, Any] = {"name": name, "value": round_sig(value), "unit": unit}
    if goal is not None:
        out["goal"] = goal
        out["met"] = goal_met(float(value), goal)
    return out


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """``(seconds, result)`` of one call."""
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def median_of(
    fn: Callable[[], Any], repeats: int, warmup: int = 0
) -> tuple[float, list[float], Any]:
    """Median wall seconds of ``repeats`` calls after ``warmup`` untimed calls.

    Returns ``(median_s, all_s, last_result)``.
    """
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(max(1, repeats)):
        seconds, result = timed(fn)
        times.append(seconds)
    return statistics.median(times), [round(t, 4) for t in times], result


def interleaved_medians(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 0
) -> tuple[dict[str, float], dict[str, list[float]], dict[str, Any]]:
    """Median seconds of several variants run in turn (A, B, A, B, ...), so drift hits all alike.

    Returns ``({name: median_s}, {name: all_s}, {name: last result})``.
    """
    results: dict[str, Any] = {}
    for _ in range(warmup):
        for name, fn in fns.items():
            results[name] = fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            seconds, results[name] = timed(fn)
            times[name].append(seconds)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return medians, {k: [round(t, 4) for t in v] for k, v in times.items()}, results


@contextlib.contextmanager
def one_core() -> Iterator[int]:
    """Pin this process to one CPU core with one BLAS/OpenMP and one torch thread; restore after.

    Yields the core's index. Threads that libraries start inside the block inherit the pinning.
    """
    from threadpoolctl import threadpool_limits

    saved_affinity = os.sched_getaffinity(0)
    core = min(saved_affinity)
    torch_threads = None
    try:
        import torch

        torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)
    except ImportError:
        torch = None  # type: ignore[assignment]
    os.sched_setaffinity(0, {core})
    try:
        with threadpool_limits(limits=1):
            yield core
    finally:
        os.sched_setaffinity(0, saved_affinity)
        if torch is not None and torch_threads is not None:
            torch.set_num_threads(torch_threads)


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (how busy the machine was while measuring)."""
    return [round(v, 2) for v in os.getloadavg()]
