"""The `jaxattr` command line: `explain`, `models`, `convert`, `crosscheck`.

`main(argv) -> exit status`. PyTorch is imported only by `convert --verify/--random-init` and by
`crosscheck` (through the `converters` package), so `jaxattr explain` runs on the core install.

`explain` is built for long unattended runs: every output file is written atomically, a re-run
skips images whose outputs exist (the run "resumes"), one bad image is reported and skipped
without stopping the others, and `summary.json` / `summary.csv` are rewritten after every batch.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import dataclasses
import difflib
import io
import json
import os
import sys
import time
import types
import typing
import zlib
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from jaxattr import viz
from jaxattr.data import imagenet_labels
from jaxattr.explain import explain, method_config
from jaxattr.image import ImageLoadError, expand_paths, load_batch, load_image
from jaxattr.methods import list_methods, method_info
from jaxattr.models import WeightsError, create_model, list_models, model_info
from jaxattr.models.registry import ModelInfo, cache_path, local_weights_file
from jaxattr.models.weights import save_params

DEFAULT_MODEL = "efficientnet_lite0"
DEFAULT_METHOD = "integrated_gradients"
SUMMARY_JSON = "summary.json"
SUMMARY_CSV = "summary.csv"
# Modules of the optional extras; a missing one means "install the extra", not a bug.
_OPTIONAL_MODULES = frozenset({"torch", "torchvision", "timm", "safetensors", "captum", "saliency", "scipy"})
_CONFIG_DEST = "config:"  # argparse dest prefix of the method's config options
_SCALAR_TYPES = (int, float, str)


class CliError(Exception):
    """A user-facing failure: printed as `jaxattr: error: ...`, exit status `status`."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------ arguments


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _option_spec(annotation: Any) -> dict[str, Any] | None:
    """argparse keywords for a config field of type `annotation` (Optional[X] is treated as X);
    None for types with no command-line form (e.g. a nested config typed Any)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(inner) == 1:
            annotation = inner[0]
    origin, params = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is Literal:
        return {"type": type(params[0]), "choices": params}
    if origin is tuple and len(params) == 2 and params[1] is Ellipsis and params[0] in _SCALAR_TYPES:
        return {"type": params[0], "nargs": "+"}
    if annotation in _SCALAR_TYPES:
        return {"type": annotation}
    return None


def _flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _config_options(method: str) -> list[tuple[str, dict[str, Any], Any]]:
    """(field name, argparse keywords, default) of each config field settable from the command
    line; the others keep their defaults."""
    config_cls = method_info(method).config
    hints = typing.get_type_hints(config_cls)
    defaults = config_cls()
    options = []
    for field in dataclasses.fields(config_cls):
        spec = _option_spec(hints[field.name]) if field.init else None
        if spec is not None:
            options.append((field.name, spec, getattr(defaults, field.name)))
    return options


def _config_flags(method: str) -> list[str]:
    return [_flag(name) for name, _, _ in _config_options(method)]


def _add_config_options(parser: argparse.ArgumentParser, method: str) -> None:
    """One option per field of `method`'s config dataclass; only options given on the command line
    reach the config (default=SUPPRESS), so the dataclass stays the one source of defaults."""
    group = parser.add_argument_group(f"options of {method} (defaults: the method's reference settings)")
    for name, spec, default in _config_options(method):
        help_text = None if spec.get("action") else f"default: {default}"
        group.add_argument(
            _flag(name), dest=_CONFIG_DEST + name, default=argparse.SUPPRESS, help=help_text, **spec
        )


def build_parser(method: str | None = DEFAULT_METHOD) -> argparse.ArgumentParser:
    """The argument parser; `explain` gets the config options of `method` (none if None)."""
    parser = argparse.ArgumentParser(
        prog="jaxattr", description="Saliency maps for image classifiers, in JAX.", allow_abbrev=False
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    models = commands.add_parser(
        "models", help="list the registered models and their weights", allow_abbrev=False
    )
    models.set_defaults(run=run_models, parser=models)

    ex = commands.add_parser(
        "explain",
        help="write saliency maps of image files",
        allow_abbrev=False,
        description="Explain each image's predicted (or --target) class. Writes <name>.png (overlay) and "
        "<name>.npy (raw attribution) per image, and summary.json / summary.csv, into --out. Images "
        "whose outputs exist are skipped unless --overwrite, so an interrupted run resumes.",
    )
    ex.add_argument(
        "inputs", nargs="+", metavar="IMAGES_OR_DIRS", help="image files and/or directories of images"
    )
    ex.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"registered model (see `jaxattr models`; default {DEFAULT_MODEL})",
    )
    ex.add_argument(
        "--method", default=DEFAULT_METHOD, choices=list_methods(), help=f"default {DEFAULT_METHOD}"
    )
    ex.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    ex.add_argument("--weights", metavar="FILE", help="weights file (jaxattr or torch); default: pretrained")
    ex.add_argument(
        "--batch-size", type=_positive_int, default=8, metavar="N", help="images per batch (default 8)"
    )
    ex.add_argument(
        "--target",
        metavar="CLASS",
        help="explain this class (index or ImageNet name) instead of the prediction",
    )
    ex.add_argument(
        "--seed", type=int, default=0, metavar="N", help="random seed of stochastic methods (default 0)"
    )
    ex.add_argument("--overwrite", action="store_true", help="recompute images whose outputs exist")
    ex.add_argument("--panel", action="store_true", help="write image | heatmap | overlay side by side")
    ex.add_argument(
        "--alpha", type=float, default=viz.OVERLAY_ALPHA,
        help=f"opacity of the hottest pixels in the overlay (default {viz.OVERLAY_ALPHA})",
    )
    ex.add_argument("--recursive", action="store_true", help="also take images in subdirectories")
    if method is not None:
        _add_config_options(ex, method)
    ex.set_defaults(run=run_explain, parser=ex)

    cv = commands.add_parser(
        "convert",
        help="convert torch weights to jaxattr's format; --verify checks the port layer by layer",
        allow_abbrev=False,
    )
    cv.add_argument("model", help="registered model")
    cv.add_argument("--weights", metavar="FILE", help="torch checkpoint or safetensors (default: pretrained)")
    cv.add_argument(
        "--out", type=Path, metavar="FILE", help="write the converted weights here (.safetensors)"
    )
    cv.add_argument(
        "--verify",
        action="store_true",
        help="compare with the torch model on random images (needs jaxattr[torch])",
    )
    cv.add_argument(
        "--random-init",
        action="store_true",
        help="random torch weights instead (offline; needs jaxattr[torch])",
    )
    cv.add_argument(
        "--image-size", type=_positive_int, metavar="N", help="verification image size (default: the model's)"
    )
    cv.add_argument(
        "--batch", type=_positive_int, default=2, metavar="N", help="verification images (default 2)"
    )
    cv.add_argument(
        "--seed", type=int, default=0, metavar="N", help="seed of random weights and images (default 0)"
    )
    cv.set_defaults(run=run_convert, parser=cv)

    cc = commands.add_parser(
        "crosscheck",
        help="compare a method with its PyTorch reference implementation (needs jaxattr[dev])",
        allow_abbrev=False,
    )
    cc.add_argument("method", help="method with a PyTorch reference")
    cc.add_argument("--model", required=True, metavar="ARCH", help="registered model")
    cc.add_argument(
        "--random-init", action="store_true", help="random weights (offline) instead of pretrained"
    )
    cc.add_argument("--dtype", choices=("float32", "float64"), help="default: the reference's")
    cc.add_argument(
        "--images", nargs="+", type=Path, metavar="FILE", help="image files (default: random images)"
    )
    cc.add_argument("--image-size", type=_positive_int, metavar="N", help="image size (default: the model's)")
    cc.add_argument("--batch", type=_positive_int, default=2, metavar="N", help="random images (default 2)")
    cc.add_argument(
        "--seed", type=int, default=0, metavar="N", help="seed of random weights and images (default 0)"
    )
    cc.set_defaults(run=run_crosscheck, parser=cc)
    return parser


def _requested_method(argv: Sequence[str]) -> str:
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--method", default=DEFAULT_METHOD)
    return pre.parse_known_args(argv)[0].method


def _unknown_arguments_message(args: argparse.Namespace, unknown: list[str]) -> str:
    """Name the method an option belongs to when it is another method's config option."""
    if args.command == "explain":
        owners = collections.defaultdict(list)
        for method in list_methods():
            for flag in _config_flags(method):
                owners[flag].append(method)
        for arg in unknown:
            flag = arg.split("=", 1)[0]
            if flag in owners:
                return (
                    f"{args.method} has no option {flag} (an option of {', '.join(owners[flag])}); "
                    f"options of {args.method}: {', '.join(_config_flags(args.method)) or 'none'}"
                )
    return f"unrecognized arguments: {' '.join(unknown)}"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    method = _requested_method(argv)
    parser = build_parser(method if method in list_methods() else None)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        args.parser.error(_unknown_arguments_message(args, unknown))  # the subcommand's usage
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.run(args)
    except (CliError, WeightsError) as e:
        print(f"jaxattr: error: {e}", file=sys.stderr)
        return getattr(e, "status", 1)
    except KeyboardInterrupt:
        print(
            "\njaxattr: interrupted; finished outputs are kept, run the same command to resume",
            file=sys.stderr,
        )
        return 130


