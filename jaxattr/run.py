"""The batch loop every long run shares (`jaxattr explain`, and later `evaluate` and `bench`):
inputs in fixed-shape batches, per-file keys, resumable output directories, atomic writes.

* `OutputDir`: a directory of outputs and its summary (the settings the outputs depend on, and one
  record per input, in `summary.json` and `summary.csv`). A run into a directory written with other
  settings is refused; records of finished inputs are kept, so a re-run resumes.
* `run_batches`: loads inputs a batch at a time (an unreadable one is recorded and skipped),
  stacks them into one fixed shape, padding the last batch with copies of its last input and a
  `valid` mask marking the real rows, so the computation compiles once; hands each real row's
  result to `save`, and rewrites the summary after every batch.
* `file_keys`: one `jax.random` key per input from the seed and its output name, so a stochastic
  method gives an input the same noise, and so the same result up to rounding, in any batch,
  resumed or not.
* `output_names`: a unique, printable output name per input that fits the file system's name
  limit with any extension; `check_outputs_apart` keeps outputs from landing on inputs.

`pipeline` (`Prefetch` and `BackgroundWriter`) turns `run_batches` into a streaming pipeline (see below).

A batch's computation (one compiled XLA call, its compile on the first batch) can run for minutes
inside native code, where Python runs no signal handler; `run_batches` runs it on a daemon thread
(`call_interruptibly`), so Ctrl-C or SIGTERM stops the run at once: the batch is abandoned (a
resume recomputes it). A program that ends while such a call still runs must end with `os._exit`
(`computing_abandoned`; see `jaxattr.cli.entry`).

Every file is written atomically (`jaxattr.viz.write_atomically`): an interrupted run leaves
finished outputs and no half-written file (a killed one may leave hidden temporary files, which
the next run into the directory removes). The summary is merged into the one on disk under an
exclusive lock (`fcntl.flock` on the directory itself), so concurrent runs into one directory keep
each other's records. A failed write (no space left, a read-only file system) ends the run with
a RunError naming the file, after the records of the finished inputs are saved where possible.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import csv
import hashlib
import io
import json
import os
import queue
import stat
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, Mapping, NamedTuple, Sequence, TextIO, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxattr._files import display_path, read_json
from jaxattr.image import ImageLoadError
from jaxattr.viz import remove_stale_temporaries, write_atomically

try:
    import fcntl
except ImportError:  # not POSIX: summaries are written without a lock
    fcntl = None  # type: ignore[assignment]

SUMMARY_JSON = "summary.json"
SUMMARY_CSV = "summary.csv"
# Output names are at most this many bytes: with an extension or a suffix (".mask.npy") and the
# temporary name of an atomic write (".<name>.npy.<pid>.tmp") a file name stays within the
# 255 bytes of NAME_MAX on every common file system.
MAX_NAME_BYTES = 160
_HASH_CHARS = 12
SUMMARY_LIMIT = 1 << 28  # bytes of a summary.json read back: about a million records

Item = TypeVar("Item")
Result = TypeVar("Result")


class RunError(Exception):
    """A failure of the whole run that the user can fix (settings clash, unusable inputs)."""


def _digest(text: str | os.PathLike) -> str:
    return hashlib.sha256(os.fsencode(text)).hexdigest()[:_HASH_CHARS]


def _fit_name(name: str) -> str:
    """`name` made printable (undecodable bytes as \\xNN, control characters escaped) and at most
    MAX_NAME_BYTES long: a longer one keeps its start and ends in a hash of the whole name."""
    printable = display_path(name)
    if len(printable.encode()) <= MAX_NAME_BYTES:
        return printable
    head = printable.encode()[: MAX_NAME_BYTES - _HASH_CHARS - 1].decode("utf-8", "ignore")
    return f"{head}-{_digest(name)}"


def is_output_name(name: object) -> bool:
    """Whether `name` is one `output_names` could give: printable, within the name limit, without
    a path separator, not "." or "..", so that joined to an output directory it names a file
    inside it (a summary read back is untrusted input)."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(sep in name for sep in {"/", os.sep, os.altsep or "/"})
        and display_path(name) == name
        and len(name.encode()) <= MAX_NAME_BYTES
    )


