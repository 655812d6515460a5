"""I-GOS and iGOS++: jaxattr vs the PyTorch reference algorithm, same machine, same random
torchvision weights, same images and targets.

    python benchmarks/igos.py             # ResNet-50, 64 px, T = 3, N = 5, 8 x 8 masks, batch 8: minutes
    python benchmarks/igos.py --full      # ResNet-50 and VGG-19, 224 px, the reference's defaults
                                          # (T = 20, N = 15, 28 x 28 masks), batch 1 and 8: hours on 2 cores
    python benchmarks/igos.py --models resnet50 --methods igos --batches 1,8 --iterations 2

The reference is `converters/references/igos.py` (the tests' reference): one image at a time, the
N path images of a score as one batch, the path gradients sample by sample, its line search, the
model's parameters frozen as the authors' main.py freezes them. jaxattr optimises the whole batch
in one compiled program (`igos_masks`). Each round runs jaxattr on the batch, then the reference on
--torch-images of the same images (its time per image does not depend on jaxattr's batch); the
best round is kept, so a load change on a shared machine hits both alike.

Both draw their own noise (JAX's and torch's), so their line searches take different numbers of
trials: the table reports the path-score evaluations per image of each side (one evaluation = N
images through the model; a gradient counts as one), and jaxattr's batch also runs the line search
of every image until the slowest one is done (`jaxattr evals/img` counts what the batch computed).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import torch

from converters.references import igos as reference
from converters.torch_models import torch_twin
from jaxattr.methods.igos import RULES, IGOSConfig, IGOSPlusConfig, igos_masks

from _harness import load, print_header, timed_compile, timed_rounds

SMALL = dict(size=64, iterations=3, steps=5, mask_size=8, models="resnet50", batches="8")
FULL = dict(size=224, iterations=20, steps=15, mask_size=28, models="resnet50,vgg19", batches="1,8")
CHUNK_BUDGET = 32 * 224 * 224  # path-image pixels per model batch when --chunk is auto (memory)


def _auto_chunk(batch: int, terms: int, size: int, steps: int) -> int | None:
    chunk = max(1, CHUNK_BUDGET // (batch * terms * size * size))
    return None if chunk >= steps else chunk


def _config(method: str, args, batch: int):
    rules = RULES[method]
    chunk = args.chunk if args.chunk is not None else _auto_chunk(batch, len(rules.gradient_kinds), args.size, args.steps)
    options = dict(iterations=args.iterations, steps=args.steps, mask_size=args.mask_size, chunk=chunk)
    return (IGOSConfig if method == "igos" else IGOSPlusConfig)(**options)


def _jaxattr_evaluations(method: str, trials: np.ndarray, batch_max: bool) -> float:
    """Path-score evaluations per image: the direction's terms, then the objective's terms for the
    base value and every trial, per iteration (trials: (b, T)); `batch_max`: what the batch ran."""
    rules = RULES[method]
    per_iteration = np.max(trials, axis=0, keepdims=True) if batch_max else trials
    counts = len(rules.gradient_kinds) + len(rules.objective_kinds) * (1 + per_iteration)
    return float(np.mean(np.sum(counts, axis=-1)))


def bench(model_name: str, method: str, batch: int, args) -> dict:
    torch_model, model = torch_twin(model_name)
    for p in torch_model.parameters():  # the reference's main.py freezes the model
        p.requires_grad_(False)
    images = np.random.RandomState(0).rand(batch, args.size, args.size, 3).astype(np.float32)
    targets = np.asarray(jnp.argmax(model(jnp.asarray(images)), axis=-1))
    config = _config(method, args, batch)

    run = jax.jit(lambda m, x, t, k: igos_masks(m, x, t, variant=method, config=config, key=k))
    compiled, compile_seconds = timed_compile(run, model, images, targets, jax.random.key(0))

    settings = reference.Settings.from_config(config)
    normalised = torch.from_numpy(np.asarray(model.normalise(images)).transpose(0, 3, 1, 2).copy())
    baselines = None
    reference_images = min(args.torch_images, batch)
    draws = [0]

    def counting_noise(iteration, draw, shape, dtype):
        draws[0] += 1
        return torch.randn(shape, dtype=dtype)

    def jaxattr_run():
        nonlocal baselines
        result = compiled(model, images, targets, jax.random.key(0))
        jax.block_until_ready(result.mask)
        if baselines is None:
            pixels = np.asarray(model.normalise(result.baselines))
            baselines = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
        return result

    def reference_run():
        draws[0] = 0
        with torch.enable_grad():
            for i in range(reference_images):
                row = slice(i, i + 1)
                labels = torch.from_numpy(targets[row].astype(np.int64))
                reference.REFERENCES[method](torch_model.model, normalised[row], baselines[row], labels, settings, counting_noise)
        return draws[0]

    # jaxattr first in each round: its first run gives the reference its baselines.
    results, seconds, _ = timed_rounds({"jaxattr": jaxattr_run, "reference": reference_run}, args.repeats)
    trials = np.asarray(results["jaxattr"].trace.trials)
    return dict(
        model=model_name,
        method=method,
        batch=batch,
        chunk=config.chunk,
        compile=compile_seconds,
        jaxattr_evaluations=_jaxattr_evaluations(method, trials, batch_max=False),
        batch_evaluations=_jaxattr_evaluations(method, trials, batch_max=True),
        reference_evaluations=results["reference"] / reference_images,
        jaxattr=seconds["jaxattr"] / batch,
        reference=seconds["reference"] / reference_images,
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help=f"the issue's table at the reference's defaults: {FULL}")
    parser.add_argument("--models", help="comma-separated torchvision twins (default resnet50, --full resnet50,vgg19)")
    parser.add_argument("--methods", default="igos,igos_pp", help="comma-separated: igos, igos_plus, igos_pp")
    parser.add_argument("--batches", help="jaxattr batch sizes (default 8, --full 1,8)")
    parser.add_argument("--size", type=int, help="image size (default 64, --full 224)")
    parser.add_argument("--iterations", type=int, help="T (default 3, --full 20)")
    parser.add_argument("--steps", type=int, help="N (default 5, --full 15)")
    parser.add_argument("--mask-size", type=int, help="s (default 8, --full 28)")
    parser.add_argument("--chunk", type=int, help="path nodes per model batch (default: auto, for memory)")
    parser.add_argument("--torch-images", type=int, default=2, help="images the reference explains per round (default 2)")
    parser.add_argument("--torch-threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds; the best is kept (default 1)")
    args = parser.parse_args(argv)
    for name, value in (FULL if args.full else SMALL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    jax.config.update("jax_default_matmul_precision", "highest")  # what the parity tests use
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    print(
        f"I-GOS family, {args.size} px, T = {args.iterations}, N = {args.steps}, {args.mask_size}x{args.mask_size} masks, "
        f"line search; JAX {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); reference on {args.torch_images} image(s) per round, best of {args.repeats}; "
        f"load average before {load()}"
    )
    header = (
        "| model | method | batch | jaxattr s/img | reference s/img | reference/jaxattr | jaxattr evals/img "
        "(batch ran) | reference evals/img | chunk | compile s |"
    )
    print_header(header)
    for model_name in args.models.split(","):
        for method in args.methods.split(","):
            for batch in map(int, args.batches.split(",")):
                r = bench(model_name.strip(), method.strip(), batch, args)
                print(
                    f"| {r['model']} | {r['method']} | {r['batch']} | {r['jaxattr']:.2f} | {r['reference']:.2f} | "
                    f"{r['reference'] / r['jaxattr']:.2f} | {r['jaxattr_evaluations']:.0f} ({r['batch_evaluations']:.0f}) | "
                    f"{r['reference_evaluations']:.0f} | {r['chunk']} | {r['compile']:.1f} |",
                    flush=True,
                )
    print(f"load average after {load()}")


if __name__ == "__main__":
    main()
