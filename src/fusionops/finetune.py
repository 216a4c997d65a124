"""Optional fine-tuning of the image backbone's last stage (`fusionops finetune`; a GPU is recommended).

It fits the content-addressed pipeline instead of bypassing it: the result is a state-dict file for
`features.image.weights`. Its sha256 is part of the encoder id, so the features stage computes the fine-tuned vectors
under a new cache key space and keeps the old ones (switching back costs nothing).

What trains -- the last stage and everything the forward runs after it -- is found by one rule for timm and
torchvision models (`last_stage`):
  1. From the model, descend into the child module with the deepest nesting of parameters while exactly one child
     has it: the stage container (timm `blocks` / `stages` / `layers`, torchvision
     `features`, `encoder.layers`, `trunk_output`; or the model itself, e.g. a ResNet's layer1..layer4).
  2. The last stage is the container's deepest child that the forward runs last (a block group, not a lone head
     conv).
  3. Every parameter of a module the forward first runs after the stage began trains too (head conv, final norm,
     pre-logits layers); everything before stays frozen and runs under no_grad.
Examples: tf_efficientnet_lite0 -> blocks.6 + conv_head + bn2 (timm's last `group_matcher(coarse=True)` group);
ResNet -> layer4; ViT -> blocks.11 + norm; ConvNeXt -> stages.3 + head.norm; torchvision EfficientNet -> features.7 +
features.8. BatchNorm layers keep their running statistics (the whole backbone runs in eval mode: small batches give
poor statistics); their scale and shift train.

Training: a linear probe on the frozen pooled features first (the "before" score, and the classifier's starting
point: linear probing then fine-tuning distorts pretrained features less), then AdamW on the last stage plus that
classifier, early stopping on validation macro-F1. The images go through the encoder's own eval preprocessing
(`pixels` + `normalize`, as in the features stage), without augmentation (emoji are not flip-invariant). Only the
train split trains and only validation selects: the test split stays unseen. The backbone has seen the train labels,
though, so the fusion head's train vectors are easier than new ones: judge it by validation and test metrics.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from rich.progress import TextColumn
from sklearn.metrics import accuracy_score

from fusionops.atomic import atomic_path, write_json
from fusionops.config import ImageEncoderParams
from fusionops.device import autocast_dtype, precision_name, resolve_device
from fusionops.errors import DataError, UserError
from fusionops.features.image import ImageEncoder, Pixels, build_image_encoder
from fusionops.labels import LabelTask, macro_f1
from fusionops.progress import progress_bar
from fusionops.train import training_labels

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")  # what features.image.weights loads (image._load_state)


def check_out_path(out: Path | str) -> Path:
    """The weights file to write, refused before any work when the features stage could not load it."""
    out = Path(out)
    if out.suffix not in WEIGHT_SUFFIXES:
        raise UserError(f"--out {out}: unknown weights format {out.suffix or '(no suffix)'!r}; "
                        f"use {' or '.join(WEIGHT_SUFFIXES)}")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: give a file name such as {out / 'finetuned.safetensors'}")
    return out


def report_path(out: Path | str) -> Path:
    """The JSON report written next to the weights: <out>.json."""
    return Path(f"{out}.json")


# ------------------------------------------------------------------------------------------------ which part trains

@dataclass
class LastStage:
    stage: str  # the stage module, e.g. blocks.6
    modules: list[str]  # the unfrozen modules, outermost names, in forward order: blocks.6, conv_head, bn2
    parameters: list[str]  # every trainable parameter name
    entry: str  # the first trainable module the forward calls: gradients start at its input


def _depth(module: torch.nn.Module) -> int:
    """How deeply the module nests its parameters (0: its own, like a Conv2d); -1 without parameters."""
    return max((name.count(".") for name, _ in module.named_parameters()), default=-1)


def _size(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _call_order(model: torch.nn.Module, input_size: tuple[int, int, int]) -> dict[str, int]:
    """Module name -> the rank of its first call in one forward pass (modules never called are absent)."""
    order: dict[str, int] = {}

    def record(name: str):
        def hook(module, args) -> None:
            order.setdefault(name, len(order))
        return hook

    handles = [m.register_forward_pre_hook(record(name)) for name, m in model.named_modules()]
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(1, *input_size, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return order


def last_stage(model: torch.nn.Module, input_size: tuple[int, int, int]) -> LastStage:
    """The backbone's last stage and what runs after it (see the module docstring); works on the meta device."""
    order = _call_order(model, input_size)

    def first_call(prefix: str) -> int | None:
        ranks = [r for n, r in order.items() if n == prefix or n.startswith(f"{prefix}.")]
        return min(ranks) if ranks else None

    name, container = "", model
    while True:
        kids = [(f"{name}.{n}" if name else n, m) for n, m in container.named_children() if _depth(m) >= 0]
        if not kids:
            raise UserError(f"cannot find stages in {type(model).__name__}: it has no submodules with parameters")
        deepest = max(_depth(m) for _, m in kids)
        top = [(n, m) for n, m in kids if _depth(m) == deepest]
        if len(top) == 1 and deepest > 0 and not any(  # not a wrapper when siblings are stages like it, shallower
                type(m) is type(top[0][1]) and _depth(m) >= deepest - 1 for n, m in kids if n != top[0][0]):
            name, container = top[0]
            continue
        called = [(first_call(n), n) for n, _ in top if first_call(n) is not None]
        if not called:
            raise UserError(f"cannot find the last stage of {type(model).__name__}: its forward calls none of "
                            f"{', '.join(n for n, _ in top)}")
        start, stage = max(called)
        break

    def trainable_owner(owner: str) -> bool:
        inside = owner == stage or owner.startswith(f"{stage}.")
        return inside or (owner in order and order[owner] > start)

    parameters = [p for p, _ in model.named_parameters() if trainable_owner(p.rpartition(".")[0])]
    chosen = set(parameters)
    # Describe them by their outermost modules whose parameters all train (blocks.6, conv_head, bn2).
    modules: list[str] = []
    for p in parameters:
        owner = p.rpartition(".")[0]
        parts = owner.split(".")
        for i in range(1, len(parts) + 1):
            candidate = ".".join(parts[:i])
            if all(f"{candidate}.{n}" in chosen for n, _ in model.get_submodule(candidate).named_parameters()):
                break
        if candidate not in modules:
            modules.append(candidate)
    modules.sort(key=lambda m: first_call(m) if first_call(m) is not None else len(order))
    entry = min((n for n in order if any(n == m or n.startswith(f"{m}.") for m in modules)), key=order.get)
    return LastStage(stage=stage, modules=modules, parameters=parameters, entry=entry)


