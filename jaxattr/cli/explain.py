"""`jaxattr explain`: saliency maps of image files, resumable, one record per image."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxattr import distributed, viz
from jaxattr._files import display_path
from jaxattr.cli._common import (
    CliError,
    add_config_options,
    add_dtype_option,
    add_loaders_option,
    add_preprocessing_options,
    config_error,
    config_flags,
    config_overrides,
    fit_memory,
    format_table,
    fraction,
    host_port,
    in_compute_dtype,
    loaders,
    lookup_model,
    output_dir,
    open_compile_store,
    positive_int,
    preprocessing,
    seconds,
    seed,
)
from jaxattr.compilation import (
    CompileClock,
    ProgramStore,
    compile_program,
    tree_signature,
)
from jaxattr.config import ConfigError
from jaxattr.data import imagenet_labels
from jaxattr.explanation import explain
from jaxattr.image import ImageLoadError, Preprocessing, expand_paths, load_image
from jaxattr.methods import Method, list_methods, method_spec
from jaxattr.models import create_model
from jaxattr.run import (
    Batch,
    OutputDir,
    RunError,
    call_interruptibly,
    check_no_input_overwritten,
    check_outputs_apart,
    file_keys,
    make_progress,
    output_names,
    outputs_complete,
    pipeline,
    read_path_list,
    run_batches,
)
from jaxattr.sharding import BATCH_AXIS, batch_mesh, pad_batch

DEFAULT_MODEL = "efficientnet_lite0"
DEFAULT_METHOD = "integrated_gradients"
EXPLAINED = "explained"
FAILED = ("unreadable", "non-finite")


@dataclasses.dataclass
class ImageRecord:
    """One line of the summary."""

    file: str
    output: str  # file name stem of <output>.png / <output>.npy
    # "explained", "exists" (outputs found, no record of them), "unreadable" (also what a directory
    # scan could not use: a FIFO, an unreadable directory), "non-finite"
    status: str
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
        "<name>.npy (raw attribution) per image, and summary.json / summary.csv, into --out; methods "
        "with other outputs add <name>.<output>.npy (I-GOS: the low-resolution masks). Images "
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
    ex.add_argument("--out", required=True, type=output_dir, metavar="DIR", help="output directory")
    ex.add_argument("--weights", metavar="FILE", help="weights file (jaxattr or torch); default: pretrained")
    ex.add_argument(
        "--batch-size", type=positive_int, default=8, metavar="N", help="images per batch (default 8)"
    )
    ex.add_argument(
        "--target", metavar="CLASS", help="explain this class (index or ImageNet name) instead of the prediction"
    )
    ex.add_argument(
        "--seed", type=seed, default=0, metavar="N", help="random seed of stochastic methods and random baselines (default 0)"
    )
    ex.add_argument("--overwrite", action="store_true", help="recompute images whose outputs exist")
    ex.add_argument("--panel", action="store_true", help="write image | heatmap | overlay side by side")
    ex.add_argument(
        "--alpha",
        type=fraction,
        default=viz.OVERLAY_ALPHA,
        metavar="A",
        help=f"opacity of the hottest pixels in the overlay (default {viz.OVERLAY_ALPHA})",
    )
    ex.add_argument("--recursive", action="store_true", help="also take images in subdirectories")
    add_preprocessing_options(ex)
    add_throughput_options(ex)
    if method is not None:
        add_config_options(ex, method)
        add_method_options(ex, method)
    ex.set_defaults(run=run, parser=ex)


EXTRA_DEST = "extra:"  # argparse dest prefix of the method's extra-output switches


def add_method_options(parser: argparse.ArgumentParser, method: str) -> None:
    """What `method` takes besides its config (reference images) and the extra pictures it can
    write (`MethodSpec.extra_outputs`)."""
    spec = method_spec(method)
    if not (spec.takes_references or spec.extra_outputs):
        return
    group = parser.add_argument_group(f"inputs and outputs of {method}")
    if spec.takes_references:
        group.add_argument(
            "--references",
            nargs="+",
            metavar="IMAGES_OR_DIRS",
            help="reference images (files and/or directories; --recursive applies), preprocessed like the "
            "inputs with the model's eval transform; the method's options say which each image uses",
        )
    for extra in spec.extra_outputs:
        group.add_argument("--" + extra.flag, dest=EXTRA_DEST + extra.flag, action="store_true", help=extra.help)


def method_flags(method: str) -> list[str]:
    """Every option of `explain` that belongs to `method`: its config's and the ones above."""
    spec = method_spec(method)
    extras = ["--" + extra.flag for extra in spec.extra_outputs]
    return [*config_flags(method), *(["--references"] if spec.takes_references else []), *extras]


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
    add_loaders_option(parser)
    parser.add_argument(
        "--compile-cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep compiled programs in $JAXATTR_HOME/compile so the next run skips compiling (default: on)",
    )
    add_dtype_option(parser)
    add_distributed_options(parser)


