"""PyTorch reference for IIA (iia.md §2.3, §2.5, §3.3), written from the spec.

The authors' code (iia-iccv23/iia) has no licence and is not on PyPI: this is an independent
implementation of the computation it performs, on the torch models themselves, one image at a
time as its scripts run:

* CNN: the torchvision ResNet split as the reference's `GradModel` splits it (features up to the
  layer; head = the remaining blocks, a functional ReLU, average pool, fc). The K+1 image-path
  points go through the features as one batch; the activation path's M+1 copies go through the
  head one copy (a batch of K+1 activations) at a time. In mode 'reference' the baseline is the
  activation itself (the reference's minimum over a singleton axis), so every copy equals it,
  and the copies after the first have the first subtracted before the sum: only one contributes,
  as in the reference. Mode 'integrated' takes the minimum over the image points and keeps every
  copy (iia.md §2.5).
* ViT (timm or torchvision): attention recorded explicitly in every block (timm: its non-fused
  path, the softmax output captured where it enters `attn_drop`; torchvision: each
  `MultiheadAttention` replaced by the explicit computation for the run), the path block's
  attention replaced by a leaf tensor. One forward pass per image point records the path block's
  attention, then one forward and backward pass per (image point, attention point).

Both return the map resized to the image (bicubic / bilinear, align_corners=False) before the
reference's min-max normalisation, which is what `jaxattr.iia` returns.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from converters.crosscheck import reference
from converters.torch_models import PixelInput, to_torch_images
from jaxattr.methods.iia import IIAConfig, iia, vit_attention_sites

# The reference's own settings (iia.md §2.3, §3.3), not jaxattr's: a changed jaxattr default must
# fail the parity test at defaults.
INTERPOLATION_STEPS = 10  # cnn_saliency_map_generator.py:37: 11 points on each path
ITERATION_STEPS = 5  # vit_saliency_map_generator.py: 6 points on each path
CNN_LAYER = "layer4"  # GradModel splits ResNet-50 after its last stage
VIT_BLOCK = -1  # the override replaces the last block's attention (block 11 of 12)


def path_nodes(steps: int) -> np.ndarray:
    """The reference's interpolation coefficients: float32 NumPy linspace(0, 1, steps + 1)."""
    return np.linspace(0, 1, steps + 1, dtype=np.float32)


def _scores(logits: torch.Tensor, target: int, output: str) -> torch.Tensor:
    if output == "probability":
        logits = torch.softmax(logits, dim=-1)
    return logits[:, target].sum()


def _normalised(torch_model: PixelInput, image: np.ndarray) -> np.ndarray:
    """One NHWC image in [0, 1] -> the model's normalised (1, 3, H, W) input, as a NumPy array."""
    pixels = to_torch_images(image[None])
    mean, std = torch_model.normalisation(pixels.dtype)
    return ((pixels - mean) / std).numpy()


def _path(nodes: np.ndarray, end: np.ndarray, start: np.ndarray | float = 0.0) -> torch.Tensor:
    """start + node·(end - start) for every node, in NumPy as the reference's
    `get_interpolated_values` (float32 nodes, the arrays' dtype)."""
    delta = end - start
    scales = nodes.reshape(-1, *([1] * delta.ndim))
    return torch.from_numpy(np.ascontiguousarray(start + scales * delta))


# ------------------------------------------------------------------------------------------ CNN


def resnet_split(module: torch.nn.Module, layer: str):
    """(features, head) of a torchvision ResNet split after `layer` (a stage such as 'layer4.2', or
    a top-level module such as 'maxpool'), as the reference's `GradModel`: head(a) = fc(flatten(
    avgpool(relu(remaining stages(a)))))."""
    if not all(hasattr(module, name) for name in ("layer1", "layer4", "avgpool", "fc")):
        raise ValueError(
            f"the IIA reference splits torchvision ResNets; {type(module).__name__} is not one (CNN cross-checks "
            "run on resnet18/34/50/101/152)"
        )
    stages = [(name, getattr(module, name)) for name in ("conv1", "bn1", "relu", "maxpool")]
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        stages += [(f"{stage}.{i}", block) for i, block in enumerate(getattr(module, stage))]
    names = [name for name, _ in stages]
    if layer not in names:
        raise ValueError(f"no stage {layer!r} in this ResNet; stages: {', '.join(names)}")
    cut = names.index(layer) + 1
    features = torch.nn.Sequential(*[m for _, m in stages[:cut]])
    rest = torch.nn.Sequential(*[m for _, m in stages[cut:]])

    def head(activations: torch.Tensor) -> torch.Tensor:
        return module.fc(torch.flatten(module.avgpool(F.relu(rest(activations))), 1))

    return features, head


