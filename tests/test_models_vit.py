"""ViT ports against timm / torchvision run in the same test: layers, logits, attention maps,
position-embedding resampling for other image sizes, and the attention sites used by IIA."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

from converters.torch_models import PixelInput, from_torch, to_torch_images, torch_model  # noqa: E402
from converters.verify import compare  # noqa: E402
from jaxattr.models import Model, create_model, model_info  # noqa: E402
from jaxattr.models.resnet import ResNet  # noqa: E402
from jaxattr.methods.sites import site_gradients  # noqa: E402
from jaxattr.models.vit import VisionTransformer, attention_sites, resample_position_embedding  # noqa: E402
from jaxattr.models.weights import params_from_state_dict, write_safetensors  # noqa: E402

TV_VIT = torchvision.models.vision_transformer


# ---------------------------------------------------------------------------------- helpers


@jax.jit  # one compiled program: op by op, a full-size ViT takes half a minute on CPU
def attention_maps(model, images, replace=None):
    """(logits, every block's attention stacked (blocks, b, heads, n, n)) through the site API."""
    sites = attention_sites(model)
    logits, values = model.intervene(images, replace=replace, read=sites)
    return logits, jnp.stack([values[s] for s in sites])


@functools.partial(jax.jit, static_argnames="output")
def attention_gradients(model, images, targets, output="logit", replace=None):
    sites = attention_sites(model)
    logits, values, grads = site_gradients(model, images, targets, sites, replace=replace, output=output)
    return logits, jnp.stack([values[s] for s in sites]), jnp.stack([grads[s] for s in sites])


def randomise_head(module: torch.nn.Module) -> None:
    """torchvision zero-initialises its head: the logits would be 0 on both sides."""
    if hasattr(module, "heads"):
        with torch.no_grad():
            torch.nn.init.normal_(module.heads.head.weight, std=0.02)
            torch.nn.init.normal_(module.heads.head.bias, std=0.02)


def sharpen(module: torch.nn.Module, factor: float) -> None:
    """Scale all >= 2-D weights: random-init ViTs otherwise attend almost uniformly (conversion.md §3)."""
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim >= 2:
                p.mul_(factor)


def torch_attention(module: torch.nn.Module, pixels: np.ndarray, mean, std) -> tuple[np.ndarray, np.ndarray]:
    """(logits, attention[blocks, b, heads, n, n]) computed by the torch model itself.

    timm: the explicit (non-fused) attention path, its attn_drop input captured by a hook.
    torchvision: each block's MultiheadAttention re-run on its captured ln_1 output with
    need_weights=True, average_attn_weights=False."""
    captured, handles = [], []
    if isinstance(module, TV_VIT.VisionTransformer):
        for layer in module.encoder.layers:

            def hook(_m, _i, y, attn=layer.self_attention):
                captured.append(attn(y, y, y, need_weights=True, average_attn_weights=False)[1])

            handles.append(layer.ln_1.register_forward_hook(hook))
    else:
        for block in module.blocks:
            block.attn.fused_attn = False
            handles.append(
                block.attn.attn_drop.register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0]))
            )
    try:
        with torch.no_grad():
            logits = PixelInput(module, mean, std)(to_torch_images(pixels))
    finally:
        for handle in handles:
            handle.remove()
    return logits.numpy(), np.stack([a.detach().numpy() for a in captured])


def tiny_pair(naming: str, *, seed: int = 0, depth: int = 3) -> tuple[torch.nn.Module, Model]:
    """A small torch ViT of `naming`'s kind (sharpened weights) and the jaxattr port holding them."""
    torch.manual_seed(seed)
    if naming == "torchvision":
        module = TV_VIT.VisionTransformer(
            image_size=32,
            patch_size=8,
            num_layers=depth,
            num_heads=4,
            hidden_dim=32,
            mlp_dim=64,
            num_classes=10,
        )
        randomise_head(module)
    else:
        module = timm.models.vision_transformer.VisionTransformer(
            img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=4, mlp_ratio=2.0, num_classes=10
        )
    # Peaked but not saturated attention (median row maximum ~0.3 against a uniform 1/17):
    # torchvision's xavier init is larger than timm's truncated normal(0.02).
    sharpen(module, 2.0 if naming == "torchvision" else 10.0)
    vit = VisionTransformer(
        patch_size=8,
        width=32,
        depth=depth,
        num_heads=4,
        mlp_dim=64,
        num_classes=10,
        image_size=32,
        naming=naming,
    )
    images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    template = jax.eval_shape(vit.init, jax.random.key(0), images)["params"]
    params = params_from_state_dict(module.state_dict(), template, source=f"tiny {naming} ViT")
    return module.eval(), Model(vit, jax.tree_util.tree_map(jnp.asarray, params), f"tiny-{naming}")


