"""The train stage: a fusion head on the cached vectors, plus the same head on each modality alone (ablations).

Training returns the model and its history; it logs nothing to MLflow (registration is a later, separate step).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.progress import TextColumn
from sklearn.metrics import accuracy_score

from fusionops.atomic import atomic_dir, atomic_path, write_json
from fusionops.calibration import fit_temperature
from fusionops.config import FeaturesParams, TextFinetuneParams, TrainParams
from fusionops.device import autocast_dtype, resolve_device
from fusionops.errors import DataError, UserError
from fusionops.explain import write_neighbours
from fusionops.features import FeatureSet
from fusionops.features.extract import text_vectors
from fusionops.features.text import TextEncoder, build_text_encoder, write_encoder_folder
from fusionops.labels import LabelTask, known_labels, macro_f1, tune_thresholds
from fusionops.models import TEXT_ENCODER_DIR, create_head, save_model
from fusionops.progress import progress_bar
from fusionops.text_tuning import TextTable, TunedText, parameter_groups, text_batches

log = logging.getLogger(__name__)

# The fused model and, for the ablation in evaluate, the same head trained on one modality.
VARIANTS = {"fusion": ("image", "text"), "image_only": ("image",), "text_only": ("text",)}


@dataclass
class SplitData:
    image: torch.Tensor
    text: torch.Tensor
    y: torch.Tensor
    item_ids: list[str]


def split_data(prepared: pd.DataFrame, features: FeatureSet, task: LabelTask, split: str) -> SplitData:
    """The rows of one split, as tensors; y: class indices, or a 0/1 matrix items x tags (multi-label)."""
    if features.item_ids != prepared["item_id"].tolist():
        raise DataError("features do not match the prepared manifest (rows differ): run `fusionops features` again")
    mask = (prepared["split"] == split).to_numpy()
    return SplitData(
        image=torch.from_numpy(features.image[mask]),
        text=torch.from_numpy(features.text[mask]),
        y=task.targets(prepared.loc[mask, "label"], what=f"items of the {split} split",
                       ids=prepared.loc[mask, "item_id"].tolist()),
        item_ids=prepared.loc[mask, "item_id"].tolist(),
    )


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def head_dtype(device: torch.device) -> torch.dtype | None:
    """AMP for the head on a GPU; on the CPU the head is tiny and fp32 is exact and fast."""
    return autocast_dtype(device) if device.type == "cuda" else None


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, image: torch.Tensor, text: torch.Tensor, *,
                   device: torch.device | str = "cpu", batch_size: int = 1024) -> torch.Tensor:
    device = torch.device(device)
    dtype = head_dtype(device)
    model.eval()
    out = []
    for start in range(0, max(len(image), 1), batch_size):  # an empty input still yields (0, classes)
        img = image[start:start + batch_size].to(device, non_blocking=True)
        txt = text[start:start + batch_size].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out.append(model(img, txt).float().cpu())
    return torch.cat(out)


def _save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path | None) -> dict | None:
    """The last epoch's state, or None. weights_only: a checkpoint file can hold tensors, never code."""
    if path is None or not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged checkpoint costs a restart, never a wrong model
        log.warning("ignoring unreadable checkpoint %s (%s): training from the start", path, err)
        return None