def iia_cnn(
    torch_model: PixelInput,
    images: np.ndarray,
    targets: np.ndarray,
    *,
    layer: str = CNN_LAYER,
    steps: int = INTERPOLATION_STEPS,
    mode: str = "reference",
    activation_steps: int = INTERPOLATION_STEPS,
    output: str = "logit",
) -> np.ndarray:
    """IIA maps (b, H, W) of a torchvision ResNet after `layer` (a stage such as 'layer4', meaning
    its last block, or a block such as 'layer3.1'), one image at a time."""
    module = torch_model.model
    if hasattr(module, layer) and isinstance(getattr(module, layer), torch.nn.Sequential):
        layer = f"{layer}.{len(getattr(module, layer)) - 1}"
    features, head = resnet_split(module, layer)
    alphas, betas = path_nodes(steps), path_nodes(activation_steps)
    maps = []
    for image, target in zip(images, targets):
        with torch.no_grad():
            acts = features(_path(alphas, _normalised(torch_model, image)[0]))  # (K+1, C, h, w)
        acts = acts.numpy()
        # The activation path's baseline: the activation itself in the reference (a minimum over a
        # singleton axis), the minimum over the image points in mode 'integrated'.
        base = acts if mode == "reference" else acts.min(axis=0, keepdims=True)
        copies = _path(betas, acts, base)  # (M+1, K+1, C, h, w)
        grads = []
        for copy in copies:
            copy = copy.clone().requires_grad_()
            (grad,) = torch.autograd.grad(_scores(head(copy), int(target), output), copy)
            grads.append(grad)
        grads = torch.stack(grads)
        if mode == "reference":
            copies[1:] = copies[1:] - copies[0]  # the reference's subtraction: zeros
        heatmap = torch.sum(grads * F.relu(copies), dim=(0, 1)).sum(dim=0)  # (h, w)
        resized = F.interpolate(heatmap[None, None], size=image.shape[:2], mode="bicubic", align_corners=False)
        maps.append(resized[0, 0].numpy())
    return np.stack(maps)


# ------------------------------------------------------------------------------------------ ViT


class _Attention:
    """Every block's post-softmax attention of the last run, in block order; `override[i]`
    replaces block i's attention."""

    def __init__(self):
        self.maps: list[torch.Tensor] = []
        self.override: dict[int, torch.Tensor] = {}

    def __call__(self, index: int, attention: torch.Tensor) -> torch.Tensor:
        attention = self.override.get(index, attention)
        self.maps.append(attention)
        return attention


