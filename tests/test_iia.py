"""IIA against the PyTorch reference written from iia.md (converters/references/iia.py: hooks on a
torchvision ResNet, explicit attention recording on timm / torchvision ViTs), its closed forms for
ResNet's last layer (iia.md §2.3, §2.5), torch's resizers, rollout's properties, batching, chunking,
the segmentation protocol's pieces and bad input."""

import json
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from converters import crosscheck  # noqa: E402
from converters.references.iia import resnet_split  # noqa: E402
from converters.torch_models import PixelInput, randomise_constants, to_torch_images  # noqa: E402
from jaxattr import ConfigError, IIAConfig, cli, explain, iia, iia_layer_maps, maps  # noqa: E402
from jaxattr.methods.iia import path_nodes, rollout, unnormalised_inputs  # noqa: E402
from jaxattr.models import Model  # noqa: E402
from jaxattr.models.resnet import ResNet  # noqa: E402
from jaxattr.models.vit import VisionTransformer  # noqa: E402
from jaxattr.models.weights import params_from_state_dict  # noqa: E402
from _devices import report_on_four_devices

sys.path.insert(0, str(Path(__file__).parent))
from test_models_vit import tiny_pair  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CNN_SIZE, VIT_SIZE = 64, 32
TARGETS = np.array([3, 7])


def _rel(a, b) -> float:
    return crosscheck.max_rel_diff(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def resnet():
    """A torchvision ResNet with one basic block per stage (10 classes, random BatchNorm statistics)
    and the jaxattr port holding its weights. At 64 px layer4 is 2x2 and layer3 4x4."""
    torch.manual_seed(0)
    module = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)
    randomise_constants(module)
    port = ResNet(block="basic", depths=(1, 1, 1, 1), num_classes=10)
    shapes = jax.ShapeDtypeStruct((1, CNN_SIZE, CNN_SIZE, 3), jnp.float32)
    template = jax.eval_shape(port.init, jax.random.key(0), shapes)["params"]
    params = params_from_state_dict(module.state_dict(), template, source="tiny torchvision ResNet")
    model = Model(port, jax.tree_util.tree_map(jnp.asarray, params), "tiny-resnet")
    return PixelInput(module.eval(), port.mean, port.std).eval(), model


@pytest.fixture(scope="module")
def cnn_images():
    return np.random.RandomState(0).rand(2, CNN_SIZE, CNN_SIZE, 3).astype(np.float32)


def _vit_pair(naming: str):
    """A tiny sharpened ViT (peaked attention) on pixel input, and its port."""
    module, model = tiny_pair(naming)
    return PixelInput(module, model.module.mean, model.module.std).eval(), model


@pytest.fixture(scope="module", params=["timm", "torchvision"])
def vits(request):
    return _vit_pair(request.param)


@pytest.fixture(scope="module")
def vit():
    return _vit_pair("timm")


@pytest.fixture(scope="module")
def vit_images():
    return np.random.RandomState(1).rand(2, VIT_SIZE, VIT_SIZE, 3).astype(np.float32)


def _crosscheck(model, torch_model, images, config):
    result = crosscheck.run("iia", model, torch_model, images, TARGETS, config=config)
    assert result.ok, result
    return result


# ------------------------------------------------------------------------------- CNN parity


@pytest.mark.parametrize(
    "config",
    [
        None,  # each side's own defaults: layer4, 11 image points
        IIAConfig(layer="layer3", steps=4),
        IIAConfig(layer="layer3", mode="integrated", steps=3, activation_steps=4, chunk=3),
        IIAConfig(mode="integrated", steps=2, activation_steps=2, output="probability"),
    ],
    ids=["reference-layer4", "reference-layer3", "integrated-layer3", "integrated-probability"],
)
def test_cnn_matches_the_torch_reference(resnet, cnn_images, config):
    torch_model, model = resnet
    _crosscheck(model, torch_model, cnn_images, config)


def _torch_path_activations(torch_model, images, steps):
    """ResNet layer4 activations of every image-path point, (K+1, b, C, h, w), and fc's weights,
    from the torch model alone."""
    features, _ = resnet_split(torch_model.model, "layer4.0")
    mean, std = torch_model.normalisation(torch.float32)
    x = ((to_torch_images(images) - mean) / std).numpy()
    path = path_nodes(steps).reshape(-1, 1, 1, 1, 1) * x[None]
    with torch.no_grad():
        acts = features(torch.from_numpy(path.reshape(-1, *x.shape[1:]))).numpy()
    return acts.reshape(steps + 1, len(images), *acts.shape[1:]), torch_model.model.fc.weight.detach().numpy()


