"""Vision Transformers: torchvision `vit_b_16`, `vit_b_32` and timm `vit_small_patch16_224`,
`vit_base_patch16_224`.

One implementation serves both sources; they compute the same function (pre-norm blocks,
LayerNorm eps 1e-6, exact GELU, scale head_dim^-0.5, class-token pooling) and differ only in
module names, which follow each source so that parameters map onto its state_dict key for key
(`_NAMES`). torchvision's `nn.MultiheadAttention` keeps its packed `in_proj_weight` /
`in_proj_bias` as parameters in torch's layout; timm's `qkv` is an ordinary Linear.

Every block's post-softmax attention is an intervention site (`<block>.<attention>.attention`,
listed in block order by `attention_sites`): it can be read, replaced by a constant (IIA fixes the
last block's attention along its path; nothing then flows back to that block's queries and keys)
or perturbed to get the gradient with respect to the attention.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import linen as nn
from jaxtyping import Array, Float

from jaxattr.models._classifier import IMAGENET_MEAN, IMAGENET_STD, Classifier, Stage, site
from jaxattr.models._model import Model
from jaxattr.models.registry import ModelInfo, register
from jaxattr.nn import Conv2d, LayerNorm, Linear, gelu
from jaxattr.resize import resize

ATTENTION = "attention"  # the site's variable name inside each attention module


@dataclasses.dataclass(frozen=True)
class _Names:
    """torch module names of one source's ViT."""

    patch_embedding: str
    class_token: str
    position_embedding: str
    embedding: str  # the module whose output is the embedded token sequence
    block: str  # format string with the block index
    norm1: str
    attention: str
    norm2: str
    fc1: str
    fc2: str
    out_projection: str
    final_norm: str
    head: str
    packed_in_projection: bool  # nn.MultiheadAttention's in_proj_weight / in_proj_bias


_NAMES = {
    "torchvision": _Names(
        patch_embedding="conv_proj",
        class_token="class_token",
        position_embedding="encoder.pos_embedding",
        embedding="encoder.dropout",
        block="encoder.layers.encoder_layer_{}",
        norm1="ln_1",
        attention="self_attention",
        norm2="ln_2",
        fc1="mlp.0",
        fc2="mlp.3",
        out_projection="out_proj",
        final_norm="encoder.ln",
        head="heads.head",
        packed_in_projection=True,
    ),
    "timm": _Names(
        patch_embedding="patch_embed.proj",
        class_token="cls_token",
        position_embedding="pos_embed",
        embedding="pos_drop",
        block="blocks.{}",
        norm1="norm1",
        attention="attn",
        norm2="norm2",
        fc1="mlp.fc1",
        fc2="mlp.fc2",
        out_projection="proj",
        final_norm="norm",
        head="head",
        packed_in_projection=False,
    ),
}
Naming = Literal["torchvision", "timm"]


# ------------------------------------------------------------------------------------ modules


