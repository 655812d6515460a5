"""Flax (jit) vs PyTorch (eager) speed of the model ports: the forward pass, and forward + backward
to the input pixels (the cost unit of every gradient-based attribution). Same machine, same run,
same random torchvision weights and images.

    PYTHONPATH=. python benchmarks/models.py                      # resnet18,resnet50,vgg16,googlenet
    PYTHONPATH=. python benchmarks/models.py --models resnet18,vgg11 --batch 4 --size 128 --repeats 5

Each time is the best of --repeats rounds after one untimed warm-up round, the four measurements
taking turns within a round; JAX compiles before that (compile time reported separately).
Forward+backward is the gradient of the sum of each image's target logit; torch's forward runs
under `torch.inference_mode()`. Both sides compute in float32, JAX at its default matmul
precision. torch.set_num_threads is left at torch's default (one thread per physical core,
printed in the header), as a user would run it, unless --torch-threads is given; XLA sizes its own
thread pool. On a machine shared with other busy processes, torch's OpenMP threads wait at every
parallel region for a descheduled sibling, which can slow torch many times over: compare on an
idle machine, or also with --torch-threads 1; the load average is printed with each row.
Ratio = torch time / JAX time (> 1: JAX is faster).
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import torch

from converters.torch_models import PixelInput, to_torch_images, torch_twin
from jaxattr.models import Model

from _harness import load, print_header, timed_compile, timed_rounds


def _target_logits(logits, targets):
    return jnp.take_along_axis(logits, targets[:, None], axis=1).sum()


@jax.jit
def _jax_forward(model: Model, images: jax.Array) -> jax.Array:
    return model(images)


@jax.jit
def _jax_input_gradient(model: Model, images: jax.Array, targets: jax.Array) -> jax.Array:
    return jax.grad(lambda x: _target_logits(model(x), targets))(images)


def _torch_forward(torch_model: PixelInput, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch_model(images)


def _torch_input_gradient(torch_model: PixelInput, images: torch.Tensor, targets: torch.Tensor):
    x = images.detach().requires_grad_()
    torch_model(x)[torch.arange(len(targets)), targets].sum().backward()
    return x.grad


def bench_model(name: str, batch: int, size: int, repeats: int) -> dict[str, float]:
    torch_model, model = torch_twin(name)
    images = np.random.RandomState(0).rand(batch, size, size, 3).astype(np.float32)
    targets = np.arange(batch) % 1000
    images_t, targets_t = to_torch_images(images), torch.from_numpy(targets)
    images_j, targets_j = jnp.asarray(images), jnp.asarray(targets)
    forward, forward_compile = timed_compile(_jax_forward, model, images_j)
    gradient, gradient_compile = timed_compile(_jax_input_gradient, model, images_j, targets_j)
    times = timed_rounds(
        {
            "torch_forward": lambda: _torch_forward(torch_model, images_t),
            "jax_forward": lambda: forward(model, images_j).block_until_ready(),
            "torch_backward": lambda: _torch_input_gradient(torch_model, images_t, targets_t),
            "jax_backward": lambda: gradient(model, images_j, targets_j).block_until_ready(),
        },
        repeats,
        warmup=1,
    ).seconds
    return {**times, "compile": forward_compile + gradient_compile}


def _cells(torch_seconds: float, jax_seconds: float) -> str:
    """Table cells: torch ms | JAX ms | torch / JAX."""
    return f"{1e3 * torch_seconds:.1f} | {1e3 * jax_seconds:.1f} | {torch_seconds / jax_seconds:.2f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="resnet18,resnet50,vgg16,googlenet", help="comma-separated names")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224, help="square image side in pixels")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (best is kept)")
    parser.add_argument(
        "--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's own default)"
    )
    args = parser.parse_args(argv)
    if min(args.batch, args.size, args.repeats, args.torch_threads or 1) < 1:
        parser.error("--batch, --size, --repeats and --torch-threads must be positive")
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)

    print(
        f"batch {args.batch}, {args.size}x{args.size} px, best of {args.repeats}; "
        f"JAX {jax.__version__} on {jax.devices()[0].device_kind}, "
        f"torch {torch.__version__} on CPU ({torch.get_num_threads()} threads); {os.cpu_count()} CPUs, "
        f"load average {load()}"
    )
    header = (
        "| model | torch fwd ms | JAX fwd ms | fwd ratio | torch fwd+bwd ms | JAX fwd+bwd ms | fwd+bwd ratio "
        "| JAX compile s | load |"
    )
    print_header(header)
    for name in args.models.split(","):
        r = bench_model(name.strip(), args.batch, args.size, args.repeats)
        forward = _cells(r["torch_forward"], r["jax_forward"])
        backward = _cells(r["torch_backward"], r["jax_backward"])
        print(f"| {name.strip()} | {forward} | {backward} | {r['compile']:.1f} | {load()} |", flush=True)


if __name__ == "__main__":
    main()
