"""Every registered model's eval transform and normalisation, read from jaxattr (`model_info`,
the module's mean/std) and compared with what torchvision (`Weights.transforms()` of the exact
checkpoint jaxattr loads) or timm (the pretrained config of the exact tag) prescribe. The torch
twins in the parity tests are normalised with jaxattr's own constants, so only this file catches
a wrong constant or resize.

EfficientNet-Lite0 differs from timm's `tf_efficientnet_lite0` config on purpose: its weights
were trained with TensorFlow's EfficientNet-Lite preprocessing, (255x - 127) / 128, whose
constants are compared here with TensorFlow's source; its resize, crop and interpolation follow
timm's config.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxattr.image import preprocess
from jaxattr.models import list_models, model_info

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")
from timm.data import create_transform, resolve_data_config  # noqa: E402

IMAGES = sorted((Path(__file__).parents[1] / "examples" / "images").glob("*.jpg"))

# tensorflow/tpu, models/official/efficientnet/lite/efficientnet_lite_builder.py: "Edge models use
# inception-style MEAN and STDDEV for better post-quantization." MEAN_RGB = [127.0] * 3,
# STDDEV_RGB = [128.0] * 3, applied to 0..255 pixels.
TF_LITE_MEAN_RGB, TF_LITE_STDDEV_RGB = 127.0, 128.0
DELIBERATE_NORMALISATION = {"efficientnet_lite0"}


def _torchvision_weights(name: str):
    """The torchvision Weights entry of the checkpoint jaxattr loads (matched by file name)."""
    info = model_info(name)
    entries = torchvision.models.get_model_weights(info.torch_name or name)
    matches = [w for w in entries if w.url.rsplit("/", 1)[1] == info.weights_file]
    assert len(matches) == 1, f"{info.weights_file} is none of torchvision's {name} weights"
    return matches[0]


def _timm_config(name: str) -> dict:
    """timm's data config for the pretrained tag jaxattr loads (no download: pretrained=False)."""
    info = model_info(name)
    architecture = info.torch_name or name
    if "huggingface.co/timm/" in info.weights_url:  # .../timm/<architecture>.<tag>/resolve/...
        architecture = info.weights_url.split("huggingface.co/timm/")[1].split("/")[0]
    pretrained_cfg = timm.models.get_pretrained_cfg(architecture)  # the tag's config; builds no model
    assert pretrained_cfg is not None, architecture
    return resolve_data_config({}, pretrained_cfg=pretrained_cfg.to_dict())


def _timm_eval_steps(config: dict):
    """(Resize, CenterCrop) of timm's own eval transform for `config`."""
    steps = create_transform(**config, is_training=False).transforms
    resize = next(t for t in steps if type(t).__name__ == "Resize")
    crop = next(t for t in steps if type(t).__name__ == "CenterCrop")
    return resize, crop


def _module(name: str):
    info = model_info(name)
    return info.build(image_size=info.image_size)  # the architecture; no parameters needed


@pytest.mark.parametrize("name", list_models())
def test_eval_transform_matches_the_weights_source(name):
    info = model_info(name)
    module = _module(name)
    if info.source == "torchvision":
        transforms = _torchvision_weights(name).transforms()
        assert info.resize_size == transforms.resize_size[0] and len(transforms.resize_size) == 1
        assert info.image_size == transforms.crop_size[0]
        assert info.interpolation == transforms.interpolation.value
        np.testing.assert_array_equal(module.mean, transforms.mean)
        np.testing.assert_array_equal(module.std, transforms.std)
        return
    assert info.source == "timm"
    config = _timm_config(name)
    resize, crop = _timm_eval_steps(config)
    assert info.resize_size == resize.size
    assert (info.image_size, info.image_size) == tuple(crop.size) == tuple(config["input_size"][1:])
    assert info.interpolation == config["interpolation"] == resize.interpolation.value
    if name in DELIBERATE_NORMALISATION:
        np.testing.assert_allclose(np.asarray(module.mean) * 255, TF_LITE_MEAN_RGB, rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.asarray(module.std) * 255, TF_LITE_STDDEV_RGB, rtol=0, atol=1e-12)
        assert tuple(module.mean) != tuple(config["mean"])  # the documented difference is real
    else:
        np.testing.assert_array_equal(module.mean, config["mean"])
        np.testing.assert_array_equal(module.std, config["std"])


def test_every_model_is_checked():
    assert {model_info(n).source for n in list_models()} == {"torchvision", "timm"}
    assert DELIBERATE_NORMALISATION <= set(list_models())


def _jaxattr_input(image: Image.Image, name: str) -> np.ndarray:
    """jaxattr's model input for `image`: preprocess, then the module's own normalisation."""
    module = _module(name)
    pixels = jnp.asarray(preprocess(image, model_info(name))[None])
    return np.asarray(module.apply({}, pixels, method=module.normalise))[0]


@pytest.mark.parametrize("path", IMAGES, ids=lambda p: p.stem)
@pytest.mark.parametrize("name", ["resnet50", "vgg11", "vit_b_16"])
def test_preprocessing_equals_torchvision_weights_transforms(name, path):
    with Image.open(path) as image:
        image = image.convert("RGB")
        expected = _torchvision_weights(name).transforms()(image).permute(1, 2, 0).numpy()
        ours = _jaxattr_input(image, name)
    assert ours.shape == expected.shape == (224, 224, 3)
    # Same Pillow resize and crop; the normalisation's float32 rounding differs by at most one ulp
    # (2.4e-7 measured), while a constant off by 1e-3 moves values by about 1e-2.
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("path", IMAGES[:2], ids=lambda p: p.stem)
@pytest.mark.parametrize("name", ["vit_small_patch16_224", "efficientnet_lite0"])
def test_preprocessing_equals_timm_eval_transform(name, path):
    """timm's eval transform without its Normalize step against jaxattr's pixels (EfficientNet-Lite0
    normalises differently on purpose, so pixels are what both share)."""
    steps = create_transform(**_timm_config(name), is_training=False).transforms
    assert type(steps[-1]).__name__ == "Normalize"
    with Image.open(path) as image:
        image = image.convert("RGB")
        expected = image
        for step in steps[:-1]:
            expected = step(expected)
        ours = preprocess(image, model_info(name))
    np.testing.assert_array_equal(ours, expected.permute(1, 2, 0).numpy())
