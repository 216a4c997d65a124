"""Why the model said what it said: top classes, each modality's contribution, and the nearest training items.

Contribution: the predicted class's probability with everything, with the image removed and with the text removed
(a removed modality is a zero vector, exactly what a missing one is at prediction time), and the drop each removal
causes; plus the head's own per-modality weights when it has them (`gate_weights`, `attention_weights`).

Neighbours: the training items whose fused embedding (`head.forward_features`) is closest by cosine similarity. The
train stage writes that index next to the model (`write_neighbours`): neighbours.safetensors holds the
L2-normalised embeddings (float16), neighbours.csv the items, row for row. A model folder without them (trained
before the index existed) still explains, without neighbours.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch
import torch.nn.functional as F

from fusionops.atomic import atomic_path
from fusionops.errors import UserError
from fusionops.models.heads import MODALITIES

if TYPE_CHECKING:
    from rich.console import RenderableType

    from fusionops.config import Params
    from fusionops.predict import Predictor

log = logging.getLogger(__name__)

NEIGHBOURS_EMBEDDINGS = "neighbours.safetensors"
NEIGHBOURS_ITEMS = "neighbours.csv"
ITEM_COLUMNS = ["item_id", "label", "image", "text"]
_WEIGHT_METHODS = (("gate", "gate_weights"), ("attention", "attention_weights"))
_warned: set[str] = set()


@torch.inference_mode()
def fused_embeddings(model: torch.nn.Module, image: torch.Tensor, text: torch.Tensor, *,
                     batch_size: int = 1024) -> torch.Tensor:
    """The head's fused embedding of every item (eval mode, batched), L2-normalised, float32."""
    model.eval()
    return torch.cat([  # no items still yields (0, dim)
        F.normalize(model.forward_features(image[s:s + batch_size].float(), text[s:s + batch_size].float()).float(),
                    dim=1)
        for s in range(0, max(len(image), 1), batch_size)])


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_neighbours(folder: Path, model: torch.nn.Module, image: torch.Tensor, text: torch.Tensor,
                     items: pd.DataFrame) -> None:
    """The neighbour index of a trained model: the training items' fused embeddings and the items themselves.

    `items` (columns item_id, label, image, text) are the rows the tensors hold, in the same order. The embedding
    file records the items file's sha256 (and the weights' when they are already saved), so a reader can tell a
    matching pair from a stale or half-written one.
    """
    from safetensors.torch import save_file

    from fusionops.models import WEIGHTS_FILE

    folder = Path(folder)
    missing = [c for c in ITEM_COLUMNS if c not in items.columns]
    if missing:
        raise ValueError(f"neighbour items need columns {ITEM_COLUMNS}; missing {missing}")
    if not len(items) == len(image) == len(text):
        raise ValueError(f"{len(items)} items but {len(image)} image and {len(text)} text vectors")
    embeddings = fused_embeddings(model, image, text).to(torch.float16).contiguous()
    with atomic_path(folder / NEIGHBOURS_ITEMS) as tmp:
        items[ITEM_COLUMNS].astype(str).to_csv(tmp, index=False)
        items_sha256 = _sha256(tmp)
    metadata = {"items_sha256": items_sha256, "rows": str(len(items))}
    if (folder / WEIGHTS_FILE).is_file():
        metadata["model_sha256"] = _sha256(folder / WEIGHTS_FILE)
    with atomic_path(folder / NEIGHBOURS_EMBEDDINGS) as tmp:
        # One metadata key: safetensors stores several in a hash map, in an order that changes from run to run,
        # and the file must be byte-identical when the model is (DVC hashes it).
        save_file({"embeddings": embeddings}, str(tmp), metadata={"index": json.dumps(metadata, sort_keys=True)})
    log.debug("neighbour index of %d training items written to %s", len(items), folder)


@dataclass(frozen=True)
class NeighbourIndex:
    embeddings: torch.Tensor  # (items, dim) float32, unit rows
    items: pd.DataFrame  # item_id, label, image, text


def _file_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def _warn_once(folder: Path, message: str) -> None:
    key = str(Path(folder).resolve())
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def load_neighbours(folder: Path | str) -> NeighbourIndex | None:
    """The model folder's neighbour index, or None (with one warning per folder) when it has none usable."""
    folder = Path(folder)
    emb_path, items_path = folder / NEIGHBOURS_EMBEDDINGS, folder / NEIGHBOURS_ITEMS
    if not (emb_path.is_file() and items_path.is_file()):
        _warn_once(folder, f"{folder} has no neighbour index ({NEIGHBOURS_EMBEDDINGS}, {NEIGHBOURS_ITEMS}): "
                           "explanations come without the nearest training items; train the model again to add it")
        return None
    try:
        return _load_index(_file_key(emb_path), _file_key(items_path))
    except (OSError, ValueError, KeyError, pd.errors.ParserError) as err:
        _warn_once(folder, f"the neighbour index in {folder} is not usable ({err}): explanations come without the "
                           "nearest training items; train the model again to rewrite it")
        return None


