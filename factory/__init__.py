"""The mobile face-model factory: recipes in, verified mobile artifacts out."""

__version__ = "0.1.0"
