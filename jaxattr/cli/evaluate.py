"""`jaxattr evaluate`: faithfulness (and segmentation) scores of saliency maps, with curve plots
and an HTML report; resumable, one record per image.

Two ways in, one path through:
* INPUTS are output directories of `jaxattr explain`, one per method, of the same model and
  images: each image's .npy attribution is reduced to the saliency map explain drew
  (`MethodSpec.saliency`, then `MethodSpec.upsample` to the image), its overlay illustrates the
  report, and the class it explains is the class scored.
* With `--method a,b,c`, INPUTS are images: each method explains them first into
  OUT/explain/<method> (an ordinary, resumable explain directory), which are evaluated as above.

Per image every method is scored by `jaxattr.evaluation.evaluate_maps`; its results are stored in
OUT/results/<name>.npz and its scores in OUT/summary.json / .csv (`jaxattr.run.OutputDir`), so a
re-run skips finished images. At the end `jaxattr.report.write_report` writes metrics.json,
metrics.csv, curves_<game>.png and report.html from every stored result.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import importlib.util
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxattr import viz
from jaxattr._files import display_path, load_array
from jaxattr.cli import explain
from jaxattr.cli._common import (
    CliError,
    add_loaders_option,
    config_option,
    flag,
    format_table,
    loaders,
    lookup_model,
    output_dir,
    positive_int,
    seed,
)
from jaxattr.config import ConfigError
from jaxattr.evaluation import (
    DEFAULT_METRICS,
    IGOS_MASK_SIZE,
    METRIC_GROUPS,
    check_metrics,
    evaluate_maps,
    result_rows,
    saliency_cells,
    score_names,
    stack_rows,
    valid_rows,
)
from jaxattr.image import (
    ImageLoadError,
    Preprocessing,
    expand_paths,
    open_image,
    preprocess,
    preprocess_labels,
)
from jaxattr.maps import upsample
from jaxattr.methods import MethodSpec, list_methods, method_spec
from jaxattr.methods.igos import MASK_OUTPUT, igos_baselines
from jaxattr.metrics import DEFAULT_CHUNK, RISE_STEPS, binary_mask, segmentation
from jaxattr.models import create_model
from jaxattr.report import method_records, write_report
from jaxattr.run import (
    SUMMARY_JSON,
    Batch,
    OutputDir,
    Progress,
    RunError,
    check_outputs_apart,
    pipeline,
    read_summary,
    run_batches,
)

EVALUATED = "evaluated"
INCOMPLETE = "incomplete"  # some method's map could not be scored (missing, NaN/inf); retried on a re-run
EXPLAIN_DIR = "explain"  # OUT/explain/<method>: the explanations of --method
INPUTS_DIR = "inputs"  # OUT/inputs/<name>.png: the preprocessed images, shown in the report
RESULTS_DIR = "results"  # OUT/results/<name>.npz: every metric result of the image
RECORD_FIELDS = ["file", "output", "status", "message"]
# The most bytes of a map or mask file read back (a 224 px float32 map is 0.6 MB; a header claiming
# more is refused before anything is allocated).
MAP_LIMIT = 1 << 30
# I-GOS's `jaxattr explain` writes its low-resolution mask (low = salient) beside the map
# (`explain.extra_output(..., MASK_OUTPUT)`). Where it exists, the I-GOS metric scores that mask;
# every other method's map is averaged over the cells of --mask-size (`saliency_cells`).


@dataclasses.dataclass(frozen=True)
class Source:
    """One explain output directory: one method's maps of the images."""

    directory: Path
    label: str  # the method's name in the report (with the directory's name where methods repeat)
    spec: MethodSpec
    settings: dict[str, Any]
    records: dict[str, dict]  # explain's records by output name
    mask_shape: tuple[int, ...] | None  # the shape of its I-GOS masks, if it has any

    @property
    def model(self) -> tuple[str, str]:
        """(model name, weights: 'pretrained' or the file's absolute path) the maps were made with."""
        return self.settings["model"], self.settings.get("weights", "pretrained")

    def model_text(self) -> str:
        return "{} with {} weights".format(*self.model)

    def preprocessing(self, info) -> Preprocessing:
        """The eval transform the maps were made with (recorded by explain; older directories:
        the model's)."""
        recorded = self.settings.get("preprocessing")
        return Preprocessing(**recorded) if recorded else Preprocessing.of(info)


