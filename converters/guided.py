"""The guided backward rules (gnl.md §2.4) on torch models: the PyTorch side of jaxattr's
`nonlinearity="guided"` / `"guided_relu"` model option.

    with guided(torch_model, mode="guided"):
        torch_model(x)[range(b), targets].sum().backward()

Written independently of jaxattr's `custom_vjp` rules so that each checks the other. Inside the
block every `nn.ReLU` / `nn.ReLU6` module (each call of a reused module separately) runs a
guided-backprop ReLU, and in mode "guided" every `nn.MaxPool2d` runs the GNL max-pool rule;
the forward values are unchanged. torchvision's GoogLeNet applies a functional ReLU in
`BasicConv2d`, which module-level rules cannot reach; as in the GNL reference, a guided ReLU is
put after its BatchNorm and the functional ReLU is kept (out of place).

Every replacement is out of place, so torchvision's `inplace=True` ReLUs cannot overwrite what a
backward rule needs, and the rules save only masks and indices they own.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.googlenet import BasicConv2d as GoogLeNetBasicConv2d

from jaxattr.nn import check_nonlinearity


class GuidedReLU(torch.autograd.Function):
    """clamp(x, 0, upper) forward; backward 1[0 < x < upper] * max(g, 0) (upper=None: no clip)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, upper: float | None) -> torch.Tensor:
        passes = x > 0 if upper is None else (x > 0) & (x < upper)
        ctx.save_for_backward(passes)
        return torch.clamp(x, min=0, max=upper)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        (passes,) = ctx.saved_tensors
        return torch.where(passes & (g > 0), g, torch.zeros_like(g)), None


class GNLMaxPool(torch.autograd.Function):
    """F.max_pool2d forward; backward: the routed max-pool gradient times the indicator of a
    positive upstream gradient, nearest-resized from the output grid to the input size."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, pool: nn.MaxPool2d) -> torch.Tensor:
        y, indices = F.max_pool2d(
            x, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode, return_indices=True
        )
        ctx.save_for_backward(indices)
        ctx.input_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        (indices,) = ctx.saved_tensors
        b, c, h, w = ctx.input_shape
        # `indices` are flat positions in each (h, w) plane; overlapping windows add up.
        routed = g.new_zeros(b, c, h * w).scatter_add_(2, indices.flatten(2), g.flatten(2)).view(b, c, h, w)
        positive = F.interpolate((g > 0).to(g.dtype), size=(h, w), mode="nearest")
        return routed * positive, None


def _guided_relu(module: nn.ReLU) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: GuidedReLU.apply(x, None)


def _guided_relu6(module: nn.ReLU6) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: GuidedReLU.apply(x, 6.0)


def _gnl_max_pool(module: nn.MaxPool2d) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: GNLMaxPool.apply(x, module)


def _guided_basic_conv(module: GoogLeNetBasicConv2d) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: F.relu(GuidedReLU.apply(module.bn(module.conv(x)), None))


_RELU_RULES = ((nn.ReLU6, _guided_relu6), (nn.ReLU, _guided_relu), (GoogLeNetBasicConv2d, _guided_basic_conv))
_RULES = {
    "standard": (),
    "guided_relu": _RELU_RULES,
    "guided": (*_RELU_RULES, (nn.MaxPool2d, _gnl_max_pool)),
}


def _rule(module: nn.Module, mode: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    for cls, make_forward in _RULES[mode]:
        if isinstance(module, cls):
            return make_forward(module)
    return None


@contextlib.contextmanager
def guided(model: nn.Module, mode: str = "guided") -> Iterator[nn.Module]:
    """Within the block, `model`'s backward follows jaxattr's non-linearity `mode`:
    "guided" (GNL: ReLU/ReLU6 and max-pool rules), "guided_relu" (ReLU/ReLU6 only, captum's
    GuidedBackprop) or "standard" (nothing changes). The model is restored on exit."""
    check_nonlinearity(mode)
    patched: list[tuple[nn.Module, object]] = []
    try:
        for module in model.modules():
            forward = _rule(module, mode)
            if forward is not None:
                # An instance attribute shadows the class's forward for this module only.
                patched.append((module, module.__dict__.get("forward")))
                module.forward = forward
        yield model
    finally:
        for module, previous in patched:
            if previous is None:
                del module.forward
            else:
                module.forward = previous