def drop_modalities(image: torch.Tensor, text: torch.Tensor, rate: float,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero one modality (image or text, evenly) of a `rate` share of the items: a missing modality at inference is
    a zero vector, and the head learns to classify from what is left."""
    drop = torch.rand(len(image), generator=generator) < rate
    image_side = torch.rand(len(image), generator=generator) < 0.5
    return image * ~(drop & image_side)[:, None], text * ~(drop & ~image_side)[:, None]


def lr_scheduler(optimizer: torch.optim.Optimizer, params: TrainParams):
    """The learning rate per epoch (stepped after each): a linear warm-up over train.lr_warmup_epochs, then
    constant, cosine (down to 0 at max_epochs) or plateau (halved after more than patience // 3 epochs without a
    better validation macro-F1)."""
    from torch.optim import lr_scheduler as sched

    warmup = min(params.lr_warmup_epochs, params.max_epochs - 1)
    if params.lr_schedule == "plateau":
        # Its own warm-up would need a second scheduler; plateau reacts to validation, so it starts at train.lr.
        return sched.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=max(1, params.patience // 3))

    def factor(epoch: int) -> float:  # epoch 0 = the first one
        if epoch < warmup:
            return (epoch + 1) / (warmup + 1)
        if params.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / max(1, params.max_epochs - warmup)))
        return 1.0

    return sched.LambdaLR(optimizer, factor)


def train_epoch(model, optimizer, scaler, loss_fn, data: SplitData, batches: list[torch.Tensor], *,
                device: torch.device, dtype, modality_dropout: float = 0.0,
                generator: torch.Generator | None = None) -> float:
    """One pass over `batches` (item positions in `data`); the mean training loss per item."""
    model.train()
    total, count = 0.0, 0
    for idx in batches:
        img, txt = data.image[idx], data.text[idx]
        if modality_dropout > 0:
            img, txt = drop_modalities(img, txt, modality_dropout, generator)
        img, txt, y = (t.to(device, non_blocking=True) for t in (img, txt, data.y[idx]))
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(model(img, txt), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total += loss.item() * len(idx)
        count += len(idx)
    return total / count


@dataclass
class TextTuning:
    """What fine-tuning the text encoder starts from: the pretrained encoder, the manifest's distinct texts (the
    `text` of a SplitData then holds rows of the table, not vectors), and how it trains."""

    encoder: TextEncoder
    table: TextTable
    params: TextFinetuneParams

    def split(self, data: SplitData, texts: list[str]) -> SplitData:
        """`data` with its items' texts as table rows."""
        return SplitData(image=data.image, text=self.table.ids(texts), y=data.y, item_ids=data.item_ids)