def _names(text: str, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown)}; {what}s: {', '.join(known)}")
    if not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct {what} names separated by commas, got {text!r}")
    return names


def _metric_list(text: str) -> tuple[str, ...]:
    return check_metrics(_names(text, tuple(METRIC_GROUPS), "metric"))


def _method_list(text: str) -> tuple[str, ...]:
    return _names(text, list_methods(), "method")


def _step(text: str) -> int | str:
    if text in RISE_STEPS:
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a number of pixels or one of {', '.join(RISE_STEPS)}, got {text!r}") from None


def _fill(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) not in (1, 3) or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected one value or R,G,B (pixel values in [0, 1]), got {text!r}")
    return values


def add_parser(commands) -> None:
    ev = commands.add_parser(
        "evaluate",
        help="score saliency maps (deletion/insertion, perturbation, segmentation) and write a report",
        allow_abbrev=False,
        description="Score the maps in output directories of `jaxattr explain` (one per method, same model "
        "and images), or, with --method, explain images with each method first (into OUT/explain/METHOD) "
        "and score those. Writes metrics.json, metrics.csv, curves_*.png, report.html and "
        "summary.json / summary.csv into --out; a re-run skips finished images.",
    )
    ev.add_argument("inputs", nargs="+", metavar="DIRS_OR_IMAGES",
                    help="explain output directories; with --method, image files and/or directories of images")
    ev.add_argument("--out", required=True, type=output_dir, metavar="DIR", help="output directory")
    ev.add_argument("--metrics", type=_metric_list, metavar="LIST",
                    help=f"metrics, comma-separated, of {', '.join(METRIC_GROUPS)} "
                    f"(default {','.join(DEFAULT_METRICS)}, plus segmentation with --masks)")
    ev.add_argument("--step", type=_step, default="single", metavar="N",
                    help="RISE deletion/insertion: pixels per curve point, or a preset: single (224, the default) "
                    "or batched (1792)")
    ev.add_argument("--chunk", type=positive_int, default=DEFAULT_CHUNK, metavar="N",
                    help=f"curve points per forward pass (memory only; default {DEFAULT_CHUNK})")
    ev.add_argument("--fill", type=_fill, metavar="V|R,G,B",
                    help="colour of removed pixels (RISE deletion, perturbation tests; default: the model's mean colour)")
    ev.add_argument("--mask-size", type=positive_int, default=IGOS_MASK_SIZE, metavar="N",
                    help=f"I-GOS metric: grid of cells for maps of methods other than I-GOS (default {IGOS_MASK_SIZE})")
    ev.add_argument("--masks", type=Path, metavar="DIR",
                    help="ground-truth masks named as the images (any image format, non-zero = foreground): "
                    "adds the segmentation scores")
    ev.add_argument("--threshold", type=float, metavar="X",
                    help="masks with other values: foreground = value > X (default: masks must be binary)")
    ev.add_argument("--batch-size", type=positive_int, default=8, metavar="N", help="images per batch (default 8)")
    add_loaders_option(ev)
    ev.add_argument("--overwrite", action="store_true", help="recompute finished images (and, with --method, their maps)")
    ev.add_argument("--embed-images", action="store_true",
                    help="embed the report's images in report.html (one file that travels alone)")
    ex = ev.add_argument_group("explaining first (with --method)")
    ex.add_argument("--method", type=_method_list, metavar="M1,M2",
                    help="explain INPUTS (images) with these methods, comma-separated, then score them")
    ex.add_argument("--option", action="append", default=[], metavar="METHOD.FIELD=VALUE",
                    help="an option of one method (repeatable), e.g. integrated_gradients.steps=16; "
                    "see `jaxattr explain --method METHOD --help`")
    ex.add_argument("--model", metavar="M", help=f"registered model (default {explain.DEFAULT_MODEL}; without "
                    "--method: a check of the directories' model)")
    ex.add_argument("--weights", metavar="FILE", help="weights file (default: pretrained; without --method: a check)")
    ex.add_argument("--target", metavar="CLASS", help="explain and score this class instead of each prediction")
    ex.add_argument("--seed", type=seed, metavar="N", help="random seed of stochastic methods (default 0)")
    ex.add_argument("--recursive", action="store_true", help="also take images in subdirectories")
    ex.add_argument("--references", nargs="+", metavar="IMAGES_OR_DIRS",
                    help="reference images for the methods that take them (ig2), as `jaxattr explain --references`")
    ev.set_defaults(run=run, parser=ev)