class _Tail:
    """The backbone's forward with gradients only from its entry module on, and able to start there.

    `capture(x)` runs the whole model without gradients and also returns the entry module's input. `run(h,
    replay=True)` feeds a captured entry input `h` to the rest of the model: a forward pre-hook on the entry swaps it
    in for what a one-item dummy input computed up to there, so a training step costs only the part that trains.
    `run(x, replay=False)` runs the whole model on `x`, the frozen part under no_grad (when the entry's inputs are
    not kept: too large, or a graph where replaying changes the output).
    """

    def __init__(self, model: torch.nn.Module, entry: torch.nn.Module, input_size: tuple[int, ...]):
        self.model = model
        self.dummy = torch.zeros(1, *input_size, device=next(model.parameters()).device)
        self.grad, self.feed, self.seen = False, None, None
        self.handle = entry.register_forward_pre_hook(self._at_entry)

    def _at_entry(self, module, args):
        if self.seen is not None:
            self.seen.append(args[0])
        if self.grad:
            torch.set_grad_enabled(True)  # the enclosing no_grad() restores the previous mode on exit
        if self.feed is not None:
            return (self.feed, *args[1:])
        return None

    def capture(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the model's output, the entry's input; None if the forward called the entry more than once, or its
        input is not one tensor)."""
        self.seen = []
        try:
            with torch.no_grad():
                out = self.model(x)
        finally:
            seen, self.seen = self.seen, None
        return out, seen[0] if len(seen) == 1 and isinstance(seen[0], torch.Tensor) else None

    def run(self, x: torch.Tensor, *, replay: bool, grad: bool = False) -> torch.Tensor:
        self.grad, self.feed = grad, x if replay else None
        try:
            with torch.no_grad():
                return self.model(self.dummy if replay else x)
        finally:
            self.grad, self.feed = False, None


# ------------------------------------------------------------------------------------------------------------ data

class _Images(torch.utils.data.Dataset):
    """(uint8 pixels, target: a class index, or a 0/1 row of tags): the features stage's decoding and eval
    preprocessing."""

    def __init__(self, paths: list[Path], labels: torch.Tensor, pixels: Pixels):
        self.paths, self.labels, self.pixels = paths, labels, pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return self.pixels.one(self.paths[i]), self.labels[i]
        except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
            raise DataError(f"cannot read image {self.paths[i]} ({err}): run `fusionops validate`") from None

    def collate(self, items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = zip(*items, strict=True)
        return self.pixels.batch(images), torch.stack(labels)


def _split(prepared: pd.DataFrame, images_root: Path,
           separator: str | None) -> tuple[LabelTask, dict[str, tuple[list[Path], torch.Tensor]]]:
    missing = [c for c in ("item_id", "image", "label", "split") if c not in prepared.columns]
    if missing:
        raise DataError(f"the prepared manifest lacks column(s) {', '.join(missing)}: run `fusionops prepare` again")
    task = LabelTask(training_labels(prepared, separator), separator=separator)
    root = Path(images_root).resolve()
    data = {}
    for split in ("train", "val"):
        rows = prepared[prepared["split"] == split]
        targets = task.targets(rows["label"], what=f"items of the {split} split", ids=rows["item_id"].tolist())
        paths = [root / p for p in rows["image"]]
        absent = [i for i, p in zip(rows["item_id"], paths, strict=True) if not p.is_file()]
        if absent:
            raise DataError(f"{len(absent)} image(s) not found under {root} (first: row {absent[0]!r}): "
                            "check data.images_root, or run `fusionops validate` to list them")
        data[split] = paths, targets
    return task, data


# ------------------------------------------------------------------------------------------------------ training

def _to_input(encoder: ImageEncoder, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    batch = pixels.to(device, non_blocking=True)
    return encoder.normalize(batch)


@dataclass
class _Frozen:
    """One split through the frozen backbone, once: pooled features (float32, CPU) for the linear probe, targets,
    and the entry's inputs (None when they are not kept) for the training epochs."""

    pooled: torch.Tensor
    y: torch.Tensor
    entry_inputs: torch.Tensor | None