@lru_cache(maxsize=4)
def _load_index(emb_key: tuple[str, int, int], items_key: tuple[str, int, int]) -> NeighbourIndex:
    """Read (and check) an index once per file version."""
    from safetensors import safe_open

    emb_path, items_path = Path(emb_key[0]), Path(items_key[0])
    with safe_open(str(emb_path), framework="pt") as f:
        metadata = json.loads((f.metadata() or {}).get("index", "{}"))
        embeddings = f.get_tensor("embeddings").float()
    if metadata.get("items_sha256") != _sha256(items_path):
        raise ValueError(f"{items_path.name} does not belong to {emb_path.name} (written by another training run)")
    model_sha256 = metadata.get("model_sha256")
    from fusionops.models import WEIGHTS_FILE

    weights = emb_path.parent / WEIGHTS_FILE
    if model_sha256 and weights.is_file() and _sha256(weights) != model_sha256:
        raise ValueError(f"it was computed with other weights than {WEIGHTS_FILE}")
    items = pd.read_csv(items_path, dtype=str, keep_default_na=False)
    if list(items.columns) != ITEM_COLUMNS or len(items) != len(embeddings):
        raise ValueError(f"{items_path.name} has {len(items)} rows / columns {list(items.columns)}, "
                         f"{emb_path.name} {len(embeddings)} rows")
    return NeighbourIndex(F.normalize(embeddings, dim=1), items)


@torch.inference_mode()
def _nearest(index: NeighbourIndex, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, rows) of the k nearest index items of each query, in chunks that bound the memory."""
    k = min(k, len(index.embeddings))
    chunk = max(1, 16_000_000 // max(len(index.embeddings), 1))
    sims, rows = [], []
    for s in range(0, len(queries), chunk):
        top = (queries[s:s + chunk] @ index.embeddings.T).topk(k, dim=1)
        sims.append(top.values)
        rows.append(top.indices)
    return torch.cat(sims), torch.cat(rows)


@torch.inference_mode()
def _modality_weights(head: torch.nn.Module, image: torch.Tensor, text: torch.Tensor,
                      batch_size: int = 1024) -> tuple[str | None, dict[str, torch.Tensor]]:
    """The head's own per-modality weights (gated: gate_weights, attention: attention_weights), if it has any."""
    for kind, method in _WEIGHT_METHODS:
        fn = getattr(head, method, None)
        if callable(fn):
            parts = [fn(image[s:s + batch_size], text[s:s + batch_size]) for s in range(0, len(image), batch_size)]
            return kind, {m: torch.cat([p[m] for p in parts]).float() for m in parts[0]} if parts else {}
    return None, {}


def explain(predictor: Predictor, images: Sequence[Path | str | bytes | None], texts: Sequence[str | None], *,
            top: int = 3, neighbours: int = 5, progress: bool = False) -> list[dict]:
    """One explanation per item (images and texts as for Predictor.predict; a missing one is None or empty).

    Each is a dict: `label` and `confidence` (as Predictor.predict), `modalities` (what the head classified from),
    `top` ([{label, probability}], most probable first, temperature-scaled as predict), `contributions`
    ({image|text: {present, without, drop[, weight]}}: the most probable class's (multi-label: tag's) probability
    without that modality and
    how much it drops; None for the only modality present, since nothing would be left; 0 drop for an absent one),
    `weights` (which weights the head reported: "gate", "attention" or None) and `neighbours`
    ([{item_id, label, text, image, similarity}], nearest first; None when the model has no neighbour index).
    """
    from fusionops.train import predict_logits

    if top < 1:
        raise UserError(f"top must be at least 1, not {top}")
    if neighbours < 0:
        raise UserError(f"neighbours must be 0 or more, not {neighbours}")
    if len(images) == len(texts) == 0:
        return []
    head, labels = predictor.head, predictor.labels
    image, text = predictor.encode(images, texts, progress=progress)
    n = len(image)
    used = set(getattr(head, "modalities", MODALITIES))
    inputs = {"image": image, "text": text}
    # What each item has that the head looks at (a one-modality head ignores the other one entirely).
    present = {m: (inputs[m].abs().amax(1) > 0) & (m in used) for m in MODALITIES}

    # One pass over all three versions of every item: as given, without the image, without the text.
    logits = predict_logits(head, torch.cat([image, torch.zeros_like(image), image]),
                            torch.cat([text, text, torch.zeros_like(text)]))
    task = predictor.task
    probs = torch.from_numpy(task.probabilities(logits, predictor.temperature))
    full, without = probs[:n], {"image": probs[n:2 * n], "text": probs[2 * n:]}
    decisions = task.decide(full.numpy())
    names, confidence = task.names(decisions), task.confidence(full.numpy(), decisions)
    predicted = full.argmax(1)  # the class whose probability the contributions follow (multi-label: the top tag)
    rows = torch.arange(n)
    p_full = full[rows, predicted]
    p_without = {m: torch.where(present[m], without[m][rows, predicted], p_full) for m in MODALITIES}
    top_p, top_i = full.topk(min(top, len(labels)), dim=1)
    kind, weights = _modality_weights(head, image, text)

    index = load_neighbours(predictor.folder) if neighbours > 0 else None
    near = None
    if index is not None:
        queries = fused_embeddings(head, image, text)
        if queries.shape[1] != index.embeddings.shape[1]:
            _warn_once(predictor.folder, f"the neighbour index in {predictor.folder} holds {index.embeddings.shape[1]}-"
                                         f"dim embeddings, the model makes {queries.shape[1]}: explaining without "
                                         "neighbours")
            index = None
        else:
            near = _nearest(index, queries, neighbours)

    only = {m: present[m] & ~torch.stack([present[o] for o in MODALITIES if o != m]).any(0) for m in MODALITIES}
    results = []
    for i in range(n):
        contributions = {}
        for m in MODALITIES:
            c = {"present": bool(present[m][i])}
            if only[m][i]:
                c.update(without=None, drop=None)  # nothing would be left to classify from
            else:
                c.update(without=round(float(p_without[m][i]), 6),
                         drop=round(float(p_full[i] - p_without[m][i]), 6) if present[m][i] else 0.0)
            if kind is not None:
                c["weight"] = round(float(weights[m][i]), 6) if m in weights else 0.0
            contributions[m] = c
        result = {
            "label": names[i],
            "confidence": round(float(confidence[i]), 6),
            "modalities": "+".join(m for m in MODALITIES if present[m][i]),
            "top": [{"label": labels[int(j)], "probability": round(float(p), 6)}
                    for p, j in zip(top_p[i], top_i[i], strict=True)],
            "contributions": contributions,
            "weights": kind,
            "neighbours": None,
        }
        if near is not None:
            sims, idx = near
            result["neighbours"] = [{**index.items.iloc[int(j)].to_dict(), "similarity": round(float(s), 4)}
                                    for s, j in zip(sims[i], idx[i], strict=True)]
        elif neighbours == 0:
            result["neighbours"] = []
        results.append(result)
    return results


