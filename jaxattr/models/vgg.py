"""torchvision VGG-11/13/16/19, with and without BatchNorm (configurations A, B, D, E)."""

from __future__ import annotations

from typing import Callable, Sequence

from jaxtyping import Array, Float

from jaxattr.models._classifier import IMAGENET_MEAN, IMAGENET_STD, Classifier, Stage
from jaxattr.models.registry import ModelInfo, register
from jaxattr.nn import BatchNorm2d, Conv2d, Linear, adaptive_avg_pool2d, max_pool2d, relu

POOL = "M"  # a 2x2 stride-2 max-pool in a configuration; integers are 3x3 convolution widths

CONFIGS: dict[str, tuple[int | str, ...]] = {
    "A": (64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL),
    "B": (64, 64, POOL, 128, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL),
    "D": (64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512, POOL),
    "E": (
        64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL,
        512, 512, 512, 512, POOL, 512, 512, 512, 512, POOL,
    ),  # fmt: skip
}


def _conv(features: int, name: str) -> Callable[[Array], Array]:
    return lambda x: Conv2d(features, 3, 1, 1, name=name)(x)


def _batch_norm(name: str) -> Callable[[Array], Array]:
    return lambda x: BatchNorm2d(name=name)(x)


def _linear(features: int, name: str) -> Callable[[Array], Array]:
    return lambda x: Linear(features, name=name)(x)


def _identity(x: Array) -> Array:
    return x


def flatten_nchw(x: Float[Array, "b h w c"]) -> Float[Array, "b chw"]:
    """Flatten in torch's (C, H, W) order, the order of the first classifier layer's inputs."""
    return x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)


class VGG(Classifier):
    feature_layer = "features"  # its last module, the final max-pool (pytorch-grad-cam's choice)
    config: Sequence[int | str] = CONFIGS["D"]
    batch_norm: bool = False
    num_classes: int = 1000
    nonlinearity: str = "standard"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def stages(self) -> list[Stage]:
        nl = self.nonlinearity
        features: list[Callable[[Array], Array]] = []
        for v in self.config:
            if v == POOL:
                features.append(lambda x: max_pool2d(x, 2, 2, nonlinearity=nl))
                continue
            features.append(_conv(v, f"features.{len(features)}"))
            if self.batch_norm:
                features.append(_batch_norm(f"features.{len(features)}"))
            features.append(lambda x: relu(x, nl))
        classifier = [
            lambda x: Linear(4096, name="classifier.0")(flatten_nchw(x)),
            lambda x: relu(x, nl),
            _identity,  # Dropout: identity at inference
            _linear(4096, "classifier.3"),
            lambda x: relu(x, nl),
            _identity,
            _linear(self.num_classes, "classifier.6"),
        ]
        return [
            *((f"features.{i}", fn) for i, fn in enumerate(features)),
            ("avgpool", lambda x: adaptive_avg_pool2d(x, 7)),
            *((f"classifier.{i}", fn) for i, fn in enumerate(classifier)),
        ]


_MODELS = {
    "vgg11": ("A", False, "vgg11-8a719046.pth"),
    "vgg11_bn": ("A", True, "vgg11_bn-6002323d.pth"),
    "vgg13": ("B", False, "vgg13-19584684.pth"),
    "vgg13_bn": ("B", True, "vgg13_bn-abd245e5.pth"),
    "vgg16": ("D", False, "vgg16-397923af.pth"),
    "vgg16_bn": ("D", True, "vgg16_bn-6c64b313.pth"),
    "vgg19": ("E", False, "vgg19-dcbb9e9d.pth"),
    "vgg19_bn": ("E", True, "vgg19_bn-c79401a0.pth"),
}

for _name, (_config, _bn, _file) in _MODELS.items():
    register(
        ModelInfo(
            name=_name,
            family="vgg",
            source="torchvision",
            # The adaptive 7x7 average pool makes the classifier independent of the image size.
            build=lambda config=CONFIGS[_config], batch_norm=_bn, nonlinearity="standard", image_size=224: (
                VGG(config=config, batch_norm=batch_norm, nonlinearity=nonlinearity)
            ),
            weights_file=_file,
            weights_url=f"https://download.pytorch.org/models/{_file}",
            description=f"torchvision {_name}, ImageNet-1k (DEFAULT weights)",
        )
    )