# ---------------------------------------------------------------------------- shared bits


def _model_info(name: str) -> ModelInfo:
    try:
        return model_info(name)
    except ValueError as e:
        raise CliError(f"{e} (see `jaxattr models`)") from None


@contextlib.contextmanager
def _needs_extra(extra: str, command: str) -> Iterator[None]:
    """Turn a missing optional dependency into an install hint."""
    try:
        yield
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in _OPTIONAL_MODULES:
            raise
        raise CliError(
            f"`jaxattr {command}` needs PyTorch and friends: pip install 'jaxattr[{extra}]' ({e})"
        ) from None


def _random_images(seed: int, batch: int, size: int) -> np.ndarray:
    return np.asarray(jax.random.uniform(jax.random.key(seed), (batch, size, size, 3), jnp.float32))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------------- models


def weights_status(info: ModelInfo) -> str:
    """'cached' (converted or torch weights on this machine), 'embedded' (shipped in a package)
    or 'missing' (create_model would download them). Checked in create_model's order."""
    if cache_path(info.name).is_file():
        return "cached"
    if info.embedded is not None:
        return "embedded"
    return "cached" if local_weights_file(info) is not None else "missing"


def run_models(args: argparse.Namespace) -> int:
    rows = []
    for name in list_models():
        info = model_info(name)
        size = f"{info.image_size} (resize {info.resize_size}, {info.interpolation})"
        rows.append((name, info.family, info.source, size, weights_status(info)))
    print(format_table(("model", "family", "source", "input", "weights"), rows))
    return 0


