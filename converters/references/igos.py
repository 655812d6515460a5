"""A PyTorch reference of I-GOS, iGOS+ and iGOS++ written from the specification (igos.md), with
the structure of the authors' code: one image per call as their main.py runs it, the N path images
of a score as one model batch, the path gradients sample by sample, the line search over the still
active samples with a fresh noise draw per evaluation, Python loops throughout.

Written from igos.md alone (the authors' repository is GPL-3.0 and is not copied): §4 path scores,
§5 regularisers, §6 algorithms, §8 line search with the semantics of the pinned torch 1.7.1 (the
authors' in-place update of the active flags raises on torch >= 2; here the flags are rebuilt),
§9 noise order. The parity tests, `jaxattr crosscheck igos*` and benchmarks/igos.py all use it.

Noise: `noise(iteration, draw, shape, dtype) -> tensor` supplies draw `draw` (0, 1, ... in the
order the algorithm consumes them) of `iteration`; the default is `torch.randn`. The runners feed
jaxattr's own draws (`jaxattr.methods.igos.gaussian_noise` of each image's key) so that both sides
see the same noise.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np
import torch
import torch.nn.functional as F

from converters.crosscheck import reference
from jaxattr.methods._common import image_keys
from jaxattr.methods.igos import IGOSConfig, IGOSPlusConfig, gaussian_noise, igos_masks

Noise = Callable[[int, int, tuple, torch.dtype], torch.Tensor]


def torch_noise(iteration: int, draw: int, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype)


@dataclasses.dataclass
class _Draws:
    """The noise stream of one run: counts the draws of the current iteration."""

    noise: Noise
    iteration: int = 0
    count: int = 0

    def start(self, iteration: int) -> None:
        self.iteration, self.count = iteration, 0

    def __call__(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        draw = self.noise(self.iteration, self.count, tuple(shape), dtype)
        self.count += 1
        return draw


# --------------------------------------------------------------------------- building blocks


def upscale(masks: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 1, s, s) -> (B, 1, S, S): nn.UpsamplingBilinear2d, i.e. align_corners=True."""
    return F.interpolate(masks, size=(size, size), mode="bilinear", align_corners=True)


def tv(masks: torch.Tensor) -> torch.Tensor:
    m = masks[:, 0]
    vertical = (m[:, :-1, :] - m[:, 1:, :]).abs().pow(2).flatten(1).mean(1)
    horizontal = (m[:, :, :-1] - m[:, :, 1:]).abs().pow(2).flatten(1).mean(1)
    return vertical + horizontal


def bilateral_tv(image: torch.Tensor, masks: torch.Tensor, sigma: float) -> torch.Tensor:
    """§5: TV of the low-res mask plus image-weighted squared differences of its upsampling; the
    vertical weights average the channels before squaring, the horizontal ones after exp."""
    up = upscale(masks, image.shape[-1])
    w_vertical = torch.exp(-((image[:, :, :-1, :] - image[:, :, 1:, :]).mean(dim=1) ** 2) / sigma)
    w_horizontal = torch.exp(-((image[:, :, :, :-1] - image[:, :, :, 1:]) ** 2) / sigma).mean(dim=1)
    d_vertical = (up[:, :, :-1, :] - up[:, :, 1:, :]).abs().pow(2)
    d_horizontal = (up[:, :, :, :-1] - up[:, :, :, 1:]).abs().pow(2)
    bil_vertical = (w_vertical.flatten(1) * d_vertical.flatten(1)).mean(1)
    bil_horizontal = (w_horizontal.flatten(1) * d_horizontal.flatten(1)).mean(1)
    return 0.5 * (tv(masks) + bil_vertical + bil_horizontal)


def l1(masks: torch.Tensor) -> torch.Tensor:
    return (1 - masks).abs().flatten(1).mean(1)


