"""torchvision GoogLeNet (Inception v1) as its pretrained weights expect it.

The pretrained checkpoint was ported from TensorFlow, which is why torchvision loads it with
`transform_input=True` (a re-normalisation of ImageNet-normalised input), BatchNorm eps 1e-3 and
`ceil_mode` max-pools. The auxiliary heads are training-only and not ported.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
from flax import linen as nn
from jaxtyping import Array, Float

from jaxattr.models._classifier import IMAGENET_MEAN, IMAGENET_STD, Classifier, Stage
from jaxattr.models.registry import ModelInfo, register
from jaxattr.nn import BatchNorm2d, Conv2d, Linear, adaptive_avg_pool2d, max_pool2d, relu

# torchvision's `_transform_input`: x_c * (std_c / 0.5) + (mean_c - 0.5) / 0.5, turning ImageNet
# normalisation into the (pixel - 0.5) / 0.5 normalisation the TensorFlow weights were trained with.
# The constants are computed in double precision, then applied in float32, as in torchvision.
_TRANSFORM_SCALE = tuple(s / 0.5 for s in IMAGENET_STD)
_TRANSFORM_SHIFT = tuple((m - 0.5) / 0.5 for m in IMAGENET_MEAN)

# Inception block widths: (1x1, 3x3 reduce, 3x3, "5x5" reduce, "5x5", pool projection).
_INCEPTION = {
    "inception3a": (64, 96, 128, 16, 32, 32),
    "inception3b": (128, 128, 192, 32, 96, 64),
    "inception4a": (192, 96, 208, 16, 48, 64),
    "inception4b": (160, 112, 224, 24, 64, 64),
    "inception4c": (128, 128, 256, 24, 64, 64),
    "inception4d": (112, 144, 288, 32, 64, 64),
    "inception4e": (256, 160, 320, 32, 128, 128),
    "inception5a": (256, 160, 320, 32, 128, 128),
    "inception5b": (384, 192, 384, 48, 128, 128),
}


class BasicConv2d(nn.Module):
    """Convolution without bias, BatchNorm (eps 1e-3), ReLU."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    nonlinearity: str = "standard"

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h2 w2 f"]:
        x = Conv2d(self.features, self.kernel_size, self.stride, self.padding, use_bias=False, name="conv")(x)
        x = BatchNorm2d(eps=1e-3, name="bn")(x)
        # GNL (gnl.md 2.1) puts a guided ReLU module after the BN, followed by torchvision's
        # functional ReLU. relu(relu(x)) has the forward of one ReLU, and its backward is one guided
        # ReLU too: the outer ReLU passes g where x > 0, the guided one then keeps 1[x > 0] max(g, 0),
        # the same mask. One ReLU in the model's mode is therefore exact.
        return relu(x, self.nonlinearity)


class Inception(nn.Module):
    ch1x1: int
    ch3x3red: int
    ch3x3: int
    ch5x5red: int
    ch5x5: int
    pool_proj: int
    nonlinearity: str = "standard"

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h w f"]:
        nl = self.nonlinearity
        branch1 = BasicConv2d(self.ch1x1, 1, nonlinearity=nl, name="branch1")(x)
        branch2 = BasicConv2d(self.ch3x3red, 1, nonlinearity=nl, name="branch2.0")(x)
        branch2 = BasicConv2d(self.ch3x3, 3, padding=1, nonlinearity=nl, name="branch2.1")(branch2)
        branch3 = BasicConv2d(self.ch5x5red, 1, nonlinearity=nl, name="branch3.0")(x)
        # A 3x3 convolution where the paper has 5x5: torchvision's "known bug" (vision #906),
        # which the pretrained weights were trained with.
        branch3 = BasicConv2d(self.ch5x5, 3, padding=1, nonlinearity=nl, name="branch3.1")(branch3)
        branch4 = max_pool2d(x, 3, 1, 1, ceil_mode=True, nonlinearity=nl)
        branch4 = BasicConv2d(self.pool_proj, 1, nonlinearity=nl, name="branch4.1")(branch4)
        return jnp.concatenate([branch1, branch2, branch3, branch4], axis=-1)


def _basic_conv(
    name: str, features: int, kernel_size: int, stride: int, padding: int, nonlinearity: str
) -> Callable[[Array], Array]:
    return lambda x: BasicConv2d(features, kernel_size, stride, padding, nonlinearity, name=name)(x)


def _inception(name: str, nonlinearity: str) -> Callable[[Array], Array]:
    return lambda x: Inception(*_INCEPTION[name], nonlinearity=nonlinearity, name=name)(x)


def _max_pool(kernel_size: int, nonlinearity: str) -> Callable[[Array], Array]:
    return lambda x: max_pool2d(x, kernel_size, 2, ceil_mode=True, nonlinearity=nonlinearity)


class GoogLeNet(Classifier):
    feature_layer = "inception5b"
    num_classes: int = 1000
    nonlinearity: str = "standard"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def normalise(self, images: Float[Array, "b h w 3"]) -> Float[Array, "b h w 3"]:
        x = super().normalise(images)
        return x * jnp.asarray(_TRANSFORM_SCALE, x.dtype) + jnp.asarray(_TRANSFORM_SHIFT, x.dtype)

    def stages(self) -> list[Stage]:
        nl = self.nonlinearity
        return [
            ("conv1", _basic_conv("conv1", 64, 7, 2, 3, nl)),
            ("maxpool1", _max_pool(3, nl)),
            ("conv2", _basic_conv("conv2", 64, 1, 1, 0, nl)),
            ("conv3", _basic_conv("conv3", 192, 3, 1, 1, nl)),
            ("maxpool2", _max_pool(3, nl)),
            ("inception3a", _inception("inception3a", nl)),
            ("inception3b", _inception("inception3b", nl)),
            ("maxpool3", _max_pool(3, nl)),
            *((name, _inception(name, nl)) for name in _INCEPTION if name.startswith("inception4")),
            ("maxpool4", _max_pool(2, nl)),
            ("inception5a", _inception("inception5a", nl)),
            ("inception5b", _inception("inception5b", nl)),
            ("avgpool", lambda x: adaptive_avg_pool2d(x, 1)),
            # torch flattens before its dropout, so this stage's output is (batch, 1024) as there.
            ("dropout", lambda x: x.reshape(x.shape[0], -1)),
            ("fc", lambda x: Linear(self.num_classes, name="fc")(x)),
        ]


register(
    ModelInfo(
        name="googlenet",
        family="googlenet",
        source="torchvision",
        build=lambda nonlinearity="standard", image_size=224: GoogLeNet(nonlinearity=nonlinearity),
        weights_file="googlenet-1378be20.pth",
        weights_url="https://download.pytorch.org/models/googlenet-1378be20.pth",
        ignored_weights=("aux1.", "aux2."),
        description="torchvision googlenet (transform_input, no aux heads), ImageNet-1k (DEFAULT weights)",
    )
)