def read_summary(path: Path) -> tuple[dict, dict[str, dict], list[str]]:
    """(settings, records by output name, what was rejected) of a summary.json, read as untrusted
    input: bounded in size and depth (`read_json`); a record is kept only if it is an object whose
    "output" is an output name and whose "file" and "status" are strings; each other one is
    described in the list. ValueError (OSError if unreadable) when the document is no summary."""
    data = read_json(path, SUMMARY_LIMIT)
    if not isinstance(data, dict) or not isinstance(data.get("settings"), dict) or not isinstance(data.get("images"), list):
        raise ValueError("not a summary: no settings and images")
    records, rejected = {}, []
    for i, record in enumerate(data["images"]):
        if not isinstance(record, dict):
            rejected.append(f"record {i} is not an object")
        elif not is_output_name(record.get("output")):
            rejected.append(f"record {i} has the output name {display_path(str(record.get('output')))[:80]!r}, not a plain file name")
        elif not isinstance(record.get("file"), str) or not isinstance(record.get("status"), str):
            rejected.append(f"record {i} ({record['output']}) has no file or status")
        else:
            records[record["output"]] = record
    return data["settings"], records, rejected


def output_names(paths: Sequence[Path]) -> dict[Path, str]:
    """A unique output name per input path: its stem, or, where stems clash, its path relative to
    the clashing files' common directory with '__' for separators (a/cat.jpg -> a__cat), keeping
    the extension only where that is the difference (cat.jpg, cat.png). Names are printable
    (undecodable bytes and control characters escaped) and at most MAX_NAME_BYTES long (a long
    one is cut and ends in a stable hash of the path); any clash left gets a hash suffix."""
    by_stem: dict[str, list[Path]] = collections.defaultdict(list)
    for path in paths:
        by_stem[path.stem].append(path)
    names = {}
    for stem, group in by_stem.items():
        if len(group) == 1:
            names[group[0]] = stem
            continue
        absolute = [Path(os.path.normpath(p.absolute())) for p in group]  # not resolved: a link loop cannot be
        root = Path(os.path.commonpath([a.parent for a in absolute]))
        relative = [a.relative_to(root) for a in absolute]
        candidates = ["__".join(r.with_suffix("").parts) for r in relative]
        if len(set(candidates)) < len(candidates):
            candidates = ["__".join(r.parts) for r in relative]
        names.update(zip(group, candidates, strict=True))
    fitted = {path: _fit_name(name) for path, name in names.items()}
    counts = collections.Counter(fitted.values())
    for path, name in fitted.items():  # escaping can make two names equal (a file named a\\xff and a\xff)
        if counts[name] > 1:
            fitted[path] = _fit_name(f"{names[path]}-{_digest(os.path.normpath(path.absolute()))}")
    if len(set(fitted.values())) != len(fitted):
        raise RunError("cannot give the inputs distinct output names; rename the clashing files")
    return {path: fitted[path] for path in paths}


def _mode(path: Path) -> int | None:
    """st_mode of `path` (links followed); None if it cannot be stat'ed (missing, a name too long,
    a link loop: whoever uses it reports why)."""
    try:
        return os.stat(path).st_mode
    except (OSError, ValueError):
        return None


def _is_dir(path: Path) -> bool:
    mode = _mode(path)
    return mode is not None and stat.S_ISDIR(mode)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs_apart(out: Path, inputs: Sequence[Path], *, recursive: bool) -> list[Path]:
    """Refuse (RunError) an output directory that is one of the input directories: outputs would be
    written among the inputs, and read as inputs by the next run. Returns the directories a scan
    must leave out: `out` when a recursive scan of an input directory would reach it."""
    excluded = []
    for item in inputs:
        if not _is_dir(item):
            continue
        if _same_file(item, out):
            raise RunError(
                f"the output directory {display_path(out)} is an input directory: outputs would be written "
                f"among the inputs; choose another output directory (one inside it works: {display_path(out / 'saliency')})"
            )
        if recursive and Path(os.path.realpath(out)).is_relative_to(os.path.realpath(item)):
            excluded.append(out)
    return excluded


