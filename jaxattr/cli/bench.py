"""`jaxattr bench`: throughput of a model x method on this machine's default device, as JSON.

The batch program of `jaxattr explain` (prediction, attribution, saliency map; the method's
extra outputs left out) is compiled for a batch of random images; the report gives its compile time, XLA's own memory analysis of the
compiled program (peak device memory = arguments + outputs + temporaries - aliased), XLA's flop
count, and the steady-state images/s and GFLOP/s over `--repeats` timed calls.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax

from jaxattr.cli._common import (
    CliError,
    add_config_options,
    add_dtype_option,
    config_error,
    config_overrides,
    in_compute_dtype,
    lookup_model,
    open_compile_store,
    positive_int,
    random_images,
)
from jaxattr.cli.explain import BatchProgram
from jaxattr.config import ConfigError
from jaxattr.methods import list_methods, method_spec
from jaxattr.models import create_model

DEFAULT_MODEL = "efficientnet_lite0"
DEFAULT_METHOD = "integrated_gradients"


def add_parser(commands, method: str | None) -> None:
    bench = commands.add_parser(
        "bench",
        help="measure images/s, compile time and device memory of a model x method (JSON)",
        allow_abbrev=False,
        description="Compile `explain` for one batch of random images and time it on the default device. "
        "Prints one JSON object: images_per_s, compile_s, peak_memory_bytes (XLA memory analysis), gflops_per_s.",
    )
    bench.add_argument("--model", default=DEFAULT_MODEL, help=f"registered model (default {DEFAULT_MODEL})")
    bench.add_argument("--method", default=DEFAULT_METHOD, choices=list_methods(), help=f"default {DEFAULT_METHOD}")
    bench.add_argument("--batch-size", type=positive_int, default=8, metavar="N", help="images per batch (default 8)")
    bench.add_argument("--repeats", type=positive_int, default=3, metavar="N", help="timed calls (default 3)")
    bench.add_argument("--weights", metavar="FILE", help="weights file; default: pretrained")
    bench.add_argument("--random-init", action="store_true", help="random weights (speed does not depend on them)")
    bench.add_argument(
        "--compile-cache",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="load the program from the compile store ($JAXATTR_HOME/compile) when it is there; default off, so compile_s is a real compile",
    )
    add_dtype_option(bench)
    if method is not None:
        add_config_options(bench, method)
    bench.set_defaults(run=run, parser=bench)


def peak_memory_bytes(compiled: jax.stages.Compiled) -> int | None:
    """Device memory the program needs at its peak, from XLA's memory analysis (None if the
    backend gives none)."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return int(
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )


def flop_count(compiled: jax.stages.Compiled) -> float | None:
    costs = compiled.cost_analysis()
    if isinstance(costs, (list, tuple)):  # older JAX: one dict per computation
        costs = costs[0] if costs else None
    flops = (costs or {}).get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def run(args: argparse.Namespace) -> int:
    info = lookup_model(args.model)
    if args.random_init and args.weights:
        raise CliError("--random-init and --weights exclude each other")
    try:
        method = method_spec(args.method).build(**config_overrides(args))
    except ConfigError as e:
        raise config_error(e) from None
    store = open_compile_store(args)
    model = in_compute_dtype(create_model(args.model, weights=None if args.random_init else (args.weights or "pretrained")), args)
    size = info.image_size
    images = jax.numpy.asarray(random_images(0, args.batch_size, size))
    unwanted = frozenset(name for extra in method.spec.extra_outputs for name in extra.uses)
    start = time.perf_counter()  # trace, lower, XLA compile (or the store's read)
    program = BatchProgram(model, method, args.batch_size, size, None, None, None, unwanted, None, store)
    compile_s = time.perf_counter() - start
    key_data = jax.random.key_data(jax.random.split(jax.random.key(0), args.batch_size)) if program.stochastic else None
    compiled = program.compiled

    def call():
        return compiled(program.leaves, images, key_data, None)

    jax.block_until_ready(call())  # first call: transfers, allocations
    start = time.perf_counter()
    for _ in range(args.repeats):
        jax.block_until_ready(call())
    per_batch = (time.perf_counter() - start) / args.repeats
    flops = flop_count(compiled)
    device = jax.devices()[0]
    report = {
        "model": args.model,
        "method": args.method,
        "config": method.config.to_dict(),
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "image_size": size,
        "device": f"{device.platform}:{device.device_kind}",
        "jax": jax.__version__,
        "compile_cache": args.compile_cache,
        "compile_s": round(compile_s, 4),
        "seconds_per_batch": round(per_batch, 6),
        "images_per_s": round(args.batch_size / per_batch, 3),
        "peak_memory_bytes": peak_memory_bytes(compiled),
        "gflop_per_batch": None if flops is None else round(flops / 1e9, 3),
        "gflops_per_s": None if flops is None else round(flops / 1e9 / per_batch, 3),
    }
    print(json.dumps(report, indent=2))
    sys.stdout.flush()
    return 0
