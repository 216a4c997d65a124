"""Fusion heads: build one by name (train.head in params.yaml), save and load it."""

from fusionops.models import heads  # noqa: F401  (registers the built-in heads)
from fusionops.models.core import (
    CONFIG_FILE,
    HEADS,
    TEXT_ENCODER_DIR,
    WEIGHTS_FILE,
    create_head,
    load_model,
    register_head,
    save_model,
)

__all__ = ["CONFIG_FILE", "HEADS", "TEXT_ENCODER_DIR", "WEIGHTS_FILE", "create_head", "load_model", "register_head",
           "save_model"]
