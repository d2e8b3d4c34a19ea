"""The model zoo: one file per family, the registry of names (`build_model`, which injects the config's
normalization, including its BatchNorm grouping, as one `cnnjax.nn.Norm`), input and memory validation,
and the import of torchvision weights."""

from cnnjax.models.registry import MODELS, build_model, get_model_constructor

__all__ = ["MODELS", "build_model", "get_model_constructor"]