# ------------------------------------------------------------------------------ explaining first


def method_flags(methods: tuple[str, ...], options: list[str]) -> dict[str, list[str]]:
    """--option METHOD.FIELD=VALUE as explain's flags per method, each value checked against the
    method's config (a bad one is a usage error naming the option)."""
    flags: dict[str, list[str]] = {m: [] for m in methods}
    overrides: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for text in options:
        where, equals, value = text.partition("=")
        method, dot, field = where.partition(".")
        field = field.replace("-", "_")
        if not (equals and dot and field):
            raise CliError(f"argument --option: expected METHOD.FIELD=VALUE (e.g. integrated_gradients.steps=16), got {text!r}", 2)
        if method not in flags:
            raise CliError(f"argument --option {text}: {method} is not one of --method {','.join(methods)}", 2)
        typed, arguments = config_option(method, field, value, text)
        overrides[method][field] = typed
        if isinstance(typed, bool):
            flags[method].append(flag(field) if typed else "--no-" + flag(field)[2:])
        else:
            flags[method] += [flag(field), *arguments]
    for method in methods:
        try:
            method_spec(method).build(**overrides[method])
        except ConfigError as e:
            raise CliError(f"argument --option {method}.{e.field}: {e}", 2) from None
    return flags


def explain_first(args: argparse.Namespace) -> list[Path]:
    """Run `jaxattr explain` with each of --method into OUT/explain/<method>; its directories."""
    from jaxattr.cli import parse_args  # the package imports this module: resolved at call time

    explained = [p for p in args.inputs if (Path(p) / SUMMARY_JSON).is_file()]
    if explained:
        args.parser.error(f"{explained[0]} is an output directory of `jaxattr explain`: without --method, "
                          "evaluate scores its maps")
    flags = method_flags(args.method, args.option)
    directories = []
    for method in args.method:
        directory = args.out / EXPLAIN_DIR / method
        argv = ["explain", "--method", method, "--out", str(directory), "--model", args.model or explain.DEFAULT_MODEL,
                "--batch-size", str(args.batch_size), "--loaders", str(loaders(args)), "--seed", str(args.seed or 0),
                *flags[method]]
        argv += ["--weights", args.weights] if args.weights else []
        argv += ["--target", args.target] if args.target is not None else []
        argv += ["--recursive"] * args.recursive + ["--overwrite"] * args.overwrite
        if args.references and method_spec(method).takes_references:
            argv += ["--references", *args.references]
        print(f"explaining with {method} into {directory}", file=sys.stderr)
        explain_args = parse_args([*argv, "--", *args.inputs])
        with contextlib.redirect_stdout(io.StringIO()):  # explain's table; evaluate prints its own
            explain_args.run(explain_args)  # images that failed are recorded, and reported below
        directories.append(directory)
    return directories


# ------------------------------------------------------------------------------ reading explain outputs


def _igos_mask_shape(directory: Path, names: list[str]) -> tuple[int, ...] | None:
    """The shape of the first I-GOS mask file in `directory`, None if it has none."""
    for name in names:
        path = explain.extra_output(directory, name, MASK_OUTPUT)
        if path.is_file():
            try:
                return load_array(path, MAP_LIMIT).shape
            except (OSError, ValueError, MemoryError):
                continue
    return None


def read_source(directory: Path) -> Source:
    path = directory / SUMMARY_JSON
    if directory.is_file():
        raise CliError(f"{directory} is a file: evaluate takes output directories of `jaxattr explain` "
                       "(or images, with --method)")
    if not directory.is_dir():
        raise CliError(f"no such directory: {directory}")
    if not path.is_file():
        raise CliError(f"{directory} is not an output directory of `jaxattr explain` (no {SUMMARY_JSON}); "
                       "to explain images first, pass --method")
    try:
        settings, records, rejected = read_summary(path)
        method = settings["method"]
        if not isinstance(method, str) or not isinstance(settings["model"], str):
            raise TypeError(f"method {method!r}, model {settings['model']!r}")
        if settings.get("preprocessing"):
            Preprocessing(**settings["preprocessing"])  # TypeError / ValueError if damaged
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CliError(f"{display_path(path)} is not a summary of `jaxattr explain` ({e})") from None
    for name, record in list(records.items()):
        if not (record.get("class_index") is None or type(record["class_index"]) is int) or not isinstance(record.get("message", ""), str):
            rejected.append(f"record {name} has the class {str(record.get('class_index'))[:40]!r}, not a class index")
            del records[name]
    for problem in rejected:
        print(f"jaxattr: warning: {display_path(path)}: {problem}; skipped", file=sys.stderr)
    if not records:
        raise CliError(f"{directory} holds no explained images")
    try:
        spec = method_spec(method)
    except ValueError:
        raise CliError(f"{directory} holds maps of the method {method!r}, which this jaxattr does not know") from None
    return Source(directory, method, spec, settings, records, _igos_mask_shape(directory, sorted(records)))