def phi(x: torch.Tensor, y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return x.mul(u) + y.mul(1 - u)


def path_scores(model, x, y, label, up, steps: int, std: float, draws: _Draws) -> torch.Tensor:
    """(B, N): p_c(phi(x, y, t_k up) + std eps_k) / N for the float32 nodes linspace(1/N, 1, N);
    the N images of all B samples in one model batch, one noise draw (B, N, 3, S, S)."""
    nodes = torch.linspace(1 / steps, 1, steps).view(-1, 1, 1, 1)  # float32, as the reference's
    u = up.unsqueeze(1) * nodes  # (B, N, 1, S, S)
    images = phi(x.unsqueeze(1), y.unsqueeze(1), u)
    images = images + draws(images.shape, images.dtype) * std
    probabilities = torch.softmax(model(images.reshape(-1, *images.shape[2:])), dim=1)
    probabilities = probabilities.view(x.shape[0], steps, -1)
    scores = probabilities.gather(2, label.view(-1, 1, 1).expand(-1, steps, 1))[..., 0]
    return scores / steps


def path_gradient(model, x, y, label, masks_list, up, steps, std, draws) -> list[torch.Tensor]:
    """d/d masks of sum_k P(x, y, up), sample by sample (the reference's loop; each sample its own
    draw of shape (1, N, 3, S, S)); `up` is a differentiable function of the masks in `masks_list`."""
    grads = [torch.zeros_like(m) for m in masks_list]
    for i in range(x.shape[0]):
        score = path_scores(model, x[i : i + 1], y[i : i + 1], label[i : i + 1], up[i : i + 1], steps, std, draws)
        for total, g in zip(grads, torch.autograd.grad(score.sum(), masks_list, retain_graph=True, allow_unused=True)):
            if g is not None:
                total += g
    return grads


def line_search(masks, grads, loss_fn, alpha0: float, beta: float, decay: float, min_step: float) -> torch.Tensor:
    """§8: per-sample Armijo backtracking. The semantics of torch 1.7.1: a sample whose trial passes
    (or whose alpha fell below min_step) keeps its alpha and drops out; the others decay. Returns
    float32 alphas (B,)."""
    with torch.no_grad():
        n = masks.shape[0]
        active = torch.ones(n, dtype=torch.bool)
        alphas = torch.ones(n) * alpha0  # float32 whatever the masks' dtype, as the reference
        base = loss_fn(masks, active)
        tau = -beta * (grads**2).reshape(n, -1).sum(dim=1)
        shape = (-1,) + (1,) * (masks.dim() - 1)
        while True:
            trial = torch.clamp(masks[active] - alphas[active].view(shape) * grads[active], 0, 1)
            losses = loss_fn(trial, active)
            failed = (losses > base[active] + alphas[active] * tau[active]) & (alphas[active] >= min_step)
            still = active.clone()
            still[active] = failed
            active = still
            if not active.any():
                break
            alphas[active] *= decay
    return alphas


# ----------------------------------------------------------------------------------- methods


@dataclasses.dataclass(frozen=True)
class Settings:
    """The reference's settings; the defaults are its effective ones (igos.md §2): main.py's command
    line at b0820a2 and the constants hard-coded in methods.py / methods_helper.py."""

    iterations: int = 20  # --ig_iter 20, passed as the iteration count T (main.py:71-72)
    steps: int = 15  # --iterations 15, passed as the integration steps N
    mask_size: int = 28  # --size 28
    l1: float = 1.0  # --L1 1
    l2: float = 20.0  # --L2 20
    alpha0: float = 1000.0  # --alpha 1000
    noise: float = 0.2  # the noise std added to every path image, hard-coded
    optimizer: str = "ls"  # --opt is never forwarded: the function default 'LS' runs
    armijo: float = 1e-4  # line_search (methods_helper.py:139-189): beta 1e-4,
    decay: float = 0.2  # decay 0.2,
    min_step: float = 1e-5  # smallest step 1e-5
    btv_sigma: float = 0.01  # bilateral TV's sigma (iGOS+ / iGOS++)

    @classmethod
    def from_config(cls, config: IGOSConfig) -> "Settings":
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls) if hasattr(config, f.name)})


def _nag_step(masks, grads, theta_previous, iteration, alpha0):
    e = iteration / (iteration + 3)
    theta = masks - alpha0 * grads
    return theta + e * (theta - theta_previous), theta


def igos(model, image, baseline, label, settings: Settings, noise: Noise = torch_noise) -> torch.Tensor:
    """I-GOS (§6.1) on normalised images (B, 3, S, S); returns the masks (B, 1, s, s)."""
    size, s = image.shape[-1], settings.mask_size
    draws = _Draws(noise)

    def regulariser(m):
        return settings.l1 * l1(m) + settings.l2 * tv(m)

    def loss(m, active):
        up = upscale(m, size)
        scores = path_scores(model, image[active], baseline[active], label[active], up, settings.steps, settings.noise, draws)
        return scores.sum(dim=1) + regulariser(m)

    masks = torch.ones((image.shape[0], 1, s, s), dtype=image.dtype)
    theta = torch.zeros(1, dtype=image.dtype)
    for i in range(settings.iterations):
        draws.start(i)
        m = masks.clone().requires_grad_()
        (grads,) = torch.autograd.grad(regulariser(m).sum(), [m])
        up = upscale(m, size)
        grads = grads + path_gradient(model, image, baseline, label, [m], up, settings.steps, settings.noise, draws)[0]
        if settings.optimizer == "ls":
            alphas = line_search(masks, grads, loss, settings.alpha0, settings.armijo, settings.decay, settings.min_step)
            masks = masks - grads * alphas.view(-1, 1, 1, 1)
        else:
            masks, theta = _nag_step(masks, grads, theta, i, settings.alpha0)
        masks = masks.clamp(0, 1).detach()
    return masks


