"""captum and PAIR saliency references for Integrated Gradients and GNL-IG.

Both sides explain the same function: the torch twin on pixel input (PixelInput) and the jaxattr
model, with the same baseline, targets, rule and score; GNL-IG runs captum on the normalised-input
model with the guided rules of `converters.guided` attached, exactly GNL's configuration.
"""

from __future__ import annotations

import numpy as np
import saliency.core as saliency
import scipy.ndimage
import torch
from captum.attr import IntegratedGradients

from converters.crosscheck import changed, reference
from converters.guided import guided
from converters.references.pair import pair_call_model
from converters.torch_models import PixelInput, to_numpy_nhwc, to_torch_images
from jaxattr.methods import resolve_chunks
from jaxattr.methods.baselines import baseline_images
from jaxattr.methods.integrated_gradients import GnlIGConfig, IntegratedGradientsConfig, gnl_ig, integrated_gradients

CAPTUM_RULES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
# captum 0.2.0's Gauss-Legendre (GNL's pin): modern captum has no float64-weight form, so it is
# computed by `captum_020_gauss_legendre` below.
REFERENCE_RULES = (*CAPTUM_RULES, "gausslegendre64")


def _torch_dtype(torch_model: torch.nn.Module) -> torch.dtype:
    return next(torch_model.parameters()).dtype


def captum_baselines(config: IntegratedGradientsConfig, torch_model: PixelInput, images: np.ndarray, key=None):
    """The baseline of `config`, built on the reference side (captum takes any tensor or number).

    'uniform' is random: the same draw as jaxattr's, taken from `key`."""
    dtype = _torch_dtype(torch_model)
    if config.baseline == "black":
        return 0.0
    if config.baseline == "mean":
        return torch_model.normalisation(dtype)[0]
    if config.baseline == "blur":  # saliency's Blur IG blur: zero padding, no blur across channels
        blurred = [scipy.ndimage.gaussian_filter(x, (config.blur_sigma, config.blur_sigma, 0), mode="constant") for x in images]
        return to_torch_images(np.stack(blurred)).to(dtype)
    return to_torch_images(np.asarray(baseline_images("uniform", None, images, key=key))).to(dtype)


def _internal_batch_size(config: IntegratedGradientsConfig, images: np.ndarray) -> int | None:
    # captum batches the points of all images together: chunk steps x batch images, with the
    # chunk jaxattr evaluates for this batch.
    chunk = resolve_chunks(config, len(images), images.shape[1:]).chunk
    return None if chunk is None else chunk * len(images)


def _score_function(torch_model: torch.nn.Module, output: str):
    if output == "probability":
        return lambda x: torch.softmax(torch_model(x), dim=-1)
    return torch_model


def captum_020_gauss_legendre(
    forward, inputs: torch.Tensor, baselines, target: torch.Tensor, steps: int
) -> torch.Tensor:
    """Integrated Gradients as captum 0.2.0 computes `method='gausslegendre'` (gnl.md §1, §2.5),
    written from its source: NumPy's float64 `leggauss` nodes α = (1 + ξ)/2 and step sizes w/2,
    which stay float64 (NumPy scalars make a float64 tensor, and torch's type promotion keeps the
    product float64); the points baseline + α (input - baseline) of every step in one batch;
    Σ_k w_k ∇_k summed in float64, times (input - baseline)."""
    xi, w = np.polynomial.legendre.leggauss(steps)
    alphas, step_sizes = 0.5 * (1 + xi), torch.from_numpy(0.5 * w)
    baselines = torch.as_tensor(baselines, dtype=inputs.dtype)
    points = torch.cat([baselines + float(a) * (inputs - baselines) for a in alphas]).requires_grad_()
    scores = forward(points).gather(1, target.repeat(steps)[:, None])
    (grads,) = torch.autograd.grad(scores.sum(), points)
    total = (grads.view(steps, *inputs.shape) * step_sizes.view(steps, *[1] * inputs.dim())).sum(0)
    return total * (inputs - baselines)


CAPTUM_STEPS = 50  # captum's attribute(n_steps=50, method='gausslegendre'), 0.2.0 and 0.9 alike


def _integrated_gradients(
    forward, inputs, baselines, targets: np.ndarray, config: IntegratedGradientsConfig, images, defaults
) -> torch.Tensor:
    """captum's IntegratedGradients for captum's rules, captum 0.2.0's arithmetic for 'gausslegendre64',
    at captum's own step count and rule unless `config` changes them from jaxattr's `defaults`."""
    target = torch.from_numpy(targets)
    options = changed(config, defaults, {"n_steps": "steps", "method": "rule"})
    if options.get("method") == "gausslegendre64":  # all steps in one batch (a chunk changes only the order of the sum)
        baselines = 0.0 if baselines is None else baselines
        return captum_020_gauss_legendre(forward, inputs, baselines, target, options.get("n_steps", CAPTUM_STEPS))
    return IntegratedGradients(forward).attribute(
        inputs, baselines=baselines, target=target, internal_batch_size=_internal_batch_size(config, images), **options
    )


