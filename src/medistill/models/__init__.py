"""Model definitions; importing this package registers every named variant."""

from medistill.models import vit  # noqa: F401
from medistill.models.registry import MODELS, create_model, register_model

__all__ = ["MODELS", "create_model", "register_model"]
