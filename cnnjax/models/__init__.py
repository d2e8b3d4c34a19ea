"""The model zoo: one file per family, and the registry of names."""

from cnnjax.models.registry import MODELS, build_model, get_model_constructor

__all__ = ["MODELS", "build_model", "get_model_constructor"]