def _labelled(sources: list[Source]) -> list[Source]:
    """Distinct report names: the method, with the directory where a method appears twice."""
    counts = collections.Counter(s.label for s in sources)
    labelled = [dataclasses.replace(s, label=f"{s.label} ({s.directory.name})") if counts[s.label] > 1 else s for s in sources]
    if len({s.label for s in labelled}) < len(labelled):
        labelled = [dataclasses.replace(s, label=f"{s.spec.name} ({s.directory})") for s in sources]
    return labelled


def check_sources(sources: list[Source], args: argparse.Namespace) -> list[tuple[str, Path]]:
    """Refuse directories of other models or other images; the images (name, file), by name."""
    first = sources[0]
    for source in sources[1:]:
        if source.model != first.model:
            raise CliError(f"{source.directory} holds explanations of {source.model_text()}, {first.directory} of "
                           f"{first.model_text()}: evaluate compares maps of one model")
    info = lookup_model(first.model[0])
    for source in sources[1:]:
        if source.preprocessing(info) != first.preprocessing(info):
            raise CliError(f"{source.directory} and {first.directory} explain images preprocessed differently "
                           f"({source.preprocessing(info)} and {first.preprocessing(info)}): evaluate compares maps of the same inputs")
    model, weights = first.model
    if args.model and args.model != model or args.weights and str(Path(args.weights).resolve()) != weights:
        given = f"--model {args.model}" if args.model and args.model != model else f"--weights {args.weights}"
        raise CliError(f"{given}, but {first.directory} holds explanations of {first.model_text()}")
    files = {name: Path(r["file"]).resolve() for name, r in first.records.items()}
    for source in sources[1:]:
        other = {name: Path(r["file"]).resolve() for name, r in source.records.items()}
        if other != files:
            differ = [f"only in {first.directory}: {n}" for n in sorted(files.keys() - other.keys())]
            differ += [f"only in {source.directory}: {n}" for n in sorted(other.keys() - files.keys())]
            differ += [f"{n} from other files" for n in sorted(files.keys() & other.keys()) if files[n] != other[n]]
            more = f", and {len(differ) - 3} more" if len(differ) > 3 else ""
            raise CliError(f"{source.directory} and {first.directory} explain different images ({'; '.join(differ[:3])}{more}); "
                           "evaluate compares methods on the same images")
    igos_kernel(sources)  # refuses I-GOS directories optimised against different baselines
    images = [(name, Path(first.records[name]["file"])) for name in sorted(first.records)]
    if not any(file.is_file() for _, file in images):
        raise CliError(f"none of the images {first.directory} explains is here (e.g. {images[0][1]}); "
                       "run evaluate from the directory explain ran in")
    return images


def igos_kernel(sources: list[Source]) -> int | None:
    """The blur kernel of the I-GOS metric's baseline: the one the I-GOS sources' masks were
    optimised against (explain's --blur-kernel; None: I-GOS's default for the image size), so each
    mask is scored over its own baseline and every other method over the same one."""
    kernels = {s.settings.get("config", {}).get("blur_kernel") for s in sources if s.mask_shape is not None}
    if len(kernels) > 1:
        shown = ", ".join("default" if k is None else str(k) for k in sorted(kernels, key=str))
        raise CliError(f"the I-GOS directories were optimised against different baselines (--blur-kernel {shown}): "
                       "evaluate them separately")
    return kernels.pop() if kernels else None


# ------------------------------------------------------------------------------ ground-truth masks


