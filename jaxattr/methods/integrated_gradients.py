"""Integrated Gradients (Sundararajan et al., 2017) and GNL-IG (Kwon et al., ICPR 2020).

Both are the straight-line path integral of `jaxattr.paths`:
    IG(x) = (x - x') ⊙ Σ_k w_k ∇score(x' + t_k (x - x')).
GNL-IG is the same integral on the model whose ReLU / ReLU6 / max-pool backward rules are the
guided ones (gnl.md §2.4): only the gradients change, so it satisfies no completeness.

Precision: computation in the images' dtype (float64 with x64 enabled). With a jaxattr Model the
path is built in the model's normalised space, as captum builds it on normalised inputs
(`straight_image_path`), so float32 points near the 'mean' baseline keep their precision. The
captum rules' weights are the float32 values modern captum multiplies by; 'gausslegendre64' keeps
the float64 Gauss-Legendre weights of captum 0.2.0, which GNL pins (a ~1e-8 relative difference,
visible only in float64).
"""

from __future__ import annotations

import jax
from jaxtyping import Array, Float

from jaxattr import maps, paths
from jaxattr.config import AUTO_CHUNK, Chunk, Config, ConfigError, Footprint, chunk_size, config, number, pass_count, static
from jaxattr.maps import Contrast
from jaxattr.methods._common import Output, require_model, resolve_targets, straight_image_path
from jaxattr.methods.base import MethodSpec, register, run_compiled
from jaxattr.methods.baselines import Baseline, baseline_images, broadcast_baselines
from jaxattr.paths import Rule


@config
class IntegratedGradientsConfig(Config):
    """captum `IntegratedGradients.attribute` defaults."""

    steps: int = static(50, pass_count())  # captum n_steps (each rule has its minimum)
    # captum's method names ('gausslegendre64': captum 0.2.0's float64 weights), PAIR's 'pair', I-GOS's 'igos'
    rule: Rule = static("gausslegendre")
    baseline: Baseline = static("black")  # a `baselines=` array overrides it
    # Steps evaluated per gradient batch: memory and speed, never results (captum's
    # internal_batch_size / batch size). "auto": chosen from the batch (`resolve_chunks`); None:
    # all steps at once.
    chunk: Chunk = static(AUTO_CHUNK, chunk_size())
    output: Output = static("logit")  # differentiate the target's logit or its softmax probability
    blur_sigma: float = static(50.0, number(0))  # sigma of the 'blur' baseline (Blur IG's max_sigma)

    def validate_fields(self) -> None:
        try:
            paths.check_rule(self.rule, self.steps)
        except ValueError as e:
            raise ConfigError("steps", str(e)) from None

    def needs_key(self) -> bool:
        return self.baseline == "uniform"

    def footprint(self, image_shape: tuple[int, ...]) -> Footprint:
        return Footprint(passes=min(self.chunk or self.steps, self.steps), fixed_bytes=paths.quadrature_bytes(self.rule, self.steps))


@jax.jit
def _straight_line_ig(forward, images, targets, key, config: IntegratedGradientsConfig, baselines):
    targets = resolve_targets(forward, images, targets)
    if baselines is None:
        baselines = baseline_images(config.baseline, forward, images, key=key, blur_sigma=config.blur_sigma)
    starts = broadcast_baselines(baselines, images)
    score, path = straight_image_path(forward, starts, images, targets, config.output)
    rule = paths.quadrature(config.rule, config.steps)
    return paths.integrate(score, path, rule, chunk=config.chunk)


def integrated_gradients(
    model,
    images: Float[Array, "b h w 3"],
    targets=None,
    *,
    baselines: Float[Array, "*f"] | None = None,
    config: IntegratedGradientsConfig = IntegratedGradientsConfig(),
    key: jax.Array | None = None,
) -> Float[Array, "b h w 3"]:
    """Integrated Gradients of each image's target (default: its predicted class).

    `baselines`: an optional array broadcastable to the images (per image, one image, a colour);
    otherwise `config.baseline` names one ('uniform' needs `key`)."""
    return run_compiled(
        _straight_line_ig, IntegratedGradientsConfig, model, images, targets, config=config, key=key, baselines=baselines
    )


@config
class GnlIGConfig(IntegratedGradientsConfig):
    """GNL's settings (gnl.md §2.5): 50 Gauss-Legendre nodes, the logit, and captum's zero baseline
    on normalised inputs, which in pixel space is the model's mean colour."""

    baseline: Baseline = static("mean")


def gnl_ig(
    model,
    images: Float[Array, "b h w 3"],
    targets=None,
    *,
    baselines: Float[Array, "*f"] | None = None,
    config: GnlIGConfig = GnlIGConfig(),
    key: jax.Array | None = None,
) -> Float[Array, "b h w 3"]:
    """Integrated Gradients with Guided Non-Linearity: IG on `model.with_nonlinearity("guided")`.

    Targets default to the predicted class (the guided rules leave the forward pass unchanged)."""
    guided = require_model(model, "gnl_ig", "switches the model's ReLU/max-pool backward rules").with_nonlinearity("guided")
    return run_compiled(_straight_line_ig, GnlIGConfig, guided, images, targets, config=config, key=key, baselines=baselines)


register(
    MethodSpec(
        "integrated_gradients",
        integrated_gradients,
        IntegratedGradientsConfig,
        "path integral of the gradient from a baseline to the image (captum defaults)",
        saliency=maps.abs_sum,
        contrast=Contrast("min", 99.0),
        takes_baselines=True,
    )
)
register(
    MethodSpec(
        "gnl_ig",
        gnl_ig,
        GnlIGConfig,
        "Integrated Gradients with guided ReLU/max-pool backward rules (GNL)",
        # GNL's map |sum_c a|; it divides by the maximum, the display clips at the 99th percentile
        # (the raw maximum is one dot on the embedded model).
        saliency=maps.abs_of_sum,
        contrast=Contrast("zero", 99.0),
        needs_model=True,
        takes_baselines=True,
    )
)
