"""Built-in fusion heads. Each takes image and text vectors and exposes forward_features / forward_head.

A missing modality is an all-zero vector: `concat` learns what to make of it (train.modality_dropout shows it
zeros in training), `gated` gives it no weight at all, and `attention` masks it out of its attention so it gets no
weight either. `gated` and `attention` report per-item modality weights (`gate_weights`, `attention_weights`).
"""

from __future__ import annotations

import torch
from torch import nn

from fusionops.models.core import register_head

MODALITIES = ("image", "text")


def _projection(in_dim: int, out_dim: int) -> nn.Sequential:
    # LayerNorm first: image vectors have norms near 30, text vectors are unit length; both arrive on one scale.
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim), nn.GELU())


def _checked(modalities: tuple[str, ...]) -> tuple[str, ...]:
    unknown = set(modalities) - set(MODALITIES)
    if unknown or not modalities:
        raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {modalities}")
    return tuple(m for m in MODALITIES if m in modalities)


def _mlp(in_dim: int, hidden_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout))


class FusionHead(nn.Module):
    """What every head shares: forward = forward_head(forward_features(image, text)), a linear classifier."""

    classifier: nn.Linear
    modalities: tuple[str, ...]
    proj: nn.ModuleDict

    def _project(self, image_dim: int, text_dim: int, proj_dim: int, modalities: tuple[str, ...]) -> None:
        """The modalities used (checked, in MODALITIES order) and a projection of each to `proj_dim`."""
        self.modalities = _checked(modalities)
        dims = {"image": image_dim, "text": text_dim}
        self.proj = nn.ModuleDict({m: _projection(dims[m], proj_dim) for m in self.modalities})

    def _present(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(batch, M) booleans: the modalities each item has (a missing one is an all-zero vector)."""
        return torch.stack([inputs[m].abs().amax(-1) > 0 for m in self.modalities], dim=-1)

    def forward_features(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, z: torch.Tensor) -> torch.Tensor:
        return self.classifier(z)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(image, text))


class ConcatHead(FusionHead):
    """Project each modality, concatenate, and classify with an MLP."""

    def __init__(self, image_dim: int, text_dim: int, num_classes: int, *, proj_dim: int = 256,
                 hidden_dim: int = 512, dropout: float = 0.3, modalities: tuple[str, ...] = MODALITIES):
        super().__init__()
        self._project(image_dim, text_dim, proj_dim, modalities)
        self.mlp = _mlp(proj_dim * len(self.modalities), hidden_dim, dropout)
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def forward_features(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The fused embedding (for explanations, neighbours and drift)."""
        inputs = {"image": image, "text": text}
        return self.mlp(torch.cat([self.proj[m](inputs[m]) for m in self.modalities], dim=-1))


@register_head
def concat(image_dim: int, text_dim: int, num_classes: int, **kwargs) -> ConcatHead:
    return ConcatHead(image_dim, text_dim, num_classes, **kwargs)


class GatedHead(FusionHead):
    """Per-sample modality weights: a gate reads every projected modality and mixes them into one vector.

    The weights are the model's own statement of how much it trusts each modality for this item
    (`gate_weights`, used by explanations); a missing (all-zero) modality gets weight 0.
    """

    def __init__(self, image_dim: int, text_dim: int, num_classes: int, *, proj_dim: int = 256,
                 hidden_dim: int = 512, dropout: float = 0.3, modalities: tuple[str, ...] = MODALITIES):
        super().__init__()
        self._project(image_dim, text_dim, proj_dim, modalities)
        self.gate = nn.Linear(proj_dim * len(self.modalities), len(self.modalities))
        self.mlp = _mlp(proj_dim, hidden_dim, dropout)
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def _mix(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = {"image": image, "text": text}
        present = self._present(inputs)
        projected = torch.stack([self.proj[m](inputs[m]) * present[:, i, None]
                                 for i, m in enumerate(self.modalities)], dim=1)  # (batch, M, proj)
        logits = self.gate(projected.flatten(1)).masked_fill(~present, float("-inf"))
        # An item with no modality at all gets equal weights over nothing (zeros), not NaNs.
        weights = torch.where(present.any(-1, keepdim=True), logits.softmax(-1), torch.zeros_like(logits))
        return weights, projected

    def gate_weights(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each modality's weight, per item (rows sum to 1)."""
        weights, _ = self._mix(image, text)
        return {m: weights[:, i] for i, m in enumerate(self.modalities)}

    def forward_features(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        weights, projected = self._mix(image, text)
        return self.mlp((weights.unsqueeze(-1) * projected).sum(1))


@register_head
def gated(image_dim: int, text_dim: int, num_classes: int, **kwargs) -> GatedHead:
    return GatedHead(image_dim, text_dim, num_classes, **kwargs)


def _num_heads(dim: int, preferred: int = 4) -> int:
    """The most attention heads, up to `preferred`, that divide `dim`."""
    return next(h for h in range(min(preferred, dim), 0, -1) if dim % h == 0)


class AttentionHead(FusionHead):
    """Cross-modal attention over modality tokens, pooled by a learned query.

    Each modality is projected to a token, plus a learned modality-type embedding. One pre-LayerNorm transformer
    block (multi-head self-attention and a small feed-forward, both residual) lets the tokens read each other; a
    learned query then scores the resulting context-aware tokens (one attention head), and the fused vector is the
    weighted sum of each modality's own token (its normalised projection), classified by an MLP. The values come
    from before the block on purpose: there each token still holds one modality only, so the weights say how much of
    each modality the answer is built from (`attention_weights`, used by explanations), while the block lets each
    weight depend on both modalities. (With values taken after the block both tokens carry both modalities and the
    weights stay near 0.5 whatever the data.) A missing (all-zero) modality is masked out of both attentions: it
    gets weight 0 and its vector cannot change the answer.
    """

    def __init__(self, image_dim: int, text_dim: int, num_classes: int, *, proj_dim: int = 256,
                 hidden_dim: int = 512, dropout: float = 0.3, modalities: tuple[str, ...] = MODALITIES,
                 num_heads: int = 4):
        super().__init__()
        self._project(image_dim, text_dim, proj_dim, modalities)
        self.type_embedding = nn.Parameter(torch.randn(len(self.modalities), proj_dim) * 0.02)
        self.attn_norm = nn.LayerNorm(proj_dim)
        self.attn = nn.MultiheadAttention(proj_dim, _num_heads(proj_dim, num_heads), batch_first=True)
        self.ff_norm = nn.LayerNorm(proj_dim)
        self.ff = nn.Sequential(nn.Linear(proj_dim, 2 * proj_dim), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(2 * proj_dim, proj_dim))
        self.query = nn.Parameter(torch.randn(1, 1, proj_dim) * 0.02)
        self.key_norm = nn.LayerNorm(proj_dim)
        self.pool = nn.MultiheadAttention(proj_dim, 1, batch_first=True)  # one head: one weight per modality
        self.mlp = _mlp(proj_dim, hidden_dim, dropout)
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def _attend(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pooled summary (batch, proj) and the query's weight on each modality (batch, M)."""
        inputs = {"image": image, "text": text}
        present = self._present(inputs)
        any_present = present.any(-1, keepdim=True)
        # Masking every key of an item with no modality at all would be a softmax over nothing (NaN, and NaN
        # gradients): such an item attends over its zero-vector tokens instead, and its results are zeroed below.
        ignore = ~present & any_present
        tokens = torch.stack([self.proj[m](inputs[m]) for m in self.modalities], dim=1) + self.type_embedding
        own = self.attn_norm(tokens)  # (batch, M, proj): each row one modality only
        context = tokens + self.attn(own, own, own, key_padding_mask=ignore, need_weights=False)[0]
        context = context + self.ff(self.ff_norm(context))
        pooled, weights = self.pool(self.query.expand(len(tokens), -1, -1), self.key_norm(context), own,
                                    key_padding_mask=ignore, need_weights=True)
        pooled, weights = pooled.squeeze(1), weights.squeeze(1)
        return torch.where(any_present, pooled, 0.0), torch.where(any_present, weights, 0.0)

    def attention_weights(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each modality's weight in the fused vector, per item (rows sum to 1; a missing modality gets 0)."""
        _, weights = self._attend(image, text)
        return {m: weights[:, i] for i, m in enumerate(self.modalities)}

    def forward_features(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The fused embedding (for explanations, neighbours and drift)."""
        pooled, _ = self._attend(image, text)
        return self.mlp(pooled)


@register_head
def attention(image_dim: int, text_dim: int, num_classes: int, **kwargs) -> AttentionHead:
    return AttentionHead(image_dim, text_dim, num_classes, **kwargs)