def test_cnn_closed_forms_at_resnets_last_layer(resnet, cnn_images):
    """Head = ReLU, spatial mean, fc and A >= 0: reference mode is the path-summed un-rectified CAM
    (1/hw) Σ_k Σ_c W[t, c] A_k,c; integrated mode ((M+1)/(2hw)) Σ_c W[t, c] (Σ_k A_k,c + (K+1) B_c)."""
    torch_model, model = resnet
    steps, inner = 4, 3
    acts, weight = _torch_path_activations(torch_model, cnn_images, steps)
    w = weight[TARGETS][:, :, None, None]  # (b, C, 1, 1)
    hw = acts.shape[-1] * acts.shape[-2]
    expected = np.sum(w[None] * acts, axis=(0, 2)) / hw
    ours = iia_layer_maps(model, cnn_images, TARGETS, config=IIAConfig(steps=steps))
    assert _rel(ours, expected) <= 1e-5
    base = acts.min(axis=0)
    expected = (inner + 1) / (2 * hw) * np.sum(w * (acts.sum(axis=0) + (steps + 1) * base), axis=1)
    config = IIAConfig(steps=steps, mode="integrated", activation_steps=inner)
    assert _rel(iia_layer_maps(model, cnn_images, TARGETS, config=config), expected) <= 1e-5


# ------------------------------------------------------------------------------- ViT parity


def test_vit_matches_the_torch_reference_with_peaked_attention(vits, vit_images):
    torch_model, model = vits
    _, values = model.intervene(jnp.asarray(vit_images), read=[model.module.attention_site(2)])
    attention = np.asarray(next(iter(values.values())))
    # Not the near-uniform attention of a plain random init (1/17 per token).
    assert attention.max() > 0.5 and np.median(attention.max(-1)) > 3 / 17
    _crosscheck(model, torch_model, vit_images, None)  # each side's own defaults


@pytest.mark.slow
def test_vit_matches_the_torch_reference_on_another_path_block(vit, vit_images):
    """Another path block, fewer points, two image points per batch."""
    torch_model, model = vit
    block = model.module.block_name(1)
    _crosscheck(model, torch_model, vit_images, IIAConfig(layer=block, steps=2, activation_steps=3, chunk=2))


def test_rollout_properties():
    """Every augmented matrix and their product are row-stochastic, so the class token's row sums to
    1; zero cams give J = I, whose class-token row without the class token is all zeros."""
    cams = jax.random.uniform(jax.random.key(0), (3, 2, 4, 5, 5))
    relevance = rollout(cams)
    np.testing.assert_allclose(np.asarray(relevance.sum(-1)), 1.0, rtol=1e-6)
    assert float(relevance.min()) > 0
    zero = rollout(jnp.zeros((3, 2, 4, 5, 5)))
    np.testing.assert_array_equal(np.asarray(zero), np.eye(5)[[0, 0]])


# ---------------------------------------------------------------------------- resizing, scale


def test_maps_are_resized_exactly_as_torch(resnet, cnn_images, vit, vit_images):
    """The image-resolution map is torch's bicubic (CNN) / bilinear (ViT) resize of the layer map."""
    F = torch.nn.functional
    for model, images, mode in ((resnet[1], cnn_images, "bicubic"), (vit[1], vit_images, "bilinear")):
        config = IIAConfig(steps=1) if mode == "bicubic" else IIAConfig(steps=1, activation_steps=1)
        layer_maps = np.array(iia_layer_maps(model, images, TARGETS, config=config))
        expected = F.interpolate(torch.from_numpy(layer_maps)[:, None], size=images.shape[1:3], mode=mode, align_corners=False)
        assert _rel(iia(model, images, TARGETS, config=config), expected[:, 0].numpy()) <= 1e-6
    # The reference's sizes: 7x7 -> 224 bicubic, 14x14 -> x16 bilinear.
    grid = np.random.RandomState(2).randn(2, 7, 7).astype(np.float32)
    torch_bicubic = F.interpolate(torch.from_numpy(grid)[:, None], size=(224, 224), mode="bicubic", align_corners=False)
    np.testing.assert_allclose(maps.upsample(jnp.asarray(grid), (224, 224), "bicubic"), torch_bicubic[:, 0], atol=1e-6)
    grid = np.random.RandomState(3).rand(2, 14, 14).astype(np.float32)
    torch_bilinear = F.interpolate(torch.from_numpy(grid)[:, None], scale_factor=16, mode="bilinear", align_corners=False)
    np.testing.assert_allclose(maps.upsample(jnp.asarray(grid), (224, 224), "bilinear"), torch_bilinear[:, 0], atol=1e-6)


