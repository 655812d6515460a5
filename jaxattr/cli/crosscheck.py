"""`jaxattr crosscheck`: a method against its PyTorch reference on the same model and images."""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

import jax

from jaxattr.cli._common import (
    CliError,
    config_option,
    count,
    fit_memory,
    lookup_model,
    needs_extra,
    positive_int,
    random_images,
    seed,
)
from jaxattr.config import ConfigError
from jaxattr.image import ImageLoadError, load_batch
from jaxattr.methods import Method, list_methods, method_spec
from jaxattr.run import call_interruptibly


def add_parser(commands) -> None:
    cc = commands.add_parser(
        "crosscheck", help="compare a method with its PyTorch reference implementation (needs jaxattr[dev])", allow_abbrev=False
    )
    cc.add_argument("method", help="method with a PyTorch reference")
    cc.add_argument("--model", required=True, metavar="ARCH", help="registered model")
    cc.add_argument("--random-init", action="store_true", help="random weights (offline) instead of pretrained")
    cc.add_argument("--dtype", choices=("float32", "float64"), help="default: the reference's")
    cc.add_argument("--images", nargs="+", type=Path, metavar="FILE", help="image files (default: random images)")
    cc.add_argument("--image-size", type=positive_int, metavar="N", help="image size (default: the model's)")
    cc.add_argument("--batch", type=positive_int, default=2, metavar="N", help="random images (default 2)")
    cc.add_argument("--seed", type=seed, default=0, metavar="N", help="seed of random weights and images (default 0)")
    cc.add_argument("--option", action="append", default=[], metavar="FIELD=VALUE",
                    help="a field of the method's config on both sides (repeatable), e.g. steps=8 for "
                    "integrated_gradients; the fields: `jaxattr explain --method METHOD --help`")
    cc.set_defaults(run=run, parser=cc)


def run(args: argparse.Namespace) -> int:
    info = lookup_model(args.model)
    size = args.image_size or info.image_size
    if args.images:
        try:
            images = load_batch(args.images, info, size)
        except ImageLoadError as e:
            raise CliError(str(e)) from None
        described = count(len(images), "image file")
    else:
        images = random_images(args.seed, args.batch, size)
        described = count(args.batch, "random image")
    with needs_extra("dev", "crosscheck"), jax.default_matmul_precision("highest"):
        from converters import crosscheck

        references = crosscheck.references()
        if args.method not in references:
            raise CliError(f"no PyTorch reference for {args.method!r}; cross-checkable: {', '.join(references)}")
        reference = references[args.method]
        configured = _configured(reference, args.option)  # a bad --option fails before the models are built
        model, torch_model = crosscheck.twin_models(args.model, random_init=args.random_init, seed=args.seed)
        dtype = args.dtype or reference.default_dtype
        options = _runner_options(reference, configured, model, len(images), size, dtype)

        def compare():  # on a worker thread, so Ctrl-C stops a long comparison at once; JAX's
            with jax.default_matmul_precision("highest"):  # precision setting is per thread
                return crosscheck.run(args.method, model, torch_model, images, dtype=args.dtype, **options)

        try:
            result = call_interruptibly(compare)
        except ValueError as e:
            raise CliError(str(e)) from None
    weights = f"random weights (seed {args.seed})" if args.random_init else "pretrained weights"
    inputs = f"{described} {size}x{size}" + (f", {' '.join(args.option)}" if args.option else "")
    print(f"{args.method} on {args.model}, {weights}, {result.dtype}, {inputs}, vs {result.reference}")
    verdict = "ok" if result.ok else "EXCEEDED"
    print(f"max_rel_diff={result.max_rel_diff:.3e} tolerance={result.tolerance:.0e} {verdict}")
    return 0 if result.ok else 1


def _configured(reference, options: list[str]) -> tuple[Method, Method] | None:
    """(the method as the runner compares it when given no config: `Reference.config`, else the
    method's defaults; the same with the --option fields); None for a reference of no jaxattr method."""
    if reference.method not in list_methods():
        if options:
            raise CliError(f"argument --option: {reference.method} is no jaxattr method; it takes no options", 2)
        return None
    spec = method_spec(reference.method)
    overrides = {}
    for text in options:
        field, equals, value = text.partition("=")
        field = field.replace("-", "_")
        if not (equals and field):
            raise CliError(f"argument --option: expected FIELD=VALUE (e.g. steps=8), got {text!r}", 2)
        overrides[field] = config_option(spec.name, field, value, text)[0]
    default = spec.build(reference.config)
    try:
        chosen = spec.build(default.config, **overrides)
    except ConfigError as e:
        raise CliError(f"argument --option {e.field}: {e}", 2) from None
    if chosen != default and "config" not in inspect.signature(reference.runner).parameters:
        raise CliError(f"argument --option: the {reference.method} reference compares the method's defaults only", 2)
    return default, chosen


def _runner_options(reference, configured: tuple[Method, Method] | None, model, batch: int, size: int, dtype: str) -> dict:
    """The runner's `config=`: the configured method with chunk sizes that fit the memory available
    (both sides evaluate the same chunks: captum's internal batch size is the chunk); {} where that
    is the runner's own default."""
    if configured is None:
        return {}
    default, chosen = configured
    fitted = fit_memory(chosen, model, batch, (size, size, 3), dtype)
    if fitted == default:
        return {}
    if "config" not in inspect.signature(reference.runner).parameters:
        raise CliError(f"{reference.method} does not fit the memory available; use fewer or smaller images", status=2)
    return {"config": fitted.config}
