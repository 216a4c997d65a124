"""Fusion heads: build one by name (train.head in params.yaml), save and load it."""

from fusionops.models import heads  # noqa: F401  (registers the built-in heads)
from fusionops.models.core import HEADS, create_head, load_model, register_head, save_model

__all__ = ["HEADS", "create_head", "load_model", "register_head", "save_model"]
