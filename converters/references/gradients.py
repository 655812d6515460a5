"""captum and PAIR saliency references for the plain gradient and for SmoothGrad / VarGrad.

Noise: captum's NoiseTunnel draws it with torch's RNG inside `_add_noise_to_input`, PAIR's
GetSmoothedMask with NumPy's global RNG, one `normal(0, sigma, x.shape)` per sample. The runners
draw the noise once and hand the very same values to both sides: to jaxattr as `noise=`, to captum
by standing in for its noise function, to PAIR by replaying the seeded NumPy stream.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import saliency.core as saliency
import torch
from captum.attr import IntegratedGradients, NoiseTunnel, Saliency

from converters.crosscheck import changed, reference
from converters.references.pair import pair_call_model
from converters.torch_models import PixelInput, to_numpy_nhwc, to_torch_images
from jaxattr.methods import resolve_chunks
from jaxattr.methods.gradients import SmoothGradConfig, saliency as saliency_map, smoothgrad


@reference(
    "saliency",
    reference="captum Saliency (abs=False)",
    tolerance={"float32": 1e-5, "float64": 1e-10},
)
def saliency_vs_captum(model, torch_model, images, targets):
    ours = saliency_map(model, images, targets)
    inputs = to_torch_images(images).requires_grad_()  # captum warns when it has to set it
    theirs = Saliency(torch_model).attribute(inputs, target=torch.from_numpy(targets), abs=False)
    return np.asarray(ours), to_numpy_nhwc(theirs)


def _captum_base(config: SmoothGradConfig, torch_model: PixelInput):
    """The captum attribution for `config.base` and the keyword arguments giving jaxattr's settings."""
    base, base_config = config.base.spec.name, config.base.config
    if base == "saliency" and not base_config.multiply_by_inputs and base_config.output == "logit":
        return Saliency(torch_model), {"abs": False}
    if base == "integrated_gradients" and base_config.baseline == "black" and base_config.output == "logit":
        return IntegratedGradients(torch_model), {"n_steps": base_config.steps, "method": base_config.rule}
    raise ValueError(f"no captum counterpart for smoothgrad of {base} with {base_config}")


def noise_draws(config: SmoothGradConfig, images: np.ndarray, seed: int = 0) -> np.ndarray:
    """(samples, b, h, w, c) Gaussian noise, float32 like captum's (its stdev tensor is float32),
    with jaxattr's sigma: relative to each image's range or absolute."""
    z = torch.randn((config.samples, *images.shape), generator=torch.Generator().manual_seed(seed)).numpy()
    spread = np.ptp(images, axis=(1, 2, 3)).reshape(1, -1, 1, 1, 1) if config.relative else 1.0
    return (z * np.float32(config.stdev * spread)).astype(np.float32)


# float64 by default for the reason given at integrated_gradients: noisy images put max-pool
# windows within float32 rounding of a tie (measured 5e-3 on vgg11 in float32, 1e-15 in float64).
@reference(
    "smoothgrad",
    reference="captum NoiseTunnel (same noise injected into both sides)",
    tolerance={"float32": 1e-5, "float64": 1e-10},
    default_dtype="float64",
)
def smoothgrad_vs_captum(model, torch_model, images, targets, *, config: SmoothGradConfig | None = None, seed: int = 0):
    config = resolve_chunks(config or SmoothGradConfig(), len(images), images.shape[1:])  # captum's partitions: jaxattr's chunks
    noise = noise_draws(config, images, seed)
    ours = smoothgrad(model, images, targets, config=config, noise=noise.astype(images.dtype))

    # captum asks for one partition of P samples at a time, laid out image-major (b0 s0..sP-1, b1 ...).
    partitions = iter(np.split(noise, np.cumsum(_partition_sizes(config))[:-1]))

    def injected_noise(inputs: torch.Tensor, stdev: float, nt_samples_partition: int) -> torch.Tensor:
        part = next(partitions)
        assert part.shape[0] == nt_samples_partition
        part = to_torch_images(part.transpose(1, 0, 2, 3, 4).reshape(-1, *images.shape[1:]))
        return inputs.repeat_interleave(nt_samples_partition, dim=0) + part

    base, base_kwargs = _captum_base(config, torch_model)
    with mock.patch.object(NoiseTunnel, "_add_noise_to_input", staticmethod(injected_noise)):
        theirs = NoiseTunnel(base).attribute(
            to_torch_images(images),
            nt_type=config.kind,
            nt_samples=config.samples,
            nt_samples_batch_size=config.chunk,
            target=torch.from_numpy(targets),
            **base_kwargs,
        )
    return np.asarray(ours), to_numpy_nhwc(theirs)


def _partition_sizes(config: SmoothGradConfig) -> list[int]:
    """captum's split of the samples: full batches of nt_samples_batch_size, then the remainder."""
    size = config.samples if config.chunk is None else min(config.chunk, config.samples)
    full, rest = divmod(config.samples, size)
    return [size] * full + ([rest] if rest else [])


PAIR_STDEV_SPREAD, PAIR_SAMPLES = 0.15, 25  # GetSmoothedMask(stdev_spread=.15, nsamples=25), saliency 0.2.1


def smoothgrad_vs_pair(model, torch_model, images, targets, *, config: SmoothGradConfig | None = None, seed: int = 0):
    """jaxattr smoothgrad of the saliency map vs saliency 0.2.1 `GradientSaliency.GetSmoothedMask`
    (kind 'smoothgrad' is magnitude=False, 'smoothgrad_sq' magnitude=True; relative sigma only).

    PAIR draws normal(0, sigma, x.shape) per sample from NumPy's global RNG; the runner seeds it,
    records the draws, reseeds and lets PAIR draw the same stream again."""
    defaults = SmoothGradConfig()
    config = config or defaults
    if config.base.spec.name != "saliency" or config.kind == "vargrad" or not config.relative:
        raise ValueError("PAIR's GetSmoothedMask has kinds smoothgrad / smoothgrad_sq with relative sigma only")
    # PAIR at its own stdev_spread and nsamples unless the caller changed jaxattr's
    options = changed(config, defaults, {"stdev_spread": "stdev", "nsamples": "samples"})
    stdev_spread, nsamples = options.get("stdev_spread", PAIR_STDEV_SPREAD), options.get("nsamples", PAIR_SAMPLES)
    theirs, noise = [], []
    for i, (image, target) in enumerate(zip(images, targets)):
        sigma = stdev_spread * (np.max(image) - np.min(image))  # PAIR's stdev_spread arithmetic
        np.random.seed(seed + i)
        noise.append([np.random.normal(0, sigma, image.shape) for _ in range(nsamples)])
        np.random.seed(seed + i)
        theirs.append(
            saliency.GradientSaliency().GetSmoothedMask(
                image, pair_call_model(torch_model, int(target), "logit"), magnitude=config.kind == "smoothgrad_sq", **options
            )
        )
    noise = np.asarray(noise).transpose(1, 0, 2, 3, 4).astype(images.dtype)
    ours = smoothgrad(model, images, targets, config=config, noise=noise)
    return np.asarray(ours), np.stack(theirs)
