"""Paper models and the registry: `dlmodels.models.get(name, **kw)`, `dlmodels.models.list()`."""

from dlmodels.models.registry import entry, get, list, register
from dlmodels.models.unet import UNet

__all__ = ["UNet", "entry", "get", "list", "register"]
