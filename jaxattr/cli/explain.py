"""`jaxattr explain`: saliency maps of image files, resumable, one record per image."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import functools
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxattr import viz
from jaxattr.cli._common import (
    CliError,
    add_config_options,
    config_error,
    config_overrides,
    format_table,
    lookup_model,
    positive_int,
)
from jaxattr.compilation import CompileClock, enable_compile_cache
from jaxattr.config import ConfigError
from jaxattr.data import imagenet_labels
from jaxattr.explanation import explain
from jaxattr.image import ImageLoadError, expand_paths, load_image
from jaxattr.methods import Method, list_methods, method_spec
from jaxattr.models import create_model
from jaxattr.models.registry import jaxattr_home
from jaxattr.run import (
    BackgroundWriter,
    Batch,
    OutputDir,
    Prefetch,
    RunError,
    file_keys,
    make_progress,
    output_names,
    read_path_list,
    run_batches,
    write_now,
)

DEFAULT_MODEL = "efficientnet_lite0"
DEFAULT_METHOD = "integrated_gradients"
EXPLAINED = "explained"
FAILED = ("unreadable", "non-finite")


@dataclasses.dataclass
class ImageRecord:
    """One line of the summary."""

    file: str
    output: str  # file name stem of <output>.png / <output>.npy
    status: str  # "explained", "exists" (outputs found, no record of them), "unreadable", "non-finite"
    class_index: int | None = None  # the explained class: the prediction, or --target
    label: str = ""
    probability: float | None = None
    message: str = ""
    classes: str = ""  # --top-k: the explained classes, most probable first, space-separated


RECORD_FIELDS = [f.name for f in dataclasses.fields(ImageRecord)]


def add_parser(commands, method: str | None) -> None:
    ex = commands.add_parser(
        "explain",
        help="write saliency maps of image files",
        allow_abbrev=False,
        description="Explain each image's predicted (or --target) class. Writes <name>.png (overlay) and "
        "<name>.npy (raw attribution) per image, and summary.json / summary.csv, into --out. Images "
        "whose outputs exist are skipped unless --overwrite, so an interrupted run resumes.",
    )
    ex.add_argument("inputs", nargs="*", metavar="IMAGES_OR_DIRS", help="image files and/or directories of images")
    ex.add_argument(
        "--list",
        type=Path,
        metavar="FILE",
        help="also explain the image files listed in FILE, one path per line (missing ones are reported and skipped)",
    )
    ex.add_argument("--model", default=DEFAULT_MODEL, help=f"registered model (see `jaxattr models`; default {DEFAULT_MODEL})")
    ex.add_argument("--method", default=DEFAULT_METHOD, choices=list_methods(), help=f"default {DEFAULT_METHOD}")
    ex.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    ex.add_argument("--weights", metavar="FILE", help="weights file (jaxattr or torch); default: pretrained")
    ex.add_argument("--batch-size", type=positive_int, default=8, metavar="N", help="images per batch (default 8)")
    ex.add_argument(
        "--target", metavar="CLASS", help="explain this class (index or ImageNet name) instead of the prediction"
    )
    ex.add_argument("--seed", type=int, default=0, metavar="N", help="random seed of stochastic methods (default 0)")
    ex.add_argument("--overwrite", action="store_true", help="recompute images whose outputs exist")
    ex.add_argument("--panel", action="store_true", help="write image | heatmap | overlay side by side")
    ex.add_argument(
        "--alpha",
        type=float,
        default=viz.OVERLAY_ALPHA,
        help=f"opacity of the hottest pixels in the overlay (default {viz.OVERLAY_ALPHA})",
    )
    ex.add_argument("--recursive", action="store_true", help="also take images in subdirectories")
    add_throughput_options(ex)
    if method is not None:
        add_config_options(ex, method)
    ex.set_defaults(run=run, parser=ex)


def outputs(out: Path, name: str) -> tuple[Path, Path]:
    return out / f"{name}.png", out / f"{name}.npy"


def class_outputs(out: Path, name: str, cls: int) -> tuple[Path, Path]:
    """--top-k: one overlay and one attribution per explained class, the class in the name."""
    return outputs(out, f"{name}.class{cls}")


def add_throughput_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--top-k",
        type=positive_int,
        metavar="K",
        help="explain each image's K most probable classes in one program; writes <name>.class<C>.png/.npy per class",
    )
    parser.add_argument(
        "--loaders",
        type=int,
        default=min(4, os.cpu_count() or 1),
        metavar="N",
        help="threads decoding the next batches while one computes (0: decode, compute and write in turn; "
        "default min(4, CPUs))",
    )
    parser.add_argument(
        "--compile-cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep compiled programs in $JAXATTR_HOME/compile so the next run skips compiling (default: on)",
    )


def input_paths(args: argparse.Namespace) -> list[Path]:
    """The positional inputs (directories expanded) followed by the --list file's paths."""
    if not args.inputs and args.list is None:
        raise CliError("give image files, directories or --list FILE")
    try:
        paths = expand_paths(args.inputs, recursive=args.recursive) if args.inputs else []
    except FileNotFoundError as e:
        raise CliError(str(e)) from None
    if args.list is not None:
        try:
            listed = read_path_list(args.list, lambda line: print(f"jaxattr: warning: {line}", file=sys.stderr))
        except (OSError, UnicodeDecodeError) as e:
            raise CliError(f"cannot read --list {args.list}: {getattr(e, 'strerror', None) or e}") from None
        seen = {p.resolve() for p in paths}  # a file named twice is explained once
        for path in listed:
            if path.resolve() not in seen:
                seen.add(path.resolve())
                paths.append(path)
    return paths