def test_min_max_is_the_references_normalisation_and_zero_for_constant_maps():
    x = np.random.RandomState(4).randn(3, 9, 9).astype(np.float32)
    expected = torch.from_numpy(x.copy())
    for m in expected:  # make_resize_norm / blend_transformer_heatmap, in place
        m -= m.min()
        m /= m.max()
    np.testing.assert_allclose(np.asarray(maps.min_max(jnp.asarray(x))), expected.numpy(), rtol=0, atol=1e-7)
    constant = maps.min_max(jnp.full((2, 4, 4), 3.0))
    assert np.all(np.asarray(constant) == 0)


# ------------------------------------------------------------------------ batching, chunking


def test_batch_and_chunk_change_nothing(resnet, cnn_images, vit, vit_images):
    """Chunks of image points (a full chunk and a remainder) and single images give the batch's
    maps. (The CNN reference mode is in test_methods_contract's batch sweeps.)"""
    cases = (
        (resnet[1], cnn_images, IIAConfig(steps=2, mode="integrated", activation_steps=2)),
        (vit[1], vit_images, IIAConfig(steps=2, activation_steps=2)),
    )
    for model, images, config in cases:
        together = iia_layer_maps(model, images, TARGETS, config=config)
        chunked = iia_layer_maps(model, images, TARGETS, config=config.replace(chunk=2))
        assert _rel(chunked, together) <= 1e-6, config
        for i in range(len(images)):
            alone = iia_layer_maps(model, images[i : i + 1], TARGETS[i : i + 1], config=config)
            assert _rel(alone[0], together[i]) <= 1e-5, (config, i)


