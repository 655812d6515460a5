"""`jaxattr convert`: torch weights to jaxattr's format; `--verify` checks the port layer by layer."""

from __future__ import annotations

import argparse
from pathlib import Path

import jax

from jaxattr.cli._common import CliError, count, lookup_model, needs_extra, positive_int, random_images
from jaxattr.models import create_model
from jaxattr.models.registry import cache_path
from jaxattr.models.weights import save_params


def add_parser(commands) -> None:
    cv = commands.add_parser(
        "convert",
        help="convert torch weights to jaxattr's format; --verify checks the port layer by layer",
        allow_abbrev=False,
    )
    cv.add_argument("model", help="registered model")
    cv.add_argument("--weights", metavar="FILE", help="torch checkpoint or safetensors (default: pretrained)")
    cv.add_argument("--out", type=Path, metavar="FILE", help="write the converted weights here (.safetensors)")
    cv.add_argument("--verify", action="store_true", help="compare with the torch model on random images (needs jaxattr[torch])")
    cv.add_argument("--random-init", action="store_true", help="random torch weights instead (offline; needs jaxattr[torch])")
    cv.add_argument("--image-size", type=positive_int, metavar="N", help="verification image size (default: the model's)")
    cv.add_argument("--batch", type=positive_int, default=2, metavar="N", help="verification images (default 2)")
    cv.add_argument("--seed", type=int, default=0, metavar="N", help="seed of random weights and images (default 0)")
    cv.set_defaults(run=run, parser=cv)


def run(args: argparse.Namespace) -> int:
    info = lookup_model(args.model)
    if args.random_init and args.weights:
        raise CliError("--random-init and --weights exclude each other")
    if args.random_init and not (args.out or args.verify):
        raise CliError("nothing to do: --random-init needs --out and/or --verify")
    weights = args.weights or "pretrained"
    if args.verify or args.random_init:
        with needs_extra("torch", "convert --verify/--random-init"):
            from converters import crosscheck

            model, torch_model = crosscheck.twin_models(args.model, random_init=args.random_init, seed=args.seed, weights=weights)
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
    images = random_images(args.seed, args.batch, size)
    with needs_extra("torch", "convert --verify"), jax.default_matmul_precision("highest"):
        from converters import verify

        report = verify.compare(model, torch_model, images)
    print(report.table())
    logits = report.logits
    print(
        f"logits: max|diff|={logits.max_abs_diff:.3e} relative={logits.relative:.3e} "
        f"tolerance={logits.tolerance:.0e} ({count(args.batch, 'random image')} {size}x{size})"
    )
    if report.ok:
        print("parity ok")
        return 0
    print("parity FAILED in: " + ", ".join(d.layer for d in report.layers if not d.ok))
    return 1