def finished(args: argparse.Namespace, output: OutputDir, name: str) -> bool:
    """Whether an image's outputs exist: its two files, or with --top-k the files of every class
    its finished record lists."""
    if not args.top_k:
        return all(p.is_file() for p in outputs(args.out, name))
    record = output.records.get(name)
    if record is None or not record.get("classes"):
        return False
    return all(p.is_file() for c in record["classes"].split() for p in class_outputs(args.out, name, int(c)))


def parse_target(text: str | None) -> int | None:
    """A class index, or an ImageNet class name: an exact (case-sensitive) name first, then a
    case-insensitive one if it is unique ('cardigan' is class 474, 'Cardigan' the dog 264)."""
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    labels = imagenet_labels()
    if text in labels:
        return labels.index(text)
    folded = [i for i, label in enumerate(labels) if label.lower() == text.lower()]
    if len(folded) == 1:
        return folded[0]
    if folded:
        candidates = ", ".join(f"{labels[i]!r} ({i})" for i in folded)
        raise CliError(f"--target {text!r} is ambiguous: {candidates}; give the exact name or the index")
    close = difflib.get_close_matches(text.lower(), [label.lower() for label in labels], n=5)
    hint = f"; did you mean: {', '.join(close)}?" if close else ""
    raise CliError(f"--target {text!r} is neither a class index nor an ImageNet class name{hint}")


def class_label(index: int, num_classes: int) -> str:
    return imagenet_labels()[index] if num_classes == len(imagenet_labels()) else f"class {index}"


def settings(args: argparse.Namespace, method: Method, target: int | None) -> dict:
    """What the outputs depend on; a resumed run must match the run that wrote them."""
    values = {
        "model": args.model,
        "weights": str(Path(args.weights).resolve()) if args.weights else "pretrained",
        "method": args.method,
        "config": method.config.to_dict(),
        "target": target,
        "panel": args.panel,
        "alpha": args.alpha,
    }
    if args.top_k:
        values["top_k"] = args.top_k
    if method.spec.stochastic:
        values["seed"] = args.seed
    return values


def explain_batch(model, method: Method, batch: Batch, keys, target, top_k: int | None = None) -> list[tuple]:
    """(attribution, saliency map, class, probability) per real row of the batch, as numpy; with
    `top_k`, each with a leading class axis of size K."""
    result = explain(model, jnp.asarray(batch.inputs), method, targets=target, top_k=top_k, key=keys)
    n = len(batch.items)
    return list(
        zip(
            np.asarray(result.attributions[:n]),
            np.asarray(result.maps[:n]),
            np.asarray(result.targets[:n]),
            np.asarray(result.probabilities[:n]),
        )
    )


def _table_row(record: dict) -> tuple[str, ...]:
    cls, probability = record["class_index"], record["probability"]
    return (
        record["file"],
        "" if cls is None else str(cls),
        record["label"],
        "" if probability is None else f"{probability:.4f}",
        record["status"] + (f": {record['message']}" if record["message"] else ""),
    )


def run(args: argparse.Namespace) -> int:
    lookup_model(args.model)  # an unknown name fails before any work
    try:
        method = method_spec(args.method).build(**config_overrides(args))
    except ConfigError as e:
        raise config_error(e) from None
    target = parse_target(args.target)
    if not 0.0 <= args.alpha <= 1.0:
        raise CliError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.top_k and target is not None:
        raise CliError("--top-k and --target exclude each other")
    if args.loaders < 0:
        raise CliError(f"--loaders must be 0 or more, got {args.loaders}")
    if args.compile_cache:  # before anything compiles: JAX decides once per process
        enable_compile_cache(jaxattr_home() / "compile")
    paths = input_paths(args)
    if not paths:
        raise CliError(f"no image files in {', '.join(map(str, args.inputs + ([args.list] if args.list else [])))}")
    try:
        names = output_names(paths)
        output = OutputDir(args.out, settings(args, method, target), RECORD_FIELDS, finished=EXPLAINED, overwrite=args.overwrite)
    except RunError as e:
        raise CliError(str(e)) from None

    records, todo = {}, []
    for path in paths:
        name = names[path]
        if not args.overwrite and finished(args, output, name):
            records[name] = output.records.get(name) or dataclasses.asdict(ImageRecord(str(path), name, "exists"))
            output.record(records[name])
        else:
            todo.append(path)
    if records:
        print(f"{len(records)} of {len(paths)} images already have outputs in {args.out}; skipping them", file=sys.stderr)
    if todo:
        for record in _explain_files(todo, names, args, method, target, output):
            records[record["output"]] = record

    ordered = [records[names[path]] for path in paths]
    print(format_table(("file", "class", "label", "probability", "status"), [_table_row(r) for r in ordered]))
    failed = sum(r["status"] in FAILED for r in ordered)
    print(
        f"{len(todo) - failed} explained, {len(paths) - len(todo)} already done, {failed} failed; "
        f"outputs and summary.json / summary.csv in {args.out}",
        file=sys.stderr,
    )
    return 1 if failed else 0