class SelfAttention(nn.Module):
    """Multi-head self-attention (qkv bias, scale head_dim^-0.5) with observable attention."""

    num_heads: int
    naming: Naming

    @nn.compact
    def __call__(self, x: Float[Array, "b n d"]) -> Float[Array, "b n d"]:
        names = _NAMES[self.naming]
        b, n, d = x.shape
        head_dim = d // self.num_heads
        if names.packed_in_projection:
            # torch layout (3d, d): not a `kernel`, so it keeps torch's name and orientation.
            weight = self.param(
                "in_proj_weight", nn.initializers.lecun_normal(in_axis=1, out_axis=0), (3 * d, d)
            )
            bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * d,))
            qkv = x @ weight.T.astype(x.dtype) + bias.astype(x.dtype)
        else:
            qkv = Linear(3 * d, name="qkv")(x)
        # Both sources lay the 3d outputs out as (q|k|v, head, head_dim).
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, head_dim).transpose(2, 0, 3, 1, 4)
        scores = (q * head_dim**-0.5) @ k.swapaxes(-1, -2)
        attention = site(self, ATTENTION, jax.nn.softmax(scores, axis=-1))
        out = (attention @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
        return Linear(d, name=names.out_projection)(out)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attention(norm1(x)), then x + mlp(norm2(x))."""

    num_heads: int
    mlp_dim: int
    naming: Naming

    @nn.compact
    def __call__(self, x: Float[Array, "b n d"]) -> Float[Array, "b n d"]:
        names = _NAMES[self.naming]
        x = x + SelfAttention(self.num_heads, self.naming, name=names.attention)(
            LayerNorm(1e-6, name=names.norm1)(x)
        )
        y = LayerNorm(1e-6, name=names.norm2)(x)
        y = Linear(x.shape[-1], name=names.fc2)(gelu(Linear(self.mlp_dim, name=names.fc1)(y)))
        return x + y


class VisionTransformer(Classifier):
    """ViT with class-token pooling for square images of `image_size` pixels."""

    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    num_classes: int = 1000
    image_size: int = 224
    naming: Naming = "timm"
    nonlinearity: str = "standard"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2 + 1

    def block_name(self, index: int) -> str:
        return _NAMES[self.naming].block.format(index)

    @property
    def feature_layer(self) -> str:
        # The last block's input tokens (pytorch-grad-cam's ViT recipe taps blocks[-1].norm1): of
        # the last block's output only the class token reaches the head.
        return self.block_name(self.depth - 2)

    def attention_site(self, index: int) -> str:
        """The site of block `index`'s post-softmax attention."""
        return f"{self.block_name(index)}.{_NAMES[self.naming].attention}.{ATTENTION}"

    def internal_sites(self) -> dict[str, tuple[tuple[str, ...], str]]:
        attention = _NAMES[self.naming].attention
        return {self.attention_site(i): ((self.block_name(i), attention), ATTENTION) for i in range(self.depth)}

    def stages(self) -> list[Stage]:
        if self.nonlinearity != "standard":
            raise ValueError(
                f"a ViT has no ReLU or max-pool, so nonlinearity={self.nonlinearity!r} does not apply; "
                "use 'standard'"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of the patch size {self.patch_size}"
            )
        names = _NAMES[self.naming]
        stages: list[Stage] = [
            (names.patch_embedding, self._patch_embedding),
            (names.embedding, self._embed_tokens),
        ]
        stages += [(self.block_name(i), _block_stage(self, i)) for i in range(self.depth)]
        stages += [
            (names.final_norm, lambda x: LayerNorm(1e-6, name=names.final_norm)(x)),
            (names.head, lambda x: Linear(self.num_classes, name=names.head)(x[:, 0])),
        ]
        return stages

    def _patch_embedding(self, images: Float[Array, "b h w 3"]) -> Float[Array, "b g g d"]:
        if images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(
                f"this ViT takes {self.image_size}x{self.image_size} images, "
                f"got {images.shape[1]}x{images.shape[2]}; "
                "create it for another size with create_model(name, image_size=...)"
            )
        names = _NAMES[self.naming]
        return Conv2d(self.width, self.patch_size, self.patch_size, name=names.patch_embedding)(images)

    def _embed_tokens(self, patches: Float[Array, "b g g d"]) -> Float[Array, "b n d"]:
        """Row-major patch tokens after the class token, plus the position embedding."""
        names = _NAMES[self.naming]
        b, _, _, d = patches.shape
        class_token = self.param(names.class_token, nn.initializers.normal(0.02), (1, 1, d))
        position = self.param(names.position_embedding, nn.initializers.normal(0.02), (1, self.num_tokens, d))
        tokens = jnp.concatenate(
            [jnp.broadcast_to(class_token.astype(patches.dtype), (b, 1, d)), patches.reshape(b, -1, d)],
            axis=1,
        )
        return tokens + position.astype(patches.dtype)


def _block_stage(vit: VisionTransformer, index: int):
    name = vit.block_name(index)
    return lambda x: EncoderBlock(vit.num_heads, vit.mlp_dim, vit.naming, name=name)(x)


# ------------------------------------------------------------------- position-embedding resizing


def resample_position_embedding(
    position: Float[Array, "1 n d"],
    grid_size: int,
    *,
    method: Literal["bilinear", "bicubic"] = "bicubic",
    align_corners: bool = False,
    antialias: bool = False,
) -> Float[Array, "1 m d"]:
    """A (1, 1 + g*g, d) class-token-first position embedding resampled to a grid_size^2 grid;
    the class token's entry is kept as it is."""
    old_grid = int(round((position.shape[1] - 1) ** 0.5))
    if old_grid**2 != position.shape[1] - 1:
        raise ValueError(f"position embedding of shape {position.shape} is not 1 + a square number of tokens")
    d = position.shape[-1]
    grid = jnp.asarray(position[:, 1:]).reshape(1, old_grid, old_grid, d)
    grid = resize(grid, grid_size, method, align_corners=align_corners, antialias=antialias)
    return jnp.concatenate([jnp.asarray(position[:, :1]), grid.reshape(1, grid_size**2, d)], axis=1)


def _position_resizer(naming: Naming, patch_size: int):
    """`ModelInfo.resize_params` as each source adapts pretrained weights to another image size:
    torchvision `interpolate_embeddings` (bicubic, align_corners=True, no antialiasing); timm's
    `checkpoint_filter_fn` -> `resample_abs_pos_embed` (bicubic, align_corners=False,
    antialias=True)."""
    key = _NAMES[naming].position_embedding
    options = dict(align_corners=True) if naming == "torchvision" else dict(antialias=True)

    def resize_params(params: Any, image_size: int) -> Any:
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch_size}")
        position = resample_position_embedding(params[key], image_size // patch_size, **options)
        return {**params, key: position}

    return resize_params


def attention_sites(model: Model) -> tuple[str, ...]:
    """The attention site of every block of a ViT `model`, in block order."""
    if not isinstance(model.module, VisionTransformer):
        raise TypeError(
            f"{model.name or type(model.module).__name__} is not a Vision Transformer: it has no attention sites"
        )
    return tuple(model.module.attention_site(i) for i in range(model.module.depth))


# --------------------------------------------------------------------------------- registry


def _torchvision_legacy_key(key: str) -> str:
    """torchvision before 0.13 named the MLP's Linear layers linear_1 / linear_2 (now mlp.0 /
    mlp.3); its published ViT checkpoints keep the old names and torchvision renames them on load
    (`MLPBlock._load_from_state_dict`)."""
    return key.replace(".mlp.linear_1.", ".mlp.0.").replace(".mlp.linear_2.", ".mlp.3.")


def _register(name: str, source: Naming, *, patch: int, width: int, heads: int, weights_url: str) -> None:
    depth = 12
    if source == "torchvision":
        mean, std, resize_size, interpolation = IMAGENET_MEAN, IMAGENET_STD, 256, "bilinear"
    else:
        # timm's augreg ViTs: mean = std = 0.5; crop_pct 0.9, i.e. resize to floor(224 / 0.9) = 248.
        mean, std, resize_size, interpolation = (0.5,) * 3, (0.5,) * 3, 248, "bicubic"

    def build(nonlinearity: str = "standard", image_size: int = 224) -> VisionTransformer:
        return VisionTransformer(
            patch_size=patch,
            width=width,
            depth=depth,
            num_heads=heads,
            mlp_dim=4 * width,
            image_size=image_size,
            naming=source,
            nonlinearity=nonlinearity,
            mean=mean,
            std=std,
        )

    register(
        ModelInfo(
            name=name,
            family="vit",
            source=source,
            build=build,
            weights_file=weights_url.rsplit("/", 1)[1],
            weights_url=weights_url,
            resize_size=resize_size,
            interpolation=interpolation,
            legacy_keys=_torchvision_legacy_key if source == "torchvision" else None,
            resize_params=_position_resizer(source, patch),
            description=f"{source} {name}, ImageNet-1k",
        )
    )


_TORCHVISION = "https://download.pytorch.org/models/{}"
_HF_HUB = "https://huggingface.co/timm/{}/resolve/main/model.safetensors"
_register(
    "vit_b_16",
    "torchvision",
    patch=16,
    width=768,
    heads=12,
    weights_url=_TORCHVISION.format("vit_b_16-c867db91.pth"),
)
_register(
    "vit_b_32",
    "torchvision",
    patch=32,
    width=768,
    heads=12,
    weights_url=_TORCHVISION.format("vit_b_32-d86f8d99.pth"),
)
_register(
    "vit_small_patch16_224",
    "timm",
    patch=16,
    width=384,
    heads=6,
    weights_url=_HF_HUB.format("vit_small_patch16_224.augreg_in21k_ft_in1k"),
)
_register(
    "vit_base_patch16_224",
    "timm",
    patch=16,
    width=768,
    heads=12,
    weights_url=_HF_HUB.format("vit_base_patch16_224.augreg2_in21k_ft_in1k"),
)
