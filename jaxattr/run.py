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
  method gives an input the same result in any batch, resumed or not.

`Prefetch` and `BackgroundWriter` turn `run_batches` into a streaming pipeline (see below).

Every file is written atomically (`jaxattr.viz.write_atomically`): an interrupted run leaves
finished outputs and no half-written file.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import io
import json
import os
import queue
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Generic, Mapping, Sequence, TextIO, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxattr.image import ImageLoadError
from jaxattr.viz import write_atomically

SUMMARY_JSON = "summary.json"
SUMMARY_CSV = "summary.csv"

Item = TypeVar("Item")


class RunError(Exception):
    """A failure of the whole run that the user can fix (settings clash, unusable inputs)."""


def output_names(paths: Sequence[Path]) -> dict[Path, str]:
    """A unique output name per input path: its stem, or, where stems clash, its path relative to
    the clashing files' common directory with '__' for separators (a/cat.jpg -> a__cat), keeping
    the extension only where that is the difference (cat.jpg, cat.png)."""
    by_stem: dict[str, list[Path]] = collections.defaultdict(list)
    for path in paths:
        by_stem[path.stem].append(path)
    names = {}
    for stem, group in by_stem.items():
        if len(group) == 1:
            names[group[0]] = stem
            continue
        resolved = [p.resolve() for p in group]
        root = Path(os.path.commonpath([r.parent for r in resolved]))
        relative = [r.relative_to(root) for r in resolved]
        candidates = ["__".join(r.with_suffix("").parts) for r in relative]
        if len(set(candidates)) < len(candidates):
            candidates = ["__".join(r.parts) for r in relative]
        names.update(zip(group, candidates, strict=True))
    if len(set(names.values())) != len(names):
        raise RunError("cannot give the inputs distinct output names; rename the clashing files")
    return {path: names[path] for path in paths}


def file_keys(seed: int, names: Sequence[str]) -> jax.Array:
    """One typed key per input, from the seed and the input's output name."""
    base = jax.random.key(seed)
    return jnp.stack([jax.random.fold_in(base, zlib.crc32(name.encode())) for name in names])


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
    ):
        """`fields`: the record fields, in CSV column order; `finished`: the status of a record whose
        input is done (earlier records with another status are dropped: their inputs are retried)."""
        self.path = Path(path)
        # What the outputs depend on, as it reads back from JSON (tuples become lists).
        self.settings = json.loads(json.dumps(settings))
        self.fields = list(fields)
        earlier = {} if overwrite else self._earlier_records()
        self.records: dict[str, dict] = {n: r for n, r in earlier.items() if r.get("status") == finished}

    def _earlier_records(self) -> dict[str, dict]:
        """Records of earlier runs into this directory, which must have had the same settings."""
        path = self.path / SUMMARY_JSON
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text())
            settings, records = data["settings"], {r["output"]: r for r in data["images"]}
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"jaxattr: warning: ignoring unreadable {path} ({e})", file=sys.stderr)
            return {}
        if settings != self.settings:
            changed = sorted(k for k in settings.keys() | self.settings.keys() if settings.get(k) != self.settings.get(k))
            raise RunError(
                f"{self.path} holds outputs of a run with other settings ({', '.join(changed)} differ); "
                "use another --out, or --overwrite to replace them"
            )
        return records

    def record(self, record: Mapping[str, Any]) -> None:
        self.records[record["output"]] = dict(record)

    def write_summary(self) -> None:
        records = list(self.records.values())
        payload = json.dumps({"settings": self.settings, "images": records}, indent=2)
        write_atomically(self.path / SUMMARY_JSON, lambda f: f.write(payload.encode()))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=self.fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
        write_atomically(self.path / SUMMARY_CSV, lambda f: f.write(text.getvalue().encode()))


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
) -> list[dict]:
    """Process `todo` in batches of `batch_size` (the last one padded); returns their records.

    load(item) -> inputs (a pytree of arrays; ImageLoadError: the item is recorded by
    `unreadable(item, error)` and skipped); compute(batch) -> one result per real row;
    save(item, inputs, result) -> the item's record, after writing its outputs. The summary is rewritten
    after every batch, so an interrupted run keeps the records of its finished inputs."""
    records = []
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        loaded = []
        for item in chunk:
            try:
                loaded.append((item, load(item)))
            except ImageLoadError as e:
                records.append(dict(unreadable(item, e)))
                output.record(records[-1])
                progress.note(f"skipped unreadable {e}")
        if loaded:
            items = [item for item, _ in loaded]
            inputs, valid = stack_padded([inputs for _, inputs in loaded], batch_size)
            results = compute(Batch(items, inputs, valid))
            for (item, inputs), result in zip(loaded, results, strict=True):
                records.append(dict(save(item, inputs, result)))
                output.record(records[-1])
        output.write_summary()
        progress.advance(len(chunk))
    return records



# ----------------------------------------------------------------- the streaming pipeline
#
# `run_batches` stays the one batch loop; the pipeline overlaps its three stages by wrapping its
# `load` and the file writes of its `save`, so the pipelined and the sequential run build the same
# batches and compute the same results:
#   * `Prefetch`: `load` of the next items on worker threads, in input order, at most `ahead`
#     items in flight or waiting (memory does not grow with the number of inputs);
#   * the current batch's compute on the calling thread (XLA releases the GIL);
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
