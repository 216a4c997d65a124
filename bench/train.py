"""Training speed: one epoch of the fusion head on the cached vectors against one naive end-to-end epoch.

    python bench/train.py [--json] [--params params.yaml] [--cached-epochs 10] [--naive-batches 8]

Needs the prepared manifest and the cached vectors (`dvc repro features`); neither is changed. Both epochs are
measured in this one run, on the same training items, with train.batch_size and train.modality_dropout from params:

  cached   what `fusionops train` does per epoch (fusionops.train.train_epoch: the real head, AdamW, loss), on the
           vectors in features.out_dir. One warm-up epoch, then the median of --cached-epochs timed epochs.
  naive    per batch, as tutorial code does: every image opened and decoded with PIL and preprocessed one at a time
           (the encoder's own transform), the CNN and the transformer run in fp32, NCHW, without the cache, then
           the same head's forward, backward and step. The encoders are frozen (no_grad), as in the cached setup.
           The image files are read once beforehand, so the OS cache holds them (disk speed is not measured: a
           cold first read would only make the naive figure slower). One warm-up batch (not timed), then the first
           --naive-batches batches of the shuffled epoch (default 8 = 1024 items: over 30 s on 2 cores at the
           ~10-15 items/s seen; 0 = the whole epoch, 22 batches at batch size 128). When fewer than the whole
           epoch are timed, the time per item is extrapolated to every training item; the JSON says so
           (naive_measured_items < items, naive_extrapolated true).

The last line of output is a JSON object:

  cached_epoch_s, naive_epoch_s      seconds per epoch over every training item
  cached_items_s, naive_items_s      training items per second
  speedup_vs_naive_epoch             naive_epoch_s / cached_epoch_s (goal >= 50)
  items, naive_measured_items        training items; items the naive loop actually ran on
  batch_size, device, threads, modality_dropout, image_size, cached_epochs_s (every timed cached epoch)
  loadavg_1min                       the machine's 1-minute load average before and after: above the thread count,
                                     other processes shared the cores and every figure is slower than it would be
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from pathlib import Path

import torch
from _cli import parser as bench_parser
from _cli import report, trained_on

from fusionops.device import resolve_device
from fusionops.features.image import build_image_encoder
from fusionops.features.text import build_text_encoder
from fusionops.labels import LabelTask
from fusionops.models import create_head
from fusionops.train import drop_modalities, head_dtype, seed_everything, split_data, train_epoch


def new_head(train_params, image_dim: int, text_dim: int, task: LabelTask, device: torch.device):
    """The head, optimizer, scaler and loss exactly as fusionops.train.fit builds them."""
    model = create_head(train_params.head, image_dim=image_dim, text_dim=text_dim, num_classes=len(task.labels),
                        proj_dim=train_params.proj_dim, hidden_dim=train_params.hidden_dim,
                        dropout=train_params.dropout, modalities=("image", "text")).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_params.lr, weight_decay=train_params.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=head_dtype(device) == torch.float16)
    loss_fn = task.loss(train_params.label_smoothing)
    return model, optimizer, scaler, loss_fn


def cached_epochs(train, task: LabelTask, train_params, device: torch.device, epochs: int) -> list[float]:
    """Seconds of each of `epochs` timed epochs of fusionops.train.train_epoch, after one warm-up epoch."""
    generator = seed_everything(train_params.seed)
    model, optimizer, scaler, loss_fn = new_head(train_params, train.image.shape[1], train.text.shape[1],
                                                 task, device)
    times = []
    for epoch in range(epochs + 1):
        start = time.perf_counter()
        batches = list(torch.randperm(len(train.y), generator=generator).split(train_params.batch_size))
        train_epoch(model, optimizer, scaler, loss_fn, train, batches, device=device, dtype=head_dtype(device),
                    modality_dropout=train_params.modality_dropout, generator=generator)
        if epoch:  # epoch 0 is the warm-up
            times.append(time.perf_counter() - start)
    return times


def naive_epoch(image_paths: list[Path], texts: list[str], y: torch.Tensor, image_encoder, text_encoder,
                task: LabelTask, train_params, device: torch.device, max_batches: int) -> tuple[float, int]:
    """(seconds, items) of the end-to-end loop over the first `max_batches` batches (0 = all), after one warm-up
    batch. Everything a tutorial does per batch is inside the timed region."""
    from PIL import Image

    # Palette PNGs with transparency warn on convert("RGB"); the naive loop converts like tutorial code does.
    warnings.filterwarnings("ignore", message="Palette images with Transparency", category=UserWarning)
    generator = seed_everything(train_params.seed)
    cnn = image_encoder.model.to(device).to(memory_format=torch.contiguous_format).float().eval()
    transformer = text_encoder.model.to(device).float().eval()
    tokenizer = text_encoder.tokenizer
    model, optimizer, _, loss_fn = new_head(train_params, image_encoder.dim, text_encoder.dim, task, device)
    batch_size = train_params.batch_size

    def step(idx: torch.Tensor) -> None:
        with torch.no_grad():
            pixels = torch.stack([image_encoder.transform(Image.open(image_paths[i]).convert("RGB")) for i in idx])
            image = cnn(pixels.to(device))
            tokens = tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                               max_length=text_encoder.max_length, return_tensors="pt").to(device)
            hidden = transformer(**tokens).last_hidden_state
            mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            text = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)
        model.train()
        image, text = drop_modalities(image.cpu(), text.cpu(), train_params.modality_dropout, generator)
        loss = loss_fn(model(image.to(device), text.to(device)), y[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()

    order = torch.randperm(len(y), generator=generator)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    timed = batches[:max_batches] if max_batches > 0 else batches
    for idx in timed:
        for i in idx:
            image_paths[i].read_bytes()  # into the OS cache: decoding is timed, the disk is not
    step(batches[0])  # warm-up: first-call allocations, lazy initialisation
    start = time.perf_counter()
    for idx in timed:
        step(idx)
    return time.perf_counter() - start, sum(len(idx) for idx in timed)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--cached-epochs", type=int, default=10, help="timed cached epochs (after one warm-up)")
    parser.add_argument("--naive-batches", type=int, default=8,
                        help="timed naive batches, extrapolated per item to the epoch (0 = the whole epoch)")
    args = parser.parse_args()

    params, prepared, features, task = trained_on(args.params)
    train = split_data(prepared, features, task, "train")
    rows = prepared[prepared["split"] == "train"]
    root = Path(params.data.images_root)
    device = resolve_device(params.train.device)
    items = len(train.y)
    load_before = os.getloadavg()[0]

    times = cached_epochs(train, task, params.train, device, args.cached_epochs)
    cached = statistics.median(times)

    image_encoder = build_image_encoder(params.features.image)
    text_encoder = build_text_encoder(params.features.text)
    seconds, measured = naive_epoch([root / p for p in rows["image"]], rows["text"].tolist(), train.y,
                                    image_encoder, text_encoder, task, params.train, device,
                                    args.naive_batches)
    naive = seconds / measured * items

    result = {
        "items": items, "batch_size": params.train.batch_size, "device": device.type,
        "threads": torch.get_num_threads(), "head": params.train.head,
        "modality_dropout": params.train.modality_dropout, "image_size": params.features.image.image_size,
        "cached_epoch_s": round(cached, 4), "cached_epochs_s": [round(t, 4) for t in times],
        "cached_items_s": round(items / cached, 1),
        "naive_epoch_s": round(naive, 2), "naive_measured_items": measured, "naive_measured_s": round(seconds, 2),
        "naive_extrapolated": measured < items, "naive_items_s": round(items / naive, 1),
        "speedup_vs_naive_epoch": round(naive / cached, 1),
        # Other processes on the same cores slow both loops (the cached one most: many small ops, 2 threads).
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "goals": {"speedup_vs_naive_epoch": ">= 50"},
    }
    report(result, json_only=args.json)


if __name__ == "__main__":
    main()