# -------------------------------------------------------------------------------- explain


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


_FAILED = ("unreadable", "non-finite")


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
        raise CliError("cannot give the inputs distinct output names; rename the clashing files")
    return {path: names[path] for path in paths}


def _outputs(out: Path, name: str) -> tuple[Path, Path]:
    return out / f"{name}.png", out / f"{name}.npy"


def _parse_target(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    lowered = [label.lower() for label in imagenet_labels()]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    close = difflib.get_close_matches(text.lower(), lowered, n=5)
    hint = f"; did you mean: {', '.join(close)}?" if close else ""
    raise CliError(f"--target {text!r} is neither a class index nor an ImageNet class name{hint}")


def _class_label(index: int, num_classes: int) -> str:
    return imagenet_labels()[index] if num_classes == len(imagenet_labels()) else f"class {index}"


def _read_summary(out: Path) -> tuple[dict | None, dict[str, dict]]:
    """(settings, records by output name) of an earlier run into `out`, if any."""
    path = out / SUMMARY_JSON
    if not path.is_file():
        return None, {}
    try:
        data = json.loads(path.read_text())
        return data["settings"], {record["output"]: record for record in data["images"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"jaxattr: warning: ignoring unreadable {path} ({e})", file=sys.stderr)
        return None, {}


def _write_summary(out: Path, settings: dict, records: Sequence[dict]) -> None:
    payload = json.dumps({"settings": settings, "images": list(records)}, indent=2)
    viz.write_atomically(out / SUMMARY_JSON, lambda f: f.write(payload.encode()))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=[f.name for f in dataclasses.fields(ImageRecord)])
    writer.writeheader()
    writer.writerows(records)
    viz.write_atomically(out / SUMMARY_CSV, lambda f: f.write(text.getvalue().encode()))


class Progress:
    """A progress bar on a terminal; a plain line per update otherwise (logs, pipes)."""

    def __init__(self, total: int, stream: TextIO, width: int = 30):
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


def _settings(args: argparse.Namespace, config: Any, target: int | None) -> dict:
    """What the outputs depend on; a resumed run must match the run that wrote them."""
    settings = {
        "model": args.model,
        "weights": str(Path(args.weights).resolve()) if args.weights else "pretrained",
        "method": args.method,
        "config": dataclasses.asdict(config),
        "target": target,
        "panel": args.panel,
        "alpha": args.alpha,
    }
    if method_info(args.method).stochastic:
        settings["seed"] = args.seed
    return json.loads(json.dumps(settings))  # as it reads back from summary.json (tuples -> lists)


def _write_outputs(
    out: Path,
    name: str,
    image: np.ndarray,
    attribution: np.ndarray,
    heatmap: np.ndarray,
    *,
    panel: bool,
    alpha: float,
) -> None:
    png, npy = _outputs(out, name)
    # Each file is atomic; an image only counts as done once both exist.
    viz.write_atomically(npy, lambda f: np.save(f, attribution))
    viz.save_png(png, viz.panel(image, heatmap, alpha) if panel else viz.overlay(image, heatmap, alpha))


def _image_keys(seed: int, names: list[str]) -> jax.Array:
    """One key per image from the seed and its output name, so a stochastic method gives an image
    the same map in any batch, in a resumed run as in an uninterrupted one."""
    base = jax.random.key(seed)
    return jnp.stack([jax.random.fold_in(base, zlib.crc32(name.encode())) for name in names])


def _explain_batch(model, method: str, images: list[np.ndarray], static_size: int, keys, config, target):
    """Attributions, heatmaps, classes and probabilities (numpy) of `images`.

    The batch (and its per-image keys) is padded to `static_size` by repeating its last image, so
    every batch has one shape and the method compiles once."""
    padding = static_size - len(images)
    batch = np.stack(images + [images[-1]] * padding)
    if keys is not None and padding:
        keys = jnp.concatenate([keys, jnp.repeat(keys[-1:], padding)])
    result = explain(model, jnp.asarray(batch), method, targets=target, key=keys, config=config)
    n = len(images)
    return (
        np.asarray(result.attributions[:n]),
        np.asarray(result.heatmaps[:n]),
        np.asarray(result.targets[:n]),
        np.asarray(result.probabilities[:n]),
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


def _config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The method options given on the command line (nargs='+' lists become tuples)."""
    return {
        key[len(_CONFIG_DEST) :]: tuple(value) if isinstance(value, list) else value
        for key, value in vars(args).items()
        if key.startswith(_CONFIG_DEST)
    }


def _earlier_records(out: Path, settings: dict, overwrite: bool) -> dict[str, dict]:
    """Records of images explained by earlier runs into `out`, which must have had `settings`."""
    earlier_settings, earlier = _read_summary(out)
    if earlier_settings is None or earlier_settings == settings:
        return {name: r for name, r in earlier.items() if r.get("status") == "explained"}
    if overwrite:
        return {}  # their settings no longer describe the directory
    changed = sorted(
        k for k in settings.keys() | earlier_settings.keys() if settings.get(k) != earlier_settings.get(k)
    )
    raise CliError(
        f"{out} holds outputs of a run with other settings ({', '.join(changed)} differ); "
        "use another --out, or --overwrite to replace them"
    )


def _explain_images(
    todo: list[Path], names: dict[Path, str], args, config, target, settings, summary
) -> dict[str, dict]:
    """Explain `todo` batch by batch, writing each image's outputs and, after every batch, the
    summary (`summary` updated in place). Returns the records of `todo`."""
    info = _model_info(args.model)
    model = create_model(args.model, weights=args.weights or "pretrained")
    shape = jax.ShapeDtypeStruct((1, info.image_size, info.image_size, 3), jnp.float32)
    num_classes = jax.eval_shape(model, shape).shape[-1]
    if target is not None and not 0 <= target < num_classes:
        raise CliError(f"--target {target} is out of range: {args.model} has {num_classes} classes")
    args.out.mkdir(parents=True, exist_ok=True)
    static_size = min(args.batch_size, len(todo))
    progress = Progress(len(todo), sys.stderr)
    records = {}
    stochastic = method_info(args.method).stochastic
    for start in range(0, len(todo), static_size):
        batch_paths, loaded = todo[start : start + static_size], []
        for path in batch_paths:
            try:
                loaded.append((path, load_image(path, info)))
            except ImageLoadError as e:
                records[names[path]] = dataclasses.asdict(
                    ImageRecord(str(path), names[path], "unreadable", message=e.reason)
                )
                progress.note(f"skipped unreadable {e}")
        if loaded:
            keys = _image_keys(args.seed, [names[path] for path, _ in loaded]) if stochastic else None
            images = [image for _, image in loaded]
            results = _explain_batch(model, args.method, images, static_size, keys, config, target)
            for (path, image), attribution, heatmap, cls, probability in zip(loaded, *results, strict=True):
                name, cls = names[path], int(cls)
                record = ImageRecord(
                    str(path), name, "explained", cls, _class_label(cls, num_classes), float(probability)
                )
                if np.isfinite(attribution).all() and np.isfinite(heatmap).all():
                    _write_outputs(
                        args.out, name, image, attribution, heatmap, panel=args.panel, alpha=args.alpha
                    )
                else:
                    record.status, record.message = (
                        "non-finite",
                        "NaN or inf in the attribution; outputs not written",
                    )
                    progress.note(f"skipped {path}: {record.message}")
                records[name] = dataclasses.asdict(record)
        summary.update(records)
        _write_summary(args.out, settings, list(summary.values()))
        progress.advance(len(batch_paths))
    return records


def run_explain(args: argparse.Namespace) -> int:
    _model_info(args.model)  # an unknown name fails before any work
    config = method_config(args.method, **_config_overrides(args))
    target = _parse_target(args.target)
    if not 0.0 <= args.alpha <= 1.0:
        raise CliError(f"--alpha must be in [0, 1], got {args.alpha}")
    try:
        paths = expand_paths(args.inputs, recursive=args.recursive)
    except FileNotFoundError as e:
        raise CliError(str(e)) from None
    if not paths:
        raise CliError(f"no image files in {', '.join(args.inputs)}")
    names = output_names(paths)
    settings = _settings(args, config, target)
    summary = _earlier_records(args.out, settings, args.overwrite)

    records, todo = {}, []
    for path in paths:
        name = names[path]
        if not args.overwrite and all(p.is_file() for p in _outputs(args.out, name)):
            records[name] = summary.get(name) or dataclasses.asdict(ImageRecord(str(path), name, "exists"))
        else:
            todo.append(path)
    if records:
        print(
            f"{len(records)} of {len(paths)} images already have outputs in {args.out}; skipping them",
            file=sys.stderr,
        )
        summary.update(records)
    if todo:
        records.update(_explain_images(todo, names, args, config, target, settings, summary))

    ordered = [records[names[path]] for path in paths]
    print(format_table(("file", "class", "label", "probability", "status"), [_table_row(r) for r in ordered]))
    failed = sum(r["status"] in _FAILED for r in ordered)
    print(
        f"{len(todo) - failed} explained, {len(paths) - len(todo)} already done, {failed} failed; "
        f"outputs and {SUMMARY_JSON} / {SUMMARY_CSV} in {args.out}",
        file=sys.stderr,
    )
    return 1 if failed else 0


# -------------------------------------------------------------------------------- convert


def run_convert(args: argparse.Namespace) -> int:
    info = _model_info(args.model)
    if args.random_init and args.weights:
        raise CliError("--random-init and --weights exclude each other")
    if args.random_init and not (args.out or args.verify):
        raise CliError("nothing to do: --random-init needs --out and/or --verify")
    weights = args.weights or "pretrained"
    if args.verify or args.random_init:
        with _needs_extra("torch", "convert --verify/--random-init"):
            from converters import crosscheck

            model, torch_model = crosscheck.twin_models(
                args.model, random_init=args.random_init, seed=args.seed, weights=weights
            )
    else:  # reading torch checkpoints needs no torch
        model = create_model(args.model, weights)
    if args.out:
        save_params(args.out, model.params, model=args.model)
        print(f"wrote {args.out}")
    elif weights == "pretrained" and cache_path(args.model).is_file():
        print(f"converted weights cached at {cache_path(args.model)}")
    if not args.verify:
        return 0
    size = args.image_size or info.image_size
    images = _random_images(args.seed, args.batch, size)
    with _needs_extra("torch", "convert --verify"), jax.default_matmul_precision("highest"):
        from converters import verify

        report = verify.compare(model, torch_model, images)
    print(report.table())
    logits = report.logits
    print(
        f"logits: max|diff|={logits.max_abs_diff:.3e} relative={logits.relative:.3e} "
        f"tolerance={logits.tolerance:.0e} ({_count(args.batch, 'random image')} {size}x{size})"
    )
    if report.ok:
        print("parity ok")
        return 0
    print("parity FAILED in: " + ", ".join(d.layer for d in report.layers if not d.ok))
    return 1


# ----------------------------------------------------------------------------- crosscheck


def run_crosscheck(args: argparse.Namespace) -> int:
    info = _model_info(args.model)
    size = args.image_size or info.image_size
    if args.images:
        try:
            images = load_batch(args.images, info, size)
        except ImageLoadError as e:
            raise CliError(str(e)) from None
        described = _count(len(images), "image file")
    else:
        images = _random_images(args.seed, args.batch, size)
        described = _count(args.batch, "random image")
    with _needs_extra("dev", "crosscheck"), jax.default_matmul_precision("highest"):
        from converters import crosscheck

        references = crosscheck.references()
        if args.method not in references:
            raise CliError(
                f"no PyTorch reference for {args.method!r}; cross-checkable: {', '.join(references)}"
            )
        model, torch_model = crosscheck.twin_models(args.model, random_init=args.random_init, seed=args.seed)
        try:
            result = crosscheck.run(args.method, model, torch_model, images, dtype=args.dtype)
        except ValueError as e:
            raise CliError(str(e)) from None
    weights = f"random weights (seed {args.seed})" if args.random_init else "pretrained weights"
    inputs = f"{described} {size}x{size}"
    print(f"{args.method} on {args.model}, {weights}, {result.dtype}, {inputs}, vs {result.reference}")
    verdict = "ok" if result.ok else "EXCEEDED"
    print(f"max_rel_diff={result.max_rel_diff:.3e} tolerance={result.tolerance:.0e} {verdict}")
    return 0 if result.ok else 1
