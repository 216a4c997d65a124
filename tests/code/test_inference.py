import logging

import pytest
import torch
from torch import nn

from fusionops.features.inference import SamePadConv2d, for_inference


def _randomise_norms(model: nn.Module) -> nn.Module:
    """Fresh models have running mean 0, variance 1: folding them would be a no-op. Give every norm real statistics."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t, low, high in ((m.running_mean, -1, 1), (m.running_var, 0.5, 2), (m.weight, 0.5, 1.5),
                                     (m.bias, -0.5, 0.5)):
                    t.copy_(torch.empty(t.shape).uniform_(low, high, generator=generator))
    return model.eval()


@pytest.mark.parametrize("kernel, stride", [(3, 2), (5, 2), (3, 1), (5, 1), (2, 2)])
@pytest.mark.parametrize("height, width", [(224, 224), (57, 56), (13, 28)])
def test_same_padding_in_the_convolution_matches_timm(kernel, stride, height, width):
    from timm.layers.conv2d_same import Conv2dSame

    timm_conv = Conv2dSame(8, 8, kernel, stride, groups=8, bias=True)
    ours = SamePadConv2d(8, 8, kernel, stride, groups=8, bias=True)
    ours.load_state_dict(timm_conv.state_dict())
    x = torch.randn(2, 8, height, width)
    with torch.no_grad():
        expected, got = timm_conv(x), ours(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [(224, 224), (227, 199)])
def test_lite0_for_inference_has_no_batch_norm_nor_pad_and_the_same_output(image_encoder, size):
    from timm.layers.conv2d_same import Conv2dSame

    reference = image_encoder.model
    fast = for_inference(reference, torch.randn(2, 3, 224, 224))
    assert not any(isinstance(m, nn.BatchNorm2d | Conv2dSame) for m in fast.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in reference.modules())  # the original is left as it was
    x = torch.randn(3, 3, *size)  # another size than the example: the padding follows the input
    with torch.no_grad():
        torch.testing.assert_close(fast(x), reference(x), rtol=1e-4, atol=1e-4)


def test_torchvision_resnet_folds_too():
    import torchvision

    model = _randomise_norms(torchvision.models.resnet18(weights=None))
    fast = for_inference(model, torch.randn(2, 3, 64, 64))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)


class _SharedOutput(nn.Module):
    """The convolution's output is read by its batch norm and by the sum after it: folding would change the sum."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.norm(y) + y


def test_a_graph_folding_would_change_is_used_as_it_is(caplog):
    model = _randomise_norms(_SharedOutput())
    with caplog.at_level(logging.WARNING, logger="fusionops.features.inference"):
        assert for_inference(model, torch.randn(2, 3, 16, 16)) is model
    assert "running it as it is" in caplog.text


class _SharedWeights(nn.Module):
    """One convolution and its batch norm applied twice: folding the pair would scale the second use twice."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.other, self.other_norm = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.other_norm(self.other(self.norm(self.conv(self.norm(self.conv(x))))))


def test_shared_weights_are_left_alone_and_the_rest_folds():
    model = _randomise_norms(_SharedWeights())
    fast = for_inference(model, torch.randn(2, 3, 16, 16))
    assert fast is not model and isinstance(fast.norm, nn.BatchNorm2d) and isinstance(fast.other_norm, nn.Identity)
    x = torch.randn(2, 3, 20, 20)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)


class _SlightlyShared(_SharedOutput):
    def forward(self, x):
        y = self.conv(x)
        return self.norm(y) + 1e-3 * y  # small, and still more than rounding: folding would be wrong


def test_a_small_difference_is_not_taken_for_rounding():
    model = _randomise_norms(_SlightlyShared())
    assert for_inference(model, torch.randn(2, 3, 16, 16)) is model
