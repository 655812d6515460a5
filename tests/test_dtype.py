"""Reduced precision: a model computing in bfloat16 (`Model.astype`, `jaxattr explain --dtype`)
inside float32 methods. The layers run in bfloat16; what methods see (logits, activations, maps)
is float32, finite, and close in rank to the float32 maps (benchmarks/dtype.py measures the
embedded model; the README prints its table)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import spearmanr
from test_methods_contract import BATCH, SIZE, tiny_model

from jaxattr import cli, explain

# Rank correlation of each image's bfloat16 map with its float32 map. Measured on this tiny random
# ResNet (3 images): lowest 0.968 (saliency), IG 0.993, Grad-CAM 0.998 (SmoothGrad 0.995).
# bfloat16 keeps 8 bits of mantissa: the maps are a coarse copy, never equal to float32 rounding.
MIN_RANK_CORRELATION = 0.9
CASES = [
    ("saliency", {}),
    ("integrated_gradients", {"steps": 4}),
    ("gradcam", {"layer": "layer3"}),  # 2x2 at 32 px (layer4 is 1x1: a constant map)
]


@pytest.fixture(scope="module")
def models():
    model = tiny_model()
    return model, model.astype(jnp.bfloat16)


@pytest.fixture(scope="module")
def images():
    return jnp.asarray(np.random.RandomState(0).rand(BATCH, SIZE, SIZE, 3).astype(np.float32))


def test_the_layers_compute_in_bfloat16_and_return_float32(models, images):
    model, low = models
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(low.params)} == {jnp.dtype(jnp.bfloat16)}
    jaxpr = str(jax.make_jaxpr(low)(images))
    assert "conv_general_dilated" in jaxpr and "bf16[" in jaxpr
    layer = low.resolve_layer(low.feature_layer)

    @jax.jit
    def run(m, x):  # one program per model, not op-by-op dispatch
        _, read = m.intervene(x, read=[layer])
        return m(x), read[layer], m.from_normalised(m.normalise(x))

    (logits, activation, from_normalised), (reference, _, _) = run(low, images), run(model, images)
    assert logits.dtype == activation.dtype == jnp.float32
    error = float(jnp.abs(logits - reference).max() / jnp.abs(reference).max())
    assert 0 < error < 0.05  # rounded to bfloat16 on the way, not a float32 run
    # Normalisation happens before the cast: the model's input is rounded once, either way in.
    np.testing.assert_array_equal(from_normalised, logits)


@pytest.mark.parametrize("method, options", CASES)
def test_bfloat16_maps_are_float32_finite_and_close_in_rank(models, images, method, options):
    model, low = models
    key = jax.random.key(0)  # SmoothGrad: the same noise in both runs
    reference = explain(model, images, method, key=key, **options)
    result = explain(low, images, method, targets=reference.targets, key=key, **options)
    assert result.maps.dtype == result.attributions.dtype == jnp.float32
    assert np.isfinite(result.maps).all() and np.isfinite(result.attributions).all()
    assert not np.array_equal(result.maps, reference.maps)
    for ours, theirs in zip(np.asarray(result.maps), np.asarray(reference.maps)):
        assert spearmanr(ours.ravel(), theirs.ravel())[0] >= MIN_RANK_CORRELATION


def test_a_model_computes_in_a_floating_dtype(models):
    with pytest.raises(TypeError, match="floating dtype"):
        models[0].astype(jnp.int32)


def test_cli_dtype(tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(image)
    base = ["explain", str(image), "--model", "resnet18", "--method", "saliency", "--crop", "32", "--no-compile-cache"]
    out = tmp_path / "out"
    assert cli.main([*base, "--out", str(out), "--dtype", "bfloat16", "--weights", str(_random_weights(tmp_path))]) == 0
    attribution = np.load(out / "a.npy")
    assert attribution.dtype == np.float32 and np.isfinite(attribution).all()
    assert json.loads((out / "summary.json").read_text())["settings"]["dtype"] == "bfloat16"
    capsys.readouterr()
    # The outputs depend on the dtype: a float32 run into the directory is refused, not mixed in.
    assert cli.main([*base, "--out", str(out), "--weights", str(tmp_path / "w.safetensors")]) == 1
    assert "dtype differ" in capsys.readouterr().err
    assert cli.main([*base, "--out", str(out), "--dtype", "float16"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--dtype" in err and "float16" in err and "Traceback" not in err


def _random_weights(folder):
    from jaxattr.models import create_model
    from jaxattr.models.weights import save_params

    path = folder / "w.safetensors"
    save_params(path, create_model("resnet18", weights=None).params, model="resnet18")
    return path