# float64 by default: on max-pool/ReLU networks, float32 torch and XLA break near-ties of
# near-baseline path points (the first Gauss-Legendre node is t = 5.7e-4) differently, which moves
# those points' gradients (measured 4e-4 on resnet18 and 4e-3 on vgg11 at the defaults); float64
# agrees to ~1e-15. float32 stays available (--dtype float32) and is tested where no ties occur.
# Rules that evaluate the baseline itself (riemann_left, riemann_trapezoid, pair) on a constant
# baseline (black, mean) are ill-posed in any precision: every max-pool window ties exactly, and
# which entry takes the gradient depends on the CPU's convolution rounding (measured 7e-3 in
# float64 on an AMD EPYC, 1e-15 on an Intel Xeon); compare those from a random baseline.
@reference(
    "integrated_gradients",
    reference="captum IntegratedGradients (same rule, steps, baseline and internal batching; "
    "'gausslegendre64': captum 0.2.0's float64-weight arithmetic)",
    tolerance={"float32": 1e-5, "float64": 1e-10},
    default_dtype="float64",
)
def integrated_gradients_vs_captum(
    model, torch_model, images, targets, *, config: IntegratedGradientsConfig | None = None, key=None
):
    defaults = IntegratedGradientsConfig()
    config = config or defaults
    if config.rule not in REFERENCE_RULES:
        raise ValueError(f"captum has no rule {config.rule!r}; its rules: {REFERENCE_RULES}")
    ours = integrated_gradients(model, images, targets, config=config, key=key)
    forward = _score_function(torch_model, config.output) if changed(config, defaults, {"output": "output"}) else torch_model
    # captum's default baseline is zeros: black pixels
    baselines = captum_baselines(config, torch_model, images, key) if changed(config, defaults, {"baseline": "baseline"}) else None
    theirs = _integrated_gradients(forward, to_torch_images(images), baselines, targets, config, images, defaults)
    return np.asarray(ours), to_numpy_nhwc(theirs)


def integrated_gradients_vs_pair(
    model,
    torch_model,
    images,
    targets,
    *,
    steps: int = 25,
    batch_size: int = 1,
    output: str = "logit",
    baselines: np.ndarray | None = None,
):
    """jaxattr's 'pair' rule vs saliency 0.2.1 `IntegratedGradients.GetMask` from `baselines` (one per
    image; default black, PAIR's default), one image at a time as PAIR runs; jaxattr's chunk is PAIR's
    batch_size (the same per-batch sums). The rule evaluates the baseline itself: a black one ties
    max-pool windows exactly (see integrated_gradients_vs_captum's note)."""
    config = IntegratedGradientsConfig(steps=steps, rule="pair", chunk=batch_size, output=output)
    starts = np.zeros_like(images) if baselines is None else np.broadcast_to(baselines, images.shape)
    ours = integrated_gradients(model, images, targets, config=config, baselines=starts)
    theirs = [
        saliency.IntegratedGradients().GetMask(
            image, pair_call_model(torch_model, int(target), output), x_steps=steps, x_baseline=start, batch_size=batch_size
        )
        for image, start, target in zip(images, starts, targets)
    ]
    return np.asarray(ours), np.stack(theirs)


@reference(
    "gnl_ig",
    reference="captum IntegratedGradients on the normalised-input torch model with GNL's guided rules "
    "(baseline 0 in normalised space, 50 Gauss-Legendre steps; "
    "'gausslegendre64': captum 0.2.0's float64-weight arithmetic)",
    tolerance={"float32": 1e-5, "float64": 1e-10},
    default_dtype="float64",  # as integrated_gradients
)
def gnl_ig_vs_captum(model, torch_model: PixelInput, images, targets, *, config: GnlIGConfig | None = None):
    """GNL's own configuration on the torch side: normalised inputs, baseline None (= 0), the guided
    rules on every ReLU / max-pool module. Normalised-space attributions (x_n - 0) ⊙ ∇_n equal
    pixel-space ones (p - mean) ⊙ ∇_p exactly in real arithmetic (gnl.md §2.5)."""
    defaults = GnlIGConfig()
    config = config or defaults
    if config.baseline != "mean":
        raise ValueError(f"GNL's baseline is zero in normalised space, i.e. baseline 'mean'; got {config.baseline!r}")
    ours = gnl_ig(model, images, targets, config=config)
    dtype = _torch_dtype(torch_model)
    pixels = to_torch_images(images)
    mean, std = torch_model.normalisation(dtype)
    normalised = (pixels - mean) / std
    with guided(torch_model.model, "guided") as guided_model:
        forward = _score_function(guided_model, config.output) if changed(config, defaults, {"output": "output"}) else guided_model
        theirs = _integrated_gradients(forward, normalised, None, targets, config, images, defaults)
    return np.asarray(ours), to_numpy_nhwc(theirs)
