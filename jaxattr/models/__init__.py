"""Flax ports of torchvision / timm classifiers, one file per family, and their registry."""

from jaxattr.models import resnet as resnet  # noqa: F401  (registers the family)
from jaxattr.models import vgg as vgg  # noqa: F401
from jaxattr.models import googlenet as googlenet  # noqa: F401
from jaxattr.models import vit as vit  # noqa: F401
from jaxattr.models import efficientnet_lite as efficientnet_lite  # noqa: F401
from jaxattr.models._classifier import Classifier as Classifier
from jaxattr.models._model import Head as Head, Model as Model, check_images as check_images
from jaxattr.models.registry import (
    ModelInfo as ModelInfo,
    WeightsNotFoundError as WeightsNotFoundError,
    create_model as create_model,
    list_models as list_models,
    model_info as model_info,
)
from jaxattr.models.weights import WeightsError as WeightsError
