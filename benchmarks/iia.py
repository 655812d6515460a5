"""IIA: jaxattr vs the PyTorch implementation of the reference computation
(converters/references/iia.py, one image at a time as the authors' scripts), same machine, same
random weights, images and targets.

    python benchmarks/iia.py                  # ResNet-101 and ViT-B/16 (timm), 224 px, batch 2
    python benchmarks/iia.py --batch 4        # the issue's batch (twice the time)
    python benchmarks/iia.py --quick          # batch 1, ViT path 3 x 3 points instead of 6 x 6
    python benchmarks/iia.py --threads 1      # one CPU thread on each side

Reference configuration: CNN layer4, 11 image points (mode 'reference': the features of the 11
points, then 11 head passes of the degenerate activation path); ViT 6 image points x 6 attention
points (a forward pass per image point, then 36 forward and backward passes). The torch side runs
the features / recording passes without gradients and differentiates w.r.t. activations or
attention only (no parameter gradients), so it does no more work than the computation needs.

Reports seconds per image of each (the best of --repeats rounds, each round running both once, so
a load change on this shared machine hits both alike; jaxattr's compile time separately), the
ratio torch / jaxattr and the agreement of the maps. Prints the load average before and after.
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np
import torch

from converters.crosscheck import max_rel_diff
from converters.references.iia import reference_maps
from converters.torch_models import to_torch_images, torch_twin
from jaxattr.methods.iia import IIAConfig, iia

from _harness import load, print_header, timed_compile, timed_rounds

MODELS = "resnet101,vit_base_patch16_224"


def bench_model(name: str, args) -> dict:
    torch_model, model = torch_twin(name)
    images = np.random.RandomState(0).rand(args.batch, 224, 224, 3).astype(np.float32)
    with torch.no_grad():
        targets = torch_model(to_torch_images(images)).argmax(-1).numpy()
    vit = name.startswith("vit")
    config = IIAConfig(steps=2, activation_steps=2) if (vit and args.quick) else IIAConfig()
    config = config.replace(chunk=args.chunk) if args.chunk else config
    fn = jax.jit(lambda m, x, t: iia(m, x, t, config=config))
    compiled, compile_seconds = timed_compile(fn, model, images, targets)
    runs = {
        "jaxattr": lambda: np.asarray(compiled(model, images, targets)),
        "torch": lambda: reference_maps(model, torch_model, images, targets, config),
    }
    results, seconds, _ = timed_rounds(runs, args.repeats)
    return {
        "model": name,
        "config": f"{(config.steps or 5) + 1}x{(config.activation_steps or 5) + 1}" if vit else "11 (+11 head)",
        "jaxattr": seconds["jaxattr"] / args.batch,
        "torch": seconds["torch"] / args.batch,
        "compile": compile_seconds,
        "max_rel_diff": max_rel_diff(results["jaxattr"], results["torch"]),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=MODELS, help=f"comma-separated registered models (default {MODELS})")
    parser.add_argument("--batch", type=int, default=None, help="images per jaxattr batch (default 2; --quick 1)")
    parser.add_argument("--chunk", type=int, default=None, help="image points per jaxattr batch (default: IIA's)")
    parser.add_argument("--repeats", type=int, default=1, help="timed rounds (best is kept)")
    parser.add_argument("--quick", action="store_true", help="batch 1 and a 3 x 3 ViT path (not the reference's)")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads of each side (default: torch's and XLA's own)"
    )
    args = parser.parse_args(argv)
    if args.threads:  # before JAX starts its CPU backend
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_cpu_multi_thread_eigen={'true' if args.threads > 1 else 'false'}"
            + f" intra_op_parallelism_threads={args.threads}"
        )
        torch.set_num_threads(args.threads)
    args.batch = args.batch or (1 if args.quick else 2)
    jax.config.update("jax_default_matmul_precision", "highest")  # what the parity tests use
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    print(
        f"IIA, batch {args.batch}, 224 px{', quick' if args.quick else ''}; JAX {jax.__version__} on "
        f"{jax.devices()[0].device_kind}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"{os.cpu_count()} CPUs, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; load average before {load()}"
    )
    header = "| model | path points | jaxattr s/img | torch s/img | torch/jaxattr | compile s | max_rel_diff |"
    print_header(header)
    for name in args.models.split(","):
        r = bench_model(name.strip(), args)
        print(
            f"| {r['model']} | {r['config']} | {r['jaxattr']:.2f} | {r['torch']:.2f} | {r['torch'] / r['jaxattr']:.2f} | "
            f"{r['compile']:.1f} | {r['max_rel_diff']:.1e} |",
            flush=True,
        )
    print(f"load average after {load()}")


if __name__ == "__main__":
    main()
