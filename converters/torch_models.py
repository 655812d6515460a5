"""The torch twin of every registered jaxattr model, and conversion of torch models to jaxattr.

torch, torchvision and timm are imported here (the `jaxattr[torch]` extra), never by `jaxattr`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from jaxattr.models import Model, model_info
from jaxattr.models.weights import params_from_state_dict, state_dict_from_params
from jaxattr.nn import check_nonlinearity

# torchvision builds these differently from its defaults when it loads pretrained weights.
# GoogLeNet's own init (init_weights=True: convolutions drawn from N(0, 0.01)) under the randomised
# BatchNorm below leaves feature maps nearly constant, with max-pool windows whose two largest
# entries lie within an ulp (403 within 4 ulp over IG-50's evaluations at 224 px): rounding, not
# the port, would then pick the gradient's route. torch's default init has none.
_TORCHVISION_KWARGS = {"googlenet": {"aux_logits": False, "transform_input": True, "init_weights": False}}


def torch_model(name: str, *, seed: int = 0) -> torch.nn.Module:
    """The torch model `name` with random weights, in eval mode.

    Parameters the library initialises to constants are drawn at random as well: BatchNorm
    statistics and affine parameters (mean 0, var 1, weight 1, bias 0 make BatchNorm an identity)
    and all-zero tensors (zero biases, torchvision ViT's zero head, which makes every logit 0).
    Either would leave its conversion untested."""
    info = model_info(name)
    torch.manual_seed(seed)
    if info.source == "timm":
        import timm

        model = timm.create_model(info.torch_name or name, pretrained=False)
    else:
        import torchvision

        kwargs = _TORCHVISION_KWARGS.get(name, {})
        model = torchvision.models.get_model(info.torch_name or name, weights=None, **kwargs)
    return randomise_constants(model, seed=seed + 1).eval()


def randomise_constants(model: torch.nn.Module, *, seed: int = 1) -> torch.nn.Module:
    """`model` with the parameters a library initialises to constants drawn at random (in place):
    BatchNorm statistics and affine parameters, and all-zero tensors (see `torch_model`)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                c = module.num_features
                module.running_mean.copy_(torch.rand(c, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.5)
                module.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(c, generator=generator) - 0.5)
        for parameter in model.parameters():
            if not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return model


def to_torch(model: Model) -> torch.nn.Module:
    """The torch twin of `model` holding its weights (e.g. jaxattr's resolved pretrained ones)."""
    module = torch_model(model.name)
    state = {k: torch.from_numpy(v.copy()) for k, v in state_dict_from_params(model.params).items()}
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"torch {model.name} does not fit: missing {missing}, unexpected {unexpected}")
    return module.eval()


def from_torch(name: str, module: torch.nn.Module, *, nonlinearity: str = "standard") -> Model:
    """The jaxattr model `name` holding the weights of the torch model `module`."""
    info = model_info(name)
    check_nonlinearity(nonlinearity)
    classifier = info.build(nonlinearity=nonlinearity, image_size=info.image_size)
    return with_torch_weights(classifier, module, info.image_size, name)


def with_torch_weights(classifier, module: torch.nn.Module, image_size: int, name: str = "") -> Model:
    """A jaxattr `Model` of the Flax `classifier` holding the weights of its torch twin `module`
    (any configuration, e.g. a small ResNet built for a test)."""
    # Shapes only: a random initialisation (an eager forward pass) would be thrown away.
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    template = jax.eval_shape(classifier.init, jax.random.key(0), images)["params"]
    params = params_from_state_dict(module.state_dict(), template, source=f"torch {name or type(module).__name__}")
    return Model(classifier, jax.tree_util.tree_map(jnp.asarray, params), name)


class PixelInput(torch.nn.Module):
    """Wraps a torch classifier so that it takes NCHW pixels in [0, 1], like jaxattr models.

    The normalisation is computed as jaxattr computes it, (x - mean) / std, so both sides start
    from bit-identical model inputs."""

    def __init__(self, model: torch.nn.Module, mean, std):
        super().__init__()
        self.model = model
        # Plain floats, not buffers, so `.to(dtype)` cannot round them: cast from float64 at each
        # call they round exactly as jnp.asarray(mean, dtype) does on the jaxattr side.
        self.mean, self.std = tuple(mean), tuple(std)

    def normalisation(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) as (1, 3, 1, 1) tensors of `dtype`."""
        as_tensor = lambda v: torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1).to(dtype)
        return as_tensor(self.mean), as_tensor(self.std)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        mean, std = self.normalisation(pixels.dtype)
        return self.model((pixels - mean) / std)


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