def load_predictor(model: str, params: Params) -> Predictor:
    """A model folder (e.g. models/fusion) directly, or an MLflow model URI (models:/name@alias, runs:/...)."""
    from fusionops.predict import Predictor

    path = Path(model)
    if path.is_dir() and not (path / "MLmodel").is_file():  # a trained folder, not one MLflow exported
        return Predictor(path, quantize=params.registry.quantize)  # as the registered model would serve
    if not path.is_dir() and "://" not in model and not model.startswith(("models:/", "runs:/")):
        raise UserError(f"{model} is neither a model folder ({path.absolute()} is none) nor an MLflow model URI "
                        "(give e.g. models/fusion or models:/<name>@champion)")
    from mlflow.exceptions import MlflowException

    from fusionops.registry import load_pyfunc

    try:
        python_model = load_pyfunc(model, params).unwrap_python_model()
    except MlflowException:
        raise UserError(f"{model} is not a fusionops model (an MLflow model of another kind)") from None
    predictor = getattr(python_model, "predictor", None)
    if predictor is None:
        raise UserError(f"{model} is not a fusionops model (its python model holds no predictor)")
    return predictor


def summary(explanation: dict) -> RenderableType:
    """A readable rich rendering of one explanation."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    label = explanation["label"]
    parts: list = [Text.assemble("prediction ", (label, "bold"), f"  {explanation['confidence']:.3f}",
                                 f"  (from {explanation['modalities']})")]
    classes = Table("class", "probability", title="top classes", title_justify="left", box=None)
    for t in explanation["top"]:
        classes.add_row(Text(t["label"]), f"{t['probability']:.3f}")
    parts.append(classes)
    kind = explanation["weights"]
    followed = explanation["top"][0]["label"]  # the class the contributions follow (multi-label: the top tag)
    contrib = Table("modality", "present", f"P({escape(followed)}) without it", "drop",
                    *([f"{kind} weight"] if kind else []), title="contributions", title_justify="left", box=None)
    for m, c in explanation["contributions"].items():
        if c["without"] is None:
            without, drop = "-", "(only modality)"
        else:
            without, drop = f"{c['without']:.3f}", f"{c['drop']:+.3f}"
        contrib.add_row(m, "yes" if c["present"] else "no", without, drop,
                        *([f"{c['weight']:.3f}"] if kind else []))
    parts.append(contrib)
    if explanation["neighbours"] is None:
        parts.append(Text("nearest training items: not available (the model has no neighbour index)", style="dim"))
    elif explanation["neighbours"]:
        near = Table("similarity", "item", "label", "text", title="nearest training items", title_justify="left",
                     box=None)
        near.add_column("image", overflow="fold")  # a path is no use cut short
        for nb in explanation["neighbours"]:
            near.add_row(f"{nb['similarity']:.3f}", Text(nb["item_id"]), Text(nb["label"]), Text(nb["text"]),
                         Text(nb["image"]))
        parts.append(near)
    return Group(*parts)