def _explain_files(
    todo: list[Path], names: dict[Path, str], args: argparse.Namespace, method: Method, target: int | None, output: OutputDir
) -> list[dict]:
    info = lookup_model(args.model)
    model = create_model(args.model, weights=args.weights or "pretrained")
    shape = jax.ShapeDtypeStruct((1, info.image_size, info.image_size, 3), jnp.float32)
    num_classes = jax.eval_shape(model, shape).shape[-1]
    if target is not None and not 0 <= target < num_classes:
        raise CliError(f"--target {target} is out of range: {args.model} has {num_classes} classes")
    if args.top_k and args.top_k > num_classes:
        raise CliError(f"--top-k {args.top_k} is more than the {num_classes} classes of {args.model}")
    args.out.mkdir(parents=True, exist_ok=True)
    batch_size = min(args.batch_size, len(todo))
    progress = make_progress(len(todo), sys.stderr)
    spec = method.spec

    def compute(batch: Batch[Path]) -> list[tuple]:
        keys = None
        if spec.stochastic:  # padded rows repeat the last real row's key
            keys = file_keys(args.seed, [names[p] for p in batch.items])
            keys = jnp.concatenate([keys, jnp.repeat(keys[-1:], batch_size - len(batch.items))])
        return explain_batch(model, method, batch, keys, target, args.top_k)

    def write_files(png: Path, npy: Path, image: np.ndarray, attribution: np.ndarray, saliency_map: np.ndarray) -> None:
        # Each file is atomic; an image only counts as done once both exist.
        viz.write_atomically(npy, lambda f: np.save(f, attribution))
        heat = viz.contrast(saliency_map, spec.contrast)
        picture = viz.panel(image, heat, args.alpha) if args.panel else viz.overlay(image, heat, args.alpha)
        viz.save_png(png, picture)

    def save(path: Path, image: np.ndarray, result: tuple) -> dict:
        attribution, saliency_map, classes, probabilities = result
        name = names[path]
        classes = np.atleast_1d(classes)  # (K,) with --top-k, else one class
        cls = int(classes[0])
        record = ImageRecord(
            str(path), name, EXPLAINED, cls, class_label(cls, num_classes), float(np.atleast_1d(probabilities)[0])
        )
        if np.isfinite(attribution).all() and np.isfinite(saliency_map).all():
            if args.top_k:
                record.classes = " ".join(str(int(c)) for c in classes)
                for c, a, m in zip(classes, attribution, saliency_map, strict=True):
                    write(functools.partial(write_files, *class_outputs(args.out, name, int(c)), image, a, m))
            else:
                write(functools.partial(write_files, *outputs(args.out, name), image, attribution, saliency_map))
        else:
            record.status, record.message = "non-finite", "NaN or inf in the attribution; outputs not written"
            progress.note(f"skipped {path}: {record.message}")
        return dataclasses.asdict(record)

    def unreadable(path: Path, error: ImageLoadError) -> dict:
        return dataclasses.asdict(ImageRecord(str(path), names[path], "unreadable", message=error.reason))

    load = lambda path: load_image(path, info)
    with contextlib.ExitStack() as stages, CompileClock() as clock:
        if args.loaders:  # the pipeline: see jaxattr.run; the same batches as the sequential path
            load = stages.enter_context(Prefetch(todo, load, workers=args.loaders, ahead=2 * batch_size))
            write = stages.enter_context(BackgroundWriter(depth=2 * batch_size * (args.top_k or 1))).submit
        else:
            write = write_now
        start = time.monotonic()
        records = run_batches(
            todo,
            batch_size=batch_size,
            load=load,
            compute=compute,
            save=save,
            unreadable=unreadable,
            output=output,
            progress=progress,
        )
        stages.close()  # the last outputs are written before the summary that lists them is final
    output.write_summary()
    elapsed = time.monotonic() - start
    print(
        f"{len(todo)} images in {elapsed:.1f}s ({len(todo) / elapsed:.2f} images/s), "
        f"compile {clock.seconds:.2f}s{'' if args.compile_cache else ' (compile cache off)'}",
        file=sys.stderr,
    )
    return records