def mask_index(directory: Path, images: list[tuple[str, Path]]) -> dict[str, list[Path]]:
    """The mask files of --masks by stem; refused when no image has one."""
    if not directory.is_dir():
        raise CliError(f"--masks {directory}: no such directory")
    index: dict[str, list[Path]] = collections.defaultdict(list)
    for path in expand_paths([directory], on_skip=lambda e: print(f"jaxattr: warning: {e}", file=sys.stderr)):
        index[path.stem].append(path)
    if not any(name in index or file.stem in index for name, file in images):
        raise CliError(f"no mask in {directory} is named as an image (e.g. {images[0][0]}.png)")
    return index


def load_truth(index: dict[str, list[Path]], directory: Path, name: str, file: Path, size: tuple[int, int],
               transform: Preprocessing, threshold: float | None) -> np.ndarray:
    """The image's ground-truth mask, through the image's eval transform (NEAREST), as bool."""
    candidates = index.get(name) or index.get(file.stem) or []
    if len(candidates) != 1:
        found = "no mask" if not candidates else f"{len(candidates)} masks ({', '.join(p.name for p in candidates)})"
        raise ImageLoadError(file, f"{found} named {name}.* in {directory}")
    path = candidates[0]
    labels = open_image(path)
    if labels.size != size:
        raise ImageLoadError(path, f"the mask is {labels.size[0]}x{labels.size[1]}, its image {file.name} "
                             f"{size[0]}x{size[1]}; give each mask its image's size")
    if labels.mode in ("LA", "La", "PA"):  # grey or palette values with transparency: the values
        labels = labels.getchannel(0)
    try:
        return binary_mask(preprocess_labels(labels, transform), threshold=threshold)
    except ValueError as e:
        hint = " (--threshold X)" if threshold is None and "threshold" in str(e) else ""
        raise ImageLoadError(path, f"{e}{hint}") from None


# ------------------------------------------------------------------------------ one image


def source_inputs(
    source: Source, name: str, shape: tuple[int, int], mask_size: int
) -> tuple[np.ndarray, np.ndarray, int, str, str]:
    """(saliency map at the image's size, I-GOS metric mask, class, problem, note) of `source`'s
    map of image `name`: a map that cannot be scored comes back NaN with the problem in words; the
    note says what was adapted (a map resized to the image)."""
    record = source.records[name]
    target = record.get("class_index")
    target = -1 if target is None else int(target)  # -1: the prediction (computed with the batch)
    path = source.directory / f"{name}.npy"
    note = ""
    if not path.is_file():
        reason = f"{record.get('status')}: {record.get('message')}" if record.get("message") else "no file"
        saliency_map, problem = np.full(shape, np.nan, np.float32), f"{source.label}: no map ({reason})"
    else:
        saliency_map, problem, note = _read_map(source, path, shape)
    if source.mask_shape is None:  # maps of methods other than I-GOS: averaged over the grid's cells
        cells = np.asarray(saliency_cells(saliency_map[None], mask_size))[0]
    else:
        cells, mask_problem = _read_igos_mask(source, name)
        problem = problem or mask_problem
    return saliency_map, cells, target, problem, note


def _read_map(source: Source, path: Path, shape: tuple[int, int]) -> tuple[np.ndarray, str, str]:
    """(map, problem, note) from an attribution file, reduced and upsampled as explain does."""
    nan = np.full(shape, np.nan, np.float32)
    try:
        attribution = load_array(path, MAP_LIMIT)
    except (OSError, ValueError, MemoryError) as e:
        return nan, f"{source.label}: unreadable map {path.name} ({e or type(e).__name__})", ""
    if attribution.dtype.kind not in "fiu" or attribution.ndim not in (2, 3):
        return nan, f"{source.label}: {path.name} holds {attribution.dtype} of shape {attribution.shape}, not a map", ""
    saliency = source.spec.saliency(jnp.asarray(attribution, jnp.float32)[None])
    if saliency.ndim != 3:
        return nan, f"{source.label}: {path.name} of shape {attribution.shape} is not a {source.spec.name} attribution", ""
    note = ""
    # A pixel attribution (h, w, channels) of another size; coarse maps (Grad-CAM's) are upsampled by design.
    if attribution.ndim == 3 and saliency.shape[1:] != shape:
        note = (f"{source.label}: the map of {path.stem} is {saliency.shape[1]}x{saliency.shape[2]}, the image "
                f"{shape[0]}x{shape[1]}: map resized ({source.spec.upsample})")
    saliency_map = np.asarray(upsample(saliency, shape, source.spec.upsample))[0]
    if not np.isfinite(saliency_map).all():
        return saliency_map, f"{source.label}: NaN or inf in the map of {path.stem}", note
    return saliency_map, "", note


