"""Attribution methods: pure, jit-compiled functions `method(forward, images, targets=None, *, config, key)`."""

from jaxattr.methods import gradients as gradients  # noqa: F401  (registers its methods)
from jaxattr.methods import gradcam as gradcam  # noqa: F401
from jaxattr.methods import guided_backprop as guided_backprop  # noqa: F401
from jaxattr.methods import integrated_gradients as integrated_gradients  # noqa: F401
from jaxattr.methods import guided_ig as guided_ig  # noqa: F401
from jaxattr.methods import blur_ig as blur_ig  # noqa: F401
from jaxattr.methods.registry import MethodInfo as MethodInfo, list_methods as list_methods, method_info as method_info
