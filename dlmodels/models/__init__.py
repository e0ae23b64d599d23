"""Paper models and the registry: `dlmodels.models.get(name, **kw)`, `dlmodels.models.list()`."""

from dlmodels.models.registry import entry, get, list, register
from dlmodels.models.resnet import (
    ResNet,
    ResNet18,
    ResNet34,
    ResNet50,
    ResNet50V2,
    ResNet101,
    ResNet101V2,
    ResNet152,
    ResNet152V2,
    feature_strides,
    resnet_features,
)
from dlmodels.models.unet import UNet

__all__ = [
    "ResNet",
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "ResNet50V2",
    "ResNet101",
    "ResNet101V2",
    "ResNet152",
    "ResNet152V2",
    "UNet",
    "entry",
    "feature_strides",
    "get",
    "list",
    "register",
    "resnet_features",
]
