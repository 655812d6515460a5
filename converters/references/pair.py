"""PAIR saliency 0.2.1 references for Guided IG and Blur IG, one image at a time as PAIR runs.

The saliency callback returns d(target logit)/d(pixels) of the torch twin on pixel input
(PixelInput), which is the gradient jaxattr's methods take, so both sides explain the same function.
"""

from __future__ import annotations

import contextlib
import types
from unittest import mock

import numpy as np
import saliency.core as saliency
import saliency.core.guided_ig as saliency_guided_ig
import torch

from converters.crosscheck import changed, reference
from converters.torch_models import to_numpy_nhwc, to_torch_images
from jaxattr.methods.blur_ig import BlurIGConfig, blur_ig
from jaxattr.methods.guided_ig import GuidedIGConfig, guided_ig


def pair_call_model(torch_model: torch.nn.Module, target: int, output: str):
    """A saliency `call_model_function`: NHWC batch -> d score[target] / d pixels, NHWC, in the model's
    dtype; the score is the logit or the softmax probability, as jaxattr's `output` option.

    Guided IG hands over float64 points whatever the model's dtype; they are cast to it."""
    dtype = next(torch_model.parameters()).dtype

    def call_model(batch, call_model_args=None, expected_keys=None):
        pixels = to_torch_images(np.asarray(batch)).to(dtype).requires_grad_(True)
        scores = torch_model(pixels)
        if output == "probability":
            scores = torch.softmax(scores, dim=-1)
        (grads,) = torch.autograd.grad(scores[:, target].sum(), pixels)
        return {saliency.INPUT_OUTPUT_GRADIENTS: to_numpy_nhwc(grads)}

    return call_model


def _quantile_with_interpolation_keyword(a, q, interpolation="linear", **kwargs):
    return np.quantile(a, q, method=interpolation, **kwargs)


@contextlib.contextmanager
def _numpy_quantile_shim():
    """saliency 0.2.1's Guided IG calls np.quantile(..., interpolation=), removed in NumPy 2.4:
    inside this block its module sees a NumPy whose quantile maps `interpolation` to `method`."""
    shimmed = types.ModuleType("numpy")
    shimmed.__dict__.update(np.__dict__)
    shimmed.quantile = _quantile_with_interpolation_keyword
    with mock.patch.object(saliency_guided_ig, "np", shimmed):
        yield


@reference(
    "guided_ig",
    reference="PAIR saliency 0.2.1 GuidedIG (float64 throughout; float32 branching is chaotic)",
    tolerance={"float64": 1e-10},
    default_dtype="float64",
)
def guided_ig_vs_pair(
    model, torch_model, images, targets, *, config: GuidedIGConfig | None = None, baselines: np.ndarray | None = None
):
    """Guided IG from `baselines` (one per image; default: the config's, which must be black as PAIR's
    default). A black start is an exactly constant image, whose max-pool windows tie exactly: which
    entry takes the gradient then depends on ulp-level differences between torch's and XLA's
    convolutions on the machine's CPU, and Guided IG's path branches on it. Random baselines give a
    well-posed float64 comparison on any CPU."""
    defaults = GuidedIGConfig()
    config = config or defaults
    if baselines is None and config.baseline != "black":
        raise ValueError(f"the PAIR reference runs from a black baseline or given baselines, not {config.baseline!r}")
    starts = np.zeros_like(images) if baselines is None else np.broadcast_to(baselines, images.shape)
    ours = guided_ig(model, images, targets, config=config, baselines=None if baselines is None else starts)
    # PAIR at its own x_steps, fraction and max_dist unless the caller changed jaxattr's
    options = changed(config, defaults, {"x_steps": "steps", "fraction": "fraction", "max_dist": "max_dist"})
    with _numpy_quantile_shim():
        theirs = [
            saliency.GuidedIG().GetMask(
                image, pair_call_model(torch_model, int(target), config.output), x_baseline=start, **options
            )
            for image, start, target in zip(images, starts, targets)
        ]
    return np.asarray(ours), np.stack(theirs)


# float32 agreement (~5e-7) needs a kink-free model: on a torchvision CNN the heavily blurred images
# put whole regions of ReLU / max-pool inputs at their kinks, where torch and XLA round to
# different sides, and some path gradients differ by per cent (max_rel_diff ~4e-4 on resnet18).
@reference(
    "blur_ig",
    reference="PAIR saliency 0.2.1 BlurIG (batch_size=1; float32 only for kink-free models)",
    tolerance={"float32": 1e-5, "float64": 1e-10},
    default_dtype="float64",
)
def blur_ig_vs_pair(model, torch_model, images, targets, *, config: BlurIGConfig | None = None):
    defaults = BlurIGConfig()
    config = config or defaults
    ours = blur_ig(model, images, targets, config=config)
    # PAIR at its own max_sigma, steps, grad_step and sqrt unless the caller changed jaxattr's
    options = changed(config, defaults, {f: f for f in ("max_sigma", "steps", "grad_step", "sqrt")})
    theirs = [
        saliency.BlurIG().GetMask(image, pair_call_model(torch_model, int(target), config.output), **options)
        for image, target in zip(images, targets)
    ]
    return np.asarray(ours), np.stack(theirs)