def add_distributed_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "several hosts (jax.distributed; see jaxattr.distributed and the README)",
        "Start the same command once per host: each process explains its share of the inputs on all "
        "its local devices, into the shared --out. Values left out are read from the environment "
        "(Cloud TPU pods, SLURM, Open MPI, Kubernetes).",
    )
    group.add_argument("--distributed", action="store_true", help="run as one process of a multi-process job")
    group.add_argument("--coordinator", type=host_port, metavar="HOST:PORT", help="address of process 0's coordinator")
    group.add_argument("--num-processes", type=positive_int, metavar="N", help="number of processes")
    group.add_argument("--process-id", type=int, metavar="K", help="this process's index, 0 to N-1")
    group.add_argument(
        "--coordinator-timeout",
        type=seconds,
        default=300,
        metavar="S",
        help="seconds to wait for every process to connect (default 300)",
    )


def start_distributed(args: argparse.Namespace) -> tuple[int, int]:
    """(process index, process count): (0, 1) without --distributed."""
    given = [flag for flag in ("coordinator", "num_processes", "process_id") if getattr(args, flag) is not None]
    if not args.distributed:
        if given:
            raise CliError(f"--{given[0].replace('_', '-')} needs --distributed", status=2)
        return 0, 1
    try:
        return distributed.initialize(
            args.coordinator, args.num_processes, args.process_id, timeout=args.coordinator_timeout, on_timeout=_exit_with
        )
    except distributed.DistributedError as e:
        raise CliError(str(e)) from None


def _exit_with(message: str) -> None:
    """The main thread is blocked inside JAX's runtime, which would abort the process: one line, exit 1."""
    print(f"jaxattr: error: {message}", file=sys.stderr, flush=True)
    os._exit(1)


def listed_paths(args: argparse.Namespace, paths: list[Path]) -> list[Path]:
    """The --list file's paths not already in `paths` (a file named twice is explained once)."""
    if args.list is None:
        return []
    try:
        listed = read_path_list(args.list, lambda line: print(f"jaxattr: warning: {line}", file=sys.stderr))
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"cannot read --list {args.list}: {getattr(e, 'strerror', None) or e}") from None
    seen, new = {p.resolve() for p in paths}, []
    for path in listed:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            new.append(path)
    return new


def finished(args: argparse.Namespace, output: OutputDir, name: str) -> bool:
    """Whether an image's outputs exist: its two files, or with --top-k the files of every class
    its finished record lists."""
    if not args.top_k:
        return outputs_complete(outputs(args.out, name))
    record = output.records.get(name)
    if record is None or not record.get("classes"):
        return False
    return all(outputs_complete(class_outputs(args.out, name, int(c))) for c in record["classes"].split())


def extra_output(out: Path, name: str, extra: str) -> Path:
    """Where the method's extra output `extra` (MethodSpec.extras) of image `name` is saved."""
    return out / f"{name}.{extra}.npy"


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
        raise CliError(f"argument --target: {text!r} is ambiguous: {candidates}; give the exact name or the index", status=2)
    close = difflib.get_close_matches(text.lower(), [label.lower() for label in labels], n=5)
    hint = f"; did you mean: {', '.join(close)}?" if close else ""
    raise CliError(f"argument --target: {text!r} is neither a class index nor an ImageNet class name{hint}", status=2)