def igos_plus(model, image, baseline, label, settings: Settings, noise: Noise = torch_noise) -> torch.Tensor:
    """iGOS+ (§6.3): one mask; direction grad D - grad J + grad R; line-search loss -J + D + R with
    the two scores combined node by node."""
    size, s = image.shape[-1], settings.mask_size
    draws = _Draws(noise)

    def regulariser(m, active):
        return settings.l1 * l1(m) + settings.l2 * bilateral_tv(image[active], m, settings.btv_sigma)

    def loss(m, active):
        up = upscale(m, size)
        x, y, c = image[active], baseline[active], label[active]
        scores = -path_scores(model, y, x, c, up, settings.steps, settings.noise, draws)
        scores = scores + path_scores(model, x, y, c, up, settings.steps, settings.noise, draws)
        return scores.sum(dim=1) + regulariser(m, active)

    everyone = torch.ones(image.shape[0], dtype=torch.bool)
    masks = torch.ones((image.shape[0], 1, s, s), dtype=image.dtype)
    theta = torch.zeros(1, dtype=image.dtype)
    for i in range(settings.iterations):
        draws.start(i)
        m = masks.clone().requires_grad_()
        up = upscale(m, size)
        grads = torch.zeros_like(masks)
        grads = grads + path_gradient(model, image, baseline, label, [m], up, settings.steps, settings.noise, draws)[0]
        grads = grads + -path_gradient(model, baseline, image, label, [m], up, settings.steps, settings.noise, draws)[0]
        grads = grads + torch.autograd.grad(regulariser(m, everyone).sum(), [m])[0]
        if settings.optimizer == "ls":
            alphas = line_search(masks, grads, loss, settings.alpha0, settings.armijo, settings.decay, settings.min_step)
            masks = masks - grads * alphas.view(-1, 1, 1, 1)
        else:
            masks, theta = _nag_step(masks, grads, theta, i, settings.alpha0)
        masks = masks.clamp(0, 1).detach()
    return masks


def igos_pp(model, image, baseline, label, settings: Settings, noise: Noise = torch_noise) -> tuple[torch.Tensor, torch.Tensor]:
    """iGOS++ (§6.2): deletion and insertion masks; returns (Md, Mi), each (B, 1, s, s)."""
    size, s = image.shape[-1], settings.mask_size
    draws = _Draws(noise)
    steps, std = settings.steps, settings.noise

    def regulariser(product, active):
        return settings.l1 * l1(product) + settings.l2 * bilateral_tv(image[active], product, settings.btv_sigma)

    def loss(pair, active):  # pair: (B', 2, 1, s, s); the four terms summed without 1/2
        x, y, c = image[active], baseline[active], label[active]
        up_d, up_i = upscale(pair[:, 0], size), upscale(pair[:, 1], size)
        total = path_scores(model, x, y, c, up_d, steps, std, draws).sum(dim=1)
        total = total + -path_scores(model, y, x, c, up_i, steps, std, draws).sum(dim=1)
        total = total + path_scores(model, x, y, c, up_d * up_i, steps, std, draws).sum(dim=1)
        total = total + -path_scores(model, y, x, c, up_d * up_i, steps, std, draws).sum(dim=1)
        return total + regulariser(pair[:, 0] * pair[:, 1], active)

    everyone = torch.ones(image.shape[0], dtype=torch.bool)
    deletion = torch.ones((image.shape[0], 1, s, s), dtype=image.dtype)
    insertion = torch.ones_like(deletion)
    theta_d = theta_i = torch.zeros(1, dtype=image.dtype)
    for i in range(settings.iterations):
        draws.start(i)
        md, mi = deletion.clone().requires_grad_(), insertion.clone().requires_grad_()
        up_d, up_i = upscale(md, size), upscale(mi, size)
        g1d, g1i = path_gradient(model, image, baseline, label, [md, mi], up_d * up_i, steps, std, draws)
        g2d, g2i = path_gradient(model, baseline, image, label, [md, mi], up_d * up_i, steps, std, draws)
        (g3d,) = path_gradient(model, image, baseline, label, [md], up_d, steps, std, draws)
        (g4i,) = path_gradient(model, baseline, image, label, [mi], up_i, steps, std, draws)
        grad_d = ((g1d - g2d) + g3d) / 2
        grad_i = ((g1i - g2i) - g4i) / 2
        reg_d, reg_i = torch.autograd.grad(regulariser(md * mi, everyone).sum(), [md, mi])
        grad_d, grad_i = grad_d + reg_d, grad_i + reg_i
        if settings.optimizer == "ls":
            pair = torch.stack([deletion, insertion], dim=1)
            alphas = line_search(pair, torch.stack([grad_d, grad_i], dim=1), loss, settings.alpha0,
                                 settings.armijo, settings.decay, settings.min_step)
            deletion = deletion - grad_d * alphas.view(-1, 1, 1, 1)
            insertion = insertion - grad_i * alphas.view(-1, 1, 1, 1)
        else:
            deletion, theta_d = _nag_step(deletion, grad_d, theta_d, i, settings.alpha0)
            insertion, theta_i = _nag_step(insertion, grad_i, theta_i, i, settings.alpha0)
        deletion, insertion = deletion.clamp(0, 1).detach(), insertion.clamp(0, 1).detach()
    return deletion, insertion


