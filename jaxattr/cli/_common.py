"""What the commands share: the user-facing error, extras hints, tables, and method options
generated from config classes."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxattr import memory
from jaxattr.compilation import ProgramStore, StoreError, open_store, tree_signature
from jaxattr.config import AUTO_CHUNK, Chunk, ConfigError, literal_choices
from jaxattr.image import MAX_PIXELS, Preprocessing
from jaxattr.methods import Method, list_methods, method_spec, resolve_chunks
from jaxattr.models import model_info
from jaxattr.models.registry import ModelInfo, jaxattr_home

# Modules of the optional extras; a missing one means "install the extra", not a bug.
_OPTIONAL_MODULES = frozenset({"torch", "torchvision", "timm", "safetensors", "captum", "saliency", "scipy"})
CONFIG_DEST = "config:"  # argparse dest prefix of the method's config options
_SCALAR_TYPES = (int, float, str)
_METAVARS = {int: "N", float: "X", str: "NAME"}


class CliError(Exception):
    """A user-facing failure: printed as `jaxattr: error: ...`, exit status `status`."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------ option types: one-line errors, exit 2


def _integer(text: str, expected: str, low: int, high: float, bounds: str) -> int:
    """int(text) within [low, high], or a usage error: `expected` when it is no integer, `bounds`
    when it is out of range."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{bounds}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _integer(text, "a positive integer", 1, float("inf"), "must be a positive integer")


SEED_RANGE = 2**32  # jax.random.key takes any 32-bit seed


def seed(text: str) -> int:
    return _integer(text, "an integer seed", 0, SEED_RANGE - 1, f"must be in [0, {SEED_RANGE - 1}]")


def loader_count(text: str) -> int:
    return _integer(text, "a number of threads", 0, float("inf"), "must be 0 or more")


def host_port(text: str) -> str:
    """HOST:PORT: a host name, an IPv4 address or an IPv6 address in brackets ([::1]:1234), and a
    port in 1..65535; the text unchanged."""
    host, colon, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        valid_host = _is_address(host[1:-1], ipaddress.IPv6Address)
    elif host.replace(".", "").isdecimal():
        valid_host = _is_address(host, ipaddress.IPv4Address)
    else:  # a bare IPv6 address fails here: its last group would read as the port
        valid_host = len(host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in host.split("."))
    if not (colon and valid_host and port.isascii() and port.isdecimal() and 1 <= int(port) <= 65535):
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT (a host name, IPv4 address or [IPv6] address, and a port in 1..65535), got {text!r}"
        )
    return text


_HOST_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")  # RFC 1123 (and the underscores some clusters use)


def _is_address(text: str, kind: type) -> bool:
    try:
        kind(text)
        return True
    except ValueError:
        return False


MAX_TIMEOUT = 7 * 24 * 3600


def seconds(text: str) -> int:
    """A timeout: 1 s to a week."""
    return _integer(text, "a number of seconds", 1, MAX_TIMEOUT, f"must be in [1, {MAX_TIMEOUT}] seconds")


def output_dir(text: str) -> Path:
    """--out DIR: any path but the empty one, which would quietly mean the current directory."""
    if not text:
        raise argparse.ArgumentTypeError("expected a directory, got an empty path (for the current directory, give .)")
    return Path(text)


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def add_preprocessing_options(parser: argparse.ArgumentParser) -> None:
    """--resize, --crop / --no-crop, --interpolation: the eval transform, default the model's."""
    group = parser.add_argument_group("preprocessing (default: the model's eval transform, see `jaxattr models`)")
    group.add_argument("--resize", type=positive_int, metavar="N", help="resize the shorter side to N (with --no-crop: the image to NxN)")
    crop = group.add_mutually_exclusive_group()
    crop.add_argument("--crop", type=positive_int, metavar="N", help="centre-crop NxN after the resize (the model's input size)")
    crop.add_argument("--no-crop", dest="crop", action="store_const", const=0, help="no crop: resize the whole image to NxN")
    group.add_argument("--interpolation", choices=("bilinear", "bicubic"), help="resize filter (Pillow's, as torchvision)")


def add_loaders_option(parser: argparse.ArgumentParser) -> None:
    """--loaders N: the streaming pipeline's decoding threads (`jaxattr.run.pipeline`)."""
    parser.add_argument(
        "--loaders",
        type=loader_count,
        metavar="N",
        help="threads decoding the next batches while one computes (0: decode, compute and write in turn; "
        "default min(4, CPUs) on an accelerator, 0 when JAX computes on the CPU)",
    )


