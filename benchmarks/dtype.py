"""bfloat16 against float32: how far the saliency maps of a model computing in bfloat16
(`Model.astype(jnp.bfloat16)`, `jaxattr explain --dtype bfloat16`) are from the float32 maps.

EfficientNet-Lite0 with its embedded ImageNet weights, the sample photographs of examples/images.
Both runs explain the float32 model's predicted class, so the maps answer the same question; per
method, over the images (mean, and the worst image):
  * relative L2 error of the saliency map, ||m_bf16 - m_f32|| / ||m_f32||;
  * Spearman rank correlation of the two maps' pixels (what rankings, deletion/insertion curves
    and overlays depend on);
  * top-1 agreement: the share of images whose bfloat16 prediction is the float32 one (the same
    for every method: it is the model's, printed once per row for reading convenience).
Times per image are printed too: on a CPU bfloat16 is emulated and slower; the speed it buys is on
TPUs and GPUs (`jaxattr bench --dtype bfloat16` there). One run, same process.

    python benchmarks/dtype.py                            # methods at their reference defaults
    python benchmarks/dtype.py --steps 16 --samples 8     # quicker (the README table's setting)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from scipy.stats import spearmanr

from jaxattr import explain
from jaxattr.image import expand_paths, load_batch
from jaxattr.models import create_model, model_info

ROOT = Path(__file__).resolve().parents[1]
MODEL = "efficientnet_lite0"
METHODS = ("saliency", "integrated_gradients", "gnl_ig", "gradcam", "smoothgrad")


def options(method: str, args: argparse.Namespace) -> dict:
    if method in ("integrated_gradients", "gnl_ig") and args.steps:
        return {"steps": args.steps}
    if method == "smoothgrad" and args.samples:
        return {"samples": args.samples}
    return {}


def timed_maps(model, images, method: str, targets, settings: dict) -> tuple[np.ndarray, float]:
    """The method's saliency maps (compiled first, then timed once) and seconds per image."""
    key = jax.random.key(0)  # a fixed key: SmoothGrad draws the same noise in both dtypes
    run = lambda: jax.block_until_ready(explain(model, images, method, targets=targets, key=key, **settings).maps)
    run()
    start = time.perf_counter()
    maps = run()
    return np.asarray(maps), (time.perf_counter() - start) / images.shape[0]


def compare(reference: np.ndarray, other: np.ndarray) -> tuple[list[float], list[float]]:
    """Per image: relative L2 error and Spearman rank correlation of `other` against `reference`."""
    errors, ranks = [], []
    for ref, out in zip(reference.astype(np.float64), other.astype(np.float64)):
        errors.append(float(np.linalg.norm(out - ref) / np.linalg.norm(ref)))
        ranks.append(float(spearmanr(ref.ravel(), out.ravel())[0]))
    return errors, ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, help="path steps of integrated_gradients and gnl_ig (default: theirs)")
    parser.add_argument("--samples", type=int, help="smoothgrad samples (default: its own)")
    args = parser.parse_args()

    paths = expand_paths([ROOT / "examples" / "images"])
    images = jnp.asarray(load_batch(paths, model_info(MODEL)))
    model = create_model(MODEL)
    low = model.astype(jnp.bfloat16)
    predicted = jnp.argmax(model(images), axis=-1)
    agree = float(np.mean(np.asarray(jnp.argmax(low(images), axis=-1) == predicted)))
    print(f"{MODEL}, {len(paths)} images ({', '.join(p.name for p in paths)}), {jax.devices()[0].platform}, jax {jax.__version__}")
    header = "| method | settings | rel. L2 error mean (max) | Spearman mean (min) | top-1 agreement | s/img f32 | s/img bf16 |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for method in args.methods.split(","):
        settings = options(method, args)
        reference, seconds32 = timed_maps(model, images, method, predicted, settings)
        ours, seconds16 = timed_maps(low, images, method, predicted, settings)
        assert ours.dtype == np.float32 and np.isfinite(ours).all()
        errors, ranks = compare(reference, ours)
        shown = ", ".join(f"{k}={v}" for k, v in settings.items()) or "defaults"
        print(
            f"| {method} | {shown} | {np.mean(errors):.4f} ({max(errors):.4f}) | {np.mean(ranks):.4f} ({min(ranks):.4f}) "
            f"| {agree:.2f} | {seconds32:.2f} | {seconds16:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