def qkv_weight_and_bias(grads, model: Model, block: int):
    """The block's q|k|v projection weight and bias in `grads`, output axis first."""
    node = grads[model.module.block_name(block)]["self_attention" if model.module.naming == "torchvision" else "attn"]
    if model.module.naming == "torchvision":
        return np.asarray(node["in_proj_weight"]), np.asarray(node["in_proj_bias"])
    return np.asarray(node["qkv"]["kernel"]).T, np.asarray(node["qkv"]["bias"])


# ------------------------------------------------------------------------- full-size parity

FULL_MODELS = ["vit_b_16", "vit_b_32", "vit_small_patch16_224", "vit_base_patch16_224"]


@pytest.mark.parametrize("name", FULL_MODELS)
def test_parity_random_weights(name, rng):
    module = torch_model(name)
    randomise_head(module)
    model = from_torch(name, module)
    mean, std = model.module.mean, model.module.std
    images = rng.rand(1, 224, 224, 3).astype(np.float32)
    report = compare(model, PixelInput(module, mean, std).eval(), images)
    print("\n" + report.table())
    assert report.ok, report.table()
    assert not report.skipped  # every stage is named after a torch module
    assert len(report.layers) == model.module.depth + 5  # patch conv, tokens, blocks, norm, head, logits

    torch_logits, torch_maps = torch_attention(module, images, mean, std)
    logits, maps = attention_maps(model, jnp.asarray(images))
    assert maps.shape == (
        model.module.depth,
        1,
        model.module.num_heads,
        model.module.num_tokens,
        model.module.num_tokens,
    )
    np.testing.assert_allclose(np.asarray(maps), torch_maps, rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(logits), torch_logits, rtol=0, atol=1e-4 * np.abs(torch_logits).max()
    )


# ----------------------------------------------------------------------- other image sizes


@pytest.mark.parametrize("naming, grid", [("timm", 16), ("timm", 10), ("torchvision", 9), ("torchvision", 5)])
def test_position_resampling_matches_torch(naming, grid, rng):
    """resize_params' rule against timm's resample_abs_pos_embed / torchvision's interpolate_embeddings."""
    position = rng.randn(1, 1 + 14 * 14, 24).astype(np.float32)
    if naming == "timm":
        # What timm's checkpoint_filter_fn calls (bicubic, antialias=True, align_corners=None).
        ref = timm.layers.resample_abs_pos_embed(
            torch.from_numpy(position), new_size=[grid, grid], num_prefix_tokens=1
        )
        got = resample_position_embedding(jnp.asarray(position), grid, antialias=True)
    else:
        state = TV_VIT.interpolate_embeddings(
            grid * 16, 16, {"encoder.pos_embedding": torch.from_numpy(position)}
        )
        ref = state["encoder.pos_embedding"]
        got = resample_position_embedding(jnp.asarray(position), grid, align_corners=True)
    np.testing.assert_allclose(np.asarray(got), ref.numpy(), rtol=0, atol=1e-5)


def test_other_image_size_timm(tmp_path, rng):
    """create_model(..., image_size=256) from a 224 checkpoint == timm's model at 256 loading the
    same checkpoint through its own filter (upsampling the 14x14 position grid to 16x16)."""
    name, size = "vit_small_patch16_224", 256
    source = torch_model(name)
    state = source.state_dict()
    path = tmp_path / "vit_small_224.safetensors"
    write_safetensors(path, {k: v.numpy() for k, v in state.items()})

    reference = timm.create_model(name, pretrained=False, img_size=size).eval()
    reference.load_state_dict(timm.models.vision_transformer.checkpoint_filter_fn(state, reference))
    model = create_model(name, weights=path, image_size=size)

    images = rng.rand(1, size, size, 3).astype(np.float32)
    report = compare(model, PixelInput(reference, model.module.mean, model.module.std).eval(), images)
    print("\n" + report.table())
    assert report.ok, report.table()
    with pytest.raises(ValueError, match="takes 256x256 images"):
        model(jnp.zeros((1, 224, 224, 3)))


