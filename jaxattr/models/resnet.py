"""torchvision ResNet-18/34/50/101/152 (v1.5: stride on the bottleneck's 3x3 convolution)."""

from __future__ import annotations

from typing import Sequence

from flax import linen as nn
from jaxtyping import Array, Float

from jaxattr.models._classifier import IMAGENET_MEAN, IMAGENET_STD, Classifier, Stage
from jaxattr.models.registry import ModelInfo, register
from jaxattr.nn import BatchNorm2d, Conv2d, Linear, adaptive_avg_pool2d, max_pool2d, relu


class BasicBlock(nn.Module):
    planes: int
    stride: int = 1
    downsample: bool = False
    nonlinearity: str = "standard"

    expansion = 1

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h2 w2 p"]:
        out = Conv2d(self.planes, 3, self.stride, 1, use_bias=False, name="conv1")(x)
        out = relu(BatchNorm2d(name="bn1")(out), self.nonlinearity)
        out = Conv2d(self.planes, 3, 1, 1, use_bias=False, name="conv2")(out)
        out = BatchNorm2d(name="bn2")(out)
        return relu(out + _shortcut(self, x), self.nonlinearity)


class Bottleneck(nn.Module):
    planes: int
    stride: int = 1
    downsample: bool = False
    nonlinearity: str = "standard"

    expansion = 4

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h2 w2 p"]:
        # torchvision reuses one ReLU module three times; each use is a separate guided position.
        out = Conv2d(self.planes, 1, use_bias=False, name="conv1")(x)
        out = relu(BatchNorm2d(name="bn1")(out), self.nonlinearity)
        out = Conv2d(self.planes, 3, self.stride, 1, use_bias=False, name="conv2")(out)
        out = relu(BatchNorm2d(name="bn2")(out), self.nonlinearity)
        out = Conv2d(self.planes * 4, 1, use_bias=False, name="conv3")(out)
        out = BatchNorm2d(name="bn3")(out)
        return relu(out + _shortcut(self, x), self.nonlinearity)


def _shortcut(block: BasicBlock | Bottleneck, x: Array) -> Array:
    if not block.downsample:
        return x
    x = Conv2d(block.planes * block.expansion, 1, block.stride, use_bias=False, name="downsample.0")(x)
    return BatchNorm2d(name="downsample.1")(x)


class ResNet(Classifier):
    feature_layer = "layer4"
    block: str = "bottleneck"  # "basic" or "bottleneck"
    depths: Sequence[int] = (3, 4, 6, 3)
    num_classes: int = 1000
    nonlinearity: str = "standard"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def stages(self) -> list[Stage]:
        nl = self.nonlinearity
        block_cls = BasicBlock if self.block == "basic" else Bottleneck
        stages: list[Stage] = [
            ("conv1", lambda x: Conv2d(64, 7, 2, 3, use_bias=False, name="conv1")(x)),
            ("bn1", lambda x: BatchNorm2d(name="bn1")(x)),
            ("relu", lambda x: relu(x, nl)),
            ("maxpool", lambda x: max_pool2d(x, 3, 2, 1, nonlinearity=nl)),
        ]
        in_channels = 64
        for stage_index, (planes, depth) in enumerate(zip((64, 128, 256, 512), self.depths)):
            for i in range(depth):
                stride = 2 if (stage_index > 0 and i == 0) else 1
                downsample = i == 0 and (stride != 1 or in_channels != planes * block_cls.expansion)
                name = f"layer{stage_index + 1}.{i}"
                stages.append((name, _block_stage(block_cls, planes, stride, downsample, nl, name)))
                in_channels = planes * block_cls.expansion
        stages += [
            ("avgpool", lambda x: adaptive_avg_pool2d(x, 1)),
            ("fc", lambda x: Linear(self.num_classes, name="fc")(x.reshape(x.shape[0], -1))),
        ]
        return stages


def _block_stage(block_cls, planes, stride, downsample, nonlinearity, name):
    return lambda x: block_cls(planes, stride, downsample, nonlinearity, name=name)(x)


_CONFIGS = {
    "resnet18": ("basic", (2, 2, 2, 2), "resnet18-f37072fd.pth", 256),
    "resnet34": ("basic", (3, 4, 6, 3), "resnet34-b627a593.pth", 256),
    "resnet50": ("bottleneck", (3, 4, 6, 3), "resnet50-11ad3fa6.pth", 232),
    "resnet101": ("bottleneck", (3, 4, 23, 3), "resnet101-cd907fc2.pth", 232),
    "resnet152": ("bottleneck", (3, 8, 36, 3), "resnet152-f82ba261.pth", 232),
}

for _name, (_block, _depths, _file, _resize) in _CONFIGS.items():
    register(
        ModelInfo(
            name=_name,
            family="resnet",
            source="torchvision",
            build=lambda block=_block, depths=_depths, nonlinearity="standard", image_size=224: ResNet(
                block=block, depths=depths, nonlinearity=nonlinearity
            ),
            weights_file=_file,
            weights_url=f"https://download.pytorch.org/models/{_file}",
            resize_size=_resize,
            description=f"torchvision {_name}, ImageNet-1k (DEFAULT weights)",
        )
    )
