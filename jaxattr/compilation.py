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

`ProgramStore` removes those too: a program is traced and lowered once per machine and kept as a
serialised `jax.export.Exported` under a digest of everything its text depends on (the caller's
description of it, the JAX version, jaxattr's own source, the backend and the numerics flags), so
a second process deserialises it (milliseconds) and hands the module to XLA, whose compilation the
persistent cache serves. Counts that also cost a trace (a model's memory per image, its classes)
are kept beside it. A file that cannot be read back (another JAX, a truncated disk) is a miss, never an
error: the program is exported again and the file replaced.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jaxlib

from jaxattr.viz import write_atomically

# jax.monitoring duration events that make up "compile time" (names from jax._src.dispatch).
COMPILE_EVENTS = frozenset(
    {
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",  # XLA compile, or the persistent-cache read
    }
)


def enable_compile_cache(directory: str | os.PathLike) -> "ProgramStore":
    """Use `directory` (created if missing) as the cache of every program this process compiles
    from now on: JAX's persistent compilation cache in `directory/xla`, and the `ProgramStore` of
    exported programs in `directory/programs`, which is returned."""
    directory = Path(directory)
    (directory / "xla").mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return ProgramStore(directory / "programs")


@functools.cache
def _source_digest() -> str:
    """A digest of jaxattr's Python source: a change of the code that builds a program is a new
    program, even between two runs of the same version number."""
    package = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _environment() -> dict[str, Any]:
    """What a traced program depends on besides its own description."""
    device = jax.local_devices()[0]
    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "jaxattr_source": _source_digest(),
        "platform": device.platform,
        "device_kind": device.device_kind,
        "x64": bool(jax.config.jax_enable_x64),
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
    }


def tree_signature(tree: Any) -> dict[str, Any]:
    """What a program built around `tree` (a model) depends on: its structure, static fields
    included, and the shape and dtype of every leaf; not the leaves' values."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return {"structure": str(treedef), "leaves": [(list(jax.numpy.shape(x)), str(jax.numpy.result_type(x))) for x in leaves]}


class ProgramStore:
    """Exported programs and small traced values on disk, one file per digest (see the module
    docstring). `description` is a JSON-able mapping that tells the program apart from every other
    one the same code can build (model structure, method settings, shapes); the environment is
    added to it here."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def _path(self, description: Mapping[str, Any], suffix: str) -> Path:
        text = json.dumps({"environment": _environment(), **description}, sort_keys=True, default=str)
        return self.directory / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}{suffix}"

    def program(self, description: Mapping[str, Any], jitted: Callable, *specs: Any) -> Callable:
        """`jitted` (a `jax.jit` function) as a compiled-once callable on arguments shaped like
        `specs`: the stored export when there is one, else exported now and stored."""
        path = self._path(description, ".jaxexport")
        try:
            exported = jax.export.deserialize(bytearray(path.read_bytes()))
        except Exception:  # missing, or unreadable by this JAX: export again
            exported = jax.export.export(jitted)(*specs)
            serialised = exported.serialize()
            write_atomically(path, lambda f: f.write(serialised))
        return jax.jit(exported.call)

    def count(self, description: Mapping[str, Any], compute: Callable[[], int]) -> int:
        """compute() (a count, >= 0), from the store when it holds one; anything else stored there
        (an edited or damaged file) is a miss."""
        path = self._path(description, ".json")
        try:
            value = json.loads(path.read_text())["value"]
            if type(value) is int and value >= 0:
                return value
        except (OSError, ValueError, KeyError, TypeError):
            pass
        value = int(compute())
        write_atomically(path, lambda f: f.write(json.dumps({"value": value}).encode()))
        return value


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


def compile_program(jitted: Callable, *specs: Any, store: ProgramStore | None = None, description: Mapping[str, Any] | None = None) -> Any:
    """`jitted` (a `jax.jit` function) compiled ahead of time for arguments shaped like `specs`
    (`jax.ShapeDtypeStruct`s, with their shardings): through `store`, under `description`, when
    one is given (see `ProgramStore.program`)."""
    if store is not None:
        jitted = store.program(description or {}, jitted, *specs)
    return jitted.lower(*specs).compile()