def test_other_image_size_torchvision_from_legacy_checkpoint(tmp_path, rng):
    """A torchvision .pth with the pre-0.13 MLP key names (as the published ViT checkpoints have),
    loaded at 288 pixels == torchvision's model at 288 loading it through interpolate_embeddings."""
    name, size = "vit_b_32", 288
    source = torch_model(name)
    randomise_head(source)
    legacy = {
        k.replace(".mlp.0.", ".mlp.linear_1.").replace(".mlp.3.", ".mlp.linear_2."): v
        for k, v in source.state_dict().items()
    }
    assert any(".mlp.linear_1." in k for k in legacy)
    path = tmp_path / "vit_b_32_legacy.pth"
    torch.save(legacy, path)

    reference = TV_VIT.VisionTransformer(
        image_size=size, patch_size=32, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072
    ).eval()
    current = TV_VIT.interpolate_embeddings(size, 32, source.state_dict())
    reference.load_state_dict(current)
    model = create_model(name, weights=path, image_size=size)

    images = rng.rand(1, size, size, 3).astype(np.float32)
    report = compare(model, PixelInput(reference, model.module.mean, model.module.std).eval(), images)
    print("\n" + report.table())
    assert report.ok, report.table()


def test_image_size_must_be_a_multiple_of_the_patch():
    params = {"encoder.pos_embedding": np.zeros((1, 50, 8), np.float32)}
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        model_info("vit_b_32").resize_params(params, 250)


# ------------------------------------------------------------------------- attention sites


@pytest.mark.parametrize("naming", ["timm", "torchvision"])
def test_attention_maps_match_torch(naming, rng):
    module, model = tiny_pair(naming)
    images = rng.rand(2, 32, 32, 3).astype(np.float32)
    torch_logits, torch_maps = torch_attention(module, images, model.module.mean, model.module.std)
    logits, maps = attention_maps(model, jnp.asarray(images))
    assert maps.shape == (3, 2, 4, 17, 17)
    # Sharpened weights give peaked attention, so the comparison is not between uniform maps.
    assert float(torch_maps.max()) > 0.5 and float(np.median(torch_maps.max(-1))) > 3 / 17
    np.testing.assert_allclose(np.asarray(maps), torch_maps, rtol=0, atol=2e-6)
    np.testing.assert_allclose(
        np.asarray(logits), torch_logits, rtol=0, atol=1e-4 * np.abs(torch_logits).max()
    )


@pytest.mark.parametrize("naming", ["timm", "torchvision"])
def test_override_with_own_attention_reproduces_logits(naming, rng):
    _, model = tiny_pair(naming)
    images = jnp.asarray(rng.rand(2, 32, 32, 3).astype(np.float32))
    logits, maps = attention_maps(model, images)
    sites = attention_sites(model)
    for block in (-1, 1):
        overridden, overridden_maps = attention_maps(model, images, {sites[block]: maps[block]})
        np.testing.assert_array_equal(np.asarray(overridden), np.asarray(logits))
        np.testing.assert_array_equal(np.asarray(overridden_maps), np.asarray(maps))
    # A different attention changes the output and is reported as that block's attention.
    uniform = jnp.full_like(maps[-1], 1.0 / maps.shape[-1])
    changed, changed_maps = attention_maps(model, images, {sites[-1]: uniform})
    assert np.abs(np.asarray(changed - logits)).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(changed_maps[-1]), np.asarray(uniform))
    np.testing.assert_array_equal(np.asarray(changed_maps[:-1]), np.asarray(maps[:-1]))


