"""The CNN ports (ResNet, VGG, GoogLeNet) against their torchvision twins run in the same test.

Random weights with randomised BatchNorm (converters.torch_models), small non-square images.
Forward parity is checked in float32 at the project tolerances (converters.verify). Input
gradients are compared in float64: in float32 the two frameworks' rounding differences
(~1e-6 relative) can flip the winner of a near-tied max-pool window, which moves gradient to
another pixel and makes a float32 comparison of whole-model gradients a matter of luck.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from converters.guided import guided
from converters.torch_models import PixelInput, to_numpy_nhwc, to_torch_images, torch_twin
from converters.verify import compare
from jaxattr.models import Model, create_model, model_info

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
VGGS = ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")
CNNS = (*RESNETS, *VGGS, "googlenet")
IMAGE_SHAPE = (2, 64, 56, 3)  # VGG's last feature map is 2x1, so its 7x7 average pool does not divide
TARGETS = np.array([3, 7])
GRADIENT_TOLERANCE = 1e-9  # float64, max |diff| / max |reference gradient|


@pytest.fixture
def images(rng):
    return rng.rand(*IMAGE_SHAPE).astype(np.float32)


def _static_model(name: str) -> Model:
    """A model without parameters: enough for everything about layer names."""
    return Model(model_info(name).build(), {}, name)


# ------------------------------------------------------------------------------ forward parity


@pytest.mark.parametrize("name", CNNS)
def test_forward_parity_per_layer(name, images):
    torch_model, model = torch_twin(name)
    report = compare(model, torch_model, images)
    assert report.ok, "\n" + report.table()
    # Every stage is named after a torch module, so every stage was compared.
    assert report.skipped == ()
    assert [d.layer for d in report.layers[:-1]] == list(model.layers)


def test_vgg_stages_are_torchs_modules_in_order():
    torch_model = torchvision.models.vgg11_bn(weights=None, init_weights=False)
    leaves = [name for name, module in torch_model.named_modules() if not list(module.children())]
    assert list(_static_model("vgg11_bn").layers) == leaves


def test_googlenet_stages_are_torchs_top_level_modules_in_order():
    torch_model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False)
    assert list(_static_model("googlenet").layers) == [name for name, _ in torch_model.named_children()]


# ------------------------------------------------------------------------------ input gradients


@functools.lru_cache(maxsize=1)  # the gradient tests are ordered by model; VGG-11 is large
def _float64_twin(name: str) -> tuple[PixelInput, Model]:
    torch_model, model = torch_twin(name)
    with jax.enable_x64(True):
        return torch_model.double(), model.astype(np.float64)


@jax.jit
def _target_logit_gradient(model: Model, images: jax.Array, targets: jax.Array) -> jax.Array:
    return jax.grad(lambda x: jnp.take_along_axis(model(x), targets[:, None], axis=1).sum())(images)


def _torch_target_logit_gradient(torch_model: PixelInput, images: np.ndarray, targets: np.ndarray):
    x = to_torch_images(images).requires_grad_()
    torch_model(x)[torch.arange(len(targets)), torch.from_numpy(targets)].sum().backward()
    return to_numpy_nhwc(x.grad)


GRADIENT_CASES = [  # grouped by model, for _float64_twin's cache
    (name, mode)
    for name, modes in [
        ("resnet18", ("standard", "guided", "guided_relu")),
        ("resnet50", ("guided", "guided_relu")),
        ("vgg11", ("standard", "guided", "guided_relu")),
        ("googlenet", ("guided", "guided_relu")),
    ]
    for mode in modes
]


@pytest.mark.parametrize("name, mode", GRADIENT_CASES, ids=[f"{n}-{m}" for n, m in GRADIENT_CASES])
def test_input_gradient_matches_torch(name, mode, rng):
    torch_model, model = _float64_twin(name)
    images = rng.rand(*IMAGE_SHAPE)
    with jax.enable_x64(True):
        ours = np.asarray(_target_logit_gradient(model.with_nonlinearity(mode), images, TARGETS))
    with guided(torch_model, mode=mode):
        reference = _torch_target_logit_gradient(torch_model, images, TARGETS)
    assert ours.dtype == np.float64
    # Relative: random-weight GoogLeNet gradients are ~1e-14 in magnitude.
    error = np.abs(ours - reference).max() / np.abs(reference).max()
    assert error <= GRADIENT_TOLERANCE, f"{name} {mode}: relative error {error:.2e}"


def test_guided_modes_change_the_gradient(rng):
    _, model = _float64_twin("resnet18")
    images = rng.rand(*IMAGE_SHAPE)
    with jax.enable_x64(True):
        grads = {mode: np.asarray(_target_logit_gradient(model.with_nonlinearity(mode), images, TARGETS))
                 for mode in ("standard", "guided", "guided_relu")}
    # The GNL max-pool rule and the guided ReLU rule each change the result.
    assert not np.allclose(grads["guided"], grads["guided_relu"], rtol=1e-3, atol=0)
    assert not np.allclose(grads["guided_relu"], grads["standard"], rtol=1e-3, atol=0)


# ------------------------------------------------------------------------------ taps and heads


@pytest.fixture(scope="module")
def small_twins():
    return {name: torch_twin(name)[1] for name in ("resnet18", "googlenet")}


@pytest.mark.parametrize(
    "name, layer, resolved",
    [
        ("resnet18", "layer3", "layer3.1"),
        ("resnet18", "maxpool", "maxpool"),
        ("googlenet", "inception4c", "inception4c"),
        ("googlenet", "dropout", "dropout"),
    ],
)
def test_head_of_tap_is_the_model(small_twins, images, name, layer, resolved):
    model = small_twins[name]
    activation, head = model.tap(images, layer)
    assert head.layer == resolved
    _, activations = model.activations(images)
    np.testing.assert_array_equal(activation, activations[resolved])
    logits = np.asarray(model(images))
    np.testing.assert_allclose(head(activation), logits, rtol=0, atol=1e-6 * np.abs(logits).max())


@pytest.mark.parametrize(
    "name, layer, resolved",
    [
        ("resnet18", "layer4", "layer4.1"),
        ("resnet152", "layer3", "layer3.35"),
        ("vgg11", "features", "features.20"),
        ("vgg16_bn", "features", "features.43"),
        ("vgg11", "classifier", "classifier.6"),
        ("vgg11", "classifier.1", "classifier.1"),
        ("googlenet", "inception5b", "inception5b"),
    ],
)
def test_container_names_resolve_to_their_last_layer(name, layer, resolved):
    assert _static_model(name).resolve_layer(layer) == resolved


@pytest.mark.parametrize("name", ["vgg11", "googlenet"])
def test_feature_layer_is_the_last_spatial_map(name):
    model = _static_model(name)
    layer = model.resolve_layer(model.feature_layer)
    after = model.layers[model.layers.index(layer) + 1]
    assert after == "avgpool"


@pytest.mark.parametrize(
    "name, listed", [("vgg11", "features.0, features.1"), ("googlenet", "conv1, maxpool1, conv2")]
)
def test_unknown_layer_error_lists_the_layers(name, listed):
    with pytest.raises(ValueError, match=f"unknown layer 'inception9'.*layers: {listed}"):
        _static_model(name).resolve_layer("inception9")


# ------------------------------------------------------------------------------ weights


def test_googlenet_loads_torchvisions_pretrained_checkpoint_layout(tmp_path, monkeypatch, images):
    # torchvision's googlenet-1378be20.pth holds the aux heads' weights; the port has no aux heads.
    torch.manual_seed(0)
    source = torchvision.models.googlenet(
        weights=None, aux_logits=True, transform_input=True, init_weights=True
    )
    hub = tmp_path / "torch-home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(source.state_dict(), hub / model_info("googlenet").weights_file)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    model = create_model("googlenet")
    source.aux_logits, source.aux1, source.aux2 = False, None, None  # as torchvision does after loading
    torch_model = PixelInput(source.eval(), model.module.mean, model.module.std)
    with torch.no_grad():
        expected = torch_model(to_torch_images(images)).numpy()
    np.testing.assert_allclose(model(images), expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_unknown_nonlinearity_is_rejected():
    with pytest.raises(ValueError, match="unknown nonlinearity 'guidedd'"):
        create_model("vgg11", weights=None, nonlinearity="guidedd")


def test_vgg_rejects_images_too_small_for_its_pools():
    # Five 2x2 pools need at least 32 pixels (torchvision's min_size for VGG).
    module = model_info("vgg11").build()
    images = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    with pytest.raises(ValueError, match="max_pool2d: input size 1 is too small"):
        jax.eval_shape(module.init, jax.random.key(0), images)