class _ExplicitAttention(torch.nn.Module):
    """torchvision's `MultiheadAttention` (packed in-projection, scale head_dim^-0.5) computed
    explicitly, so that its softmax output can be recorded and replaced."""

    def __init__(self, mha: torch.nn.MultiheadAttention, record):
        super().__init__()
        self.mha, self.record = mha, record

    def forward(self, query, key, value, need_weights=False):
        mha = self.mha
        b, n, d = query.shape
        heads = mha.num_heads
        qkv = F.linear(query, mha.in_proj_weight, mha.in_proj_bias)
        q, k, v = qkv.reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)
        attention = self.record(((q * (d // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1))
        out = (attention @ v).transpose(1, 2).reshape(b, n, d)
        return mha.out_proj(out), None


@contextlib.contextmanager
def recorded_attention(module: torch.nn.Module) -> Iterator[_Attention]:
    """Attention recording (and replacement) on a timm or torchvision ViT for the duration."""
    recorder, undo = _Attention(), []
    try:
        if hasattr(module, "blocks"):  # timm
            for i, block in enumerate(module.blocks):
                fused = block.attn.fused_attn
                block.attn.fused_attn = False
                undo.append(lambda attn=block.attn, fused=fused: setattr(attn, "fused_attn", fused))
                handle = block.attn.attn_drop.register_forward_hook(lambda _m, _i, out, i=i: recorder(i, out))
                undo.append(handle.remove)
        else:  # torchvision
            for i, layer in enumerate(module.encoder.layers):
                original = layer.self_attention
                layer.self_attention = _ExplicitAttention(original, lambda a, i=i: recorder(i, a))
                undo.append(lambda layer=layer, original=original: setattr(layer, "self_attention", original))
        yield recorder
    finally:
        for restore in reversed(undo):
            restore()


def patch_size(module: torch.nn.Module) -> int:
    return module.patch_embed.patch_size[0] if hasattr(module, "patch_embed") else module.patch_size


def rollout(cams: torch.Tensor) -> torch.Tensor:
    """(blocks, heads, n, n) cams -> the class token's rollout row without itself (n - 1,)."""
    fused = [c.sum(dim=0) / c.shape[0] for c in cams]  # head mean
    eye = torch.eye(cams.shape[-1], dtype=cams.dtype)
    augmented = [(m + eye) / (m + eye).sum(dim=-1, keepdim=True) for m in fused]
    joint = augmented[0]
    for matrix in augmented[1:]:
        joint = matrix @ joint
    return joint[0, 1:]


def iia_vit(
    torch_model: PixelInput,
    images: np.ndarray,
    targets: np.ndarray,
    *,
    steps: int = ITERATION_STEPS,
    attention_steps: int = ITERATION_STEPS,
    block: int = VIT_BLOCK,
    output: str = "logit",
) -> np.ndarray:
    """IIA maps (b, H, W) of a timm or torchvision ViT, one image at a time; `block` is the block
    whose attention is on the path (the reference: the last)."""
    module = torch_model.model
    alphas, betas = path_nodes(steps), path_nodes(attention_steps)
    maps = []
    with recorded_attention(module) as attention:
        depth = None
        for image, target in zip(images, targets):
            x = _normalised(torch_model, image)
            total = None
            for point in _path(alphas, x):
                attention.maps, attention.override = [], {}
                with torch.no_grad():
                    module(point)
                depth = len(attention.maps)
                path_block = block % depth
                own = attention.maps[path_block].numpy()
                for fixed in _path(betas, own):
                    attention.maps, attention.override = [], {path_block: fixed.clone().requires_grad_()}
                    # Gradients w.r.t. the attention maps only (no parameter gradients).
                    grads = torch.autograd.grad(_scores(module(point), int(target), output), attention.maps)
                    cams = torch.stack([torch.clamp(g * a, min=0)[0] for g, a in zip(grads, attention.maps)]).detach()
                    total = cams if total is None else total + cams  # a running sum of the 36 cams
            cams = total / (len(alphas) * len(betas))
            mask = rollout(cams)
            side = int(round(mask.shape[0] ** 0.5))
            grid = mask.reshape(1, 1, side, side)
            resized = F.interpolate(grid, scale_factor=patch_size(module), mode="bilinear", align_corners=False)
            maps.append(resized[0, 0].numpy())
    return np.stack(maps)


# ----------------------------------------------------------------------------------- cross-check


def reference_maps(model, torch_model: PixelInput, images: np.ndarray, targets: np.ndarray, config: IIAConfig | None = None):
    """The reference's maps on the torch twin of `model` (a ResNet or a ViT): at the reference's own
    settings, or with the values `config` sets (None fields keep the reference's)."""
    given = {} if config is None else {k: v for k, v in config.to_dict().items() if v is not None}
    sites = vit_attention_sites(model)
    if sites:
        options = {"steps": given.get("steps"), "attention_steps": given.get("activation_steps"), "output": given.get("output")}
        if "layer" in given:
            options["block"] = _block_index(model, sites, given["layer"])
        return iia_vit(torch_model, images, targets, **{k: v for k, v in options.items() if v is not None})
    options = {
        "layer": model.resolve_layer(given["layer"]) if "layer" in given else None,
        "steps": given.get("steps"),
        "mode": given.get("mode"),
        "activation_steps": given.get("activation_steps"),
        "output": given.get("output"),
    }
    return iia_cnn(torch_model, images, targets, **{k: v for k, v in options.items() if v is not None})


def _block_index(model, sites: tuple[str, ...], layer: str) -> int:
    """The block a layer name (a block, or its attention site) points to."""
    for index, site in enumerate(sites):
        if layer in (site, model.module.block_name(index)):
            return index
    raise ValueError(f"no block or attention site {layer!r}; attention sites: {', '.join(sites)}")


@reference(
    "iia",
    reference="PyTorch IIA written from iia.md (torchvision ResNet split as GradModel; timm/torchvision ViT "
    "with explicit attention recording), one image at a time",
    tolerance={"float32": 1e-5, "float64": 1e-10},
)
def iia_vs_reference(model, torch_model, images, targets, *, config: IIAConfig | None = None):
    """jaxattr at `config` (default: its defaults) against the reference at the same values (default:
    the reference's own)."""
    ours = iia(model, images, targets, config=config or IIAConfig())
    return np.asarray(ours), reference_maps(model, torch_model, images, targets, config)
