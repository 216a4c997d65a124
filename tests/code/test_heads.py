"""The fusion heads on random tensors: missing modalities, per-item modality weights, a toy problem (no data)."""

import copy

import pytest
import torch

from fusionops.models import create_head


def _weights(head, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
    return head.attention_weights(image, text) if hasattr(head, "attention_weights") else head.gate_weights(image, text)


def _batch_with_gaps(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img, txt = torch.randn(5, 12, generator=g), torch.randn(5, 5, generator=g)
    txt[1] = 0  # item 1 has no text
    img[2] = 0  # item 2 has no image
    img[3], txt[3] = 0, 0  # item 3 has neither; items 0 and 4 are complete
    return img, txt


def test_attention_head_gives_a_missing_modality_no_weight_and_no_say():
    torch.manual_seed(0)
    head = create_head("attention", image_dim=12, text_dim=5, num_classes=3).eval()
    img, txt = _batch_with_gaps()
    weights = head.attention_weights(img, txt)
    assert weights["text"][1] == 0 and weights["image"][1] == 1
    assert weights["image"][2] == 0 and weights["text"][2] == 1
    assert torch.isfinite(head(img, txt)).all()
    # Whatever the image side of the head has learned, an item without image gets the same answer: the image
    # token is masked out of every attention, so neither its projection nor its type embedding reaches the output.
    other = copy.deepcopy(head)
    with torch.no_grad():
        for p in other.proj["image"].parameters():
            p.add_(torch.randn_like(p))
        other.type_embedding[0].add_(torch.randn_like(other.type_embedding[0]))
    assert torch.equal(head(img, txt)[2], other(img, txt)[2])
    assert not torch.equal(head(img, txt)[0], other(img, txt)[0])  # ...while a complete item does see it
    # ...and whatever the other rows of the batch hold.
    shuffled_img, shuffled_txt = img.clone(), txt.clone()
    shuffled_img[0], shuffled_txt[4] = torch.randn(12), torch.randn(5)
    assert torch.equal(head(img, txt)[1:4], head(shuffled_img, shuffled_txt)[1:4])


@pytest.mark.parametrize("name", ["gated", "attention"])
def test_an_item_with_no_modality_gets_finite_logits_and_gradients(name):
    torch.manual_seed(0)
    head = create_head(name, image_dim=12, text_dim=5, num_classes=3)
    img, txt = _batch_with_gaps()
    assert torch.isfinite(head.eval()(torch.zeros(2, 12), torch.zeros(2, 5))).all()
    weights = _weights(head, img, txt)
    assert weights["image"][3] == weights["text"][3] == 0
    head.train()(img, txt).logsumexp(-1).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", ["gated", "attention"])
def test_modality_weights_sum_to_one_over_present_modalities(name):
    torch.manual_seed(0)
    head = create_head(name, image_dim=12, text_dim=5, num_classes=3).eval()
    img, txt = _batch_with_gaps()
    weights = _weights(head, img, txt)
    present = torch.tensor([0, 1, 2, 4])
    assert torch.allclose(weights["image"][present] + weights["text"][present], torch.ones(4))
    assert ((weights["image"] >= 0) & (weights["text"] >= 0)).all()
    complete = torch.tensor([0, 4])
    assert ((0 < weights["image"][complete]) & (weights["image"][complete] < 1)).all()  # a real mix


def _toy_batch(informative: str, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two classes; only one modality carries the label (a shift along a fixed direction), the other is noise."""
    y = torch.randint(0, 2, (n,), generator=g)
    direction = torch.tensor([1.0, -1.0] * 4)  # not constant: the projections start with a LayerNorm
    signal = torch.randn(n, 8, generator=g) + 0.5 * (2 * y[:, None] - 1) * direction
    noise = torch.randn(n, 8, generator=g)
    image, text = (signal, noise) if informative == "image" else (noise, signal)
    return torch.cat([image, torch.randn(n, 8, generator=g)], 1), text, y


def _train_toy(informative: str, seed: int = 0, steps: int = 150) -> tuple[torch.nn.Module, float, float]:
    """Fresh samples every step, so the noise modality cannot be memorised; returns (head, text weight, accuracy)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    head = create_head("attention", image_dim=16, text_dim=8, num_classes=2, proj_dim=32, hidden_dim=32,
                       dropout=0.0)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
    held_out = _toy_batch(informative, 512, g)
    head.train()
    for _ in range(steps):
        img, txt, y = _toy_batch(informative, 128, g)
        loss = torch.nn.functional.cross_entropy(head(img, txt), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    head.eval()
    with torch.no_grad():
        img, txt, y = held_out
        accuracy = (head(img, txt).argmax(1) == y).float().mean().item()
        return head, head.attention_weights(img, txt)["text"].mean().item(), accuracy


@pytest.mark.parametrize("informative", ["text", "image"])
def test_attention_moves_toward_the_modality_that_carries_the_label(informative):
    _, text_weight, accuracy = _train_toy(informative)
    assert accuracy > 0.8  # it learned the toy problem...
    if informative == "text":  # ...and attends to the modality that solves it (the image case is the control)
        assert text_weight > 0.6
    else:
        assert text_weight < 0.4


def test_attention_head_trains_deterministically():
    head_a, weight_a, _ = _train_toy("text", seed=3, steps=20)
    head_b, weight_b, _ = _train_toy("text", seed=3, steps=20)
    assert weight_a == weight_b
    for a, b in zip(head_a.state_dict().values(), head_b.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_attention_head_survives_int8_dynamic_quantization():
    """registry.quantize serves the head with every nn.Linear in int8 (fusionops.predict)."""
    torch.manual_seed(0)
    head = create_head("attention", image_dim=12, text_dim=5, num_classes=3).eval()
    img, txt = _batch_with_gaps()
    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(head), {torch.nn.Linear}, dtype=torch.qint8)
    with torch.inference_mode():
        out, q_out = head(img, txt), quantized(img, txt)
    assert torch.isfinite(q_out).all() and torch.allclose(out, q_out, atol=0.05)