def _read_igos_mask(source: Source, name: str) -> tuple[np.ndarray, str]:
    """The image's I-GOS mask from <name>.mask.npy (NaN and a problem if unusable)."""
    path = explain.extra_output(source.directory, name, MASK_OUTPUT)
    nan = np.full(source.mask_shape, np.nan, np.float32)
    if not path.is_file():
        return nan, f"{source.label}: no I-GOS mask {path.name}"
    try:
        mask = load_array(path, MAP_LIMIT)
    except (OSError, ValueError, MemoryError) as e:
        return nan, f"{source.label}: unreadable I-GOS mask {path.name} ({e})"
    if mask.shape != source.mask_shape or mask.dtype.kind != "f":
        return nan, f"{source.label}: {path.name} holds {mask.dtype} of shape {mask.shape}, expected {source.mask_shape}"
    return mask.astype(np.float32), ""


# ------------------------------------------------------------------------------ the command


def _check_report_extra() -> None:
    missing = [m for m in ("matplotlib", "jinja2") if importlib.util.find_spec(m) is None]
    if missing:
        raise CliError(f"`jaxattr evaluate` writes its plots and report with matplotlib and Jinja2: "
                       f"pip install 'jaxattr[report]' ({', '.join(missing)} missing)")


def _usage(args: argparse.Namespace) -> tuple[str, ...]:
    """The metric groups; usage errors (exit 2) for options that do not go together."""
    if not args.method:
        given = [f for f, v in (("--option", args.option), ("--target", args.target), ("--seed", args.seed),
                                ("--recursive", args.recursive), ("--references", args.references)) if v]
        if given:
            args.parser.error(f"{', '.join(given)} configure explanations: only with --method")
    elif args.references and not any(method_spec(m).takes_references for m in args.method):
        args.parser.error(f"--references: none of --method {','.join(args.method)} takes reference images")
    if args.threshold is not None and args.masks is None:
        args.parser.error("--threshold applies to --masks")
    groups = args.metrics or DEFAULT_METRICS
    if "segmentation" in groups and args.masks is None:
        args.parser.error("the segmentation metric needs --masks DIR")
    if args.masks is not None:
        groups = check_metrics((*groups, "segmentation"))
    return groups


def run(args: argparse.Namespace) -> int:
    groups = _usage(args)
    _check_report_extra()
    if args.model:
        lookup_model(args.model)  # an unknown name fails before any work
    _check_out(args)
    directories = explain_first(args) if args.method else [Path(p) for p in args.inputs]
    sources = _labelled([read_source(d) for d in directories])
    images = check_sources(sources, args)
    transform = sources[0].preprocessing(lookup_model(sources[0].model[0]))
    if args.mask_size > transform.size:
        args.parser.error(f"--mask-size {args.mask_size} is larger than the images ({transform.size} px)")
    masks = mask_index(args.masks, images) if args.masks is not None else None
    model, weights = sources[0].model
    settings = {
        "model": model,
        "weights": weights,
        "sources": [{"directory": str(s.directory.resolve()), "label": s.label, "explain": s.settings} for s in sources],
        "metrics": list(groups),
        "step": args.step,
        "fill": args.fill,
        "mask_size": args.mask_size,
        "igos_blur_kernel": igos_kernel(sources),  # None: I-GOS's default for the image size
        "masks": str(args.masks.resolve()) if args.masks is not None else None,
        "threshold": args.threshold,
        "preprocessing": transform.to_dict(),
    }
    fields = RECORD_FIELDS + [f"{s.label}.{score}" for s in sources for score in score_names(groups)]
    try:
        output = OutputDir(args.out, settings, fields, finished=EVALUATED, overwrite=args.overwrite)
    except RunError as e:
        raise CliError(str(e)) from None
    done = {name for name, _ in images if name in output.records and _results_path(args.out, name).is_file()}
    todo = [(name, file) for name, file in images if name not in done]
    if done:
        print(f"{len(done)} of {len(images)} images already evaluated in {args.out}; skipping them", file=sys.stderr)
    if todo:
        _evaluate_images(todo, sources, groups, transform, masks, args, output)
    records = [output.records.get(name, {"output": name, "status": "not evaluated"}) for name, _ in images]
    reported = [(name, file) for (name, file), r in zip(images, records) if r["status"] in (EVALUATED, INCOMPLETE)]
    failed = [r for r in records if r["status"] != EVALUATED]
    for record in failed:
        print(f"jaxattr: {record['output']}: {record['status']}: {record.get('message', '')}", file=sys.stderr)
    if not reported:
        raise CliError(f"no image could be evaluated; see {args.out / SUMMARY_JSON}")
    try:
        summary = _write_report(reported, sources, groups, settings, args)
    except OSError as e:
        raise CliError(f"cannot write the report in {display_path(args.out)}: {e.strerror or e}; the summary keeps "
                       "the evaluated images, and running the same command again writes it") from None
    print(summary)
    print(f"{len(todo) - len(failed)} evaluated, {len(done)} already done, {len(failed)} failed; "
          f"report.html, metrics.json / metrics.csv and curves in {args.out}", file=sys.stderr)
    return 1 if failed else 0