def loaders(args: argparse.Namespace) -> int:
    """--loaders, or its default. When the CPU is the device, decoding threads take cores from
    XLA's own thread pool, whose parallel loops then wait for their slowest thread: a pipelined run
    was slower than one stage after another (benchmarks/pipeline.py: 1.29x against 0.90x the pure
    compute time per image, 2 cores), so the CPU default is no pipeline."""
    if args.loaders is not None:
        return args.loaders
    return 0 if jax.default_backend() == "cpu" else min(4, os.cpu_count() or 1)


def preprocessing(args: argparse.Namespace, info: ModelInfo) -> Preprocessing:
    """The model's eval transform with the options given: --crop N alone keeps the model's ratio
    of resize to crop, --resize N alone keeps its crop, --no-crop alone resizes to its input size."""
    default = Preprocessing.of(info)
    crop = {None: default.crop, 0: None}.get(args.crop, args.crop)
    if args.resize is not None:
        resize = args.resize
    elif args.crop is None:
        resize = default.resize
    else:
        resize = Preprocessing.of(info, crop).resize if crop is not None else info.image_size
    transform = Preprocessing(resize, crop, args.interpolation or default.interpolation)
    if transform.resize * transform.resize > MAX_PIXELS:
        # the option given: --crop alone sets the resize through the model's ratio
        given = f"--resize: {args.resize}" if args.resize is not None else f"--crop: {args.crop} resizes images to {transform.resize} px, which"
        raise CliError(f"argument {given} makes images above {MAX_PIXELS} pixels", status=2)
    return transform


# -------------------------------------------------------------------------- compute dtype

# The dtypes a model may compute in from the command line. float16 is left out: its range
# overflows in the gradients of unnormalised logits, where bfloat16 keeps float32's range.
COMPUTE_DTYPES = ("float32", "bfloat16")


def add_dtype_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype",
        choices=COMPUTE_DTYPES,
        default="float32",
        help="the dtype the model computes in: bfloat16 casts its parameters and activations (faster on TPUs "
        "and recent GPUs; gradients are summed and maps written in float32; README: the error against float32). "
        "Default float32",
    )


def in_compute_dtype(model: Any, args: argparse.Namespace) -> Any:
    """The model computing in --dtype (float32: the model as loaded)."""
    return model if args.dtype == "float32" else model.astype(jnp.dtype(args.dtype))


# ------------------------------------------------------------------------------------ memory


def fit_memory(
    method: Method,
    model: Any,
    batch: int,
    image_shape: tuple[int, ...],
    dtype: Any = jnp.float32,
    store: ProgramStore | None = None,
) -> Method:
    """`method` with chunk sizes that fit the memory available (a note on stderr when one is
    chosen), or a usage error with the estimate when nothing fits. `store`: keep the model's
    traced memory per image there, for the next process."""
    pass_size = None
    if store is not None:
        description = {"value": "pass_bytes", "model": tree_signature(model), "image": list(image_shape), "dtype": str(dtype)}
        pass_size = store.count(description, lambda: memory.pass_bytes(model, image_shape, dtype))
    try:
        fitted = memory.fit(method, model, batch, image_shape, dtype, pass_size=pass_size)
    except memory.MemoryEstimateError as e:
        raise CliError(f"{e}; lower --batch-size or the method's sizes (--steps, --samples), or set --chunk", status=2) from None
    if fitted is method:
        return method
    resolved = resolve_chunks(method.config, batch, image_shape)  # what "auto" alone would have chosen
    chosen = [
        f"{'.'.join(path)}={value}"
        for (path, value), (_, before) in zip(memory.chunk_fields(fitted), memory.chunk_fields(Method(method.spec, resolved)))
        if value != before
    ]
    if chosen:
        print(f"jaxattr: note: {method.spec.name} runs with {', '.join(chosen)} to fit the memory available", file=sys.stderr)
    return fitted


def open_compile_store(args: argparse.Namespace) -> ProgramStore | None:
    """The program store in $JAXATTR_HOME/compile (None with --no-compile-cache); one line if its
    directory is not safe to run programs from."""
    if not args.compile_cache:
        return None
    try:
        return open_store(jaxattr_home() / "compile")
    except StoreError as e:
        raise CliError(str(e)) from None


def lookup_model(name: str) -> ModelInfo:
    try:
        return model_info(name)
    except ValueError as e:
        raise CliError(f"argument --model: {e} (see `jaxattr models`)", status=2) from None


@contextlib.contextmanager
def needs_extra(extra: str, command: str) -> Iterator[None]:
    """Turn a missing optional dependency into an install hint."""
    try:
        yield
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in _OPTIONAL_MODULES:
            raise
        raise CliError(
            f"`jaxattr {command}` needs PyTorch and friends: pip install 'jaxattr[{extra}]' ({e})"
        ) from None


def random_images(seed: int, batch: int, size: int) -> np.ndarray:
    return np.asarray(jax.random.uniform(jax.random.key(seed), (batch, size, size, 3), jnp.float32))


