"""jaxattr: saliency maps for image classifiers as jit/vmap-compiled JAX functions.

Images are NHWC float arrays in [0, 1]; models normalise internally. A method is
`method(model, images, targets=None, *, config=..., key=None)` with a batch axis in and out, and
`jaxattr.method(name, **options)` binds one to its config as a value (an `Attribution`).
"""

from importlib.metadata import PackageNotFoundError, version as _version

from jaxattr import maps as maps, metrics as metrics, viz as viz
from jaxattr.blur import gaussian_blur as gaussian_blur
from jaxattr.config import ConfigError as ConfigError
from jaxattr.data import imagenet_labels as imagenet_labels
from jaxattr.explanation import Explanation as Explanation, explain as explain, method_config as method_config
from jaxattr.image import ImageLoadError as ImageLoadError, load_batch as load_batch, load_image as load_image
from jaxattr.maps import Contrast as Contrast
from jaxattr.memory import MemoryEstimateError as MemoryEstimateError, fit as fit_memory  # noqa: F401 (re-exported)
from jaxattr.methods import (
    Attribution as Attribution,
    Method as Method,
    MethodSpec as MethodSpec,
    list_methods as list_methods,
    method as method,
    method_spec as method_spec,
)
from jaxattr.methods.blur_ig import BlurIGConfig as BlurIGConfig, blur_ig as blur_ig
from jaxattr.methods.gradcam import GradCamConfig as GradCamConfig, gradcam as gradcam
from jaxattr.methods.gradients import (
    SaliencyConfig as SaliencyConfig,
    SmoothGradConfig as SmoothGradConfig,
    saliency as saliency,
    smoothgrad as smoothgrad,
)
from jaxattr.methods.guided_backprop import (
    GuidedBackpropConfig as GuidedBackpropConfig,
    guided_backprop as guided_backprop,
)
from jaxattr.methods.guided_ig import GuidedIGConfig as GuidedIGConfig, guided_ig as guided_ig
from jaxattr.methods.igos import (
    IGOSConfig as IGOSConfig,
    IGOSPlusConfig as IGOSPlusConfig,
    IGOSResult as IGOSResult,
    igos as igos,
    igos_masks as igos_masks,
    igos_plus as igos_plus,
    igos_pp as igos_pp,
)
from jaxattr.methods.ig2 import (
    GradPath as GradPath,
    IG2Config as IG2Config,
    IG2Result as IG2Result,
    gradpath as gradpath,
    ig2 as ig2,
    ig2_result as ig2_result,
    select_references as select_references,
)
from jaxattr.methods.iia import IIAConfig as IIAConfig, iia as iia, iia_layer_maps as iia_layer_maps
from jaxattr.methods.integrated_gradients import (
    GnlIGConfig as GnlIGConfig,
    IntegratedGradientsConfig as IntegratedGradientsConfig,
    gnl_ig as gnl_ig,
    integrated_gradients as integrated_gradients,
)
from jaxattr.models import (
    Head as Head,
    Model as Model,
    ModelInfo as ModelInfo,
    WeightsError as WeightsError,
    WeightsNotFoundError as WeightsNotFoundError,
    create_model as create_model,
    list_models as list_models,
    model_info as model_info,
)

try:
    __version__ = _version("jaxattr")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"
