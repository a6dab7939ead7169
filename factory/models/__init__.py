"""Model registry; importing this package registers every seed architecture."""

from factory.models import fastfacenet, lefv, mobilefacenet, seesawfacenet  # noqa: F401  (register themselves)
from factory.models.registry import create_model, model_entry, model_names, register_model

__all__ = ["create_model", "model_entry", "model_names", "register_model"]