def count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -------------------------------------------------------------------- options from configs


def flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _base_method(text: str) -> Method:
    """--base NAME: a registered method (one that wraps no other) with its defaults."""
    try:
        spec = method_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return spec.build()


def _chunk(text: str) -> int | str | None:
    """--chunk N, auto (chosen from the batch) or all (everything at once)."""
    if text in (AUTO_CHUNK, "all"):
        return None if text == "all" else text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, auto or all, got {text!r}") from None


def _option_spec(annotation: Any) -> dict[str, Any] | None:
    """argparse keywords for a config field of type `annotation` (Optional[X] is treated as X);
    None for types with no command-line form."""
    if annotation == Chunk:
        return {"type": _chunk, "metavar": "N|auto|all"}
    choices = literal_choices(annotation)
    if choices is not None:
        choices = tuple(c for c in choices if c is not None)
        return {"type": type(choices[0]), "choices": choices}
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(inner) == 1:
            annotation = inner[0]
    origin, params = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if annotation is Method:
        names = [m for m in list_methods() if not method_spec(m).wraps]
        return {"type": _base_method, "metavar": "METHOD", "help_choices": names}
    if origin is tuple and len(params) == 2 and params[1] is Ellipsis and params[0] in _SCALAR_TYPES:
        return {"type": params[0], "nargs": "+", "metavar": _METAVARS[params[0]]}
    if annotation in _SCALAR_TYPES:
        return {"type": annotation, "metavar": _METAVARS[annotation]}
    return None


def config_options(method: str) -> list[tuple[str, dict[str, Any], Any]]:
    """(field name, argparse keywords, default) of each config field settable from the command
    line; the others keep their defaults."""
    config_cls = method_spec(method).config
    hints = typing.get_type_hints(config_cls)
    defaults = config_cls()
    options = []
    for field in dataclasses.fields(config_cls):
        spec = _option_spec(hints[field.name]) if field.init else None
        if spec is not None:
            options.append((field.name, spec, getattr(defaults, field.name)))
    return options


def config_option(method: str, field: str, value: str, text: str) -> tuple[Any, list[str]]:
    """A --option value (`text`, as given) of `method`'s config field `field`: (the config value,
    explain's arguments after the field's flag); an unknown field or a value of the wrong type is
    a usage error naming the option. Values are typed as explain's flags type them; booleans are
    true/false (yes/no, 1/0, on/off), lists comma-separated."""
    specs = {name: spec for name, spec, _ in config_options(method)}
    if field not in specs:
        raise CliError(f"argument --option {text}: {method} has no option {field}; options: {', '.join(specs) or 'none'}", 2)
    spec = specs[field]
    if spec.get("action") is argparse.BooleanOptionalAction:
        truth = {"true": True, "yes": True, "1": True, "on": True, "false": False, "no": False, "0": False, "off": False}
        if value.lower() not in truth:
            raise CliError(f"argument --option {text}: expected true or false", 2)
        return truth[value.lower()], []
    parts = value.split(",") if spec.get("nargs") == "+" else [value]
    try:
        typed = [spec["type"](p) for p in parts]
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise CliError(f"argument --option {text}: {e}", 2) from None
    choices = spec.get("choices")
    if choices is not None and typed[0] not in choices:
        raise CliError(f"argument --option {text}: expected one of {', '.join(map(str, choices))}", 2)
    return (tuple(typed) if spec.get("nargs") == "+" else typed[0]), parts


def config_flags(method: str) -> list[str]:
    return [flag(name) for name, _, _ in config_options(method)]


def _default_text(default: Any) -> str:
    return default.spec.name if isinstance(default, Method) else str(default)


def add_config_options(parser: argparse.ArgumentParser, method: str) -> None:
    """One option per field of `method`'s config; only options given on the command line reach the
    config (default=SUPPRESS), so the config class stays the one source of defaults."""
    group = parser.add_argument_group(f"options of {method} (defaults: the method's reference settings)")
    for name, spec, default in config_options(method):
        spec = dict(spec)
        choices = spec.pop("help_choices", None)
        help_text = f"default: {_default_text(default)}" + (f"; one of {', '.join(choices)}" if choices else "")
        group.add_argument(flag(name), dest=CONFIG_DEST + name, default=argparse.SUPPRESS, help=help_text, **spec)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The method options given on the command line (nargs='+' lists become tuples)."""
    return {
        key[len(CONFIG_DEST) :]: tuple(value) if isinstance(value, list) else value
        for key, value in vars(args).items()
        if key.startswith(CONFIG_DEST)
    }


def config_error(error: ConfigError) -> CliError:
    """A config error as a one-line usage error naming the flag (exit status 2)."""
    return CliError(f"argument {flag(error.field)}: {error}", status=2)