def class_label(index: int, num_classes: int) -> str:
    return imagenet_labels()[index] if num_classes == len(imagenet_labels()) else f"class {index}"


def settings(args: argparse.Namespace, method: Method, target: int | None, transform: Preprocessing, references: list[Path]) -> dict:
    """What the outputs depend on; a resumed run must match the run that wrote them."""
    values = {
        "model": args.model,
        "weights": str(Path(args.weights).absolute()) if args.weights else "pretrained",
        "method": args.method,
        "config": method.config.to_dict(),
        "target": target,
        "preprocessing": transform.to_dict(),
        "panel": args.panel,
        "alpha": args.alpha,
    }
    if args.top_k:
        values["top_k"] = args.top_k
    if args.dtype != "float32":  # absent for float32: directories written before the option stay resumable
        values["dtype"] = args.dtype
    if method.spec.takes_references:  # in this order: a picture's index names its reference
        values["references"] = [str(p.resolve()) for p in references]
    if uses_keys(method):
        values["seed"] = args.seed
    return values


def uses_keys(method: Method) -> bool:
    """Methods that draw random numbers; methods taking references may draw among them."""
    return method.stochastic or method.spec.takes_references


class BatchProgram:
    """explain() of one batch as one compiled program, the same for every batch of the run: the
    model's parameters, the images, the per-image keys and the references are its arguments; the
    method, the target, --top-k and the extra outputs left out (`unwanted`: never copied to the
    host) are fixed in it. With `store` it is
    built once per machine and verified on every load (`jaxattr.compilation.ProgramStore`), so a
    second process neither traces nor compiles it. With `devices` the batch is split over them (padded to a
    multiple of their count), the parameters replicated. Settings this model cannot take, such as
    an unknown --layer, are a usage error here, before any image is read."""

    def __init__(self, model, method: Method, batch_size: int, size: int, target: int | None, references,
                 top_k: int | None, unwanted: frozenset[str], devices, store: ProgramStore | None):
        leaves, treedef = jax.tree_util.tree_flatten(model)
        self.rows = batch_size if devices is None else -(-batch_size // len(devices)) * len(devices)
        self.stochastic = uses_keys(method)

        def program(leaves, images, key_data, references):
            keys = None if key_data is None else jax.random.wrap_key_data(key_data)
            arrays = {} if references is None else {"references": references}
            model = jax.tree_util.tree_unflatten(treedef, leaves)
            result = explain(model, images, method, targets=target, top_k=top_k, key=keys, **arrays)
            kept = {name: value for name, value in result.extras.items() if name not in unwanted}
            return result.attributions, result.maps, result.targets, result.probabilities, kept

        split = whole = None
        if devices is not None:
            mesh = batch_mesh(devices)
            split, whole = NamedSharding(mesh, PartitionSpec(BATCH_AXIS)), NamedSharding(mesh, PartitionSpec())
        spec = lambda shape, dtype, sharding: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
        key_shape = jax.random.key_data(jax.random.key(0)).shape
        specs = (
            [spec(np.shape(leaf), jnp.result_type(leaf), whole) for leaf in leaves],
            spec((self.rows, size, size, 3), jnp.float32, split),
            spec((self.rows, *key_shape), jnp.uint32, split) if self.stochastic else None,
            None if references is None else spec(np.shape(references), jnp.float32, whole),
        )
        jitted = jax.jit(program) if devices is None else jax.jit(program, out_shardings=split)
        description = {
            "program": "jaxattr explain batch",
            "model": tree_signature(model),
            "method": method.to_dict(),
            "images": [self.rows, size, size, 3],
            "target": target,
            "top_k": top_k,
            "keys": self.stochastic,
            "references": None if references is None else list(np.shape(references)),
            "unwanted_extras": sorted(unwanted),
            "devices": 1 if devices is None else len(devices),
        }
        try:
            self.compiled = compile_program(jitted, *specs, store=store, description=description)
        except (ValueError, TypeError) as e:
            raise CliError(f"{method.spec.name} on {model.name}: {e}", status=2) from None
        self.leaves = jax.device_put(leaves, whole)
        self.references = None if references is None else jax.device_put(jnp.asarray(references, jnp.float32), whole)
        self.split = split

    def __call__(self, batch: Batch, keys: jax.Array | None) -> list[tuple]:
        """(attribution, saliency map, class, probability, {extra output: array}) per real row of
        the batch, as numpy; with --top-k, the first four with a leading class axis of size K.
        `keys`: one per row of the batch, when the method draws random numbers."""
        images = pad_batch(batch.inputs, self.rows)
        key_data = pad_batch(jax.random.key_data(keys), self.rows) if self.stochastic else None
        if self.split is not None:
            images, key_data = jax.device_put((images, key_data), self.split)
        attributions, maps, classes, probabilities, extras = self.compiled(self.leaves, images, key_data, self.references)
        n = len(batch.items)
        extras = {name: np.asarray(value[:n]) for name, value in extras.items()}
        return list(
            zip(
                np.asarray(attributions[:n]),
                np.asarray(maps[:n]),
                np.asarray(classes[:n]),
                np.asarray(probabilities[:n]),
                [{name: value[i] for name, value in extras.items()} for i in range(n)],
            )
        )


def _table_row(record: dict) -> tuple[str, ...]:
    cls, probability = record["class_index"], record["probability"]
    return (
        display_path(record["file"]),
        "" if cls is None else str(cls),
        record["label"],
        "" if probability is None else f"{probability:.4f}",
        record["status"] + (f": {record['message']}" if record["message"] else ""),
    )


def run(args: argparse.Namespace) -> int:
    info = lookup_model(args.model)  # an unknown name fails before any work
    try:
        method = method_spec(args.method).build(**config_overrides(args))
    except ConfigError as e:
        raise config_error(e) from None
    target = parse_target(args.target)
    if args.top_k and target is not None:
        raise CliError("--top-k and --target exclude each other")
    for extra in method.spec.extra_outputs:
        if args.top_k and getattr(args, EXTRA_DEST + extra.flag, False):
            raise CliError(f"--{extra.flag} writes one class per image: drop --top-k", status=2)
    if not args.inputs and args.list is None:
        raise CliError("the following arguments are required: IMAGES_OR_DIRS (or --list FILE)", status=2)
    process, processes = start_distributed(args)  # before JAX starts its backends
    store = open_compile_store(args)
    transform = preprocessing(args, info)
    skipped: list[ImageLoadError] = []
    try:
        excluded = check_outputs_apart(args.out, [Path(p) for p in args.inputs], recursive=args.recursive)
        paths = expand_paths(args.inputs, recursive=args.recursive, on_skip=skipped.append, exclude=excluded)
    except FileNotFoundError as e:
        raise CliError(str(e)) from None
    except RunError as e:
        raise CliError(str(e)) from None
    paths += listed_paths(args, paths)
    for error in skipped:
        print(f"jaxattr: warning: skipped {error}", file=sys.stderr)
    if not paths and not skipped:
        raise CliError(f"no image files in {', '.join(map(display_path, [*args.inputs, *([args.list] if args.list else [])]))}")
    reference_paths, references = _load_references(args, method, transform)
    try:
        names = output_names([*paths, *(e.path for e in skipped)])  # from every input: the same in every process
        output = OutputDir(
            args.out,
            settings(args, method, target, transform, reference_paths),
            RECORD_FIELDS,
            finished=EXPLAINED,
            overwrite=args.overwrite,
            replace_summary=args.overwrite and process == 0,
        )
        check_no_input_overwritten(args.out, paths, lambda path: outputs(args.out, names[path]))
    except RunError as e:
        raise CliError(str(e)) from None
    if processes > 1:  # this process's share; the others' records stay on disk, merged by each write
        mine = set(distributed.shard(list(names.values()), process, processes))
        paths = [path for path in paths if names[path] in mine]
        skipped = [e for e in skipped if names[e.path] in mine]
        output.records = {name: record for name, record in output.records.items() if name in mine}

    records = {names[e.path]: dataclasses.asdict(ImageRecord(str(e.path), names[e.path], "unreadable", message=e.reason)) for e in skipped}
    todo = []
    for path in paths:
        name = names[path]
        if not args.overwrite and finished(args, output, name):
            records[name] = output.records.get(name) or dataclasses.asdict(ImageRecord(str(path), name, "exists"))
        else:
            todo.append(path)
    for record in records.values():
        output.record(record)
    if len(records) > len(skipped):
        print(f"{len(records) - len(skipped)} of {len(paths)} images already have outputs in {display_path(args.out)}; skipping them", file=sys.stderr)
    try:
        if processes > 1:
            _start_together(output, process, args.overwrite)
        if todo:
            for record in _explain_files(todo, names, args, method, target, transform, output, references, store):
                records[record["output"]] = record
        elif records:
            _write_summary(output)
    except RunError as e:
        raise CliError(str(e)) from None

    ordered = [records[names[path]] for path in [*(e.path for e in skipped), *paths]]
    print(format_table(("file", "class", "label", "probability", "status"), [_table_row(r) for r in ordered]))
    failed = sum(r["status"] in FAILED for r in ordered)
    print(
        f"{'' if processes == 1 else f'process {process} of {processes}: '}"
        f"{len(todo) - (failed - len(skipped))} explained, {len(paths) - len(todo)} already done, {failed} failed; "
        f"outputs and summary.json / summary.csv in {display_path(args.out)}",
        file=sys.stderr,
    )
    if processes > 1:
        distributed.barrier("jaxattr-explain-done")
        if process == 0:
            print(f"all {processes} processes done; the summary lists every shard's images", file=sys.stderr)
    return 1 if failed else 0


def _start_together(output: OutputDir, process: int, overwrite: bool) -> None:
    """Before any process of a distributed run writes an output: each clears what killed runs left
    in the directory (then no process removes a temporary file another is writing, whose process
    id means nothing on this host), and with --overwrite process 0 replaces the summary."""
    output.create()
    distributed.barrier("jaxattr-explain-cleared")
    if overwrite and process == 0:
        _write_summary(output)
    distributed.barrier("jaxattr-explain-start")


def _write_summary(output: OutputDir) -> None:
    """The summary of a run with nothing (more) to compute."""
    try:
        output.write_summary()
    except OSError as e:
        raise CliError(f"cannot write the summary in {display_path(output.path)}: {e.strerror or e}") from None


def _rgb(picture: np.ndarray) -> np.ndarray:
    return picture if picture.ndim == 3 else np.repeat(picture[..., None], 3, axis=-1)


def _num_classes(model, size: int, store: ProgramStore | None) -> int:
    """The model's class count (a trace; kept in `store` for the next process)."""
    count = lambda: int(jax.eval_shape(model, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)).shape[-1])
    return count() if store is None else store.count({"value": "num_classes", "model": tree_signature(model), "size": size}, count)