def check_no_input_overwritten(out: Path, paths: Sequence[Path], outputs: Callable[[Path], Sequence[Path]]) -> None:
    """Refuse (RunError) a run whose outputs (`outputs(input)` and the summaries) would replace one
    of its inputs: an input file in the output directory named like an output."""
    if not _is_dir(out):
        return
    produced = {SUMMARY_JSON, SUMMARY_CSV}
    for path in paths:
        produced.update(p.name for p in outputs(path))
    for path in paths:
        if path.name in produced and _same_file(path.parent, out):
            raise RunError(
                f"{display_path(path)} would be overwritten by an output of the same name in {display_path(out)}; "
                "choose another output directory"
            )


def outputs_complete(paths: Sequence[Path]) -> bool:
    """Whether every output file exists and reads back: an .npy's header and size (a file cut short
    or corrupt does not count), a PNG's chunks (`PIL.Image.verify`); other files must exist."""
    from PIL import Image

    for path in paths:
        mode = _mode(path)
        if mode is None or not stat.S_ISREG(mode):
            return False
        try:
            if path.suffix == ".npy":
                np.load(path, mmap_mode="r", allow_pickle=False)
            elif path.suffix == ".png":
                with Image.open(path) as image:
                    image.verify()
        except Exception:  # numpy and Pillow raise many kinds for damaged files
            return False
    return True


def file_keys(seed: int, names: Sequence[str]) -> jax.Array:
    """One typed key per input, from the seed and the input's output name."""
    base = jax.random.key(seed)
    return jnp.stack([jax.random.fold_in(base, zlib.crc32(os.fsencode(name))) for name in names])


def stack_padded(rows: Sequence[Any], size: int) -> tuple[Any, np.ndarray]:
    """Stack `rows` (pytrees of arrays of equal shapes) into one batch of `size` rows, padded with
    copies of the last row; returns (batch, valid), valid[i] telling whether row i is real."""
    if not 0 < len(rows) <= size:
        raise ValueError(f"need 1 to {size} rows, got {len(rows)}")
    padded = list(rows) + [rows[-1]] * (size - len(rows))
    batch = jax.tree_util.tree_map(lambda *leaves: np.stack(leaves), *padded)
    return batch, np.arange(size) < len(rows)


