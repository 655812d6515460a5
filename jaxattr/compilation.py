"""Compile once per machine, not once per process: JAX's own persistent compilation cache, and a
clock of the time JAX spends compiling.

`enable_compile_cache(directory)` points JAX's persistent cache at `directory` with thresholds of
zero, so every program is kept, small CPU programs included (JAX's defaults keep only programs that
took a second or more to compile, which on CPU leaves most of a run's programs out). A second
process running the same method, model and batch shape then loads its executables from disk
instead of compiling them. It must be called before the process compiles anything: JAX decides
once per process whether the cache is in use.

`CompileClock` measures the time covered by JAX's own compile events while it is active (tracing
to a jaxpr, lowering to MLIR, and XLA compilation or its persistent-cache lookup), which is what a
run reports as its compile time. The persistent cache saves only the XLA compilation: tracing and
lowering run in every process.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import jax

# jax.monitoring duration events that make up "compile time" (names from jax._src.dispatch).
COMPILE_EVENTS = frozenset(
    {
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",  # XLA compile, or the persistent-cache read
    }
)


def enable_compile_cache(directory: str | os.PathLike) -> Path:
    """Use `directory` (created if missing) as JAX's persistent compilation cache for every
    program this process compiles from now on; returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


class CompileClock:
    """`with CompileClock() as clock: ...` -> clock.seconds, the wall time JAX spent compiling
    inside the block: the union of its compile events' time spans, so a jit traced inside another
    one's trace is not counted twice."""

    def __init__(self):
        self._spans: list[tuple[float, float]] = []
        self._lock = threading.Lock()

    def _listen(self, event: str, start: float, end: float, **_: object) -> None:
        if event in COMPILE_EVENTS:
            with self._lock:
                self._spans.append((start, end))

    @property
    def seconds(self) -> float:
        total, reached = 0.0, float("-inf")
        for start, end in sorted(self._spans):
            if end > reached:
                total += end - max(start, reached)
                reached = end
        return total

    def __enter__(self) -> "CompileClock":
        jax.monitoring.register_event_time_span_listener(self._listen)
        return self

    def __exit__(self, *exc_info) -> None:
        jax.monitoring.unregister_event_time_span_listener(self._listen)
