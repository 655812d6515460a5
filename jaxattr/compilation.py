"""Compile once per machine, not once per process: a store of verified compiled programs, and a
clock of the time JAX spends compiling.

`ProgramStore` keeps each program a run builds -- its `jax.export.Exported` (the traced and lowered
module) and XLA's executable for it -- in one file per program, so a second process running the
same method, model and batch shape neither traces, lowers nor compiles it: it reads the file
(milliseconds). Counts that also cost a trace (a model's memory per image, its classes) are kept
the same way.

Trust. A stored executable is machine code that runs with the user's rights, so the store is a
private directory (created 0700; refused when another user owns it or others may write to it),
and a file in it is used only when it proves to be the program asked for:
  * it is named by a digest of its key, and holds the key itself, compared in full on load: the
    caller's description of the program (model structure, method settings, shapes) and everything
    else that can change the lowered program -- the versions of jax, jaxlib, flax, optax, numpy
    and ml_dtypes, a digest of jaxattr's own source, the backend and its version, the devices and
    processes, XLA's flags, and every value of JAX's configuration (`jax.config.values`: x64, the
    PRNG implementation, threefry partitioning, matmul precision, dtype promotion, ...), taken
    whole rather than from a hand-picked list;
  * a SHA-256 of its contents, checked before anything is deserialised (a flipped bit, a
    truncated write);
  * the deserialised program's argument shapes, dtypes and shardings must be those the caller
    passes, and the executable's outputs those of the exported module.
Only regular files are read (a FIFO, device, directory or symbolic link at a key is not opened),
up to a size cap. Anything that fails is a miss: the program is built again, the file replaced
atomically, and the caller told in one line why -- never an error, never another program's
result. JAX's own persistent compilation cache is not used: its files are trusted by name alone.

`CompileClock` measures the time covered by JAX's own compile events while it is active (tracing
to a jaxpr, lowering to MLIR, and XLA compilation), which is what a run reports as its compile time.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import stat
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
from jax.experimental import serialize_executable

from jaxattr._files import NotARegularFileError, display_path, open_regular_file
from jaxattr.viz import write_atomically

# jax.monitoring duration events that make up "compile time" (names from jax._src.dispatch).
COMPILE_EVENTS = frozenset(
    {
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    }
)

# Packages whose code takes part in building a program.
KEY_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "ml_dtypes")
# Environment variables read by XLA when it compiles (flags, TPU runtime arguments).
KEY_VARIABLES = ("XLA_FLAGS", "LIBTPU_INIT_ARGS")
_MAGIC = b"jaxattr stored program v2\n"
_HEADER_LIMIT = 1 << 22  # the key's text: model structures of large models are a few hundred KB
PROGRAM_LIMIT = 1 << 30  # a file larger than this is not read (executables are tens of MB at most)
COUNT_LIMIT = _HEADER_LIMIT + 4096


class StoreError(Exception):
    """The store's directory cannot be used safely (another owner, writable by others)."""


class _Miss(Exception):
    """A stored file that cannot be used; the message says why."""


def open_store(directory: str | os.PathLike, warn: Callable[[str], None] | None = None) -> "ProgramStore":
    """The `ProgramStore` in `directory/programs`, both created private (0700) if missing;
    StoreError if either is not a directory of this user that only this user can write to.
    `warn(message)` hears each stored file that could not be used (default: stderr)."""
    directory = Path(directory)
    for path in (directory, directory / "programs"):
        _private_directory(path)
    return ProgramStore(directory / "programs", warn=warn)