class OutputDir:
    """An output directory with its summary; see the module docstring."""

    def __init__(
        self,
        path: Path,
        settings: Mapping[str, Any],
        fields: Sequence[str],
        *,
        finished: str,
        overwrite: bool = False,
        replace_summary: bool | None = None,
    ):
        """`fields`: the record fields, in CSV column order; `finished`: the status of a record whose
        input is done (earlier records with another status are dropped: their inputs are retried).
        `overwrite`: earlier records are ignored, and (unless `replace_summary` is False) the first
        summary written replaces the one on disk; False is for the other processes of a
        distributed run, whose first process replaces it before any of them writes.
        Nothing is created yet (`create`); an unusable path is a RunError now."""
        self.path = Path(path)
        # What the outputs depend on, as it reads back from JSON (tuples become lists).
        self.settings = json.loads(json.dumps(settings))
        self.fields = list(fields)
        self.finished = finished
        self._check_usable()
        earlier = {} if overwrite else self._earlier_records()
        self.records: dict[str, dict] = {n: r for n, r in earlier.items() if r.get("status") == finished}
        # A background writer records an input once its files are written (`run_batches`).
        self._records_lock = threading.Lock()
        self._replace_summary = overwrite if replace_summary is None else replace_summary  # on the first write
        self._warned_unlocked = False
        self._created = False

    def _check_usable(self) -> None:
        """The path, or the nearest ancestor that exists, is a directory we may write into."""
        where = display_path(self.path)
        existing = Path(os.path.abspath(self.path))
        while True:
            try:
                mode = os.stat(existing).st_mode
                break
            except (FileNotFoundError, NotADirectoryError):  # not there yet, or under a file
                if existing.parent == existing:
                    raise RunError(f"cannot create the output directory {where}") from None
                existing = existing.parent
            except OSError as e:  # a name too long, a link loop, no permission to look
                raise RunError(f"cannot use the output directory {where}: {e.strerror or e}") from None
        if not stat.S_ISDIR(mode):
            if existing == Path(os.path.abspath(self.path)):
                raise RunError(f"the output directory {where} is a file")
            raise RunError(f"cannot create the output directory {where}: {display_path(existing)} is a file")
        if not os.access(existing, os.W_OK | os.X_OK):
            reason = "read-only file system" if _read_only(existing) else "permission denied"
            raise RunError(f"cannot write into the output directory {where}: {reason}")

    def create(self) -> None:
        """Make the directory (and its parents), the first time clearing what a killed run left
        half-written (temporary files of atomic writes); RunError if that fails."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot create the output directory {display_path(self.path)}: {e.strerror or e}") from None
        if not self._created:
            remove_stale_temporaries(self.path)
            self._created = True

    def _read_summary(self) -> tuple[dict | None, dict[str, dict]]:
        """(settings, records) of the summary on disk; (None, {}) if there is none or it is unreadable."""
        path = self.path / SUMMARY_JSON
        mode = _mode(path)
        if mode is None or not stat.S_ISREG(mode):
            return None, {}
        try:
            settings, records, rejected = read_summary(path)
        except (OSError, ValueError) as e:
            print(f"jaxattr: warning: ignoring unreadable {display_path(path)} ({e})", file=sys.stderr)
            return None, {}
        if rejected:
            print(f"jaxattr: warning: {display_path(path)}: ignored {len(rejected)} damaged records ({rejected[0]})", file=sys.stderr)
        return settings, records

    def _settings_clash(self, settings: Mapping[str, Any]) -> RunError:
        changed = sorted(k for k in settings.keys() | self.settings.keys() if settings.get(k) != self.settings.get(k))
        return RunError(
            f"{display_path(self.path)} holds outputs of a run with other settings ({', '.join(changed)} differ); "
            "use another output directory, or --overwrite to replace them"
        )

    def _earlier_records(self) -> dict[str, dict]:
        """Records of earlier runs into this directory, which must have had the same settings."""
        settings, records = self._read_summary()
        if settings is not None and settings != self.settings:
            raise self._settings_clash(settings)
        return records

    def record(self, record: Mapping[str, Any]) -> None:
        with self._records_lock:
            self.records[record["output"]] = dict(record)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive access to the summary among the processes writing into this directory: a
        lock on the directory (no lock file to leave behind). Where the file system cannot lock
        (some network file systems), a warning, and the summary is merged unlocked."""
        if fcntl is None:
            yield
            return
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as e:
                if not self._warned_unlocked:
                    print(f"jaxattr: warning: cannot lock {display_path(self.path)} ({e.strerror}); "
                          "concurrent runs into it may lose summary records", file=sys.stderr)
                    self._warned_unlocked = True
            yield  # closing the descriptor releases the lock
        finally:
            os.close(fd)

    def write_summary(self) -> None:
        """Merge this run's records into the summary on disk (records of other runs into the
        directory are kept; this run's win for the same output) and rewrite it, under the lock.
        OSError if it cannot be written."""
        self.create()
        with self._locked():
            settings, on_disk = (None, {}) if self._replace_summary else self._read_summary()
            if settings is not None and settings != self.settings:
                raise self._settings_clash(settings)
            with self._records_lock:
                mine = dict(self.records)
            merged = {**{n: r for n, r in on_disk.items() if r.get("status") == self.finished}, **mine}
            records = [merged[name] for name in sorted(merged)]  # the same file whatever the timing
            # Undecodable bytes of file names stay \udcXX escapes in JSON (json.loads and os.fsencode
            # give the bytes back) and are written as the original bytes in the CSV.
            payload = json.dumps({"settings": self.settings, "images": records}, indent=2)
            write_atomically(self.path / SUMMARY_JSON, lambda f: f.write(payload.encode()))
            text = io.StringIO()
            writer = csv.DictWriter(text, fieldnames=self.fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(records)
            write_atomically(self.path / SUMMARY_CSV, lambda f: f.write(text.getvalue().encode("utf-8", "surrogateescape")))
        self._replace_summary = False


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def write_error(error: OSError, output: OutputDir) -> RunError:
    """A failed output write as one line naming the file and what the summary still holds."""
    where = display_path(error.filename) if error.filename else display_path(output.path)
    return RunError(
        f"cannot write {where}: {error.strerror or error}; the summary keeps the records of the images "
        "finished before, and running the same command again resumes"
    )


class Progress:
    """A progress bar on a terminal; a plain line per update otherwise (logs, pipes)."""

    def __init__(self, total: int, stream: TextIO = sys.stderr, width: int = 30):
        self.total, self.stream, self.width = total, stream, width
        self.done = 0
        self.start = time.monotonic()
        self.tty = stream.isatty()
        self._draw()

    def _line(self) -> str:
        filled = self.width * self.done // max(self.total, 1)
        elapsed = time.monotonic() - self.start
        eta = f"{elapsed / self.done * (self.total - self.done):.0f}s" if self.done else "?"
        bar = "#" * filled + "." * (self.width - filled)
        return f"[{bar}] {self.done}/{self.total} images, {elapsed:.0f}s elapsed, eta {eta}"

    def _draw(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + self._line() + ("\n" if self.done == self.total else ""))
        else:
            self.stream.write(self._line() + "\n")
        self.stream.flush()

    def advance(self, n: int) -> None:
        self.done += n
        self._draw()

    def note(self, message: str) -> None:
        """A message above the bar."""
        self.stream.write(("\r\033[K" if self.tty else "") + message + "\n")
        if self.tty:
            self._draw()
        self.stream.flush()


class Batch(Generic[Item]):
    """The real rows of one batch: their items and loaded inputs, and the padded, stacked inputs."""

    def __init__(self, items: list[Item], inputs: Any, valid: np.ndarray):
        self.items, self.inputs, self.valid = items, inputs, valid


# How often the waiting thread wakes: a signal delivered to another thread (any thread may get a
# process's SIGINT) sets a flag that the main thread only sees when it runs Python code.
_WAKE_SECONDS = 0.05


class _Call(threading.Thread):
    """function() on a daemon thread, its result or exception kept for the waiting thread. Daemon:
    the interpreter does not wait at exit for a call the waiting thread abandoned."""

    def __init__(self, function: Callable[[], Any]):
        super().__init__(name="jaxattr-compute", daemon=True)
        self._function = function
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self._function()
        except BaseException as e:  # raised again in the waiting thread
            self.error = e
        finally:
            self._function = None
            self.done.set()


def call_interruptibly(function: Callable[[], Result]) -> Result:
    """function() run on a daemon thread while this thread waits in short, interruptible waits: a
    signal handler of the main thread (Ctrl-C, `jaxattr.cli`'s SIGTERM) runs, and may raise, at
    once, even while `function` is inside one long native call (an XLA computation or compile),
    where Python would run no handler until the call returned. An exception raised in this thread
    abandons the call, which runs on (`computing_abandoned`). function()'s own exception is raised
    here unchanged. Thread-local JAX settings (`with jax.default_matmul_precision(...)`) of the
    calling thread do not reach `function`: it enters those it needs itself."""
    call = _Call(function)
    call.start()
    while not call.done.wait(_WAKE_SECONDS):
        pass
    call.join()  # the thread is ending: `computing_abandoned` sees only abandoned calls
    if call.error is not None:
        error, call.error = call.error, None
        raise error
    return call.result


def computing_abandoned() -> bool:
    """Whether a `call_interruptibly` call abandoned by its waiting thread still runs. Ending the
    interpreter normally while it is inside XLA aborts the process (C++ runtime torn down under a
    running computation): a program then ends with os._exit after flushing its output."""
    return any(isinstance(thread, _Call) and thread.is_alive() for thread in threading.enumerate())


def run_batches(
    todo: Sequence[Item],
    *,
    batch_size: int,
    load: Callable[[Item], Any],
    compute: Callable[[Batch[Item]], Sequence[Any]],
    save: Callable[[Item, Any, Any], Mapping[str, Any]],
    unreadable: Callable[[Item, ImageLoadError], Mapping[str, Any]],
    output: OutputDir,
    progress: Progress,
    after_writes: Callable[[Callable[[], Any]], None] | None = None,
    drain: Callable[[], None] | None = None,
) -> list[dict]:
    """Process `todo` in batches of `batch_size` (the last one padded); returns their records.

    load(item) -> inputs (a pytree of arrays; ImageLoadError: the item is recorded by
    `unreadable(item, error)` and skipped); compute(batch) -> one result per real row;
    save(item, inputs, result) -> the item's record, after writing its outputs or handing their
    writes to a writer; `after_writes(task)` runs the task once every write handed over so far is
    done (the writer's `submit`; default: at once), so an input enters the summary only when its
    files exist; `drain()` waits for every handed-over write (the writer's `close`), raising its
    failure. The summary is rewritten after every batch, so an interrupted run keeps the records
    of its finished inputs. `compute` runs on another thread (`call_interruptibly`): an interrupt
    stops the run during a batch, abandoning it; thread-local JAX settings of the caller do not
    reach `compute`."""
    after_writes = after_writes or write_now
    records = []
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            loaded = []
            for item in chunk:
                try:
                    loaded.append((item, load(item)))
                except ImageLoadError as e:
                    records.append(dict(unreadable(item, e)))
                    after_writes(functools.partial(output.record, records[-1]))  # in input order
                    progress.note(f"skipped unreadable {e}")
            if loaded:
                items = [item for item, _ in loaded]
                inputs, valid = stack_padded([inputs for _, inputs in loaded], batch_size)
                batch = Batch(items, inputs, valid)
                # Ready before it returns: an asynchronously dispatched result would otherwise be
                # waited for by `save`'s conversion to numpy, in this thread, uninterruptibly.
                results = call_interruptibly(lambda: jax.block_until_ready(compute(batch)))
                for (item, inputs), result in zip(loaded, results, strict=True):
                    records.append(dict(save(item, inputs, result)))
                    after_writes(functools.partial(output.record, records[-1]))
            # Behind the batch's files and records: the summary never lists an input whose files
            # are not written, and (as in the sequential path) lags them by one batch at most.
            after_writes(output.write_summary)
            progress.advance(len(chunk))
        if drain is not None:
            drain()
            output.write_summary()
    except OSError as e:
        _save_what_is_finished(output, drain)
        raise write_error(e, output) from None
    except BaseException:  # an interrupt or a failure: keep the records of what finished
        _save_what_is_finished(output, drain)
        raise
    return records


def _save_what_is_finished(output: OutputDir, drain: Callable[[], None] | None) -> None:
    if drain is not None:  # the writes handed over complete (and record their inputs) first
        try:
            drain()
        except Exception:  # a failed write: the inputs written before it keep their records
            pass
    try:
        output.write_summary()
    except (OSError, RunError):  # the disk is full, say: the summary on disk stays as it was
        pass

# ----------------------------------------------------------------- the streaming pipeline
#
# `run_batches` stays the one batch loop; the pipeline overlaps its three stages by wrapping its
# `load` and the file writes of its `save`, so the pipelined and the sequential run build the same
# batches and compute the same results:
#   * `Prefetch`: `load` of the next items on worker threads, in input order, at most `ahead`
#     items in flight or waiting (memory does not grow with the number of inputs);
#   * the current batch's compute on its own thread (`call_interruptibly`; XLA releases the GIL);
#   * `BackgroundWriter`: the previous batch's output files written on one thread, in order, with a
#     bounded queue.
# Threads rather than a data-loading library: decoding is Pillow plus numpy (both release the
# GIL), the order must be the input order, and no new dependency is needed (Grain, the JAX
# ecosystem's loader, adds TensorFlow-free but sizeable machinery for what a deque of futures does).


class Prefetch(Generic[Item]):
    """`load` of `items`, computed ahead on `workers` threads. Call the object with the items in
    the same order (as `run_batches` does); each call returns that item's result or raises its
    exception, and starts the next item's load."""

    def __init__(self, items: Sequence[Item], load: Callable[[Item], Any], *, workers: int, ahead: int):
        if workers < 1 or ahead < 1:
            raise ValueError(f"need workers >= 1 and ahead >= 1, got {workers}, {ahead}")
        self._load = load
        self._items = iter(items)
        self._pending: collections.deque[tuple[Item, concurrent.futures.Future]] = collections.deque()
        self._executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="jaxattr-load")
        for _ in range(ahead):
            self._submit_next()

    def _submit_next(self) -> None:
        item = next(self._items, _END)
        if item is not _END:
            self._pending.append((item, self._executor.submit(self._load, item)))

    def __call__(self, item: Item) -> Any:
        if not self._pending or self._pending[0][0] is not item:
            raise RuntimeError("Prefetch must be consumed in the order of its items")
        _, future = self._pending.popleft()
        self._submit_next()
        return future.result()

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "Prefetch[Item]":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


