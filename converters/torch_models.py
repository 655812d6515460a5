"""The torch twin of every registered jaxattr model, and conversion of torch models to jaxattr.

torch, torchvision and timm are imported here (the `jaxattr[torch]` extra), never by `jaxattr`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from jaxattr.models import Model, create_model, model_info
from jaxattr.models.weights import params_from_state_dict, state_dict_from_params

# torchvision builds these differently from its defaults when it loads pretrained weights.
_TORCHVISION_KWARGS = {"googlenet": {"aux_logits": False, "transform_input": True, "init_weights": True}}


def torch_model(name: str, *, seed: int = 0, randomise_batchnorm: bool = True) -> torch.nn.Module:
    """The torch model `name` with random weights, in eval mode.

    With `randomise_batchnorm`, BatchNorm statistics and affine parameters are drawn at random:
    freshly initialised ones (mean 0, var 1, weight 1, bias 0) would make BatchNorm an identity
    and leave its conversion untested."""
    info = model_info(name)
    torch.manual_seed(seed)
    if info.source == "timm":
        import timm

        model = timm.create_model(name, pretrained=False)
    else:
        import torchvision

        model = torchvision.models.get_model(name, weights=None, **_TORCHVISION_KWARGS.get(name, {}))
    if randomise_batchnorm:
        generator = torch.Generator().manual_seed(seed + 1)
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                c = module.num_features
                module.running_mean.copy_(torch.rand(c, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.5)
                module.weight.data.copy_(torch.rand(c, generator=generator) + 0.5)
                module.bias.data.copy_(torch.rand(c, generator=generator) - 0.5)
    return model.eval()


def to_torch(model: Model) -> torch.nn.Module:
    """The torch twin of `model` holding its weights (e.g. jaxattr's resolved pretrained ones)."""
    module = torch_model(model.name, randomise_batchnorm=False)
    state = {k: torch.from_numpy(v.copy()) for k, v in state_dict_from_params(model.params).items()}
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"torch {model.name} does not fit: missing {missing}, unexpected {unexpected}")
    return module.eval()


def from_torch(name: str, module: torch.nn.Module, *, nonlinearity: str = "standard") -> Model:
    """The jaxattr model `name` holding the weights of the torch model `module`."""
    template = create_model(name, weights=None, nonlinearity=nonlinearity)
    params = params_from_state_dict(module.state_dict(), template.params, source=f"torch {name}")
    return Model(template.module, jax.tree_util.tree_map(jnp.asarray, params), name)


class PixelInput(torch.nn.Module):
    """Wraps a torch classifier so that it takes NCHW pixels in [0, 1], like jaxattr models.

    The normalisation is computed as jaxattr computes it, (x - mean) / std, so both sides start
    from bit-identical model inputs."""

    def __init__(self, model: torch.nn.Module, mean, std):
        super().__init__()
        self.model = model
        # float64 buffers cast to the input dtype round exactly as jnp.asarray(mean, dtype) does.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model((pixels - self.mean.to(pixels.dtype)) / self.std.to(pixels.dtype))


def torch_twin(name: str, *, seed: int = 0, nonlinearity: str = "standard") -> tuple[PixelInput, Model]:
    """A random torch model on pixel input and the jaxattr model with the same weights."""
    module = torch_model(name, seed=seed)
    model = from_torch(name, module, nonlinearity=nonlinearity)
    return PixelInput(module, model.module.mean, model.module.std).eval(), model


def to_torch_images(images) -> torch.Tensor:
    """NHWC numpy/JAX images -> NCHW torch tensor (same dtype)."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2)))


def to_numpy_nhwc(tensor: torch.Tensor) -> np.ndarray:
    array = tensor.detach().cpu().numpy()
    return array.transpose(0, 2, 3, 1) if array.ndim == 4 else array