def _check_out(args: argparse.Namespace) -> None:
    """--out never lands on what it reads: not an explain directory evaluated (nor an input
    directory of --method); inside an image directory scanned with --recursive, its preprocessed
    inputs and maps would be read as images by the next run."""
    inputs = [Path(p) for p in args.inputs]
    if args.method and args.recursive and check_outputs_apart(args.out, inputs, recursive=True):
        raise CliError(f"the output directory {display_path(args.out)} is inside an input directory scanned with "
                       "--recursive: its images would be read as inputs; choose an output directory outside it")
    check_outputs_apart(args.out, inputs, recursive=False)


def _results_path(out: Path, name: str) -> Path:
    return out / RESULTS_DIR / f"{name}.npz"


def _evaluate_images(todo, sources: list[Source], groups, transform: Preprocessing, masks, args, output: OutputDir) -> None:
    model_name, weights = sources[0].model
    model = create_model(model_name, weights=weights, image_size=transform.size)
    output.create()
    batch_size = min(args.batch_size, len(todo))
    progress = Progress(len(todo), sys.stderr)
    problems: dict[str, list[str]] = {}  # per image: what could not be scored
    notes: dict[str, list[str]] = {}  # per image: what was adapted
    fill = None if args.fill is None else np.asarray(args.fill, np.float32)
    kernel = igos_kernel(sources)

    def read(item: tuple[str, Path]) -> tuple[dict[str, Any], list[str], list[str]]:
        """(the image's row of the batch, what could not be scored, what was adapted); on a loader
        thread in the pipeline, so it only reads."""
        name, file = item
        original = open_image(file)
        try:
            image = preprocess(original, transform)
        except ValueError as e:
            raise ImageLoadError(file, str(e)) from None
        row: dict[str, Any] = {"image": image, "maps": [], "cells": [], "targets": []}
        truth = None if masks is None else load_truth(masks, args.masks, name, file, original.size, transform, args.threshold)
        its_problems, its_notes = [], []
        for source in sources:
            saliency_map, cells, target, problem, note = source_inputs(source, name, image.shape[:2], args.mask_size)
            row["maps"].append(saliency_map)
            row["cells"].append(cells)
            row["targets"].append(target)
            its_problems += [problem] if problem else []
            its_notes += [note] if note else []
        row["targets"] = np.asarray(row["targets"], np.int32)
        if truth is not None:
            row["truth"] = truth
        return row, its_problems, its_notes

    def load(item: tuple[str, Path]) -> dict[str, Any]:
        """`read` (prefetched in the pipeline), its problems and notes kept and shown in input order."""
        row, problems[item[0]], notes[item[0]] = stages.load(item)
        for text in problems[item[0]] + notes[item[0]]:
            progress.note(text)
        return row

    def compute(batch: Batch) -> list[list[dict]]:
        images = jnp.asarray(batch.inputs["image"])
        targets = np.asarray(batch.inputs["targets"])
        if (targets < 0).any():  # explain recorded no class: score the prediction
            targets = np.where(targets < 0, np.asarray(jnp.argmax(model(images), axis=-1))[:, None], targets)
        baselines = igos_baselines(images, kernel) if "igos" in groups else None
        per_source = []
        for i in range(len(sources)):
            results = evaluate_maps(
                model, images, batch.inputs["maps"][i], jnp.asarray(targets[:, i]), metrics=groups, step=args.step,
                chunk=args.chunk, fill=fill, igos_masks=batch.inputs["cells"][i], baselines=baselines,
                ground_truth=batch.inputs.get("truth"),
            )
            per_source.append(result_rows(results, len(batch.items)))
        return [[rows[r] for rows in per_source] for r in range(len(batch.items))]

    def write_files(name: str, image: np.ndarray, payload: dict[str, np.ndarray]) -> None:
        viz.save_png(args.out / INPUTS_DIR / f"{name}.png", image)
        viz.write_atomically(_results_path(args.out, name), lambda f: np.savez(f, **payload))

    def save(item: tuple[str, Path], inputs: dict[str, Any], rows: list[dict]) -> dict:
        name, file = item
        payload = {f"{i}.{key}": value for i, row in enumerate(rows) for key, value in row.items()}
        stages.write(functools.partial(write_files, name, inputs["image"], payload))  # an image is done once both exist
        record: dict[str, Any] = {"file": str(file), "output": name, "status": EVALUATED, "message": ""}
        failed = problems.pop(name, [])
        for source, row in zip(sources, rows):
            results = stack_rows([row])
            for score, values in method_records(source.label, results).scores.items():
                record[f"{source.label}.{score}"] = values[0] if math.isfinite(values[0]) else None
            if not valid_rows(results).all() and not any(p.startswith(f"{source.label}:") for p in failed):
                failed.append(f"{source.label}: could not be scored (NaN or inf)")
        record["status"] = INCOMPLETE if failed else EVALUATED
        record["message"] = "; ".join(failed + notes.pop(name, []))
        return record

    def unreadable(item: tuple[str, Path], error: ImageLoadError) -> dict:
        return {"file": str(item[1]), "output": item[0], "status": "unreadable", "message": str(error)}

    with pipeline(todo, read, loaders=loaders(args), batch_size=batch_size) as stages:
        run_batches(todo, batch_size=batch_size, load=load, compute=compute, save=save, unreadable=unreadable,
                    output=output, progress=progress, after_writes=stages.write, drain=stages.drain)