_END = object()


class BackgroundWriter:
    """Runs write tasks (callables) on one thread, in submission order, with at most `depth`
    waiting: `submit` blocks when the queue is full. The first failure is raised by the next
    `submit` or by `close`, which waits for every task (later tasks are dropped after a failure)."""

    def __init__(self, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="jaxattr-write", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (task := self._queue.get()) is not None:
            if self._error is None:
                try:
                    task()
                except BaseException as e:  # handed to the main thread by submit/close
                    self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, task: Callable[[], Any]) -> None:
        self._raise()
        self._queue.put(task)

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise()

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def write_now(task: Callable[[], Any]) -> None:
    """The sequential path's writer: the task runs at once."""
    task()


class Stages(NamedTuple):
    """What `run_batches` takes from the pipeline: `load` (its `load`), `write` (its `after_writes`,
    and what `save` hands its file writes to), `drain` (its `drain`)."""

    load: Callable[[Any], Any]
    write: Callable[[Callable[[], Any]], None]
    drain: Callable[[], None] | None


@contextlib.contextmanager
def pipeline(
    todo: Sequence[Item], load: Callable[[Item], Any], *, loaders: int, batch_size: int, writes_per_item: int = 1
) -> Iterator[Stages]:
    """The stages of a run over `todo` in batches of `batch_size`: with `loaders` threads, `load`
    runs two batches ahead (`Prefetch`) and up to two batches of writes (`writes_per_item` tasks
    per input) wait behind (`BackgroundWriter`); with 0, each stage in turn. Both build the same
    batches and write the same files."""
    if not loaders:
        yield Stages(load, write_now, None)
        return
    with Prefetch(todo, load, workers=loaders, ahead=2 * batch_size) as prefetched, BackgroundWriter(
        depth=2 * batch_size * writes_per_item
    ) as writer:
        yield Stages(prefetched, writer.submit, writer.close)