def fit(train: SplitData, val: SplitData, task: LabelTask, params: TrainParams, *, modalities: tuple[str, ...],
        name: str = "fusion", checkpoint: Path | None = None,
        tuning: TextTuning | None = None) -> tuple[torch.nn.Module, pd.DataFrame, dict]:
    """Train one head with AdamW and early stopping on validation macro-F1; return the best epoch's model.

    Multi-label (`task.multi`): binary cross-entropy, and validation decides at probability 0.5 (the per-tag
    thresholds are tuned once the model is chosen).

    With `checkpoint`, the state after every epoch (weights, optimizer, random generators, best so far) is saved
    there, and a run that finds one continues from it: a killed run resumes and ends with the same model as an
    uninterrupted one.

    With `tuning` (a text-only head), the text encoder trains with the head: `train.text` and `val.text` are rows
    of tuning.table, each step encodes its batch's distinct texts, the rates, epochs, warm-up and patience are
    train.text_finetune's, and the model returned is a TunedText (encoder + head).
    """
    generator = seed_everything(params.seed)
    device = resolve_device(params.device)
    dtype = head_dtype(device)
    if tuning is not None:
        if modalities != ("text",):
            raise ValueError(f"the text encoder tunes with a text-only head, not with {modalities}")
        ft = tuning.params
        params = params.model_copy(update={"max_epochs": ft.max_epochs, "patience": ft.patience,
                                           "lr_warmup_epochs": ft.warmup_epochs, "lr_schedule": "cosine"})
    text_dim = tuning.encoder.dim if tuning is not None else train.text.shape[1]
    model = create_head(params.head, image_dim=train.image.shape[1], text_dim=text_dim,
                        num_classes=len(task.labels), proj_dim=params.proj_dim, hidden_dim=params.hidden_dim,
                        dropout=params.dropout, modalities=modalities)
    if tuning is None:
        groups = model.parameters()
    else:
        model = TunedText(copy.deepcopy(tuning.encoder.model), model, tuning.table, tuning.encoder.pooling)
        groups = parameter_groups(model, tuning.params.head_lr, tuning.params)
    model = model.to(device)
    optimizer = torch.optim.AdamW(groups, lr=params.lr, weight_decay=params.weight_decay)
    scheduler = lr_scheduler(optimizer, params)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    prior = None if task.multi else torch.bincount(train.y, minlength=len(task.labels)).float() / len(train.y)
    loss_fn = task.loss(params.label_smoothing, prior=prior, adjustment=params.logit_adjustment)
    state = {"epoch": 0, "finished": False, "best": {"epoch": 0, "val_macro_f1": -1.0, "val_accuracy": 0.0},
             "best_state": None, "history": "[]"}
    saved = _load_checkpoint(checkpoint)
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        scheduler.load_state_dict(saved["scheduler"])
        generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])  # dropout draws from the global generator...
        if device.type == "cuda" and saved.get("cuda_rng"):
            torch.cuda.set_rng_state_all(saved["cuda_rng"])  # ...or, on a GPU, from the CUDA ones
        state = {k: saved[k] for k in state}
        log.info("%s: resuming from the checkpoint after epoch %d", name, state["epoch"])
    history = json.loads(state["history"])
    with progress_bar(TextColumn("{task.fields[status]}"), unit=None) as bar:
        epochs_bar = bar.add_task(f"train {name}", total=params.max_epochs, completed=state["epoch"], status="")
        for epoch in range(state["epoch"] + 1, params.max_epochs + 1):
            if state["finished"]:
                break
            if tuning is None:
                batches = list(torch.randperm(len(train.y), generator=generator).split(params.batch_size))
            else:  # every item of a text in one batch: one forward pass per distinct text
                batches = text_batches(train.text, tuning.table.lengths, tuning.params.batch_texts, generator)
            loss = train_epoch(model, optimizer, scaler, loss_fn, train, batches, device=device, dtype=dtype,
                               generator=generator,
                               modality_dropout=params.modality_dropout if len(modalities) > 1 else 0.0)
            if math.isnan(loss) or (math.isinf(loss) and not scaler.is_enabled()):  # fp16: the scaler recovers
                raise UserError(f"training {name} diverged: the loss is {loss} at epoch {epoch} "
                                f"(train.lr={params.lr}): lower train.lr")
            val_pred = task.decide_logits(predict_logits(model, val.image, val.text, device=device))
            val_y = val.y.numpy().astype(val_pred.dtype)  # multi-label: both 0/1 matrices
            f1 = macro_f1(val_y, val_pred)
            acc = float(accuracy_score(val_y, val_pred))  # multi-label: the share of items with every tag right
            history.append({"epoch": epoch, "train_loss": loss, "val_accuracy": acc, "val_macro_f1": f1,
                            "lr": optimizer.param_groups[0]["lr"]})
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(f1)
            else:
                scheduler.step()
            bar.update(epochs_bar, advance=1, status=f"loss {loss:.3f}  val macro-F1 {f1:.3f}")
            if f1 > state["best"]["val_macro_f1"]:
                state["best"] = {"epoch": epoch, "val_macro_f1": f1, "val_accuracy": acc}
                state["best_state"] = copy.deepcopy(model.state_dict())
            state["epoch"] = epoch
            state["finished"] = epoch - state["best"]["epoch"] >= params.patience or epoch == params.max_epochs
            if state["finished"] and epoch < params.max_epochs:
                bar.update(epochs_bar, status=f"stopped early: best val macro-F1 {state['best']['val_macro_f1']:.3f} "
                                              f"at epoch {state['best']['epoch']}, no better in {params.patience} "
                                              "epochs (train.patience)")
            if checkpoint is not None:
                _save_checkpoint(checkpoint, {
                    **state, "history": json.dumps(history), "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else []})
    model.load_state_dict(state["best_state"])
    best = state["best"]
    log.debug("%s: best epoch %d of %d, val macro-F1 %.4f", name, best["epoch"], state["epoch"], best["val_macro_f1"])
    return model.cpu().eval(), pd.DataFrame(history), best


def _run_key(prepared: pd.DataFrame, features: FeatureSet, params: TrainParams, separator: str | None) -> str:
    """What a checkpoint belongs to: the data, its vectors, the label mode and every training parameter."""
    h = hashlib.sha256(f"labels {separator!r}".encode())
    h.update(pd.util.hash_pandas_object(prepared[["item_id", "label", "split"]], index=False).to_numpy().tobytes())
    h.update(features.image.tobytes())
    h.update(features.text.tobytes())
    h.update(params.model_dump_json(exclude={"out_dir", "history", "checkpoint_dir", "device"}).encode())
    return h.hexdigest()[:16]


def calibrate(model: torch.nn.Module, val: SplitData, task: LabelTask) -> tuple[float, LabelTask]:
    """What turns the trained head's logits into served decisions, fitted on validation: the temperature (serving
    divides the logits by it: calibrated confidences, the same argmax; fusionops.calibration) and, multi-label,
    each tag's threshold (the best F1 on the calibrated probabilities)."""
    logits = predict_logits(model, val.image, val.text)
    temperature = round(fit_temperature(logits, val.y), 4)
    if not task.multi:
        return temperature, task
    thresholds = tune_thresholds(task.probabilities(logits, temperature), val.y.numpy())
    return temperature, LabelTask(task.labels, separator=task.separator, thresholds=thresholds)


def training_labels(prepared: pd.DataFrame, separator: str | None = None) -> list[str]:
    """The classes (multi-label: tags) a model trained on this manifest predicts: its train split's, sorted.
    Refuses a manifest with an empty train or val split, or fewer than 2 labels."""
    for split in ("train", "val"):
        if not (prepared["split"] == split).any():
            raise DataError(f"the {split} split is empty: add data or change split.train / split.val in params.yaml")
    labels = sorted(known_labels(prepared[prepared["split"] == "train"], separator))
    if len(labels) < 2:
        raise DataError(f"the train split holds {len(labels)} label(s); at least 2 are needed to train a classifier")
    return labels


@dataclass
class _Trained:
    model: torch.nn.Module  # the head: what runs on the vectors
    history: pd.DataFrame
    best: dict
    seconds: float
    features: FeatureSet  # the vectors it was trained on (with a tuned encoder's text vectors)
    text_encoder: Path | None = None  # the tuned text encoder's folder, saved with the model


def finetune_text(prepared: pd.DataFrame, features: FeatureSet, task: LabelTask, params: TrainParams,
                   features_params: FeaturesParams, checkpoints: Path) -> _Trained:
    """The text encoder tuned with the text-only head (train.text_encoder: finetune), and every item's text vector
    by the tuned encoder, through the cache under its own key space (evaluate, predict and serving reuse them)."""
    base = build_text_encoder(features_params.text)
    if base.id != features.encoders["text"]["id"]:
        raise UserError(f"features.text names the text encoder {base.id}, but the vectors in "
                        f"{features_params.out_dir} come from {features.encoders['text']['id']}: run `dvc repro` "
                        "(the features stage first)")
    tuning = TextTuning(base, TextTable(prepared["text"].tolist(), base), params.text_finetune)
    data = {split: tuning.split(split_data(prepared, features, task, split),
                                prepared.loc[prepared["split"] == split, "text"].tolist())
            for split in ("train", "val")}
    started = time.perf_counter()
    model, history, best = fit(data["train"], data["val"], task, params, modalities=("text",), name="text_only",
                               checkpoint=checkpoints / "text_only.pt", tuning=tuning)
    folder = checkpoints / TEXT_ENCODER_DIR
    write_encoder_folder(model.encoder, base, folder)
    tuned = build_text_encoder(features_params.text.model_copy(update={"model": str(folder)}))
    precision = features.encoders["text"]["precision"]  # the features stage's, as serving will compute them
    vectors, _ = text_vectors(prepared["text"].tolist(), tuned, features_params, precision=precision)
    record = {"id": tuned.id, "dim": tuned.dim, "weights_sha256": tuned.weights_sha256, "precision": precision,
              **features_params.text.model_dump(mode="json"), "model": TEXT_ENCODER_DIR, "bundled": True,
              "tuned_from": base.id}
    tuned_features = FeatureSet(features.item_ids, features.image, vectors, {**features.encoders, "text": record})
    log.info("text encoder tuned: best epoch %d, val macro-F1 %.4f; encoder id %s", best["epoch"],
             best["val_macro_f1"], tuned.id)
    return _Trained(model.head, history, best, time.perf_counter() - started, tuned_features, folder)


def train(prepared: pd.DataFrame, features: FeatureSet, params: TrainParams, *, separator: str | None = None,
          resume: bool = True, features_params: FeaturesParams | None = None) -> dict:
    """Train the fused head and the one-modality ablations; write them under params.out_dir.

    `separator`: multi-label mode (data.separator): label cells are tag lists joined by it.
    `resume`: continue from this run's checkpoints when a killed run left them; False discards them first.
    `features_params`: with train.text_encoder finetune, the text encoder to start from and where and how its
    tuned vectors are computed and cached. The encoder is tuned with the text-only head first; the fused head then
    trains on its vectors, and both models carry the tuned encoder (the image-only one has no use for it)."""
    task = LabelTask(training_labels(prepared, separator), separator=separator)
    labels = task.labels
    checkpoints = Path(params.checkpoint_dir) / _run_key(prepared, features, params, separator)
    if not resume and checkpoints.exists():
        log.info("discarding the checkpoints of an unfinished run (%s): training from the start", checkpoints)
        shutil.rmtree(checkpoints)
    trained: dict[str, _Trained] = {}
    tuned = features
    if params.text_encoder == "finetune":
        if features_params is None:
            raise ValueError("train.text_encoder finetune needs the features params (features_params=...)")
        trained["text_only"] = finetune_text(prepared, features, task, params, features_params, checkpoints)
        tuned = trained["text_only"].features
    for variant, modalities in VARIANTS.items():
        if variant in trained:
            continue
        use = tuned if "text" in modalities else features
        started = time.perf_counter()
        model, history, best = fit(split_data(prepared, use, task, "train"), split_data(prepared, use, task, "val"),
                                   task, params, modalities=modalities, name=variant,
                                   checkpoint=checkpoints / f"{variant}.pt")
        trained[variant] = _Trained(model, history, best, time.perf_counter() - started, use,
                                    trained["text_only"].text_encoder if use is not features else None)
    summary, train_seconds = {}, {}
    for variant, modalities in VARIANTS.items():
        run = trained[variant]
        train_data, val_data = (split_data(prepared, run.features, task, s) for s in ("train", "val"))
        temperature, decides = calibrate(run.model, val_data, task)
        config = {
            "head": params.head,
            "head_kwargs": {"image_dim": train_data.image.shape[1], "text_dim": train_data.text.shape[1],
                            "num_classes": len(labels), "proj_dim": params.proj_dim,
                            "hidden_dim": params.hidden_dim, "dropout": params.dropout,
                            "modalities": list(modalities)},
            "labels": labels,
            "encoders": run.features.encoders,
            "best_epoch": run.best["epoch"],
            "val_macro_f1": run.best["val_macro_f1"],
            "val_accuracy": run.best["val_accuracy"],
            "temperature": temperature,
            **decides.config(),
        }
        save_model(model_dir(params.out_dir, variant), run.model, config, text_encoder=run.text_encoder)
        if variant == "fusion":  # for `fusionops explain`: the nearest training items of what it explains
            write_neighbours(model_dir(params.out_dir, variant), run.model, train_data.image, train_data.text,
                             prepared.loc[prepared["split"] == "train", ["item_id", "label", "image", "text"]])
        summary[variant] = run.best
        train_seconds[variant] = round(run.seconds, 2)  # this process's share when it resumed from a checkpoint
    # One file per variant, so `dvc plots show` draws one curve per variant.
    with atomic_dir(params.history) as tmp:
        for variant in VARIANTS:
            trained[variant].history.to_csv(tmp / f"{variant}.csv", index=False)
    # Wall-clock time lives outside the models and metrics, so the same data and seed reproduce them byte for byte.
    write_json(params.timing, {"train_seconds": train_seconds})
    shutil.rmtree(checkpoints, ignore_errors=True)  # every variant is saved: nothing left to resume
    return summary


def model_dir(out_dir: Path, variant: str = "fusion") -> Path:
    """models/fusion for the fused head, models/ablations/<variant> for the one-modality heads."""
    return Path(out_dir) / ("fusion" if variant == "fusion" else f"ablations/{variant}")