@pytest.mark.parametrize("naming", ["timm", "torchvision"])
def test_override_blocks_gradient_to_queries_and_keys(naming, rng):
    _, model = tiny_pair(naming)
    images = jnp.asarray(rng.rand(2, 32, 32, 3).astype(np.float32))
    _, maps = attention_maps(model, images)
    vit = model.module
    last = vit.depth - 1
    qk, v = slice(0, 2 * vit.width), slice(2 * vit.width, 3 * vit.width)  # output rows q|k, v

    def score(params, override):
        replace = None if override is None else {attention_sites(model)[last]: override}
        logits, _ = dataclasses.replace(model, params=params).intervene(images, replace=replace)
        return logits[:, 3].sum()

    grad = jax.jit(jax.grad(score))
    free_w, free_b = qkv_weight_and_bias(grad(model.params, None), model, last)
    fixed_w, fixed_b = qkv_weight_and_bias(grad(model.params, maps[last]), model, last)
    assert np.abs(free_w[qk]).max() > 0 and np.abs(free_b[qk]).max() > 0
    assert np.all(fixed_w[qk] == 0) and np.all(fixed_b[qk] == 0)
    assert np.abs(fixed_w[v]).max() > 0  # values still carry the gradient


def finite_difference(model, images, targets, block, attention, direction, output, eps=1e-4):
    """Central difference of the summed target scores along `direction` of block's attention,
    by substituting attention +- eps * direction through the forward-only override."""

    def summed(attn):
        logits, _ = attention_maps(model, images, {attention_sites(model)[block]: attn})
        scores = jax.nn.softmax(logits, -1) if output == "probability" else logits
        return float(jnp.take_along_axis(scores, targets[:, None], 1).sum())

    return (summed(attention + eps * direction) - summed(attention - eps * direction)) / (2 * eps)


@pytest.mark.parametrize("naming, output", [("timm", "logit"), ("torchvision", "probability")])
def test_attention_gradients_match_finite_differences(naming, output, rng):
    _, model = tiny_pair(naming, depth=2)
    with jax.enable_x64(True):
        model64 = model.astype(jnp.float64)
        images = jnp.asarray(rng.rand(2, 32, 32, 3))
        targets = jnp.asarray([3, 7], jnp.int32)
        logits, maps, grads = attention_gradients(model64, images, targets, output=output)
        assert grads.shape == maps.shape and grads.dtype == jnp.float64
        for block in range(model64.module.depth):
            direction = jnp.asarray(rng.randn(*maps.shape[1:]))
            expected = finite_difference(model64, images, targets, block, maps[block], direction, output)
            np.testing.assert_allclose(float(jnp.sum(grads[block] * direction)), expected, rtol=1e-6)

        # With an override, the gradient of that block is the gradient w.r.t. the given array.
        given = 0.7 * maps[-1]
        _, overridden_maps, overridden_grads = attention_gradients(
            model64, images, targets, output=output, replace={attention_sites(model64)[-1]: given}
        )
        np.testing.assert_array_equal(np.asarray(overridden_maps[-1]), np.asarray(given))
        direction = jnp.asarray(rng.randn(*maps.shape[1:]))
        expected = finite_difference(model64, images, targets, -1, given, direction, output)
        np.testing.assert_allclose(float(jnp.sum(overridden_grads[-1] * direction)), expected, rtol=1e-6)


def test_attention_sites_bad_input():
    _, model = tiny_pair("timm", depth=2)
    images = jnp.zeros((2, 32, 32, 3))
    sites = attention_sites(model)
    assert sites == ("blocks.0.attn.attention", "blocks.1.attn.attention")
    with pytest.raises(ValueError, match="unknown layer 'blocks.2.attn.attention'"):
        model.intervene(images, replace={"blocks.2.attn.attention": jnp.zeros((2, 4, 17, 17))})
    with pytest.raises(ValueError, match="must have its shape"):
        model.intervene(images, replace={sites[0]: jnp.zeros((1, 4, 17, 17))})
    with pytest.raises(ValueError, match="targets"):
        site_gradients(model, images, jnp.zeros((3,), jnp.int32), sites)
    with pytest.raises(ValueError, match="unknown output"):
        site_gradients(model, images, 0, sites, output="loss")
    with pytest.raises(TypeError, match="not a Vision Transformer"):
        attention_sites(Model(ResNet(), {}, "resnet50"))
    with pytest.raises(ValueError, match="takes 32x32 images"):
        attention_maps(model, jnp.zeros((1, 64, 64, 3)))
    with pytest.raises(ValueError, match="no ReLU"):
        model.with_nonlinearity("guided")(images)
