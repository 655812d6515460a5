"""Blur IG against saliency.core.BlurIG: float64 on a torchvision twin, float32 on a smooth CNN twin."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saliency.core as saliency
import torch

from converters.crosscheck import max_rel_diff, references, run
from converters.torch_models import torch_twin
from jaxattr import BlurIGConfig, blur_ig, explain, gaussian_blur, method_spec
from jaxattr.methods.blur_ig import blur_path, blur_sigmas

SQRT = BlurIGConfig(sqrt=True)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # float64 torch convolutions with 2 threads on a shared 2-core machine run ~7x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------ float64, torchvision


@pytest.fixture(scope="module")
def resnet18():
    torch_model, model = torch_twin("resnet18")
    return model, torch_model


@pytest.mark.parametrize("config", [BlurIGConfig(), SQRT], ids=["defaults", "sqrt"])
def test_matches_pair_blur_ig_in_float64(resnet18, rng, config):
    model, torch_model = resnet18
    result = run("blur_ig", model, torch_model, rng.rand(2, 16, 16, 3), dtype="float64", config=config)
    assert result.ok, result


# --------------------------------------------------------------------------- float32, smooth CNN


class SmoothCNN(torch.nn.Module):
    """A small CNN without kinks (tanh, average pooling) on NCHW pixels.

    On a torchvision CNN float32 parity of Blur IG stops near 1e-4: the blurred images are so
    smooth that whole regions of ReLU / max-pool inputs sit near a kink together, and torch and XLA
    round them to different sides. The float64 test above covers the torchvision model."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(16, 10)
        for parameter in self.parameters():
            parameter.data.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)

    def forward(self, pixels):
        x = torch.tanh(self.conv1(pixels))
        x = torch.tanh(self.conv2(torch.nn.functional.avg_pool2d(x, 2)))
        return self.fc(x.mean(dim=(2, 3)))


def _conv(x, kernel, bias, stride):
    y = jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "OIHW", "NHWC")
    )
    return y + bias


def smooth_cnn_forward(params, images):
    """SmoothCNN in JAX on NHWC pixels (same weights, torch layouts)."""
    x = jnp.tanh(_conv(images, params["conv1.weight"], params["conv1.bias"], 1))
    b, h, w, c = x.shape
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
    x = jnp.tanh(_conv(x, params["conv2.weight"], params["conv2.bias"], 2))
    return x.mean(axis=(1, 2)) @ params["fc.weight"].T + params["fc.bias"]


@pytest.fixture(scope="module")
def smooth_cnn():
    torch_model = SmoothCNN().eval()
    params = {name: jnp.asarray(value.detach().numpy()) for name, value in torch_model.state_dict().items()}
    return jax.tree_util.Partial(smooth_cnn_forward, params), torch_model


@pytest.mark.parametrize("config", [BlurIGConfig(), SQRT], ids=["defaults", "sqrt"])
def test_matches_pair_blur_ig_in_float32(smooth_cnn, rng, config):
    forward, torch_model = smooth_cnn
    images = rng.rand(2, 16, 16, 3).astype(np.float32)
    reference = references()["blur_ig"]
    ours, theirs = reference.runner(forward, torch_model, images, np.array([1, 4]), config=config)
    assert ours.dtype == np.float32
    assert max_rel_diff(ours, theirs) <= reference.tolerance["float32"]


# ------------------------------------------------------------------ path details and the fix


def pixel_linear(images):
    weights = jnp.linspace(-1.0, 2.0, images[0].size, dtype=images.dtype).reshape(images.shape[1:])
    score = jnp.sum(images * weights, axis=(1, 2, 3))
    return jnp.stack([score, -score], axis=-1)


def test_step_zero_has_an_exactly_zero_derivative(rng):
    # sigma_0 + grad_step = 0.01: radius 0, so blur(x, 0.01) is x and d_0 = 0 exactly (as in PAIR).
    images = jnp.asarray(rng.rand(1, 8, 8, 3).astype(np.float32))
    path, _ = blur_path(images, BlurIGConfig(steps=4))
    tangents = np.asarray(jax.jit(path.tangents)(jnp.array([0.0, 1.0])))
    assert np.all(tangents[0] == 0) and np.all(tangents[1] != 0)
    np.testing.assert_array_equal(np.asarray(jax.jit(path.points)(jnp.array([0.0])))[0], images)


def test_sigma_schedule_is_pairs():
    expected = [0.0, 0.5, 1.0, 1.5, 2.0]
    np.testing.assert_array_equal(blur_sigmas(BlurIGConfig(steps=4, max_sigma=2.0)), expected)
    sqrt = BlurIGConfig(steps=4, max_sigma=2.0, sqrt=True)
    np.testing.assert_array_equal(blur_sigmas(sqrt), np.sqrt(expected))


def test_chunks_change_memory_not_weights(rng):
    """PAIR with batch_size > 1 weights a whole batch by its last step's dsigma (visible with
    sqrt=True); jaxattr's chunks keep each step's dsigma: the batch_size=1 result."""
    images = rng.rand(1, 8, 8, 3).astype(np.float32)
    config = BlurIGConfig(sqrt=True, steps=20)
    whole = np.asarray(blur_ig(pixel_linear, images, 0, config=config))
    chunked = np.asarray(blur_ig(pixel_linear, images, 0, config=dataclasses.replace(config, chunk=6)))
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6 * np.abs(whole).max())

    score_gradients = jax.jit(jax.grad(lambda x: pixel_linear(x)[:, 0].sum()))

    def gradients(batch, call_model_args=None, expected_keys=None):
        return {saliency.INPUT_OUTPUT_GRADIENTS: np.asarray(score_gradients(jnp.asarray(batch)))}

    def pair(batch_size):
        return saliency.BlurIG().GetMask(images[0], gradients, steps=20, sqrt=True, batch_size=batch_size)

    assert max_rel_diff(chunked[0], pair(1)) <= 1e-6
    assert max_rel_diff(chunked[0], pair(6)) > 1e-2


def test_linear_model_attributes_the_difference_to_the_blurred_image(rng):
    # For f(x) = <w, x>, Blur IG tends to w * (x - blur(x, max_sigma)) as the steps get finer.
    images = rng.rand(1, 8, 8, 3).astype(np.float32)
    config = BlurIGConfig(max_sigma=5.0, steps=1000, chunk=250)
    attributions = np.asarray(blur_ig(pixel_linear, images, 0, config=config))
    weights = np.linspace(-1.0, 2.0, 192, dtype=np.float32).reshape(8, 8, 3)
    expected = weights * (images - np.asarray(gaussian_blur(images, 5.0)))
    np.testing.assert_allclose(attributions, expected, rtol=0, atol=1e-2 * np.abs(expected).max())


def test_registered_and_explainable(rng):
    assert method_spec("blur_ig").config is BlurIGConfig
    explanation = explain(pixel_linear, rng.rand(1, 8, 8, 3).astype(np.float32), "blur_ig", steps=5)
    assert explanation.maps.shape == (1, 8, 8)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(steps=0), "steps must be an integer in \\[1, 1000000\\]"),
        (dict(max_sigma=-1.0), "max_sigma must be a finite number"),
        (dict(grad_step=0.0), "grad_step must be a finite number > 0"),
        (dict(chunk=0), "chunk must be a positive integer, \"auto\" or None"),
        (dict(output="softmax"), "unknown output"),
    ],
)
def test_bad_configs_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(BlurIGConfig(), **overrides)
