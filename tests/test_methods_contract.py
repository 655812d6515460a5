"""The contract every registered method keeps, in the style of optax's alias sweep: it runs under
jit with the expected shapes, its results do not depend on the batch, per-image keys equal
single-image runs, K classes per image equal K single-class runs, sharded equals single-device, outputs are finite, and an invalid option is a
clean ConfigError. A new method joins with one line in CASES."""

import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattr import ConfigError, explain, method
from jaxattr.methods import list_methods, method_spec
from jaxattr.models import Model
from jaxattr.models.resnet import ResNet
from _devices import report_on_four_devices

# name: (small options for a fast run, one invalid option)
CASES = {
    "saliency": ({}, {"output": "loss"}),
    "smoothgrad": ({"samples": 2}, {"samples": 0}),
    "integrated_gradients": ({"steps": 4}, {"rule": "simpson"}),
    "gnl_ig": ({"steps": 4}, {"steps": 0}),
    "guided_ig": ({"steps": 4}, {"max_dist": 2.0}),
    "blur_ig": ({"steps": 4, "max_sigma": 4.0}, {"grad_step": 0.0}),
    "guided_backprop": ({}, {"nonlinearity": "standard"}),
    "gradcam": ({}, {"relu": "yes"}),
    # No regulariser: the masks move far in two iterations, so the maps (1 - mask) are not a few
    # ulps of 1 that a relative tolerance would magnify.
    "igos": ({"iterations": 2, "steps": 2, "mask_size": 4, "l1": 0.0, "l2": 0.0}, {"iterations": 0}),
    "igos_plus": ({"iterations": 2, "steps": 2, "mask_size": 4, "l1": 0.0, "l2": 0.0}, {"btv_sigma": 0.0}),
    "igos_pp": ({"iterations": 2, "steps": 2, "mask_size": 4, "l1": 0.0, "l2": 0.0}, {"optimizer": "adam"}),
    # no references here: each image descends towards the config's default (black) reference
    "ig2": ({"steps": 3, "step_size": 16.0}, {"step_size": 0.0}),
    "iia": ({"steps": 2, "layer": "layer3"}, {"steps": 0}),
}
SIZE, BATCH = 32, 3


def tiny_model() -> Model:
    """A small torchvision-style ResNet (one basic block per stage, 10 classes): ReLUs, a
    max-pool, a feature layer, a linear head; cheap to compile."""
    module = ResNet(block="basic", depths=(1, 1, 1, 1), num_classes=10)
    params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))["params"]  # compiled: seconds, not 30
    return Model(module, params, "tiny-resnet")


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def images():
    return jnp.asarray(np.random.RandomState(0).rand(BATCH, SIZE, SIZE, 3).astype(np.float32))


TARGETS = jnp.array([1, 4, 7])
KEYS = jax.random.split(jax.random.key(3), BATCH)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def test_every_registered_method_is_in_the_sweep():
    assert set(CASES) == set(list_methods())


@pytest.mark.parametrize("name", CASES)
def test_runs_under_jit_with_the_expected_shapes(name, model, images):
    bound = method(name, **CASES[name][0])
    spec = bound.spec
    run = jax.jit(lambda m, x, t, k: bound(m, x, t, key=k))
    attributions = run(model, images, TARGETS, jax.random.key(1))
    assert attributions.shape[0] == BATCH and attributions.dtype == jnp.float32
    assert np.isfinite(np.asarray(attributions)).all()
    saliency = spec.saliency(attributions)
    assert saliency.ndim == 3 and saliency.shape[0] == BATCH
    result = explain(model, images, bound, targets=TARGETS, key=jax.random.key(1))
    assert result.maps.shape == (BATCH, SIZE, SIZE) and np.isfinite(np.asarray(result.maps)).all()
    np.testing.assert_array_equal(result.attributions, attributions)


@pytest.mark.parametrize("name", CASES)
def test_per_image_keys_make_results_independent_of_the_batch(name, model, images):
    bound = method(name, **CASES[name][0])
    together = bound(model, images, TARGETS, key=KEYS)
    for i in range(BATCH):
        alone = bound(model, images[i : i + 1], TARGETS[i : i + 1], key=KEYS[i : i + 1])
        # Same inputs and noise; only the convolutions' batch size (their rounding) differs.
        assert _rel(together[i], alone[0]) <= 1e-5, (name, i)


@pytest.mark.parametrize("name", CASES)
def test_k_classes_per_image_equal_single_class_runs(name, model, images):
    """targets (b, K): one program vmapped over the class axis; class k's attributions are those of
    a run with targets[:, k] alone (same per-image keys, so the same noise)."""
    bound = method(name, **CASES[name][0])
    classes = jnp.stack([TARGETS, jnp.array([0, 4, 9])], axis=1)
    if name.startswith("igos"):  # the I-GOS family optimises one mask per image: one class only, for now
        with pytest.raises(ValueError, match=r"targets must be an int or have shape \(3,\)"):
            bound(model, images, classes, key=KEYS)
        return
    together = bound(model, images, classes, key=KEYS)
    assert together.shape[:2] == (BATCH, 2)
    for k in range(2):
        alone = bound(model, images, classes[:, k], key=KEYS)
        assert _rel(together[:, k], alone) <= 1e-5, (name, k)


@pytest.mark.parametrize("name", CASES)
def test_one_key_gives_an_image_the_same_result_in_a_smaller_batch(name, model, images):
    bound = method(name, **CASES[name][0])
    full = bound(model, images, TARGETS, key=jax.random.key(2))
    prefix = bound(model, images[:2], TARGETS[:2], key=jax.random.key(2))
    assert _rel(full[:2], prefix) <= 1e-5, name
    if method_spec(name).stochastic:
        other = bound(model, images, TARGETS, key=jax.random.key(5))
        assert _rel(other, full) > 1e-3  # the key reaches the method


@pytest.mark.parametrize("name", CASES)
def test_an_invalid_option_is_a_config_error(name):
    (field, value), = CASES[name][1].items()
    with pytest.raises(ConfigError) as error:
        method(name, **{field: value})
    assert error.value.field == field and field in str(error.value)


SHARDED = textwrap.dedent(
    """
    import importlib.util, json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jaxattr import explain, method
    spec = importlib.util.spec_from_file_location("contract", sys.argv[1])
    contract = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(contract)
    assert len(jax.devices()) == 4, jax.devices()
    model = contract.tiny_model()
    x = jnp.asarray(np.random.RandomState(0).rand(contract.BATCH, contract.SIZE, contract.SIZE, 3).astype(np.float32))
    report = {}
    for name, (options, _) in contract.CASES.items():
        bound = method(name, **options)
        one = explain(model, x, bound, targets=contract.TARGETS, key=jax.random.key(1))
        many = explain(model, x, bound, targets=contract.TARGETS, key=jax.random.key(1), devices=jax.devices())
        report[name] = [contract._rel(many.attributions, one.attributions), contract._rel(many.maps, one.maps)]
    print("REPORT" + json.dumps(report))
    """
)


def test_sharded_equals_single_device():
    report = json.loads(report_on_four_devices(SHARDED, __file__))
    assert set(report) == set(CASES)
    for name, diffs in report.items():
        assert max(diffs) <= 1e-5, (name, diffs)  # 3 images on 4 devices: one padded row
