"""Paper models and the registry: `dlmodels.models.get(name, **kw)`, `dlmodels.models.list()`."""

from dlmodels.models.registry import entry, get, list, register

__all__ = ["entry", "get", "list", "register"]
