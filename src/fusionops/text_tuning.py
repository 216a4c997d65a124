"""Fine-tuning the text encoder (train.text_encoder: finetune): the encoder learns together with a text-only head.

Items point into a table of the manifest's distinct texts, tokenized once; a training step encodes each distinct
text of its batch once, and the batches are cut so that every item of a text lands in the same one: one forward
pass per distinct text per epoch. The image side stays on its cached vectors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fusionops.config import TextFinetuneParams
from fusionops.errors import UserError
from fusionops.features.text import TextEncoder, pool


class TextTable:
    """The distinct texts, tokenized once (padded to the longest; a batch is cut to its own longest)."""

    def __init__(self, texts: Sequence[str], encoder: TextEncoder):
        self.texts = sorted(set(texts))
        self._index = {t: i for i, t in enumerate(self.texts)}
        self.tokens = dict(encoder.tokenizer(self.texts, padding=True, truncation=True,
                                             max_length=encoder.max_length, return_tensors="pt"))
        self.lengths = self.tokens["attention_mask"].sum(1)

    def ids(self, texts: Sequence[str]) -> torch.Tensor:
        """Each text's row in the table."""
        return torch.tensor([self._index[t] for t in texts], dtype=torch.long)

    def batch(self, ids: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """The tokens of these rows, cut to their longest text, on `device` (pinned first on a GPU)."""
        longest = int(self.lengths[ids].max()) if len(ids) else 1
        out = {}
        for key, value in self.tokens.items():
            part = value[ids, :longest]
            if device.type == "cuda":
                part = part.pin_memory()
            out[key] = part.to(device, non_blocking=True)
        return out


class TunedText(nn.Module):
    """A head reading texts through an encoder that trains with it: forward(image, text rows of a TextTable)."""

    def __init__(self, encoder: nn.Module, head: nn.Module, table: TextTable, pooling: str):
        super().__init__()
        self.encoder, self.head = encoder, head
        self.table, self.pooling = table, pooling

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """Vectors of distinct table rows, as the frozen encoder makes them: pooled, L2-normalised."""
        device = next(self.encoder.parameters()).device
        tokens = self.table.batch(ids.cpu(), device)
        hidden = self.encoder(**tokens).last_hidden_state
        return pool(hidden.float(), tokens["attention_mask"], self.pooling)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        distinct, rows = torch.unique(text, return_inverse=True)
        return self.head(image, self.encode(distinct)[rows])


def transformer_layers(encoder: nn.Module) -> nn.ModuleList:
    """The encoder's stack of transformer layers (BERT's encoder.layer, DistilBERT's transformer.layer, ...)."""
    count = getattr(encoder.config, "num_hidden_layers", None) or getattr(encoder.config, "n_layers", None)
    stacks = [m for m in encoder.modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    if not stacks:
        raise UserError(f"cannot find the {count} transformer layers of the text encoder "
                        f"{type(encoder).__name__}: use train.text_encoder: frozen with it")
    return stacks[0]


def parameter_groups(model: TunedText, head_lr: float, params: TextFinetuneParams) -> list[dict]:
    """What the optimizer trains: the head at `head_lr`; the top `layers` transformer layers at params.lr, each
    layer below at layer_decay times the rate of the one above. Everything else (the embeddings, lower layers)
    stays as it was pretrained."""
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    layers = list(transformer_layers(model.encoder))
    count = len(layers) if params.layers == "all" else min(params.layers, len(layers))
    groups = [{"params": list(model.head.parameters()), "lr": head_lr}]
    for depth, layer in enumerate(reversed(layers[len(layers) - count:])):
        for p in layer.parameters():
            p.requires_grad_(True)
        groups.append({"params": list(layer.parameters()), "lr": params.lr * params.layer_decay ** depth})
    return groups


def text_batches(text: torch.Tensor, lengths: torch.Tensor, batch_texts: int,
                 generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch's batches of item positions: the distinct texts shuffled, cut into groups of `batch_texts` of
    similar length (sorted within windows of 64 groups, so padding stays short), each group with every item that
    has one of its texts; the groups in random order."""
    distinct, rows = torch.unique(text, return_inverse=True)
    order = torch.argsort(rows, stable=True)  # item positions grouped by their text
    items = dict(zip(distinct.tolist(), torch.split(order, torch.bincount(rows).tolist()), strict=True))
    shuffled = distinct[torch.randperm(len(distinct), generator=generator)]
    window = batch_texts * 64
    groups = []
    for start in range(0, len(shuffled), window):
        part = shuffled[start:start + window]
        groups += list(part[torch.argsort(lengths[part], stable=True)].split(batch_texts))
    return [torch.cat([items[t] for t in groups[i].tolist()]) for i in torch.randperm(len(groups),
                                                                                       generator=generator)]