def _private_directory(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(path)
    except OSError as e:
        raise StoreError(f"cannot create the compile store {display_path(path)}: {e.strerror or e}") from None
    where = display_path(path)
    remedy = "(it holds machine code that jaxattr runs); fix it, or run with --no-compile-cache"
    if not stat.S_ISDIR(info.st_mode):
        raise StoreError(f"the compile store {where} is not a directory {remedy}")
    if hasattr(os, "geteuid") and info.st_uid != os.geteuid():
        raise StoreError(f"the compile store {where} belongs to another user (uid {info.st_uid}) {remedy}")
    if info.st_mode & 0o022:
        raise StoreError(
            f"the compile store {where} is writable by others (mode {stat.S_IMODE(info.st_mode):o}) {remedy}, e.g. chmod 700"
        )


@functools.cache
def _source_digest() -> str:
    """A digest of jaxattr's Python source: a change of the code that builds a program is a new
    program, even between two runs of the same version number."""
    package = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """What a built program depends on besides its own description (see the module docstring)."""
    devices = jax.local_devices()
    return {
        "packages": {name: _version(name) for name in KEY_PACKAGES},
        "jaxattr_source": _source_digest(),
        "backend": [devices[0].platform, devices[0].client.platform_version],
        "local_devices": [device.device_kind for device in devices],
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "variables": {name: os.environ.get(name) for name in KEY_VARIABLES},
        "config": {name: repr(value) for name, value in sorted(jax.config.values.items())},
    }


def tree_signature(tree: Any) -> dict[str, Any]:
    """What a program built around `tree` (a model) depends on: its structure, static fields
    included, and the shape and dtype of every leaf; not the leaves' values."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return {"structure": str(treedef), "leaves": [(list(jax.numpy.shape(x)), str(jax.numpy.result_type(x))) for x in leaves]}


def _warn_stderr(message: str) -> None:
    print(f"jaxattr: warning: {message}", file=sys.stderr)


class ProgramStore:
    """Verified programs and small traced values on disk, one file per key (see the module
    docstring). `description` is a JSON-able mapping that tells the program apart from every other
    one the same code can build (model structure, method settings, shapes); the environment is
    added to it here. Use `open_store` to get one on a checked directory."""

    def __init__(self, directory: str | os.PathLike, warn: Callable[[str], None] | None = None):
        self.directory = Path(directory)
        self.warn = warn or _warn_stderr

    def key(self, description: Mapping[str, Any]) -> str:
        """The full text a stored file must hold to be used for `description`."""
        return json.dumps({"environment": environment(), **description}, sort_keys=True, default=str)

    def path(self, key: str, suffix: str) -> Path:
        return self.directory / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}{suffix}"

    def program(self, description: Mapping[str, Any], jitted: Callable, *specs: Any) -> jax.stages.Compiled:
        """`jitted` (a `jax.jit` function) compiled for arguments shaped like `specs`
        (`jax.ShapeDtypeStruct`s, with their shardings): the stored program when there is a valid
        one, else built now (exported, compiled) and stored."""
        key = self.key(description)
        path = self.path(key, ".program")
        try:
            parts = self._read(path, key, PROGRAM_LIMIT)
            if parts is not None:
                return _load_program(parts, specs)
        except _Miss as e:
            self.warn(f"the stored program {display_path(path)} was not used ({e}); building it again")
        except Exception as e:  # an intact file this jax cannot load: built again like any miss
            self.warn(f"the stored program {display_path(path)} was not used (it does not load: {type(e).__name__}); building it again")
        exported = jax.export.export(jitted)(*specs)
        compiled = jax.jit(exported.call).lower(*specs).compile()
        try:
            executable = serialize_executable.serialize(compiled)[0]
        except (ValueError, NotImplementedError):  # a backend without serialisable executables
            return compiled
        self._write(path, key, [exported.serialize(), executable])
        return compiled

    def count(self, description: Mapping[str, Any], compute: Callable[[], int]) -> int:
        """compute() (a count, >= 0), from the store when it holds a valid one."""
        key = self.key(description)
        path = self.path(key, ".count")
        try:
            parts = self._read(path, key, COUNT_LIMIT)
            if parts is not None:
                value = json.loads(parts[0])
                if type(value) is int and value >= 0:
                    return value
                raise _Miss(f"it holds {type(value).__name__} {str(value)[:20]}, not a count")
        except ValueError:
            self.warn(f"the stored count {display_path(path)} was not used (not JSON); computing it again")
        except _Miss as e:
            self.warn(f"the stored count {display_path(path)} was not used ({e}); computing it again")
        value = int(compute())
        self._write(path, key, [json.dumps(value).encode()])
        return value

    def _read(self, path: Path, key: str, limit: int) -> list[bytes] | None:
        """The parts stored under `key` at `path`; None if there is no file; _Miss if the file is
        not a regular file, too large, damaged, or holds another key."""
        try:
            with open_regular_file(path, follow_symlinks=False) as f:
                size = os.fstat(f.fileno()).st_size
                if size > limit:
                    raise _Miss(f"{size} bytes, more than the {limit} allowed")
                data = f.read(limit + 1)
        except FileNotFoundError:
            return None
        except NotARegularFileError as e:
            raise _Miss(str(e)) from None
        except OSError as e:
            raise _Miss(f"unreadable: {e.strerror or e}") from None
        if not data.startswith(_MAGIC):
            raise _Miss("not a stored program of this jaxattr")
        at = len(_MAGIC)
        length = int.from_bytes(data[at : at + 8], "big")
        if length > min(_HEADER_LIMIT, len(data) - at - 8):
            raise _Miss("truncated")
        try:
            header = json.loads(data[at + 8 : at + 8 + length])
            stored_key, sizes, digest = header["key"], header["sizes"], header["sha256"]
        except (ValueError, KeyError, TypeError):
            raise _Miss("damaged header") from None
        payload = memoryview(data)[at + 8 + length :]
        if not (isinstance(sizes, list) and all(type(n) is int and n >= 0 for n in sizes) and sum(sizes) == len(payload)):
            raise _Miss("truncated or damaged")
        if hashlib.sha256(payload).hexdigest() != digest:
            raise _Miss("damaged: its checksum does not match")
        if stored_key != key:
            raise _Miss("it was built for another program or environment")
        parts, offset = [], 0
        for n in sizes:
            parts.append(bytes(payload[offset : offset + n]))
            offset += n
        return parts

    def _write(self, path: Path, key: str, parts: list[bytes]) -> None:
        """Store `parts` under `key`, atomically; a store that cannot be written is a warning."""
        payload = b"".join(parts)
        header = json.dumps({"key": key, "sizes": [len(p) for p in parts], "sha256": hashlib.sha256(payload).hexdigest()}).encode()

        def write(f) -> None:
            f.write(_MAGIC + len(header).to_bytes(8, "big") + header)
            f.write(payload)

        try:
            write_atomically(path, write)
        except OSError as e:
            self.warn(f"cannot store {display_path(path)} ({e.strerror or e}); the run goes on without it")


def _load_program(parts: list[bytes], specs: tuple) -> jax.stages.Compiled:
    """The stored executable, once it proves to take exactly `specs` and to return what the stored
    module returns; _Miss otherwise."""
    if len(parts) != 2:
        raise _Miss("damaged: not a program")
    exported = jax.export.deserialize(bytearray(parts[0]))
    in_tree = jax.tree_util.tree_structure((specs, {}))
    if exported.in_tree != in_tree:
        raise _Miss(f"it takes arguments {exported.in_tree}, not {in_tree}")
    expected = jax.tree_util.tree_leaves(specs)
    avals = [(tuple(s.shape), str(s.dtype)) for s in expected]
    if [(tuple(a.shape), str(a.dtype)) for a in exported.in_avals] != avals:
        raise _Miss("it takes arguments of other shapes or dtypes")
    compiled = serialize_executable.deserialize_and_load(parts[1], in_tree, exported.out_tree)
    arguments = jax.tree_util.tree_leaves(compiled.args_info)
    if [(tuple(a.shape), str(a.dtype)) for a in arguments] != avals:
        raise _Miss("its executable takes arguments of other shapes or dtypes")
    for spec, sharding in zip(expected, jax.tree_util.tree_leaves(compiled.input_shardings[0]), strict=True):
        if spec.sharding is not None and not sharding.is_equivalent_to(spec.sharding, len(spec.shape)):
            raise _Miss("its executable splits its arguments over other devices")
    outputs = [(tuple(o.shape), str(o.dtype)) for o in jax.tree_util.tree_leaves(compiled.out_info)]
    if outputs != [(tuple(a.shape), str(a.dtype)) for a in exported.out_avals]:
        raise _Miss("its executable does not return what its module returns")
    return compiled


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
        return store.program(description or {}, jitted, *specs)
    return jitted.lower(*specs).compile()
