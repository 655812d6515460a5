"""float32 against float64 for the straight-path methods: how far jaxattr's and torch's float32
Integrated Gradients and GNL-IG are from their own float64 results, and what the space the path is
built in changes (issue 14, deliverable 4).

ResNet-50 with random weights (BatchNorm statistics and affine parameters random too, see
`converters.torch_models.torch_model`), uniform-noise images, a random target per image, the
'mean' baseline (GNL's zero in normalised space), Gauss-Legendre nodes. Rows:
  * jaxattr: the path in the model's normalised space (`straight_image_path`, what the methods do);
  * jaxattr pixel path: the same method on a plain forward with explicit mean-colour baselines,
    mean + t (x - mean) formed in pixels and normalised inside the model (bit for bit the
    pixel-space path the methods built before);
  * torch: captum IntegratedGradients on normalised inputs from baseline 0, as GNL runs it (GNL-IG:
    with the guided rules of `converters.guided`).
Each float32 run is compared with the same library's float64 run on the same float32 image; per
image, max |a32 - a64| / max |a64|. Printed per row: the median and geometric mean over the images,
the geometric mean as a ratio to torch's, and the 5-95 % range of that ratio over random subsets of
--subset images (what a test on that many images would see).

--nodes K adds the integrand tangent ⊙ gradient at the first K nodes alone, per node: how many
images' float32 integrand is off by more than 1e-4 (a ReLU or max-pool that took the other side)
and the geometric mean of the errors. In a piecewise-linear network the gradient moves with its
input only where such a unit flips, so flips are the channel through which a path point's rounding
reaches the attributions.

    PYTHONPATH=. python benchmarks/float32_paths.py                        # 48 images, 50 steps, 4 nodes
    PYTHONPATH=. python benchmarks/float32_paths.py --images 12 --methods gnl_ig --nodes 0
"""

from __future__ import annotations

import argparse
import copy
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from captum.attr import IntegratedGradients

from converters import crosscheck
from converters.guided import guided
from converters.torch_models import PixelInput, to_numpy_nhwc, to_torch_images, torch_twin
from jaxattr import paths
from jaxattr.methods import straight_image_path
from jaxattr.methods.integrated_gradients import IntegratedGradientsConfig, integrated_gradients

from _harness import load

METHODS = ("integrated_gradients", "gnl_ig")
FLIP = 1e-4  # an integrand error this large is a unit on the other side of its kink (rounding is ~1e-6)


def plain_forward(model):
    """`model` as a plain function of pixels: the methods then build the path in pixel space."""
    return jax.tree_util.Partial(lambda model, images: model(images), model)


def mean_images(model, images: np.ndarray) -> np.ndarray:
    return np.broadcast_to(np.asarray(model.module.mean, images.dtype), images.shape)


def jaxattr_maps(model, images, targets, steps: int, chunk: int, pixel_path: bool) -> np.ndarray:
    # GNL-IG is Integrated Gradients on the guided model (`gnl_ig`): the caller passes that model.
    config = IntegratedGradientsConfig(steps=steps, baseline="mean", chunk=chunk)
    if pixel_path:
        maps = integrated_gradients(
            plain_forward(model), images, targets, config=config, baselines=mean_images(model, images)
        )
    else:
        maps = integrated_gradients(model, images, targets, config=config)
    return np.asarray(maps, np.float64)


def torch_rules(method: str) -> str:
    """The backward rules `converters.guided` puts on the torch model: GNL's for GNL-IG."""
    return "guided" if method == "gnl_ig" else "standard"


def normalised_inputs(torch_model: PixelInput, images: np.ndarray) -> torch.Tensor:
    dtype = next(torch_model.parameters()).dtype
    mean, std = torch_model.normalisation(dtype)
    return (to_torch_images(images).to(dtype) - mean) / std


def torch_maps(torch_model: PixelInput, images, targets, steps: int, chunk: int, method: str) -> np.ndarray:
    inputs = normalised_inputs(torch_model, images)
    attribute = lambda net: IntegratedGradients(net).attribute(
        inputs,
        baselines=0.0,
        target=torch.from_numpy(targets),
        n_steps=steps,
        internal_batch_size=chunk * len(images),
    )
    with guided(torch_model.model, torch_rules(method)) as net:
        return to_numpy_nhwc(attribute(net)).astype(np.float64)


def jaxattr_integrands(model, images, targets, nodes: np.ndarray, pixel_path: bool) -> np.ndarray:
    """tangent ⊙ gradient of the target score at each node (k, b, h, w, c): one node's IG term."""
    starts = mean_images(model, images)
    forward = plain_forward(model) if pixel_path else model
    score, path = straight_image_path(forward, jnp.asarray(starts), jnp.asarray(images), jnp.asarray(targets))

    @jax.jit
    def integrands(nodes):
        gradients = jax.grad(lambda points: score(points).sum())(path.points(nodes))
        return gradients * path.tangents()[None]

    return np.asarray(integrands(jnp.asarray(nodes, images.dtype)), np.float64)


