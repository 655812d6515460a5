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

Every file is written atomically (`jaxattr.viz.write_atomically`): an interrupted run leaves
finished outputs and no half-written file.
"""

from __future__ import annotations

import collections
import csv
import io
import json
import os
import sys
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

