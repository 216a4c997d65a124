"""The head registry, and saving/loading a trained head (safetensors + JSON, nothing pickled)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from fusionops.atomic import atomic_dir
from fusionops.errors import UserError

HEADS: dict[str, Callable[..., torch.nn.Module]] = {}

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TEXT_ENCODER_DIR = "text_encoder"  # a model's own (tuned) text encoder, when it has one


def register_head(fn: Callable[..., torch.nn.Module]) -> Callable[..., torch.nn.Module]:
    """Make a head buildable by name from params.yaml (train.head)."""
    HEADS[fn.__name__] = fn
    return fn


def create_head(name: str, **kwargs) -> torch.nn.Module:
    if name not in HEADS:
        raise UserError(f"unknown head {name!r} in train.head; known heads: {', '.join(sorted(HEADS))}")
    return HEADS[name](**kwargs)


def save_model(folder: Path, model: torch.nn.Module, config: dict, *, text_encoder: Path | None = None) -> None:
    """Write the head's weights and everything needed to rebuild it (head name, kwargs, labels, encoders); with
    `text_encoder`, a copy of that (tuned) encoder's folder as TEXT_ENCODER_DIR beside them."""
    from safetensors.torch import save_file

    with atomic_dir(folder) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if text_encoder is not None:
            shutil.copytree(text_encoder, tmp / TEXT_ENCODER_DIR)


def load_model(folder: Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild a saved head in eval mode; weights come from safetensors, so loading runs no code from the file."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise UserError(f"{folder} holds no trained model ({CONFIG_FILE} missing): run `fusionops train` first")
    config = json.loads((folder / CONFIG_FILE).read_text())
    model = create_head(config["head"], **config["head_kwargs"])
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE), device=str(device)))
    return model.to(device).eval(), config