def read_path_list(path: Path, report: Callable[[str], None]) -> list[Path]:
    """The paths listed in the text file `path`, one per line (blank lines and lines starting with
    '#' ignored; relative paths are relative to the current directory, as on the command line).
    Paths that do not exist are reported (one line each) and left out."""
    listed, missing = [], 0
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            name = line.rstrip("\r\n")
            if not name.strip() or name.lstrip().startswith("#"):
                continue
            if os.path.lexists(name):
                listed.append(Path(name))
            else:
                missing += 1
                report(f"{path}: no such file: {name!r}; skipped")
    if missing:
        report(f"{path}: {missing} listed path{'' if missing == 1 else 's'} missing, skipped")
    return listed


class TqdmProgress:
    """`Progress` through tqdm (images/s and ETA); silent unless `stream` is a terminal, except for
    notes."""

    def __init__(self, total: int, stream: TextIO = sys.stderr):
        import tqdm  # an optional nicety: `make_progress` falls back to Progress without it

        self.stream = stream
        self.bar = tqdm.tqdm(total=total, unit="img", file=stream, disable=not stream.isatty(), dynamic_ncols=True)

    def advance(self, n: int) -> None:
        self.bar.update(n)
        if self.bar.n >= self.bar.total:
            self.bar.close()

    def note(self, message: str) -> None:
        if self.bar.disable:
            self.stream.write(message + "\n")
            self.stream.flush()
        else:
            self.bar.write(message, file=self.stream)


def make_progress(total: int, stream: TextIO = sys.stderr) -> "TqdmProgress | Progress":
    """tqdm's bar when tqdm is installed, else the plain `Progress`."""
    try:
        return TqdmProgress(total, stream)
    except ImportError:
        return Progress(total, stream)