REFERENCES = {"igos": igos, "igos_plus": igos_plus, "igos_pp": igos_pp}


# ------------------------------------------------------------------------------------ runners


def _to_nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


_jax_draw = jax.jit(gaussian_noise, static_argnums=(3, 4))


def jax_noise(key: jax.Array, steps: int, size: tuple[int, int], dtype) -> Noise:
    """The reference's noise stream drawing jaxattr's values for one image: draw k of iteration t is
    `gaussian_noise(key, t, k)` (both number the draws in igos.md §9's order)."""

    def noise(iteration: int, draw: int, shape: tuple, torch_dtype: torch.dtype) -> torch.Tensor:
        if shape[:2] != (1, steps):
            raise ValueError(f"one image at a time: expected noise of shape (1, {steps}, 3, h, w), got {shape}")
        eps = _jax_draw(key, np.int32(iteration), np.int32(draw), (steps, *size, 3), np.dtype(dtype))
        return torch.from_numpy(np.ascontiguousarray(np.asarray(eps).transpose(0, 3, 1, 2)))[None].to(torch_dtype)

    return noise


def compare(variant: str, model, torch_model, images, targets, *, config=None, key=None):
    """(jaxattr masks, reference masks): iGOS++'s as (b, 2, s, s) (deletion, insertion), the others
    (b, s, s). Same normalised images and baselines, same noise, the reference one image at a time.
    `config`: jaxattr's settings (default: its defaults)."""
    key = jax.random.key(0) if key is None else key
    defaults = IGOSConfig() if variant == "igos" else IGOSPlusConfig()
    config = config or defaults
    result = igos_masks(model, images, targets, variant=variant, config=config, key=key)
    # The reference at its own settings, but for what the caller changed from jaxattr's defaults:
    # a jaxattr default that drifted from the reference's then fails the comparison.
    settings = Settings(**{
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(Settings)
        if hasattr(config, f.name) and getattr(config, f.name) != getattr(defaults, f.name)
    })
    dtype = images.dtype
    normalised = _to_nchw(model.normalise(images))
    baselines = _to_nchw(model.normalise(result.baselines.astype(dtype)))
    labels = torch.from_numpy(np.asarray(targets, np.int64))
    keys = image_keys(key, len(images))
    theirs = []
    for i in range(len(images)):
        noise = jax_noise(keys[i], settings.steps, images.shape[1:3], dtype)
        args = (normalised[i : i + 1], baselines[i : i + 1], labels[i : i + 1], settings, noise)
        with torch.enable_grad():
            out = REFERENCES[variant](torch_model.model, *args)
        if variant == "igos_pp":
            theirs.append(torch.cat(out, dim=1)[0].numpy())
        else:
            theirs.append(out[0, 0].numpy())
    ours = np.stack([result.deletion_mask, result.insertion_mask], axis=1) if variant == "igos_pp" else result.mask
    return np.asarray(ours), np.stack(theirs)


def _register(variant: str, description: str):
    @reference(
        variant,
        reference=f"PyTorch {description} written from igos.md (one image at a time, the same noise)",
        # Line-search decisions are discrete (§12.5): float32 rounding can flip an Armijo test and
        # change a step 5x; float64 follows the reference's decisions.
        tolerance={"float32": 1e-5, "float64": 1e-10},
        default_dtype="float64",
    )
    def runner(model, torch_model, images, targets, *, config=None, key=None):
        return compare(variant, model, torch_model, images, targets, config=config, key=key)

    return runner


igos_vs_reference = _register("igos", "I-GOS")
igos_plus_vs_reference = _register("igos_plus", "iGOS+")
igos_pp_vs_reference = _register("igos_pp", "iGOS++")
