"""Attribution methods: one module per family, each a public function with an honest signature, a
config class and a registered `MethodSpec` (see `jaxattr.methods.base`)."""

from jaxattr.methods import gradients as gradients  # noqa: F401  (each module registers its methods)
from jaxattr.methods import gradcam as gradcam  # noqa: F401
from jaxattr.methods import guided_backprop as guided_backprop  # noqa: F401
from jaxattr.methods import integrated_gradients as integrated_gradients  # noqa: F401
from jaxattr.methods import guided_ig as guided_ig  # noqa: F401
from jaxattr.methods import blur_ig as blur_ig  # noqa: F401
from jaxattr.methods import igos as igos  # noqa: F401
from jaxattr.methods import ig2 as ig2  # noqa: F401
from jaxattr.methods import iia as iia  # noqa: F401
from jaxattr.methods._common import path_scores as path_scores
from jaxattr.methods._common import straight_image_path as straight_image_path
from jaxattr.methods.base import (
    Attribution as Attribution,
    ExtraOutput as ExtraOutput,
    Method as Method,
    MethodSpec as MethodSpec,
    list_methods as list_methods,
    make_config as make_config,
    resolve_chunks as resolve_chunks,
    method_spec as method_spec,
)


def method(name: str, config=None, **overrides) -> Method:
    """The registered method `name` bound to `config` (default: its reference defaults) with
    `overrides` applied, e.g. `method("integrated_gradients", steps=16)`: an `Attribution`."""
    return method_spec(name).build(config, **overrides)
