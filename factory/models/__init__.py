"""Model registry; importing this package registers every seed architecture."""

from factory.models import (  # noqa: F401  (register themselves)
    fastfacenet,
    lefv,
    mobileface_v2,
    mobilefacenet,
    seesawfacenet,
)
from factory.models.loading import load_backbone, weights_provenance
from factory.models.registry import ImportedWeights, create_model, model_entry, model_names, register_model

__all__ = ["ImportedWeights", "create_model", "load_backbone", "model_entry", "model_names", "register_model",
           "weights_provenance"]