def _load_results(out: Path, names: list[str], count: int) -> list[dict[str, Any]]:
    """Every source's results over the images `names`, from their stored files."""
    stored = []
    for name in names:
        with np.load(_results_path(out, name), allow_pickle=False) as data:
            stored.append(dict(data))
    per_source = []
    for i in range(count):
        prefix = f"{i}."
        per_source.append(stack_rows([{k[len(prefix):]: v for k, v in s.items() if k.startswith(prefix)} for s in stored]))
    return per_source


def _write_report(images, sources: list[Source], groups, settings: dict, args) -> str:
    """Write the report files; the table of means as text."""
    names = [name for name, _ in images]
    methods = []
    for source, results in zip(sources, _load_results(args.out, names, len(sources))):
        overlays = [source.directory / f"{n}.png" for n in names]
        dataset = None
        if "segmentation" in results:
            dataset = segmentation.result(segmentation.update(segmentation.init(), results["segmentation"]))
        methods.append(method_records(source.label, results, [p if p.is_file() else None for p in overlays], dataset))
    shown = {
        "model": f"{settings['model']} ({settings['weights']} weights)",
        "metrics": ", ".join(groups),
        "RISE step": settings["step"],
        "I-GOS grid (other methods)": f"{settings['mask_size']}x{settings['mask_size']}",
        "fill": "model mean colour" if settings["fill"] is None else settings["fill"],
        **({"masks": settings["masks"]} if settings["masks"] else {}),
    }
    files = write_report(args.out, names, methods, image_paths=[args.out / INPUTS_DIR / f"{n}.png" for n in names],
                         title="jaxattr evaluation", settings=shown, embed_images=args.embed_images)
    data = json.loads(files.json.read_text())
    scores = list(dict.fromkeys(k for m in methods for k in m.scores))
    rows = []
    for score in scores:
        cells = []
        for m in methods:
            summary = data["methods"][m.name]["summary"].get(score)
            mean = None if summary is None else summary["mean"]
            cells.append("-" if mean is None else f"{mean:.4f}")
        rows.append((score, *cells))
    return format_table(("metric (mean)", *[m.name for m in methods]), rows)
