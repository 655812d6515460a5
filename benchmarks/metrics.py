"""RISE deletion + insertion: jaxattr's batched metric vs the RISE reference loop, same machine, same
random ResNet-18 weights, same images and maps, one run.

    python benchmarks/metrics.py                      # ResNet-18, 224 px, batch 8, step 'batched' (1792 px)
    python benchmarks/metrics.py --step single        # RISE's single-image setting: 224 px per point
    python benchmarks/metrics.py --chunk 8 --repeats 3
    python benchmarks/metrics.py --torch-threads 1    # on a crowded machine torch's 2 threads wait on each other

The reference is RISE's `CausalMetric.single_run` written here from metrics.md §1 in PyTorch: per image
and game, the clean forward for the class, then one forward pass of one image per curve point, `step`
pixels substituted in place between passes. jaxattr scores the whole batch: all curve points of all
images built and scored on the device, --chunk points per pass (chunk x batch images). Both run in
float32 without TF32. Each round runs both implementations once (interleaved, so load from other
processes hits both alike); the best round is kept. Prints images/s for each and the ratio, the
curves' agreement, and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np
import scipy.ndimage
import torch

from converters.torch_models import to_torch_images, torch_twin
from jaxattr import metrics
from jaxattr.metrics.deletion_insertion import rise_step

from _harness import load, timed_rounds


def _rise_blur(x: torch.Tensor) -> torch.Tensor:
    """RISE's substrate: per channel, SciPy's gaussian_filter of an 11x11 delta (sigma 5), zero padding 5."""
    delta = np.zeros((11, 11))
    delta[5, 5] = 1
    kernel = torch.from_numpy(scipy.ndimage.gaussian_filter(delta, 5).astype(np.float32)).to(x.device)
    weight = torch.zeros(3, 3, 11, 11, device=x.device)
    for c in range(3):
        weight[c, c] = kernel
    return torch.nn.functional.conv2d(x, weight, padding=5)


@torch.no_grad()
def reference_curve(net, x: torch.Tensor, saliency: np.ndarray, game: str, step: int) -> np.ndarray:
    """One image (1, 3, h, w), normalised: RISE's single_run, one forward per point."""
    hw = x.shape[2] * x.shape[3]
    c = int(net(x).argmax(1))
    start, finish = (x.clone(), torch.zeros_like(x)) if game == "deletion" else (_rise_blur(x), x.clone())
    order = torch.from_numpy(np.argsort(saliency.reshape(-1))[::-1].copy()).to(x.device)
    n = (hw + step - 1) // step
    scores = np.empty(n + 1)
    flat_start, flat_finish = start.view(3, hw), finish.view(3, hw)
    for i in range(n + 1):
        scores[i] = float(torch.softmax(net(start), dim=1)[0, c])
        idx = order[step * i : step * (i + 1)]
        flat_start[:, idx] = flat_finish[:, idx]
    return scores


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--step", default="batched", help="pixels per point or a preset: single (224), batched (1792)")
    parser.add_argument("--chunk", type=int, default=8, help="jaxattr: curve points per forward pass (0: all)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the best is kept")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    jax.config.update("jax_default_matmul_precision", "highest")  # full float32, as torch without TF32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    step = rise_step(int(args.step) if args.step.isdigit() else args.step, args.size * args.size)
    chunk = args.chunk or None

    pixel_net, model = torch_twin(args.model)
    net = pixel_net.model.to(device).eval()
    mean, std = (t.to(device) for t in pixel_net.normalisation(torch.float32))
    images = np.random.RandomState(0).rand(args.batch, args.size, args.size, 3).astype(np.float32)
    maps = np.random.RandomState(1).rand(args.batch, args.size, args.size).astype(np.float32)
    normalised = (to_torch_images(images).to(device) - mean) / std
    points = -(-args.size * args.size // step) + 1

    def ours():
        deletion = metrics.rise_deletion(model, images, maps, step=step, chunk=chunk)
        insertion = metrics.rise_insertion(model, images, maps, step=step, chunk=chunk)
        return np.asarray(deletion.scores), np.asarray(insertion.scores)

    def reference():
        curves = {game: [reference_curve(net, normalised[b : b + 1], maps[b], game, step) for b in range(args.batch)]
                  for game in ("deletion", "insertion")}
        return np.array(curves["deletion"]), np.array(curves["insertion"])

    print(
        f"RISE deletion + insertion, {args.model}, {args.size} px, batch {args.batch}, step {step} "
        f"({points} points per game), chunk {chunk}; JAX {jax.__version__} on {jax.devices()[0].device_kind}, "
        f"torch {torch.__version__} on {device} ({torch.get_num_threads()} threads), {os.cpu_count()} CPUs"
    )
    print(f"load average before {load()}", flush=True)
    start = time.perf_counter()
    ours()  # compile
    print(f"jaxattr compile + first run: {time.perf_counter() - start:.1f} s", flush=True)
    results, best, cpu = timed_rounds({"jaxattr": ours, "reference": reference}, args.repeats, progress=True)
    print(f"load average after {load()}")
    diff = max(float(np.abs(a - b).max()) for a, b in zip(results["jaxattr"], results["reference"]))
    rate = {name: args.batch / s for name, s in best.items()}
    print("| implementation | images/s (deletion + insertion) | s per image | CPU s per image |")
    print("|---|---|---|---|")
    for name in ("jaxattr", "reference"):
        print(f"| {name} | {rate[name]:.3f} | {1 / rate[name]:.2f} | {cpu[name] / args.batch:.2f} |")
    print(
        f"ratio jaxattr / reference: {rate['jaxattr'] / rate['reference']:.2f}x images/s, "
        f"{cpu['reference'] / cpu['jaxattr']:.2f}x CPU time; max |curve difference| {diff:.1e}"
    )


if __name__ == "__main__":
    main()
