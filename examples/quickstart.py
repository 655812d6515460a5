"""jaxattr's Python API in a few lines: explain the sample images and save overlays.

.venv/bin/python examples/quickstart.py [--method saliency] [--out outputs/quickstart]
"""

import argparse
from pathlib import Path

import jax

import jaxattr
from jaxattr.image import expand_paths

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="efficientnet_lite0")
parser.add_argument("--method", default="saliency", choices=jaxattr.list_methods())
parser.add_argument("--out", type=Path, default=Path("outputs/quickstart"))
args = parser.parse_args()

# Images are NHWC float32 in [0, 1], preprocessed like the model's torchvision/timm eval transform.
paths = expand_paths([Path(__file__).parent / "images"])
info = jaxattr.model_info(args.model)
images = jaxattr.load_batch(paths, info)

# Pretrained weights: embedded for efficientnet_lite0, otherwise the cache / torch hub / a download.
model = jaxattr.create_model(args.model)

# One call for the whole batch; stochastic methods (SmoothGrad, ...) draw from the key.
result = jaxattr.explain(model, images, args.method, key=jax.random.key(0))

# result.maps are the unclipped saliency maps (what metrics rank); display contrast is separate.
contrast = jaxattr.method_spec(args.method).contrast
labels = jaxattr.imagenet_labels()
for path, image, saliency_map, target, probability in zip(
    paths, images, result.maps, result.targets, result.probabilities, strict=True
):
    heat = jaxattr.viz.contrast(saliency_map, contrast)
    jaxattr.viz.save_png(args.out / f"{path.stem}.png", jaxattr.viz.overlay(image, heat))
    print(f"{path.name}: {labels[int(target)]} ({float(probability):.2f}) -> {args.out / path.stem}.png")
