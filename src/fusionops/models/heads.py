"""Built-in fusion heads. Each takes image and text vectors and exposes forward_features / forward_head."""

from __future__ import annotations

import torch
from torch import nn

from fusionops.models.core import register_head

MODALITIES = ("image", "text")


def _projection(in_dim: int, out_dim: int) -> nn.Sequential:
    # LayerNorm first: image vectors have norms near 30, text vectors are unit length; both arrive on one scale.
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim), nn.GELU())


class ConcatHead(nn.Module):
    """Project each modality, concatenate, and classify with an MLP."""

    def __init__(self, image_dim: int, text_dim: int, num_classes: int, *, proj_dim: int = 256,
                 hidden_dim: int = 512, dropout: float = 0.3, modalities: tuple[str, ...] = MODALITIES):
        super().__init__()
        unknown = set(modalities) - set(MODALITIES)
        if unknown or not modalities:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {modalities}")
        self.modalities = tuple(m for m in MODALITIES if m in modalities)
        dims = {"image": image_dim, "text": text_dim}
        self.proj = nn.ModuleDict({m: _projection(dims[m], proj_dim) for m in self.modalities})
        self.mlp = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(proj_dim * len(self.modalities), hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
        )
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def forward_features(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The fused embedding (for explanations, neighbours and drift)."""
        inputs = {"image": image, "text": text}
        return self.mlp(torch.cat([self.proj[m](inputs[m]) for m in self.modalities], dim=-1))

    def forward_head(self, z: torch.Tensor) -> torch.Tensor:
        return self.classifier(z)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(image, text))


@register_head
def concat(image_dim: int, text_dim: int, num_classes: int, **kwargs) -> ConcatHead:
    return ConcatHead(image_dim, text_dim, num_classes, **kwargs)