def _load_references(args: argparse.Namespace, method: Method, transform: Preprocessing) -> tuple[list[Path], np.ndarray | None]:
    """The --references images, preprocessed with the model's eval transform: (paths, (r, h, w, 3))."""
    if not method.spec.takes_references:
        return [], None
    if not args.references:
        print(f"{args.method}: no --references given; each image uses the method's default reference", file=sys.stderr)
        return [], None
    try:
        paths = expand_paths(
            args.references,
            recursive=args.recursive,
            on_skip=lambda e: print(f"jaxattr: warning: --references: skipped {e}", file=sys.stderr),
        )
    except FileNotFoundError as e:
        raise CliError(f"--references: {e}") from None
    if not paths:
        raise CliError(f"--references: no image files in {', '.join(args.references)}")
    try:
        images = np.stack([load_image(path, transform) for path in paths])
    except ImageLoadError as e:
        raise CliError(f"--references: {e}") from None
    wanted = getattr(method.config, "num_references", None)
    fewer = f", fewer than --num-references {wanted}: each image uses every one its rules admit" if wanted and wanted > len(paths) else ""
    print(f"{args.method}: {len(paths)} reference images{fewer}", file=sys.stderr)
    return paths, images


def _explain_files(
    todo: list[Path],
    names: dict[Path, str],
    args: argparse.Namespace,
    method: Method,
    target: int | None,
    transform: Preprocessing,
    output: OutputDir,
    references: np.ndarray | None,
    store: ProgramStore | None,
) -> list[dict]:
    size = transform.size
    model = in_compute_dtype(create_model(args.model, weights=args.weights or "pretrained", image_size=size), args)
    clock = CompileClock()  # the run's compile time: traces, this program, anything compiled in the batches
    with clock:
        num_classes = _num_classes(model, size, store)
    if target is not None and not 0 <= target < num_classes:
        raise CliError(f"argument --target: {target} is out of range: {args.model} has {num_classes} classes", status=2)
    batch_size = min(args.batch_size, len(todo))
    if args.top_k and args.top_k > num_classes:
        raise CliError(f"--top-k {args.top_k} is more than the {num_classes} classes of {args.model}")
    spec = method.spec
    pictured = [extra for extra in spec.extra_outputs if getattr(args, EXTRA_DEST + extra.flag, False)]
    pictured_extras = {name for extra in spec.extra_outputs for name in extra.uses}  # never saved as .npy
    unwanted = frozenset(pictured_extras - {name for extra in pictured for name in extra.uses})
    # Every local device (a GPU box's GPUs, a TPU host's cores): the batch is split over them.
    devices = jax.local_devices() if len(jax.local_devices()) > 1 else None
    with clock:
        method = fit_memory(method, model, batch_size, (size, size, 3), store=store)
        # Minutes for a large method: compiled on a worker thread, so Ctrl-C stops it at once.
        program = call_interruptibly(
            lambda: BatchProgram(model, method, batch_size, size, target, references, args.top_k, unwanted, devices, store)
        )
    output.create()
    progress = make_progress(len(todo), sys.stderr)

    def compute(batch: Batch[Path]) -> list[tuple]:
        keys = file_keys(args.seed, [names[p] for p in batch.items]) if program.stochastic else None
        return program(batch, keys)

    def write_files(png: Path, npy: Path, image: np.ndarray, attribution: np.ndarray, saliency_map: np.ndarray) -> None:
        # Each file is atomic; an image only counts as done once both exist.
        viz.write_atomically(npy, lambda f: np.save(f, attribution))
        heat = viz.contrast(saliency_map, spec.contrast)
        picture = viz.panel(image, heat, args.alpha) if args.panel else viz.overlay(image, heat, args.alpha)
        viz.save_png(png, picture)

    def save(path: Path, image: np.ndarray, result: tuple) -> dict:
        attribution, saliency_map, classes, probabilities, extras = result
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
                # The method's extra outputs first: arrays as .npy, pictures when asked for.
                for extra, value in extras.items():
                    if extra not in pictured_extras:
                        path_ = extra_output(args.out, name, extra)
                        write(functools.partial(viz.write_atomically, path_, lambda f, v=value: np.save(f, v)))
                pictures = {suffix: p for extra in pictured for suffix, p in extra.pictures(extras).items()}
                for suffix, extra_picture in pictures.items():
                    write(functools.partial(viz.save_png, args.out / f"{name}_{suffix}.png", _rgb(np.asarray(extra_picture))))
                write(functools.partial(write_files, *outputs(args.out, name), image, attribution, saliency_map))
        else:
            record.status, record.message = "non-finite", "NaN or inf in the attribution; outputs not written"
            progress.note(f"skipped {path}: {record.message}")
        return dataclasses.asdict(record)

    def unreadable(path: Path, error: ImageLoadError) -> dict:
        return dataclasses.asdict(ImageRecord(str(path), names[path], "unreadable", message=error.reason))

    stages = pipeline(
        todo, lambda path: load_image(path, transform), loaders=loaders(args), batch_size=batch_size, writes_per_item=args.top_k or 1
    )
    with stages as (load, write, drain), clock:
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
            after_writes=write,
            drain=drain,
        )
    elapsed = time.monotonic() - start
    print(
        f"{len(todo)} images in {elapsed:.1f}s ({len(todo) / elapsed:.2f} images/s), "
        f"compile {clock.seconds:.2f}s{'' if args.compile_cache else ' (compile cache off)'}",
        file=sys.stderr,
    )
    return records