def _replays(tail: _Tail, x: torch.Tensor, out: torch.Tensor, entry_input: torch.Tensor | None) -> bool:
    """True if starting at the entry with its captured input gives the model's output (checked on one batch)."""
    if entry_input is None:
        return False
    with torch.no_grad():
        again = tail.run(entry_input, replay=True)
    return again.shape == out.shape and torch.allclose(again.float(), out.float(), rtol=1e-3,
                                                       atol=1e-3 * float(out.float().abs().max()))


def _freeze(tail: _Tail, encoder, loader, device, dtype, keep_bytes: int, on_batch) -> _Frozen:
    """Run `loader`'s images (in order) through the whole backbone; keep the entry's inputs if they replay and fit
    in `keep_bytes`."""
    pooled, ys = [], []
    n, done, kept = len(loader.dataset), 0, None
    for pixels, y in loader:
        x = _to_input(encoder, pixels, device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out, entry_input = tail.capture(x)
            if done == 0:  # the first batch decides
                size = 0 if entry_input is None else entry_input[0].nelement() * entry_input.element_size()
                if 0 < size * n <= keep_bytes and _replays(tail, x, out, entry_input):
                    kept = torch.empty((n, *entry_input.shape[1:]), dtype=entry_input.dtype)
                else:
                    log.info("the frozen part runs in every epoch (its outputs would take %.2f GB, %s)", size * n / 1e9,
                             "more than --keep-gb" if size else "not replayable")
        if kept is not None and entry_input is not None and entry_input.shape[1:] == kept.shape[1:]:
            kept[done:done + len(y)] = entry_input
        elif kept is not None:
            log.info("the frozen part runs in every epoch (the last stage's input changed at item %d)", done)
            kept = None
        pooled.append(out.float().cpu())
        ys.append(y)
        done += len(y)
        on_batch(len(y))
    return _Frozen(torch.cat(pooled), torch.cat(ys), kept)


class _Order(torch.utils.data.Sampler):
    """An epoch's batches of item indices, read alike by the images' DataLoader and by the kept entry inputs: a seed
    gives the same batches whichever is fed. In item order until `shuffle`."""

    def __init__(self, n: int, batch_size: int):
        self.n, self.batch_size = n, batch_size
        self.batches = list(torch.arange(n).split(batch_size))

    def shuffle(self, generator: torch.Generator) -> None:
        self.batches = list(torch.randperm(self.n, generator=generator).split(self.batch_size))

    def __iter__(self):
        return (batch.tolist() for batch in self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _macro_f1(task: LabelTask, y: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """Validation macro-F1 and accuracy (multi-label: tags at probability 0.5, items with every tag right)."""
    pred = task.decide_logits(logits)
    y = y.numpy().astype(pred.dtype)
    return macro_f1(y, pred), float(accuracy_score(y, pred))


def fit_probe(train_x, train_y, val_x, val_y, task: LabelTask, *, seed: int = 0, max_epochs: int = 300,
              patience: int = 30, lr: float = 1e-3) -> tuple[torch.nn.Linear, float, float]:
    """A linear classifier on fixed features (AdamW, early stopping on validation macro-F1): (model, F1, accuracy)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probe = torch.nn.Linear(train_x.shape[1], len(task.labels))
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    loss_fn = task.loss()
    best = (-1.0, 0.0, copy.deepcopy(probe.state_dict()), 0)
    for epoch in range(1, max_epochs + 1):
        order = torch.randperm(len(train_y), generator=generator)
        for start in range(0, len(order), 256):
            idx = order[start:start + 256]
            loss = loss_fn(probe(train_x[idx]), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            f1, acc = _macro_f1(task, val_y, probe(val_x))
        if f1 > best[0]:
            best = (f1, acc, copy.deepcopy(probe.state_dict()), epoch)
        elif epoch - best[3] >= patience:
            break
    probe.load_state_dict(best[2])
    return probe, best[0], best[1]


def _batches(frozen: _Frozen, loader, order: _Order, encoder, device):
    """(input, targets, replay) per batch of `order`: the kept entry inputs, else the images from `loader`."""
    if frozen.entry_inputs is None:
        for pixels, y in loader:
            yield _to_input(encoder, pixels, device), y.to(device, non_blocking=True), False
        return
    for idx in order.batches:
        yield (frozen.entry_inputs[idx].to(device, non_blocking=True), frozen.y[idx].to(device, non_blocking=True),
               True)


def _train_epoch(tail: _Tail, head, batches, optimizer, scaler, loss_fn, *, device, dtype, on_batch) -> float:
    total, count = 0.0, 0
    for x, y, replay in batches:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(head(tail.run(x, replay=replay, grad=True)), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total += loss.item() * len(y)
        count += len(y)
        on_batch(len(y))
    return total / max(count, 1)


@torch.no_grad()
def _evaluate(tail: _Tail, head, batches, task: LabelTask, *, device, dtype, on_batch) -> tuple[float, float]:
    logits, ys = [], []
    for x, y, replay in batches:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits.append(head(tail.run(x, replay=replay)).float().cpu())
        ys.append(y.cpu())
        on_batch(len(y))
    return _macro_f1(task, torch.cat(ys), torch.cat(logits))


# ----------------------------------------------------------------------------------------------------------- output

def _original_state(image_params: ImageEncoderParams, backbone: torch.nn.Module) -> tuple[dict, Path]:
    """The full state dict of the current weights file, in the backbone's own key layout (what load() accepts)."""
    from fusionops.features.image import _weights_file, timm_state

    path = _weights_file(image_params)
    return timm_state(path, image_params.backbone, backbone), path


def _save_weights(out: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Atomically: a killed or failed run leaves no partial file at `out` (and an older file there untouched)."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    with atomic_path(out) as tmp:
        if out.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata={"format": "pt", **metadata})
        else:
            torch.save(state, tmp)


def finetune(prepared: pd.DataFrame, images_root: Path | str, image_params: ImageEncoderParams, *,
             out: Path | str, epochs: int = 10, lr: float = 1e-4, batch_size: int = 64, device: str = "auto",
             patience: int = 3, seed: int = 0, progress: bool = True, separator: str | None = None,
             keep_gb: float = 4.0) -> dict:
    """Fine-tune the backbone of `image_params` (its last stage, see `last_stage`) with a linear classifier on the
    train split of `prepared`; early stopping on validation macro-F1. Write the best epoch's backbone to `out`
    (every key of the original weights file, only the trained parameters changed) and a report to <out>.json.

    The frozen part runs once per image: its outputs (the last stage's inputs) are kept in memory when they take at
    most `keep_gb` (tf_efficientnet_lite0 at 224 px: 19 KB per image in bf16), and each epoch runs only the part
    that trains. Returns the report.
    """
    from fusionops.features.extract import loader_workers

    out = check_out_path(out)
    if epochs < 1 or batch_size < 1 or lr <= 0 or patience < 1:
        raise UserError("epochs, batch size and patience must be at least 1, and the learning rate above 0")
    started = time.perf_counter()
    label_task, data = _split(prepared, images_root, separator)
    device_ = resolve_device(device)
    dtype = autocast_dtype(device_)
    encoder = build_image_encoder(image_params)
    backbone = encoder.load().eval()
    original, base_path = _original_state(image_params, backbone)
    input_size = tuple(encoder.pixels([data["train"][0][0]]).shape[1:])
    stage = last_stage(backbone, input_size)
    trainable = set(stage.parameters)
    missing = [k for k in backbone.state_dict() if k not in original]
    if missing:  # never write a file the encoder could not load back
        raise UserError(f"cannot map the backbone's keys onto {base_path} (e.g. {missing[0]!r})")
    for name, p in backbone.named_parameters():
        p.requires_grad_(name in trainable)
    backbone = backbone.to(device_).to(memory_format=torch.channels_last)
    tail = _Tail(backbone, backbone.get_submodule(stage.entry), input_size)
    log.info("unfrozen: %s (%d of %d parameters)", ", ".join(stage.modules),
             sum(p.numel() for p in backbone.parameters() if p.requires_grad), _size(backbone))

    workers = loader_workers("auto")  # resolved before the progress bar starts its thread
    generator = torch.Generator().manual_seed(seed)

    orders = {split: _Order(len(data[split][1]), batch_size) for split in ("train", "val")}
    loaders = {split: torch.utils.data.DataLoader(
        images, batch_sampler=orders[split], collate_fn=images.collate, num_workers=workers,
        persistent_workers=workers > 0, pin_memory=device_.type == "cuda")
        for split, images in ((s, _Images(*data[s], encoder.pixels)) for s in ("train", "val"))}

    n_train, n_val = len(data["train"][1]), len(data["val"][1])
    history: list[dict] = []
    columns = TextColumn("loss {task.fields[loss]:.3f}  val macro-F1 {task.fields[f1]:.3f}")
    with progress_bar(columns, unit="img", disable=not progress) as bar:
        task = bar.add_task("frozen part (probe)", total=n_train + n_val, loss=float("nan"), f1=float("nan"))
        step = lambda n: bar.advance(task, n)  # noqa: E731
        share = {"train": n_train / (n_train + n_val), "val": n_val / (n_train + n_val)}
        frozen = {split: _freeze(tail, encoder, loaders[split], device_, dtype, int(keep_gb * 1e9 * share[split]), step)
                  for split in ("train", "val")}
        head, f1_before, acc_before = fit_probe(frozen["train"].pooled, frozen["train"].y, frozen["val"].pooled,
                                                frozen["val"].y, label_task, seed=seed)
        bar.update(task, f1=f1_before)
        probe_seconds = round(time.perf_counter() - started, 2)
        log.info("linear probe on the frozen backbone: val macro-F1 %.4f", f1_before)

        head = head.to(device_)
        optimizer = torch.optim.AdamW([p for p in backbone.parameters() if p.requires_grad] + list(head.parameters()),
                                      lr=lr, weight_decay=0.01)
        scaler = torch.amp.GradScaler(device_.type, enabled=dtype == torch.float16)
        loss_fn = label_task.loss()
        best = {"epoch": 0, "val_macro_f1": -1.0, "val_accuracy": 0.0, "state": None}
        for epoch in range(1, epochs + 1):
            t0 = time.perf_counter()
            task = bar.add_task(f"epoch {epoch}/{epochs}", total=n_train + n_val, loss=float("nan"), f1=float("nan"))
            step = lambda n, task=task: bar.advance(task, n)  # noqa: E731
            orders["train"].shuffle(generator)
            train = _batches(frozen["train"], loaders["train"], orders["train"], encoder, device_)
            loss = _train_epoch(tail, head, train, optimizer, scaler, loss_fn, device=device_, dtype=dtype,
                                on_batch=step)
            val = _batches(frozen["val"], loaders["val"], orders["val"], encoder, device_)
            f1, acc = _evaluate(tail, head, val, label_task, device=device_, dtype=dtype, on_batch=step)
            bar.update(task, loss=loss, f1=f1)
            seconds = round(time.perf_counter() - t0, 2)
            history.append({"epoch": epoch, "train_loss": round(loss, 5), "val_macro_f1": round(f1, 5),
                            "val_accuracy": round(acc, 5), "seconds": seconds})
            log.info("epoch %d: train loss %.4f, val macro-F1 %.4f (%.1f s)", epoch, loss, f1, seconds)
            if f1 > best["val_macro_f1"]:
                best = {"epoch": epoch, "val_macro_f1": f1, "val_accuracy": acc,
                        "state": {n: p.detach().cpu().clone() for n, p in backbone.named_parameters()
                                  if p.requires_grad}}
            elif epoch - best["epoch"] >= patience:
                break
    tail.handle.remove()

    state = dict(original)
    for name, value in best["state"].items():
        state[name] = value.to(original[name].dtype)
    _save_weights(out, state, {"backbone": image_params.backbone, "base_weights_sha256": encoder.weights_sha256,
                               "unfrozen": ",".join(stage.modules), "best_epoch": str(best["epoch"])})
    tuned = build_image_encoder(image_params.model_copy(update={"weights": str(out.resolve())}))
    report = {
        "backbone": image_params.backbone,
        "weights": str(out.resolve()),
        "weights_sha256": tuned.weights_sha256,
        "encoder_id": tuned.id,
        "base_weights": str(base_path),
        "base_weights_sha256": encoder.weights_sha256,
        "base_encoder_id": encoder.id,
        "unfrozen": stage.modules,
        "unfrozen_rule": "the last stage (last deepest child of the stage container) and every module the forward "
                         "runs after it; BatchNorm statistics frozen",
        "trainable_parameters": sum(best["state"][n].numel() for n in best["state"]),
        "total_parameters": _size(backbone),
        "labels": label_task.labels,
        "train_items": n_train,
        "val_items": n_val,
        "epochs": len(history),
        "max_epochs": epochs,
        "best_epoch": best["epoch"],
        "val_macro_f1_before": round(f1_before, 5),  # linear probe on the frozen backbone
        "val_accuracy_before": round(acc_before, 5),
        "val_macro_f1_after": round(best["val_macro_f1"], 5),  # fine-tuned last stage + classifier, best epoch
        "val_accuracy_after": round(best["val_accuracy"], 5),
        "history": history,
        "lr": lr,
        "batch_size": batch_size,
        "patience": patience,
        "seed": seed,
        "device": device_.type,
        "precision": precision_name(dtype),
        "seconds": round(time.perf_counter() - started, 2),
        "probe_seconds": probe_seconds,  # loading, frozen features of train + val, fitting the probe
        "frozen_part_kept": all(f.entry_inputs is not None for f in frozen.values()),  # else it ran every epoch
        "seconds_per_epoch": round(sum(h["seconds"] for h in history) / len(history), 2),
    }
    write_json(report_path(out), report)
    return report
