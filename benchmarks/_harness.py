"""How every benchmark times: the machine's load, the best of interleaved rounds, compile time apart.

The benchmarks run as scripts (`python benchmarks/ig.py`), so sys.path[0] is benchmarks/ and they
import this file as `from _harness import ...`.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Literal, NamedTuple


def load() -> str:
    """The 1, 5 and 15 minute load averages, "2.1/1.8/1.5".

    Printed next to the timings because the machine may be shared: a time taken while other jobs
    keep the cores busy is not comparable with one taken on an idle machine."""
    try:
        return "/".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:  # a platform without load averages
        return "unknown"


class Rounds(NamedTuple):
    """What `timed_rounds` measured, keyed by implementation name."""

    results: dict[str, Any]  # each run's return value (from the last round)
    seconds: dict[str, float]  # wall seconds of the kept round (the best, or the median)
    cpu_seconds: dict[str, float]  # this process's CPU seconds (all threads) in that round


def timed_rounds(
    runs: dict[str, Callable[[], Any]],
    repeats: int,
    *,
    warmup: int = 0,
    progress: bool = False,
    keep: Literal["best", "median"] = "best",
) -> Rounds:
    """Time `repeats` rounds, each running every implementation once, in the dict's order.

    The rounds interleave the implementations, so a change in the load of a shared machine hits all
    of them alike. `keep`: which round's time each implementation reports, its best (the
    undisturbed time) or its median (steadier when comparing variants of one implementation on a
    busy machine: one lucky round does not decide). The CPU seconds of that round say what each
    side costs whatever the load (wall seconds: what a user waits). `warmup` untimed rounds run
    first (first-call setup of kernels and caches); `progress` prints every timed run."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    results, timings = {}, {name: [] for name in runs}
    for r in range(repeats):
        for name, run in runs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            results[name] = run()
            wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
            timings[name].append((wall, cpu))
            if progress:
                print(f"  round {r + 1}: {name} {wall:.2f} s ({cpu:.2f} CPU s)", flush=True)
    kept = {name: sorted(t)[0 if keep == "best" else (len(t) - 1) // 2] for name, t in timings.items()}
    return Rounds(results, {n: k[0] for n, k in kept.items()}, {n: k[1] for n, k in kept.items()})


def timed_compile(jitted, *args) -> tuple[Any, float]:
    """(the executable of `jitted` (a jax.jit function) for `args`, seconds spent lowering and compiling).

    Compiling ahead keeps compilation out of the timed rounds; its time is reported apart because a
    user pays it once per input shape, not per batch."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def print_header(header: str) -> None:
    """A markdown table's header line and its separator (the README's tables are pasted from these)."""
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