def torch_integrands(torch_model: PixelInput, images, targets, nodes: np.ndarray, method: str) -> np.ndarray:
    direction = normalised_inputs(torch_model, images)  # captum's points: 0 + alpha (input - 0)
    terms = []
    for alpha in nodes:
        points = (torch.tensor(alpha, dtype=direction.dtype) * direction).requires_grad_()
        with guided(torch_model.model, torch_rules(method)) as net:
            scores = net(points).gather(1, torch.from_numpy(targets)[:, None])
        (gradients,) = torch.autograd.grad(scores.sum(), points)
        terms.append(to_numpy_nhwc(gradients * direction).astype(np.float64))
    return np.stack(terms)


def errors(ours: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """max |ours - exact| / max |exact| over each image (the last three axes)."""
    axes = (-3, -2, -1)
    return np.abs(ours - exact).max(axes) / np.abs(exact).max(axes)


def geomean(values: np.ndarray, axis=None) -> np.ndarray:
    return np.exp(np.log(values).mean(axis))


def subset_ratio_range(
    ours: np.ndarray, reference: np.ndarray, size: int, draws: int = 2000
) -> tuple[float, float]:
    """5 % and 95 % quantiles of geomean(ours) / geomean(reference) over random subsets of images."""
    rng = np.random.default_rng(0)
    subsets = np.stack([rng.choice(len(ours), size, replace=False) for _ in range(draws)])
    ratios = geomean(ours[subsets], 1) / geomean(reference[subsets], 1)
    return tuple(np.quantile(ratios, [0.05, 0.95]))


def run_method(method, model, torch_model, images, targets, args) -> None:
    model = model.with_nonlinearity("guided") if method == "gnl_ig" else model
    start = time.perf_counter()
    rows = {
        "jaxattr": jaxattr_maps(model, images, targets, args.steps, args.chunk, pixel_path=False),
        "jaxattr pixel path": jaxattr_maps(model, images, targets, args.steps, args.chunk, pixel_path=True),
        "torch": torch_maps(
            copy.deepcopy(torch_model).float(), images, targets, args.steps, args.chunk, method
        ),
    }
    with crosscheck.precision("float64"):
        jaxattr_exact = jaxattr_maps(
            model.astype(np.float64), images.astype(np.float64), targets, args.steps, args.chunk, False
        )
    torch_exact = torch_maps(
        copy.deepcopy(torch_model).double(),
        images.astype(np.float64),
        targets,
        args.steps,
        args.chunk,
        method,
    )
    per_image = {
        name: errors(maps, torch_exact if name == "torch" else jaxattr_exact) for name, maps in rows.items()
    }
    print(
        f"\n{method}: {len(images)} images, {args.steps} steps; float64 jaxattr vs torch "
        f"{crosscheck.max_rel_diff(jaxattr_exact, torch_exact):.1e}; {time.perf_counter() - start:.0f} s, load {load()}"
    )
    print(
        f"  {'':20s} {'median':>9s} {'geomean':>9s} {'/ torch':>8s}   {f'/ torch, {args.subset}-image subsets 5-95 %':>34s}"
    )
    for name, e in per_image.items():
        low, high = subset_ratio_range(e, per_image["torch"], args.subset)
        ratio = geomean(e) / geomean(per_image["torch"])
        print(f"  {name:20s} {np.median(e):9.2e} {geomean(e):9.2e} {ratio:8.2f}   {low:16.2f} .. {high:.2f}")
    if args.nodes:
        run_nodes(method, model, torch_model, images, targets, args)


def run_nodes(method, model, torch_model, images, targets, args) -> None:
    nodes = np.asarray(paths.quadrature("gausslegendre", args.steps).nodes, np.float64)[: args.nodes]
    rows = {
        name: jaxattr_integrands(model, images, targets, nodes, pixel_path)
        for name, pixel_path in (("jaxattr", False), ("jaxattr pixel path", True))
    }
    rows["torch"] = torch_integrands(copy.deepcopy(torch_model).float(), images, targets, nodes, method)
    with crosscheck.precision("float64"):
        jaxattr_exact = jaxattr_integrands(
            model.astype(np.float64), images.astype(np.float64), targets, nodes, False
        )
    torch_exact = torch_integrands(
        copy.deepcopy(torch_model).double(), images.astype(np.float64), targets, nodes, method
    )
    print(
        f"  first {args.nodes} nodes (t = {', '.join(f'{t:.1e}' for t in nodes)}): images off > {FLIP:g}; geomean error"
    )
    for name, terms in rows.items():
        e = errors(terms, torch_exact if name == "torch" else jaxattr_exact)  # (nodes, images)
        flips = " ".join(f"{n:3d}" for n in (e > FLIP).sum(1))
        print(f"  {name:20s} {flips}   {' '.join(f'{g:.1e}' for g in geomean(e, 1))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--chunk", type=int, default=4, help="steps per gradient batch (memory)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument(
        "--nodes", type=int, default=4, help="also the integrand at the first K nodes (0: no)"
    )
    parser.add_argument("--subset", type=int, default=12)
    parser.add_argument("--seed", type=int, default=10)
    args = parser.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")  # as the parity tests
    torch_model, model = torch_twin(args.model)
    rng = np.random.RandomState(args.seed)
    images = rng.rand(args.images, args.size, args.size, 3).astype(
        np.float32
    )  # float64 runs: the same values
    targets = rng.randint(1000, size=args.images)
    for method in args.methods.split(","):
        run_method(method, model, torch_model, images, targets, args)


if __name__ == "__main__":
    main()
