"""`jaxattr explain`: saliency maps of image files, resumable, one record per image."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
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
from jaxattr.config import ConfigError
from jaxattr.data import imagenet_labels
from jaxattr.explanation import explain
from jaxattr.image import ImageLoadError, expand_paths, load_image
from jaxattr.methods import Method, list_methods, method_spec
from jaxattr.models import create_model
from jaxattr.run import Batch, OutputDir, Progress, RunError, file_keys, output_names, run_batches

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
    ex.add_argument("inputs", nargs="+", metavar="IMAGES_OR_DIRS", help="image files and/or directories of images")
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
    if method is not None:
        add_config_options(ex, method)
    ex.set_defaults(run=run, parser=ex)


def outputs(out: Path, name: str) -> tuple[Path, Path]:
    return out / f"{name}.png", out / f"{name}.npy"


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
    if method.spec.stochastic:
        values["seed"] = args.seed
    return values


def explain_batch(model, method: Method, batch: Batch, keys, target) -> list[tuple]:
    """(attribution, saliency map, class, probability) per real row of the batch, as numpy."""
    result = explain(model, jnp.asarray(batch.inputs), method, targets=target, key=keys)
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
    try:
        paths = expand_paths(args.inputs, recursive=args.recursive)
    except FileNotFoundError as e:
        raise CliError(str(e)) from None
    if not paths:
        raise CliError(f"no image files in {', '.join(args.inputs)}")
    try:
        names = output_names(paths)
        output = OutputDir(args.out, settings(args, method, target), RECORD_FIELDS, finished=EXPLAINED, overwrite=args.overwrite)
    except RunError as e:
        raise CliError(str(e)) from None

    records, todo = {}, []
    for path in paths:
        name = names[path]
        if not args.overwrite and all(p.is_file() for p in outputs(args.out, name)):
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
    args.out.mkdir(parents=True, exist_ok=True)
    batch_size = min(args.batch_size, len(todo))
    progress = Progress(len(todo), sys.stderr)
    spec = method.spec

    def compute(batch: Batch[Path]) -> list[tuple]:
        keys = None
        if spec.stochastic:  # padded rows repeat the last real row's key
            keys = file_keys(args.seed, [names[p] for p in batch.items])
            keys = jnp.concatenate([keys, jnp.repeat(keys[-1:], batch_size - len(batch.items))])
        return explain_batch(model, method, batch, keys, target)

    def save(path: Path, image: np.ndarray, result: tuple) -> dict:
        attribution, saliency_map, cls, probability = result
        name, cls = names[path], int(cls)
        record = ImageRecord(str(path), name, EXPLAINED, cls, class_label(cls, num_classes), float(probability))
        if np.isfinite(attribution).all() and np.isfinite(saliency_map).all():
            heat = viz.contrast(saliency_map, spec.contrast)
            png, npy = outputs(args.out, name)
            # Each file is atomic; an image only counts as done once both exist.
            viz.write_atomically(npy, lambda f: np.save(f, attribution))
            picture = viz.panel(image, heat, args.alpha) if args.panel else viz.overlay(image, heat, args.alpha)
            viz.save_png(png, picture)
        else:
            record.status, record.message = "non-finite", "NaN or inf in the attribution; outputs not written"
            progress.note(f"skipped {path}: {record.message}")
        return dataclasses.asdict(record)

    def unreadable(path: Path, error: ImageLoadError) -> dict:
        return dataclasses.asdict(ImageRecord(str(path), names[path], "unreadable", message=error.reason))

    return run_batches(
        todo,
        batch_size=batch_size,
        load=lambda path: load_image(path, info),
        compute=compute,
        save=save,
        unreadable=unreadable,
        output=output,
        progress=progress,
    )