SHARDED_VIT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jaxattr import explain
    from jaxattr.models import Model
    from jaxattr.models.vit import VisionTransformer
    assert len(jax.devices()) == 4, jax.devices()
    vit = VisionTransformer(patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=64, num_classes=10, image_size=32)
    model = Model(vit, vit.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"], "tiny-vit")
    x = jnp.asarray(np.random.RandomState(0).rand(3, 32, 32, 3).astype(np.float32))
    options = dict(targets=jnp.array([1, 4, 7]), steps=2, activation_steps=2)
    one = explain(model, x, "iia", **options)
    many = explain(model, x, "iia", devices=jax.devices(), **options)
    scale = float(jnp.abs(one.maps).max())
    print("REPORT" + json.dumps(float(jnp.abs(many.maps - one.maps).max()) / scale))
    """
)


@pytest.mark.slow
def test_a_vit_sharded_over_four_devices_equals_one_device():
    """The CNN case is in test_methods_contract's sharded sweep (not slow); this one starts a
    process with four CPU devices and compiles a ViT there."""
    assert float(report_on_four_devices(SHARDED_VIT, timeout=600)) <= 1e-5


def test_a_vit_made_for_another_image_size():
    """create_model(..., image_size=) ViTs: a 6x6 token grid at 48 px, resized to 48x48; images of
    another size are refused with the way out."""
    vit = VisionTransformer(patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=64, num_classes=10, image_size=48)
    model = Model(vit, vit.init(jax.random.key(0), jnp.zeros((1, 48, 48, 3)))["params"], "tiny-vit-48")
    x = jnp.asarray(np.random.RandomState(5).rand(1, 48, 48, 3).astype(np.float32))
    # Traced, not compiled: the shapes are the point (the ViT computation is checked above).
    result = jax.eval_shape(lambda x: iia(model, x, config=IIAConfig(steps=1, activation_steps=1)), x)
    assert result.shape == (1, 48, 48)
    grid = jax.eval_shape(lambda x: iia_layer_maps(model, x, config=IIAConfig(steps=1, activation_steps=1)), x)
    assert grid.shape == (1, 6, 6)
    with pytest.raises(ValueError, match=r"takes 48x48 images, got 32x32.*image_size"):
        iia(model, jnp.zeros((1, 32, 32, 3)))


# --------------------------------------------------------------------------------- bad input


def test_bad_input_is_explained(resnet, cnn_images, vit):
    model = resnet[1]
    with pytest.raises(ValueError, match="unknown layer 'layer9'.*layers: conv1, bn1"):
        iia(model, cnn_images, config=IIAConfig(layer="layer9"))
    with pytest.raises(ValueError, match=r"layer fc's output has shape \(2, 10\), not a feature map.*one of conv1"):
        iia(model, cnn_images, config=IIAConfig(layer="fc"))
    with pytest.raises(ValueError, match="activation_steps has no effect in mode='reference'"):
        iia(model, cnn_images, config=IIAConfig(activation_steps=3))
    with pytest.raises(ConfigError, match="steps must be None or an integer in \\[1, 1000000\\], got 0"):
        IIAConfig(steps=0)
    with pytest.raises(ConfigError, match="mode"):
        IIAConfig(mode="triple")
    with pytest.raises(TypeError, match="iia integrates over the model's activations or attention: pass a jaxattr Model"):
        iia(jax.tree_util.Partial(model.__call__), cnn_images)
    vit_model = vit[1]
    images = jnp.zeros((1, VIT_SIZE, VIT_SIZE, 3))
    with pytest.raises(ValueError, match="a ViT's attention path is always integrated"):
        iia(vit_model, images, config=IIAConfig(mode="integrated"))
    with pytest.raises(ValueError, match="layer must name a block or its attention site, got 'layer4'"):
        iia(vit_model, images, config=IIAConfig(layer="layer4"))


def test_a_constant_map_is_zero_not_nan(resnet, cnn_images):
    """A model whose layer has no spatial structure (all-zero activations) gives a constant map:
    zeros after the min-max, and zeros in the PNG contrast."""
    _, model = resnet
    zeroed = jax.tree_util.tree_map(jnp.zeros_like, model.params)
    flat = Model(model.module, zeroed, "zero-resnet")
    result = iia(flat, cnn_images, TARGETS, config=IIAConfig(steps=2))
    assert np.all(np.asarray(result) == 0)
    assert np.all(np.asarray(maps.min_max(result)) == 0)


# ---------------------------------------------------------------------------------- the CLI


def test_cli_flags_and_a_bad_layer(tmp_path, capsys):
    image = tmp_path / "cat.png"
    from PIL import Image

    Image.open(ROOT / "examples/images/chelsea.jpg").resize((40, 30)).save(image)
    from jaxattr.models import create_model
    from jaxattr.models.weights import save_params

    weights = tmp_path / "resnet18.safetensors"
    save_params(weights, create_model("resnet18", weights=None).params, model="resnet18")
    base = ["explain", str(image), "--model", "resnet18", "--weights", str(weights), "--method", "iia"]
    flags = ["--layer", "layer3", "--steps", "1", "--mode", "integrated", "--activation-steps", "1", "--chunk", "1"]
    assert cli.main([*base, *flags, "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["settings"]["config"] == {
        "layer": "layer3", "steps": 1, "mode": "integrated", "activation_steps": 1, "chunk": 1, "output": "logit"
    }
    attribution = np.load(tmp_path / "out/cat.npy")
    assert attribution.shape == (224, 224) and np.isfinite(attribution).all()
    capsys.readouterr()
    assert cli.main([*base, "--layer", "layer9", "--out", str(tmp_path / "bad")]) == 2  # a usage error, before any work
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxattr: error: iia on resnet18: unknown layer 'layer9'") and "\n" not in err
    assert not (tmp_path / "bad").exists()


# --------------------------------------------------------------------- segmentation protocol


def test_hand_drawn_masks_load_through_evaluate():
    """The hand-drawn masks of examples/masks go through `jaxattr evaluate --masks`'s own loader (the
    images' eval transform, NEAREST): binary, with foreground and background in the crop."""
    from jaxattr.cli.evaluate import load_truth, mask_index
    from jaxattr.image import open_image
    from jaxattr.models import model_info

    info = model_info("resnet18")
    images = [(p.stem, p) for p in sorted((ROOT / "examples/images").glob("*.jpg"))]
    index = mask_index(ROOT / "examples/masks", images)
    for name, file in images:
        truth = load_truth(index, ROOT / "examples/masks", name, file, open_image(file).size, info, None)
        assert truth.shape == (224, 224) and truth.dtype == bool
        assert 0.005 < truth.mean() < 0.99, name  # foreground and background (the cat fills 96% of its crop)


def test_coco_unnormalised_input_quirk():
    """unnormalised_inputs(model, p) is what the model normalises to p (iia.md §4.1)."""
    _, model = tiny_pair("timm", depth=1)
    pixels = jnp.asarray(np.random.RandomState(6).rand(1, 32, 32, 3).astype(np.float32))
    quirk = unnormalised_inputs(model, pixels)
    np.testing.assert_allclose(model.normalise(quirk), pixels, atol=1e-6)
    np.testing.assert_allclose(model(quirk), model.from_normalised(pixels), rtol=1e-5, atol=1e-5)


def test_explain_gives_the_image_resolution_map_unnormalised(resnet, cnn_images):
    """explain's map is iia's attribution itself (no further resize), min-max is the PNG contrast."""
    _, model = resnet
    result = explain(model, jnp.asarray(cnn_images), "iia", targets=TARGETS, steps=2)
    np.testing.assert_array_equal(result.maps, result.attributions)
    assert result.maps.shape == (2, CNN_SIZE, CNN_SIZE)
